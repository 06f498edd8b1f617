"""Smoke test of experiments/ot_fusion on a tiny configuration (real mfeat data)."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("ot")


@pytest.mark.registry("mfeat")
def test_ot_fusion_core_runs():
    from experiments.ot_fusion.run import OTConfig, format_report, run_experiment

    cfg = OTConfig(seeds=(0,), epochs=1, dim=16, depth=1, hetero_dim=12, regs=(0.08,), samples=40, subsample=200)
    threads = torch.get_num_threads()
    (res,) = run_experiment(cfg, log=lambda _: None)
    assert torch.get_num_threads() == threads
    assert {"parent A", "vanilla average (VF)", "OT acts, EMD", "OT acts, Sinkhorn 0.08", "logit ensemble"} <= set(res)
    for name, r in res.items():
        assert 0.0 <= r["oneshot"] <= 1.0, name
        assert math.isnan(r["finetuned"]) == (name == "logit ensemble")
    assert res["OT acts, EMD"]["fuse_s"] > 0
    report = format_report([res], cfg, "cmd", 1.0)
    assert "| OT acts, EMD |" in report and "fusion s" in report

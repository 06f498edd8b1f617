"""Smoke test of experiments/bam on a tiny configuration (real mfeat data)."""

from __future__ import annotations

import pytest


@pytest.mark.registry("mfeat")
def test_bam_core_runs():
    from experiments.bam.run import DOMAINS, BAMConfig, format_report, run_experiment

    cfg = BAMConfig(seeds=(0,), dim=8, depth=1, heads=2, seed_steps=3, specialist_steps=2, mix_steps=2, subsample=200)
    (res,) = run_experiment(cfg, log=lambda _: None)
    assert len([n for n in res["acc"] if n.startswith("specialist")]) == len(DOMAINS)
    for name, acc in res["acc"].items():
        assert set(acc) == {*DOMAINS, "mean"} and all(0.0 <= v <= 1.0 for v in acc.values()), name
    assert res["ms_per_step"]["dense seed, continued"] > 0
    assert res["params"]["BAM (FFN + attention experts, K/V per expert)"] > res["params"]["BAM, shared K/V"]
    for shares in res["usage"].values():
        assert abs(sum(shares) - 1) < 1e-6 and len(shares) == 4
    assert "| BTX (FFN experts, attention averaged) |" in format_report([res], cfg, "cmd", 1.0)

"""Smoke test of ``experiments/moh/run.py`` (MoH vs MHA char LM) on a tiny configuration."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from attnfuse.nn import MixtureOfHeadAttention

README = Path(__file__).resolve().parents[2] / "experiments" / "moh" / "README.md"


@pytest.mark.registry("womens_clothing")
def test_moh_experiment_core_runs():
    from experiments.moh.run import ARMS, MoHConfig, build, format_report, run_experiment

    arms = ("MHA-8 (100 %)", "MHA-4 (4 heads of 8; 50 % of the heads)", "MoH-50 % (2 shared + top-2 of 6)")
    cfg = MoHConfig(seeds=(0,), steps=2, tune_steps=1, val_batches=1, batch=4, max_chars=30_000, arms=arms)
    threads = torch.get_num_threads()
    (res,) = run_experiment(cfg)
    assert torch.get_num_threads() == threads
    assert set(res["arms"]) == set(arms)
    for arm, r in res["arms"].items():
        assert 0 < r["bpc"] < 10 and r["ms_step"] > 0
        assert r["active"] == pytest.approx(0.5 if "50" in arm and "MoH" in arm else 1.0)
    assert math.isnan(res["arms"][arms[0]]["imbalance"]) and res["arms"][arms[2]]["imbalance"] >= 1.0
    assert set(res["arms"][arms[2]]["fwd_ms"]) == {"dense", "sparse"}
    assert set(res["tuned"]) == {"MHA-8, tuned further", "→ MoH-50 %, tuned", "→ MoH-75 %, tuned"}
    assert "| MoH-50 % (2 shared + top-2 of 6) |" in format_report([res], cfg, "cmd", 1.0)
    # every arm builds: the MoH arms hold MoH layers with the documented head counts
    model, beta = build("MoH-88 % (2 shared + top-5 of 6)", 30, cfg)
    layers = [m for m in model.modules() if isinstance(m, MixtureOfHeadAttention)]
    assert len(layers) == cfg.depth and layers[0].active_fraction == pytest.approx(7 / 8) and beta == 0.01
    assert len(ARMS) == 7


def test_readme_names_the_command():
    text = README.read_text()
    assert "python -m experiments.moh.run" in text and "## Results" in text

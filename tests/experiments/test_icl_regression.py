"""Smoke test and invariants of experiments/icl_regression (tiny configuration; the real run is the README's)."""

from __future__ import annotations

import torch
from experiments.icl_regression.run import (
    ICLConfig,
    ICLRegression,
    _plots,
    baselines,
    format_report,
    make_prompts,
    pattern_report,
    run_experiment,
)


def test_tiny_run_gives_tables_patterns_and_plots(tmp_path):
    arms = {"1 head": ("softmax", "sum", 1), "2 heads": ("softmax", "sum", 2), "4 heads": ("softmax", "sum", 4),
            "linear": ("linear", "none", 2)}
    cfg = ICLConfig(seeds=(0, 1), steps=40, batch=64, n_test=400, test_lens=(10, 20), arms=arms)
    res = run_experiment(cfg)
    assert set(res["errors"]) == set(arms) and all(len(res["errors"][a][20]) == 2 for a in arms)
    assert len(res["patterns"]) == 2 and len(res["patterns"][0]["omega"]) == 4
    b = res["baselines"][20]
    assert b["ridge"] < b["gd"] < b["gd_fixed"] + 1e-12  # Bayes beats one-step GD; the re-tuned step is the best step
    report = format_report(res, cfg, "cmd", 1.0)
    assert "| 4 heads |" in report and "ridge" in report and "±" in report
    paths = _plots(res, cfg, tmp_path)
    assert [p.name for p in paths] == ["patterns.png", "error_vs_length.png"] and all(p.stat().st_size > 0 for p in paths)


def test_one_step_gd_matches_its_closed_form():
    """Spec invariant 7: best one-step GD error sigma^2 + d (d + 1 + sigma^2) / (L + d + 1 + sigma^2) = 1.440 (d=5, L=20)."""
    x, y, xq, yq = make_prompts(20_000, 20, 5, 0.5, torch.Generator().manual_seed(0))
    res = baselines(x, y, xq, yq, 0.5)
    closed = 0.25 + 5 * (6 + 0.25) / (20 + 6 + 0.25)
    assert abs(res["gd"] / closed - 1) < 0.03
    assert abs(res["gd_eta"] - 20 / 26.25) < 0.05


def test_zero_sum_label_heads_ignore_a_label_shift_and_one_head_does_not():
    """Spec invariant 3: OV_h = mu_h e_{d+1}, sum mu = 0, labels out of the scores -> a constant label shift changes nothing."""
    d = 3
    model = ICLRegression(d, 2, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model.KQ[:, d, :] = 0  # labels do not enter the scores
        model.OV.zero_()
        model.OV[:, d] = torch.tensor([0.7, -0.7])
    x, y, xq, _ = make_prompts(16, 8, d, 0.1, torch.Generator().manual_seed(1))
    torch.testing.assert_close(model(x, y + 2.5, xq), model(x, y, xq))
    torch.testing.assert_close(model(x, 3 * y, xq), 3 * model(x, y, xq))  # linear in the labels
    with torch.no_grad():
        model.OV[1, d] = 0.0
    torch.testing.assert_close(model(x, y + 2.5, xq) - model(x, y, xq), torch.full((16,), 0.7 * 2.5))
    rep = pattern_report(model)
    assert rep["ov_x_max"] == 0 and rep["label_row_max"] == 0


def test_context_permutation_and_duplication():
    model = ICLRegression(4, 3, generator=torch.Generator().manual_seed(0))
    x, y, xq, _ = make_prompts(8, 6, 4, 0.5, torch.Generator().manual_seed(1))
    out = model(x, y, xq)
    perm = torch.randperm(6)
    torch.testing.assert_close(model(x[:, perm], y[:, perm], xq), out)
    torch.testing.assert_close(model(torch.cat([x, x], 1), torch.cat([y, y], 1), xq), out)  # softmax: duplication-invariant
    lin = ICLRegression(4, 3, similarity="linear", normalize="none", generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(lin(torch.cat([x, x], 1), torch.cat([y, y], 1), xq), 2 * lin(x, y, xq))  # unnormalised doubles

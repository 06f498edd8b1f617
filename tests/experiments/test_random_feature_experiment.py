"""Smoke test of experiments/random_feature (tiny configuration; the real run is the README's)."""

from __future__ import annotations

import torch
from experiments.random_feature.run import TARGETS, RFConfig, _plots, format_report, ridge_path, run_experiment, sphere_data


def test_tiny_run_separates_the_means_and_writes_tables_and_plot(tmp_path):
    cfg = RFConfig(seeds=(0,), heads=32, n_train=600, n_val=200, n_test=300, sweep_n=(300, 600), sweep_heads=(8, 32),
                   sweep_means=(0.0, 1.0, 2.0))
    res = run_experiment(cfg)
    exp = res["main"]["exp"]
    assert exp[2.0][0] < 0.5 * exp[0.0][0]  # the mean 2I carries the alignment: far lower error already at this size
    assert set(res["by_mean"]) == {0.0, 1.0, 2.0} and all(len(v) == 1 for v in res["by_mean"].values())
    assert res["by_heads"][2.0][32] == exp[2.0]  # the full-width entry is the main fit
    report = format_report(res, cfg, "cmd", 1.0)
    assert "2I + Gaussian" in report and "|---|" in report
    (path,) = _plots(res, cfg, tmp_path)
    assert path.stat().st_size > 0


def test_ridge_path_recovers_a_linear_target_and_targets_are_key_permutation_invariant():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 1, dtype=torch.float64)
    y = x @ w
    rel, lam = ridge_path(x[:200], y[:200], x[200:250], y[200:250], x[250:], y[250:], [1e-9, 1e-3, 1.0])
    assert rel[0] < 1e-8 and lam[0] == 1e-9
    x0, xs = sphere_data(4, 6, 8, g)
    assert torch.allclose(xs.norm(dim=-1), torch.full((4, 6), 8**0.5, dtype=torch.float64))
    for fn in TARGETS.values():
        torch.testing.assert_close(fn(x0, xs[:, torch.randperm(6)]), fn(x0, xs))

"""Smoke tests of the quality experiments (``benchmarks/quality_*.py``) on tiny configurations.

They run each experiment's core function end to end in a few seconds, so the scripts cannot rot
silently; the numbers themselves are checked only for range and structure.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from benchmarks._quality import auroc, fmt_mean_std, write_doc_section

from attnfuse.data.catalog import is_cached


def test_auroc_matches_sklearn_with_ties():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    score = rng.integers(0, 5, size=200).astype(float)  # many ties
    positive = rng.random(200) < 0.3
    assert auroc(score, positive) == pytest.approx(metrics.roc_auc_score(positive, score), abs=1e-12)
    assert math.isnan(auroc(score[positive], np.ones(positive.sum(), bool)))  # no negatives
    assert auroc(np.array([0.1, 0.9]), np.array([False, True])) == 1.0
    assert auroc(np.array([0.9, 0.1]), np.array([False, True])) == 0.0


def test_fmt_mean_std_and_doc_section(tmp_path):
    assert fmt_mean_std([1.0, 3.0], digits=1) == "2.0 ± 1.4"
    assert fmt_mean_std([math.nan]) == "n/a"
    doc = tmp_path / "results.md"
    write_doc_section("A", "first", doc)
    write_doc_section("B", "second\n\n### sub\n\nmore", doc)
    write_doc_section("A", "replaced", doc)
    text = doc.read_text()
    assert text.startswith("# Results")
    assert "first" not in text and text.count("## A") == 1 and "replaced" in text
    assert text.index("## A") < text.index("## B") and "### sub\n\nmore" in text


@pytest.mark.skipif(not is_cached("mfeat"), reason="mfeat is not in the attnfuse cache (needs the package registry)")
def test_evidential_mfeat_core_runs():
    from benchmarks.quality_evidential_mfeat import METHODS, EvidentialConfig, format_report, run_experiment

    torch.manual_seed(0)
    cfg = EvidentialConfig(seeds=(0,), epochs=2, anneal_epochs=1, hidden=8, concat_hidden=8, views=("fou", "mor"), subsample=300)
    threads = torch.get_num_threads()
    results = run_experiment(cfg)
    assert torch.get_num_threads() == threads  # restored after the single-threaded run
    (res,) = results
    assert set(res["summary"]) == set(METHODS) and set(res["per_view"]) == {"fou", "mor"}
    for m in METHODS:
        s = res["summary"][m]
        assert 0.0 <= s["acc_clean"] <= 1.0 and 0.0 <= s["acc_corrupt"] <= 1.0
        assert math.isnan(s["auroc_corrupt_vs_clean"]) or 0.0 <= s["auroc_corrupt_vs_clean"] <= 1.0
    # the two Dempster rows share their predictions (only the uncertainty differs)
    assert res["summary"]["dempster"]["acc_corrupt"] == res["summary"]["dempster_maxp"]["acc_corrupt"]
    report = format_report([("tiny", results)], cfg, "cmd", 1.0)
    assert "| Dempster fusion of evidential heads (u = K/S) |" in report


def test_survival_core_runs():
    pytest.importorskip("sksurv")
    pytest.importorskip("lifelines")
    from benchmarks.quality_survival import SurvivalConfig, format_report, load_gse7390, run_experiment, stratified_folds

    _, _, event = load_gse7390()
    folds = stratified_folds(event, 5, seed=0)
    assert sorted(np.bincount(folds).tolist()) == [39, 39, 40, 40, 40]
    assert all(abs(event[folds == f].sum() - event.sum() / 5) <= 1 for f in range(5))  # stratified by event

    cfg = SurvivalConfig(seeds=(0,), max_folds=1, event_weights=(3.0,), penalizer_sensitivity=(), max_epochs=3, patience=2, dim=8)
    results = run_experiment(cfg, log=lambda _: None)
    assert {"coxph|clinical|0.1", "coxph|genes|0.1", "coxph|both|0.1", "coattention|both|3", "concat_mlp|both|3"} == set(results)
    for recs in results.values():
        assert len(recs) == 1 and 0.0 <= recs[0]["c_index"] <= 1.0
    assert results["coxph|both|0.1"][0]["c_index"] > 0.55  # the Cox PH baseline learns something on one fold
    report = format_report(results, cfg, "cmd", 1.0)
    assert "reference points" in report.lower() and "0.678" in report

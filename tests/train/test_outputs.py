"""Outputs and run folders (issue 14, items 10, 11): predictions are written atomically and never replace a file
without --overwrite true; one run folder per fit, nothing new for validate / test / predict, no alarming warnings."""

import warnings

import pandas as pd
import pytest
import yaml

from attnfuse.cli import main
from attnfuse.data import make_synthetic_table
from attnfuse.train import FusionPredictor


def _snapshot(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One `attnfuse fit` (CSV logger, as the docs' configs) and the warnings it raised."""
    tmp = tmp_path_factory.mktemp("outputs")
    df, schema = make_synthetic_table(300, seed=0, missing_rate=0.1)
    df.to_csv(tmp / "table.csv", index=False)
    runs = tmp / "runs"
    cfg = {
        "seed_everything": 0,
        "data": {"dataset": "table", "batch_size": 32, "table": {"path": str(tmp / "table.csv"), "schema": schema.to_dict()}},
        "model": {"fusion": {"class_path": "early", "init_args": {"depth": 1, "heads": 2}}, "dim": 16},
        "trainer": {"max_epochs": 2, "default_root_dir": str(runs), "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(runs)}}},
    }
    (tmp / "fit.yaml").write_text(yaml.safe_dump(cfg))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["fit", "--config", str(tmp / "fit.yaml")]) == 0
    (run,) = (runs / "lightning_logs").glob("version_*")
    (ckpt,) = (run / "checkpoints").glob("best-*.ckpt")
    return {"tmp": tmp, "config": tmp / "fit.yaml", "runs": runs, "run": run, "ckpt": ckpt, "df": df,
            "warnings": [str(w.message) for w in caught]}


# ---------------------------------------------------------------- item 11: one run folder per run
def test_fit_writes_one_run_folder_without_the_log_deletion_warning(fitted):
    assert not [w for w in fitted["warnings"] if "will be deleted" in w or "exists and is not empty" in w], fitted["warnings"]
    assert [p.name for p in (fitted["runs"] / "lightning_logs").iterdir()] == [fitted["run"].name]
    for name in ("config.yaml", "split.json", "preprocessor.json", "metrics.csv", "hparams.yaml"):
        assert (fitted["run"] / name).is_file(), name
    metrics = pd.read_csv(fitted["run"] / "metrics.csv")  # the run's logs survive: nothing deleted them
    assert metrics["train_loss"].notna().any() and metrics["val_acc"].notna().any() and metrics["test_acc"].notna().any()


@pytest.mark.parametrize("sub", ["validate", "test", "predict"])
def test_evaluation_creates_no_run_folder_and_prints_its_metrics(fitted, sub, capsys):
    before = _snapshot(fitted["runs"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([sub, "--config", str(fitted["config"]), "--ckpt_path", str(fitted["ckpt"])]) == 0
    assert _snapshot(fitted["runs"]) == before, "validate / test / predict must not create or change run files"
    assert not [w for w in caught if "callbacks used to create the checkpoint" in str(w.message)]
    out = capsys.readouterr().out
    if sub != "predict":
        prefix = "val_" if sub == "validate" else "test_"
        assert f"attnfuse {sub}: {fitted['ckpt']}: {prefix}acc=" in out, out[-2000:]


def test_test_prints_the_metrics_fit_logged(fitted, capsys):
    assert main(["test", "--config", str(fitted["config"]), "--ckpt_path", str(fitted["ckpt"])]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("attnfuse test:"))
    printed = float(line.split("test_acc=")[1].split(",")[0])
    logged = pd.read_csv(fitted["run"] / "metrics.csv")["test_acc"].dropna().iloc[-1]  # fit's test of the best ckpt
    assert printed == pytest.approx(logged, abs=1e-4)


# ---------------------------------------------------------------- item 10: predictions are never silently replaced
def _predict(fitted, out, *extra):
    return main(["predict", "--config", str(fitted["config"]), "--ckpt_path", str(fitted["ckpt"]), "--output", str(out),
                 *extra])


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_predict_refuses_to_replace_an_output_without_overwrite(fitted, suffix, tmp_path, capsys):
    out = tmp_path / f"pred{suffix}"
    out.write_text("precious")
    assert _predict(fitted, out) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if "error:" in x]
    assert str(out) in line and "--overwrite true" in line, line
    assert out.read_text() == "precious"
    assert _predict(fitted, out, "--overwrite", "true") == 0
    table = pd.read_csv(out) if suffix == ".csv" else pd.read_parquet(out)
    assert len(table) == 60 and "prediction" in table.columns
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name], "no temporary files are left behind"


def test_a_failed_write_leaves_the_previous_output_untouched(fitted, tmp_path, monkeypatch):
    out = tmp_path / "pred.csv"
    assert _predict(fitted, out) == 0
    before = out.read_bytes()

    def half_then_fail(self, path, *args, **kwargs):
        with open(path, "w") as f:
            f.write("row,predic")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pd.DataFrame, "to_csv", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        _predict(fitted, out, "--overwrite", "true")
    assert out.read_bytes() == before, "a failed write must not leave half a table in place of the old one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pred.csv"]


def test_predict_output_checks_come_before_predicting(fitted, tmp_path, capsys):
    folder = tmp_path / "a.csv"
    folder.mkdir()
    assert _predict(fitted, folder) == 2
    assert "is a folder" in capsys.readouterr().err
    assert _predict(fitted, tmp_path / "pred.txt") == 2
    assert ".csv or .parquet" in capsys.readouterr().err


def test_predictor_save_and_export_do_not_silently_overwrite(tmp_path):
    df, schema = make_synthetic_table(120, seed=0)
    predictor = FusionPredictor(schema, fusion={"class_path": "early", "init_args": {"heads": 2, "depth": 1}}, dim=16,
                                max_epochs=1, path=tmp_path / "run").fit(df)
    bundle = predictor.save(tmp_path / "bundle")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        predictor.save(bundle)
    predictor.save(bundle, overwrite=True)
    assert sorted(p.name for p in bundle.iterdir()) == ["model.pt", "model.pt.sha256", "predictor.json", "preprocessor.json"]
    pd.testing.assert_series_equal(FusionPredictor.load(bundle).predict(df), predictor.predict(df))
    exported = predictor.export(tmp_path / "model.pt2", df.head(4))
    with pytest.raises(FileExistsError, match="overwrite=True"):
        predictor.export(exported, df.head(4))
    predictor.export(exported, df.head(4), overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no temporary files are left behind"

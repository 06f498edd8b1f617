"""FusionPredictor on SYNTHETIC tables: fit / predict / predict_proba / evaluate for every task type, save / load,
export, missing inputs, string labels and id columns, and the same metrics and predictions as `attnfuse fit`."""

import copy
import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from attnfuse.cli import main
from attnfuse.data import InputSpec, TablePreprocessor, make_synthetic_table
from attnfuse.fusion import EarlyFusion
from attnfuse.train import FusionPredictor
from attnfuse.train.predictor import CONFIG_FILE, WEIGHTS_FILE

TASKS = ("classification", "regression", "multilabel", "survival", "retrieval")
FUSION = {"class_path": "early", "init_args": {"heads": 2, "depth": 1}}
TINY = {"fusion": FUSION, "dim": 16, "batch_size": 32, "max_epochs": 2}
#: the CLI's test metric names of each task (without the test_ prefix)
METRICS = {
    "classification": {"acc", "f1", "auroc", "loss"}, "multilabel": {"acc", "f1", "auroc", "loss"},
    "regression": {"mae", "rmse", "r2", "loss"}, "survival": {"cindex", "loss"}, "retrieval": {"recall@1", "recall@5", "loss"},
}


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """One small predictor per task type, fitted once for the module: ``fitted(task) -> (predictor, df)``."""
    cache = {}

    def get(task):
        if task not in cache:
            df, schema = make_synthetic_table(300, task=task, seed=0)
            path = tmp_path_factory.mktemp(f"pred_{task}")
            cache[task] = FusionPredictor(schema, path=path, **TINY).fit(df), df
        return cache[task]

    return get


@pytest.mark.parametrize("task", TASKS)
def test_fit_predict_evaluate(fitted, task):
    predictor, df = fitted(task)
    new = df.iloc[::-1].head(40).set_axis([f"r{i}" for i in range(40)])  # any index, any order
    pred = predictor.predict(new)
    assert list(pred.index) == list(new.index)
    targets = predictor.schema.target_columns
    if task == "classification":
        assert isinstance(pred, pd.Series) and pred.name == "y" and set(pred) <= {0, 1}
    elif task == "regression":
        assert isinstance(pred, pd.Series) and pred.name == "y" and np.isfinite(pred).all()
    elif task == "survival":
        assert isinstance(pred, pd.Series) and pred.name == "risk" and np.isfinite(pred).all()
    elif task == "multilabel":
        assert list(pred.columns) == targets and set(np.unique(pred.to_numpy())) <= {0, 1}
    else:
        assert list(pred.columns) == [f"emb_{j}" for j in range(32)]
        np.testing.assert_allclose(np.linalg.norm(pred.to_numpy(), axis=1), 1.0, rtol=1e-5)
    if task in ("classification", "multilabel"):
        proba = predictor.predict_proba(new)
        assert list(proba.columns) == predictor.classes and list(proba.index) == list(new.index)
        assert ((proba >= 0) & (proba <= 1)).all().all()
        if task == "classification":
            np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
            assert (proba.idxmax(axis=1) == pred).all()
        else:
            assert ((proba > 0.5).astype(int).to_numpy() == pred.to_numpy()).all()
    else:
        with pytest.raises(ValueError, match="predict_proba is for classification and multilabel"):
            predictor.predict_proba(new)
    metrics = predictor.evaluate(df)
    assert set(metrics) == METRICS[task] and all(np.isfinite(list(metrics.values())))
    assert set(predictor.metrics) == {f"val_{k}" for k in METRICS[task]}
    assert predictor.test_metrics == {}  # test_fraction defaults to 0
    assert predictor.best_checkpoint and predictor.best_checkpoint.endswith(".ckpt")
    run = Path(predictor.fit_summary()["run_dir"])
    assert {"split.json", "preprocessor.json", "metrics.csv"} <= {p.name for p in run.iterdir()}


@pytest.mark.parametrize("task", TASKS)
def test_save_load_predicts_identically(fitted, task, tmp_path):
    predictor, df = fitted(task)
    predictor.save(tmp_path / "bundle")
    config = json.loads((tmp_path / "bundle" / CONFIG_FILE).read_text())
    assert config["fusion"] == {"class_path": "attnfuse.fusion.stacks.EarlyFusion", "init_args": {"heads": 2, "depth": 1}}
    assert config["task"] == predictor.task.describe() and config["options"]["dim"] == 16
    rng = torch.get_rng_state()
    loaded = FusionPredictor.load(tmp_path / "bundle")
    assert torch.equal(torch.get_rng_state(), rng), "loading must not move the global RNG"
    pd.testing.assert_frame_equal(loaded.predict_columns(df), predictor.predict_columns(df))
    assert loaded.evaluate(df) == predictor.evaluate(df)
    assert loaded.classes == predictor.classes and loaded.metrics == predictor.metrics


def test_string_labels_ids_and_class_order(tmp_path):
    df, schema = make_synthetic_table(300, task="classification", seed=1)
    df["y"] = df["y"].map({0: "no", 1: "yes"})
    df.insert(0, "patient", [f"p{i:03d}" for i in range(len(df))])
    predictor = FusionPredictor(schema, id_columns=["patient"], path=tmp_path, **TINY).fit(df)
    assert predictor.classes == ["no", "yes"]
    new = df.drop(columns="y").sample(30, random_state=0)  # shuffled index, no target
    pred = predictor.predict(new)
    assert list(pred.columns) == ["patient", "y"] and list(pred.index) == list(new.index)
    assert (pred["patient"] == new["patient"]).all() and set(pred["y"]) <= {"no", "yes"}
    proba = predictor.predict_proba(new)
    assert list(proba.columns) == ["patient", "no", "yes"]
    cols = predictor.predict_columns(new)
    np.testing.assert_array_equal(proba["yes"], cols["prob_yes"])
    assert (proba[["no", "yes"]].idxmax(axis=1) == pred["y"]).all()
    with pytest.raises(ValueError, match="id column"):
        predictor.predict(new.drop(columns="patient"))
    # the inputs= form of the schema, and string labels through save / load
    again = FusionPredictor(inputs=list(schema.inputs), target="y", id_columns=["patient"], path=tmp_path / "b", **TINY)
    assert again.schema == schema
    predictor.save(tmp_path / "bundle")
    pd.testing.assert_frame_equal(FusionPredictor.load(tmp_path / "bundle").predict_proba(new), proba)


def test_missing_inputs_at_predict_time(fitted):
    predictor, df = fitted("classification")
    vec = [f"vec_{j}" for j in range(8)]
    rows = df.drop(columns="y").head(30)
    absent = predictor.predict_proba(rows.drop(columns=vec))  # the whole input's columns are absent
    nulls = predictor.predict_proba(rows.assign(**{c: np.nan for c in vec}))  # present but null: masked alike
    pd.testing.assert_frame_equal(absent, nulls)
    full = predictor.predict_proba(rows)
    assert not np.allclose(full.to_numpy(), absent.to_numpy())
    metrics = predictor.evaluate(df.drop(columns=vec))
    assert set(metrics) == METRICS["classification"]


def test_same_metrics_and_predictions_as_the_cli(tmp_path):
    df, schema = make_synthetic_table(300, task="classification", seed=0)
    csv = tmp_path / "table.csv"
    df.to_csv(csv, index=False)
    cfg = {
        "seed_everything": 0,
        "data": {"dataset": "table", "table": {"path": str(csv), "schema": schema.to_dict()}, "seed": 0, "batch_size": 32,
                 "val_fraction": 0.15, "test_fraction": 0.2},
        "model": {"fusion": FUSION, "dim": 16},
        "trainer": {"max_epochs": 2, "default_root_dir": str(tmp_path / "cli"), "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "cli")}}},
        "test_after_fit": True,
    }
    (tmp_path / "fit.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["fit", "--config", str(tmp_path / "fit.yaml")]) == 0
    (run,) = (tmp_path / "cli" / "lightning_logs").glob("version_*")
    logged = pd.read_csv(run / "metrics.csv")
    cli = {k: float(v) for k, v in logged.dropna(subset=["test_acc"]).iloc[-1].items() if k.startswith("test_")}

    # the same table file (read as the CLI reads it), settings and seed
    predictor = FusionPredictor(schema, val_fraction=0.15, test_fraction=0.2, seed=0, path=tmp_path / "api", **TINY).fit(csv)
    assert predictor.test_metrics.keys() == cli.keys()
    for key, value in cli.items():
        assert predictor.test_metrics[key] == pytest.approx(value, abs=1e-6), key
    table = pd.read_csv(csv)
    evaluated = predictor.evaluate(table.iloc[predictor.split.test])
    for key, value in cli.items():
        assert evaluated[key.removeprefix("test_")] == pytest.approx(value, abs=1e-6), key
    assert json.loads((run / "split.json").read_text())["test"] == predictor.split.test.tolist()

    # the CLI's predictions from its best checkpoint = the predictor's prediction columns
    (ckpt,) = (run / "checkpoints").glob("best-*.ckpt")
    assert predictor.best_checkpoint.endswith(ckpt.name)
    out = tmp_path / "pred.csv"
    assert main(["predict", "--config", str(tmp_path / "fit.yaml"), "--ckpt_path", str(ckpt), "--data.predict_path", str(csv),
                 "--output", str(out)]) == 0
    written = pd.read_csv(out).drop(columns="row")
    ours = predictor.predict_columns(table)
    assert list(written.columns) == list(ours.columns)
    assert (written["prediction"].to_numpy() == ours["prediction"].to_numpy()).all()
    np.testing.assert_allclose(written[["prob_0", "prob_1"]], ours[["prob_0", "prob_1"]], atol=1e-6)


def test_tuning_df_is_the_validation_set(tmp_path):
    df, schema = make_synthetic_table(300, task="regression", seed=2)
    train, tuning = df.iloc[:240], df.iloc[240:]
    predictor = FusionPredictor(schema, path=tmp_path, **TINY).fit(train, tuning)
    assert predictor.split.train.tolist() == list(range(240)) and predictor.split.val.tolist() == list(range(240, 300))
    assert predictor.metrics["val_rmse"] == pytest.approx(predictor.evaluate(tuning)["rmse"], rel=1e-5)
    own = TablePreprocessor.fit(train, schema)  # preprocessing statistics from train_df only
    assert predictor.preprocessor.stats["num"] == own.stats["num"]
    with pytest.raises(ValueError, match="test_fraction"):
        FusionPredictor(schema, test_fraction=0.2, path=tmp_path, **TINY).fit(train, tuning)


def test_export_gives_the_same_outputs(fitted, tmp_path):
    predictor, df = fitted("classification")
    path = predictor.export(tmp_path / "model.pt2", df.head(8))
    program = torch.export.load(str(path)).module()
    for rows in (df.head(8), df.iloc[50:63]):  # the traced batch size, and another one
        inputs = predictor.model_inputs(rows)
        with torch.no_grad():
            torch.testing.assert_close(program(inputs), predictor.module(inputs), rtol=0, atol=0)
    with torch.no_grad():
        columns = predictor.task.predict(program(predictor.model_inputs(df.head(8))))
    assert list(columns["prediction"]) == list(predictor.predict(df.head(8)))
    if not (importlib.util.find_spec("onnx") and importlib.util.find_spec("onnxscript")):
        with pytest.raises(ImportError, match="pip install onnx onnxscript"):
            predictor.export(tmp_path / "model.onnx", df.head(8), format="onnx")


def test_errors(fitted, tmp_path):
    df, schema = make_synthetic_table(50, task="classification")
    with pytest.raises(RuntimeError, match="not trained"):
        FusionPredictor(schema).predict(df)
    with pytest.raises(ValueError, match="either schema"):
        FusionPredictor(schema, inputs=[InputSpec("num", "numeric", ["num_0"])], target="y")
    assert FusionPredictor(inputs=list(schema.inputs), target="y", task="regression").schema.task == "regression"
    with pytest.raises(ValueError, match="describe the table"):
        FusionPredictor()
    with pytest.raises(KeyError, match="unknown fusion"):
        FusionPredictor(schema, fusion="no_such_fusion")
    with pytest.raises(KeyError, match="unknown task"):
        FusionPredictor(schema, task="no_such_task")
    with pytest.raises(ValueError, match="id_columns"):
        FusionPredictor(schema, id_columns=["y"])
    with pytest.raises(ValueError, match="val_fraction"):
        FusionPredictor(schema, val_fraction=0.6, test_fraction=0.5)

    with pytest.raises(FileNotFoundError, match="no saved FusionPredictor"):
        FusionPredictor.load(tmp_path / "nothing")
    predictor, _ = fitted("classification")
    bundle = predictor.save(tmp_path / "bundle")
    (bundle / WEIGHTS_FILE).write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="corrupt FusionPredictor weights"):
        FusionPredictor.load(bundle)
    (bundle / CONFIG_FILE).write_text("{ not json")
    with pytest.raises(ValueError, match="corrupt FusionPredictor bundle"):
        FusionPredictor.load(bundle)
    (bundle / CONFIG_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="missing"):
        FusionPredictor.load(bundle)
    other = predictor.save(tmp_path / "other")  # weights of another shape
    torch.save({"model.head.weight": torch.zeros(1)}, other / WEIGHTS_FILE)
    (other / f"{WEIGHTS_FILE}.sha256").unlink()  # as if written without a checksum (else: a checksum mismatch)
    with pytest.raises(ValueError, match="corrupt FusionPredictor bundle"):
        FusionPredictor.load(other)
    plain = copy.copy(predictor)
    plain.fusion = EarlyFusion  # a class (what a registered name gives) is saved with empty init_args
    assert json.loads((plain.save(tmp_path / "class") / CONFIG_FILE).read_text())["fusion"]["init_args"] == {}
    unsaveable = copy.copy(predictor)
    unsaveable.fusion = lambda sources, dim: None  # a factory that is no class / partial cannot be written as a config
    with pytest.raises(ValueError, match="cannot save fusion"):
        unsaveable.save(tmp_path / "lambda")

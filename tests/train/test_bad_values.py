"""Bad values and bad tables through the `attnfuse` CLI: inf / float32 overflow, a diverging run, an unwritable
cache, duplicate column names, unknown data.table keys, a one-class target, a table too small for its split,
header-only and empty prediction tables. Each gives a finite run or one `error:` line with exit 2, never a traceback."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import yaml

from attnfuse.cli import main
from attnfuse.data import make_synthetic_table


def _config(tmp_path, df: pd.DataFrame | None = None, *, schema=None, table_extra=None, data_extra=None, epochs: int = 1):
    """A CLI config training early fusion on ``df`` (default: 120 SYNTHETIC rows) written to tmp_path/table.csv."""
    if df is None:
        df, schema = make_synthetic_table(120, seed=0, missing_rate=0.1)
    path = tmp_path / "table.csv"
    if not path.exists():
        df.to_csv(path, index=False)
    table = {"path": str(path), "schema": schema.to_dict(), **(table_extra or {})}
    runs = str(tmp_path / "runs")
    cfg = {
        "seed_everything": 0,
        "data": {"dataset": "table", "batch_size": 32, "table": table, **(data_extra or {})},
        "model": {"fusion": {"class_path": "early", "init_args": {"depth": 1, "heads": 2}}, "dim": 16},
        "trainer": {"max_epochs": epochs, "default_root_dir": runs, "enable_progress_bar": False, "enable_model_summary": False,
                    "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": runs}}},
    }
    out = tmp_path / "config.yaml"
    out.write_text(yaml.safe_dump(cfg))
    return out


def _one_error(capsys, command: str) -> str:
    """The single `attnfuse COMMAND: error: ...` line on stderr (a one-line message, no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if ": error:" in line]
    assert len(lines) == 1 and lines[0].startswith(f"attnfuse {command}: error: "), err[-3000:]
    assert err.rstrip().endswith(lines[0]), "the message is one line"
    return lines[0]


def _run_folder(tmp_path):
    (run,) = sorted((tmp_path / "runs" / "lightning_logs").glob("version_*"))
    return run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One fitted run on a table with inf and 1e39 in numeric training cells: (config, best checkpoint, frame)."""
    tmp = tmp_path_factory.mktemp("trained")
    df, schema = make_synthetic_table(120, seed=0, missing_rate=0.1)
    df.loc[3, "num_0"], df.loc[7, "num_1"], df.loc[11, "vec_2"] = np.inf, 1e39, -np.inf
    cfg = _config(tmp, df, schema=schema, epochs=2)
    assert main(["fit", "--config", str(cfg)]) == 0
    run = _run_folder(tmp)
    (ckpt,) = (run / "checkpoints").glob("best-*.ckpt")
    return cfg, ckpt, df, run


# --- item 2: inf / float32 overflow are missing values; a diverging run stops -----------------------


def test_inf_and_float32_overflow_in_training_columns_train_a_finite_model(trained):
    import torch

    _, ckpt, _, run = trained
    metrics = pd.read_csv(run / "metrics.csv")
    for name in ("train_loss", "val_loss", "test_loss"):
        values = metrics[name].dropna()
        assert len(values) and np.isfinite(values).all(), (name, values.tolist())
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_inf_at_predict_time_is_a_missing_input_not_nan_probabilities(trained, tmp_path):
    cfg, ckpt, df, _ = trained
    new = df.drop(columns=["y"]).head(12).copy()
    new.loc[:3, "num_0"] = [np.inf, -np.inf, 1e39, np.nan]
    path, out = tmp_path / "new.csv", tmp_path / "pred.csv"
    new.to_csv(path, index=False)
    assert main(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt), "--data.predict_path", str(path),
                 "--output", str(out)]) == 0
    pred = pd.read_csv(out)
    probs = pred[["prob_0", "prob_1"]].to_numpy()
    assert np.isfinite(probs).all() and np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    # inf, -inf and 1e39 are exactly as missing as NaN: rows 0..3 get the same probabilities as with NaN there
    nan_rows = new.copy()
    nan_rows.loc[:3, "num_0"] = np.nan
    nan_rows.to_csv(path, index=False)
    assert main(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt), "--data.predict_path", str(path),
                 "--output", str(out), "--overwrite", "true"]) == 0
    np.testing.assert_allclose(pd.read_csv(out)[["prob_0", "prob_1"]].to_numpy(), probs, rtol=1e-5)


def test_a_non_finite_training_loss_stops_the_run_naming_epoch_and_step(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert main(["fit", "--config", str(cfg), "--model.lr", "1e30"]) == 2  # diverges within two steps
    line = _one_error(capsys, "fit")
    assert "training loss is nan at epoch 0, global step" in line and "lower model.lr" in line
    assert not list((tmp_path / "runs").rglob("*.ckpt")), "no model is saved from a diverged run"


# --- item 5: an unwritable cache folder -------------------------------------------------------------


def test_unwritable_cache_folder_is_one_error_naming_it_and_attnfuse_cache(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("ATTNFUSE_CACHE", str(blocker))
    cfg = _config(tmp_path)
    assert main(["fit", "--config", str(cfg), "--data.dataset", "nutrimouse", "--data.table", "null"]) == 2
    line = _one_error(capsys, "fit")
    assert f"cache folder {blocker / 'datasets' / 'nutrimouse'}" in line and "export ATTNFUSE_CACHE=" in line


# --- item 6: duplicate column names -----------------------------------------------------------------


def test_duplicate_column_names_in_the_csv_are_rejected_naming_them(tmp_path, capsys):
    df, schema = make_synthetic_table(120, seed=0, missing_rate=0.1)
    path = tmp_path / "table.csv"
    df.assign(extra=df["vec_0"]).to_csv(path, index=False)
    header, rest = path.read_text().split("\n", 1)
    path.write_text(header.replace(",extra", ",vec_0") + "\n" + rest)  # pandas would read the copy as 'vec_0.1'
    cfg = _config(tmp_path, df, schema=schema)
    assert main(["fit", "--config", str(cfg)]) == 2
    line = _one_error(capsys, "fit")
    assert f"table file {path} has duplicate column name(s) ['vec_0']" in line


# --- item 7: unknown keys under data.table ----------------------------------------------------------


@pytest.mark.parametrize(("extra", "expected"), [
    ({"sep": ";"}, "data.table has no key(s) ['sep']; keys: ['path', 'schema']"),
    ({"rows": 10, "bogus": 1}, "data.table has no key(s) ['bogus', 'rows']"),
    ({"pth": "x.csv"}, "'pth': did you mean 'path'?"),
])
def test_unknown_data_table_keys_are_rejected(tmp_path, capsys, extra, expected):
    assert main(["fit", "--config", str(_config(tmp_path, table_extra=extra))]) == 2
    assert expected in _one_error(capsys, "fit")


def test_unknown_schema_and_input_keys_under_data_table_are_rejected(tmp_path, capsys):
    df, schema = make_synthetic_table(120, seed=0, missing_rate=0.1)
    cfg = _config(tmp_path, df, schema=schema)
    assert main(["fit", "--config", str(cfg), "--data.table.schema.taks", "regression"]) == 2
    assert "schema has unknown key(s) ['taks']; 'taks' (did you mean 'task'?)" in _one_error(capsys, "fit")


def test_data_options_with_dataset_table_are_rejected_not_ignored(tmp_path, capsys):
    cfg = _config(tmp_path, data_extra={"options": {"sep": ";"}})
    assert main(["fit", "--config", str(cfg)]) == 2
    assert "dataset 'table' takes its settings from data.table" in _one_error(capsys, "fit")


# --- item 8: one class; a table too small for the split ----------------------------------------------


def test_a_single_class_target_names_the_column_and_its_value(tmp_path, capsys):
    df, schema = make_synthetic_table(120, seed=0, missing_rate=0.1)
    cfg = _config(tmp_path, df.assign(y=1), schema=schema)
    assert main(["fit", "--config", str(cfg)]) == 2
    line = _one_error(capsys, "fit")
    assert "at least 2 classes in target column 'y', but every row has the value 1" in line


def test_a_table_too_small_for_the_split_says_rows_fractions_and_sizes(tmp_path, capsys):
    df, schema = make_synthetic_table(120, seed=0, missing_rate=0.0)
    cfg = _config(tmp_path, df.head(2), schema=schema)
    assert main(["fit", "--config", str(cfg)]) == 2
    line = _one_error(capsys, "fit")
    assert ("the table has 2 rows, too few for the split: val_fraction=0.15 and test_fraction=0.2 give train 2, val 0, "
            "test 0 rows (empty: val, test)") in line
    assert "need at least 4 rows" in line


# --- item 9: header-only and empty prediction tables --------------------------------------------------


def test_header_only_predict_table_is_one_line_naming_the_file(trained, tmp_path, capsys):
    cfg, ckpt, df, _ = trained
    path = tmp_path / "header_only.csv"
    df.drop(columns=["y"]).head(0).to_csv(path, index=False)
    capsys.readouterr()
    assert main(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt), "--data.predict_path", str(path),
                 "--output", str(tmp_path / "p.csv")]) == 2
    assert f"table file {path} has no data rows" in _one_error(capsys, "predict")


def test_empty_predict_file_is_one_line_naming_the_file(trained, tmp_path, capsys):
    cfg, ckpt, _, _ = trained
    path = tmp_path / "empty.csv"
    path.write_bytes(b"")
    capsys.readouterr()
    assert main(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt), "--data.predict_path", str(path),
                 "--output", str(tmp_path / "p.csv")]) == 2
    assert f"table file {path} is empty (0 bytes)" in _one_error(capsys, "predict")

"""fit / test / predict through the `attnfuse` CLI on a small SYNTHETIC table; errors; determinism; resume."""

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml

from attnfuse.cli import main


def _version_dirs(root: Path) -> list[Path]:
    return sorted(p for p in (root / "runs" / "lightning_logs").glob("version_*"))


def _metrics(run: Path) -> pd.DataFrame:
    return pd.read_csv(run / "metrics.csv")


def test_fit_test_predict_with_a_missing_input(table_config, capsys):
    cfg = table_config()
    assert main(["fit", "--config", str(cfg)]) == 0
    (run,) = _version_dirs(table_config.tmp)
    for name in ("config.yaml", "split.json", "preprocessor.json", "metrics.csv"):
        assert (run / name).exists(), name
    assert (run / "checkpoints" / "last.ckpt").exists()
    (ckpt,) = (run / "checkpoints").glob("best-*.ckpt")  # the best epoch by val_acc, and the last one, are kept
    metrics = _metrics(run)
    assert metrics["val_acc"].notna().any() and metrics["train_loss"].notna().any()

    capsys.readouterr()
    assert main(["test", "--config", str(cfg), "--ckpt_path", str(ckpt)]) == 0
    assert _version_dirs(table_config.tmp) == [run], "test logs nothing: no new run folder"
    printed = capsys.readouterr().out.split("test_acc=")[1].split(",")[0]
    assert 0.0 <= float(printed) <= 1.0

    # a new table whose rows lack the whole `vec` input (columns absent) and some `num` cells
    new = table_config.df.drop(columns=["y"] + [f"vec_{j}" for j in range(8)]).head(25).copy()
    new.loc[:4, "num_0"] = None
    new_path = table_config.tmp / "new.parquet"
    new.to_parquet(new_path)
    out = table_config.tmp / "pred.csv"
    code = main(["predict", "--config", str(cfg), "--ckpt_path", str(ckpt), "--data.predict_path", str(new_path),
                 "--output", str(out), "--attention", "true"])
    assert code == 0
    pred = pd.read_csv(out)
    assert len(pred) == 25 and list(pred["row"]) == list(range(25))
    assert {"prediction", "prob_0", "prob_1", "attention_num", "attention_cat", "attention_vec"} <= set(pred.columns)
    assert (pred["attention_vec"] == 0).all(), "a missing input gets no attention"
    num_present = new[[f"num_{j}" for j in range(4)]].notna().all(axis=1).to_numpy()
    assert not num_present[:5].any() and num_present[5:].sum() >= 15
    assert ((pred["attention_num"] > 0).to_numpy() == num_present).all()
    assert pred[["prob_0", "prob_1"]].sum(axis=1).round(5).eq(1).all()


def test_same_seed_same_config_same_metrics(table_config):
    cfg = table_config()
    assert main(["fit", "--config", str(cfg)]) == 0
    assert main(["fit", "--config", str(cfg)]) == 0
    a, b = (_metrics(r) for r in _version_dirs(table_config.tmp))
    pd.testing.assert_series_equal(a["val_loss"].dropna().reset_index(drop=True), b["val_loss"].dropna().reset_index(drop=True))


def test_resume_from_checkpoint_gives_the_same_next_epoch(table_config):
    every_epoch = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint", "init_args": {"save_top_k": -1}}]
    cfg = table_config(trainer__max_epochs=2, trainer__callbacks=every_epoch)
    assert main(["fit", "--config", str(cfg)]) == 0
    (run_a,) = _version_dirs(table_config.tmp)
    first_epoch = run_a / "checkpoints" / "epoch=0-step=7.ckpt"
    assert first_epoch.exists(), sorted((run_a / "checkpoints").iterdir())
    # as if the run had been interrupted after epoch 0: resume with the same config
    assert main(["fit", "--config", str(cfg), "--ckpt_path", str(first_epoch)]) == 0
    run_b = _version_dirs(table_config.tmp)[-1]
    full = _metrics(run_a).dropna(subset=["val_loss"])
    resumed = _metrics(run_b).dropna(subset=["val_loss"])
    assert resumed["epoch"].iloc[-1] == full["epoch"].iloc[-1] == 1
    assert resumed["val_loss"].iloc[-1] == pytest.approx(full["val_loss"].iloc[-1], rel=1e-6, abs=1e-7)
    assert resumed["val_acc"].iloc[-1] == full["val_acc"].iloc[-1]
    train_full = _metrics(run_a).dropna(subset=["train_loss"])["train_loss"].iloc[-1]
    train_resumed = _metrics(run_b).dropna(subset=["train_loss"])["train_loss"].iloc[-1]
    assert train_resumed == pytest.approx(train_full, rel=1e-6)


def _run_cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "attnfuse.cli", *args], capture_output=True, text=True, cwd=cwd)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.fusin", "early"], "fusin"),
        (["--data.table", '{"path": "/nonexistent/t.csv", "schema": {"target": "y", "inputs": []}}'], "t.csv"),
        (["--model.fusion", "nope"], "nope"),
    ],
)
def test_user_errors_give_one_message_and_nonzero_exit(table_config, override, expected):
    cfg = table_config()
    result = _run_cli("fit", "--config", str(cfg), *override, cwd=table_config.tmp)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert expected in result.stderr


def test_wrong_column_in_schema_is_a_clear_error(table_config):
    schema = table_config.schema.to_dict()
    schema["inputs"][0]["columns"] = ["num_0", "no_such_column"]
    cfg = table_config(data__table={"path": str(table_config.path), "schema": schema})
    result = _run_cli("fit", "--config", str(cfg), cwd=table_config.tmp)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no_such_column" in result.stderr


@pytest.mark.slow
def test_ddp_on_cpu_with_two_processes(table_config):
    cfg = table_config(trainer__max_epochs=1)
    result = _run_cli("fit", "--config", str(cfg), "--trainer.strategy", "ddp", "--trainer.devices", "2",
                      "--trainer.accelerator", "cpu", cwd=table_config.tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = [c for run in _version_dirs(table_config.tmp) for c in (run / "checkpoints").glob("*.ckpt")]
    assert ckpts
    assert "ddp" in result.stderr.lower() or "distributed" in result.stderr.lower()
    # predict with 2 processes: every row once, gathered on rank 0
    new = table_config.df.drop(columns=["y"]).head(21)
    new_path = table_config.tmp / "new.csv"
    new.to_csv(new_path, index=False)
    out = table_config.tmp / "ddp_pred.csv"
    result = _run_cli("predict", "--config", str(cfg), "--ckpt_path", str(ckpts[0]), "--data.predict_path", str(new_path),
                      "--output", str(out), "--trainer.strategy", "ddp", "--trainer.devices", "2",
                      "--trainer.accelerator", "cpu", cwd=table_config.tmp)
    assert result.returncode == 0, result.stderr[-3000:]
    assert list(pd.read_csv(out)["row"]) == list(range(21))


def test_print_config_output_reruns_to_the_same_metrics(table_config, capsys):
    cfg = table_config(trainer__max_epochs=1)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(cfg), "--print_config"])
    printed = capsys.readouterr().out
    resolved = yaml.safe_load(printed)
    assert resolved["model"]["fusion"]["class_path"].endswith("EarlyFusion")
    assert {"heads", "depth", "modality_dropout", "op"} <= set(resolved["model"]["fusion"]["init_args"])
    assert resolved["model"]["task"] is None and resolved["patience"] == 10
    again = table_config.tmp / "printed.yaml"
    again.write_text(printed)
    assert main(["fit", "--config", str(cfg)]) == 0
    assert main(["fit", "--config", str(again)]) == 0
    a, b = (_metrics(r) for r in _version_dirs(table_config.tmp))
    for key in ("val_loss", "test_acc"):
        pd.testing.assert_series_equal(a[key].dropna().reset_index(drop=True), b[key].dropna().reset_index(drop=True))


def test_tensorboard_flag_logs_or_says_what_to_install(table_config, capsys):
    import importlib.util

    cfg = table_config(trainer__max_epochs=1)
    code = main(["fit", "--config", str(cfg), "--tensorboard", "true"])
    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        assert code == 0 and any((table_config.tmp / "runs" / "tensorboard").rglob("events.out.tfevents*"))
    else:
        assert code == 2 and "pip install tensorboard" in capsys.readouterr().err

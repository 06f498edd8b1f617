"""`attnfuse fit` under Lightning DDP on 2 CPU processes (gloo): same result as 1 process, resumable on 1 process.

SYNTHETIC table. Full-batch training (one batch per epoch: ``n_train`` rows on 1 process, ``n_train / 2`` per
rank on 2), so the data order cannot differ between the runs and DDP's gradient average equals the single
process's gradient: parameters and metrics must agree to float tolerance. The 2 ranks are forked from the
test process (``ddp_fork``: no second import of torch and Lightning); the CLI's launcher for users is
``--trainer.strategy ddp`` (see docs/distributed.md).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch

from attnfuse.cli import main

pytestmark = pytest.mark.slow

EPOCHS = 3


def _run_dir(root: Path) -> Path:
    (run,) = sorted((root / "runs" / "lightning_logs").glob("version_*"))[-1:]
    return run


def _state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


EVERY_EPOCH = [{"class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                "init_args": {"save_top_k": -1, "save_last": True, "filename": "epoch{epoch}", "auto_insert_metric_name": False}}]


def _assert_same_parameters(got: dict, want: dict, what: str) -> None:
    """Parameters equal to float tolerance (measured: <= 3e-8 apart), except attention key biases: softmax is
    invariant to them, so their gradient is 0 up to rounding, and Adam turns that noise into lr-sized steps."""
    assert got.keys() == want.keys()
    for key in want:
        if key.endswith("to_k.bias"):
            continue
        torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-5, msg=lambda m, k=key: f"{what}: {k}: {m}")


def _fit(cfg: Path, *extra: str) -> None:
    assert main(["fit", "--config", str(cfg), "--trainer.max_epochs", str(EPOCHS), "--patience", "0",
                 "--test_after_fit", "false", *extra]) == 0


def test_ddp_fit_equals_one_process_and_resumes_on_another_world_size(table_config, tmp_path):
    # 300 rows -> 180 / 60 / 60; no dropout (its random masks would differ between the two runs' batch layouts)
    split = {"data__val_fraction": 0.2, "data__test_fraction": 0.2,
             "model__fusion": {"class_path": "early", "init_args": {"depth": 1, "heads": 2, "dropout": 0.0}}, "model__dropout": 0.0}
    probe = table_config(**split, trainer__max_epochs=1, trainer__limit_train_batches=0, trainer__limit_val_batches=0)
    main(["fit", "--config", str(probe), "--test_after_fit", "false"])
    n_train = len(json.loads((_run_dir(table_config.tmp) / "split.json").read_text())["train"])
    assert n_train % 2 == 0, f"the test needs an even training split, got {n_train}"

    one = table_config(**split, data__batch_size=n_train, trainer__callbacks=EVERY_EPOCH)
    _fit(one)
    run_one = _run_dir(table_config.tmp)

    two = table_config(**split, data__batch_size=n_train // 2, trainer__callbacks=EVERY_EPOCH)
    _fit(two, "--trainer.strategy", "ddp_fork", "--trainer.devices", "2", "--trainer.accelerator", "cpu")
    run_two = _run_dir(table_config.tmp)
    assert run_two != run_one
    # checkpoints written once (by rank 0), each with its checksum
    ckpts = sorted(p.name for p in (run_two / "checkpoints").glob("*.ckpt"))
    assert ckpts == sorted([f"epoch{e}.ckpt" for e in range(EPOCHS)] + ["last.ckpt"]), ckpts
    assert all((run_two / "checkpoints" / f"{c}.sha256").exists() for c in ckpts)

    a, b = _state(run_one / "checkpoints" / "last.ckpt"), _state(run_two / "checkpoints" / "last.ckpt")
    assert a.keys() == b.keys()
    _assert_same_parameters(b, a, "2 processes")
    m1 = pd.read_csv(run_one / "metrics.csv").dropna(subset=["val_loss"]).reset_index(drop=True)
    m2 = pd.read_csv(run_two / "metrics.csv").dropna(subset=["val_loss"]).reset_index(drop=True)
    assert len(m1) == len(m2) == EPOCHS
    for col in ("val_loss", "val_acc", "val_auroc"):
        assert m2[col].to_numpy() == pytest.approx(m1[col].to_numpy(), abs=1e-4), col

    # resume the 2-process run on 1 process from its epoch-0 checkpoint: same final parameters as straight through
    _fit(one, "--ckpt_path", str(run_two / "checkpoints" / "epoch0.ckpt"))
    resumed = _state(_run_dir(table_config.tmp) / "checkpoints" / "last.ckpt")
    _assert_same_parameters(resumed, a, "resumed on 1 process")

"""Run experiments: fit + test one configuration, multi-seed tables, missing-input sweeps."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn

from attnfuse.train.datamodule import FusionDataModule
from attnfuse.train.task import FusionTask, make_metrics

__all__ = ["RunResult", "evaluate", "fit_and_test", "mean_std", "missing_input_sweep"]


@dataclass
class RunResult:
    """Metrics of one fitted configuration and the fitted task."""

    metrics: dict[str, float]
    task: FusionTask
    data: FusionDataModule
    extra: dict[str, Any] = field(default_factory=dict)


def fit_and_test(
    data: FusionDataModule,
    model: Mapping[str, Any],
    *,
    seed: int = 0,
    max_epochs: int = 30,
    out_dir: str | Path | None = None,
    progress: bool = False,
    accelerator: str = "cpu",
) -> RunResult:
    """Seed everything, build :class:`FusionTask` from ``model`` kwargs, fit, pick nothing, test.

    With ``out_dir``, CSV logs and the last checkpoint are written there.
    """
    pl.seed_everything(seed, workers=True, verbose=False)
    data.setup("fit")
    task = FusionTask(encoder_configs=data.encoder_configs, num_outputs=data.num_outputs, task=data.task,
                      target_scale=data.target_scale, **dict(model))
    logger = pl.loggers.CSVLogger(str(out_dir), name="", version="") if out_dir else False
    trainer = pl.Trainer(
        max_epochs=max_epochs, accelerator=accelerator, devices=1, deterministic=True, logger=logger,
        enable_checkpointing=out_dir is not None, enable_progress_bar=progress, enable_model_summary=False,
        default_root_dir=str(out_dir) if out_dir else None,
    )
    trainer.fit(task, datamodule=data)
    val = trainer.validate(task, datamodule=data, verbose=False)[0]
    test = trainer.test(task, datamodule=data, verbose=False)[0]
    return RunResult({**val, **test}, task, data)


@torch.no_grad()
def evaluate(model: nn.Module, loader: Iterable[dict], *, task: str, num_outputs: int,
             target_scale: tuple[float, float] | None = None) -> dict[str, float]:
    """Metrics of ``model`` (in eval mode) over the batches of ``loader``: acc/f1/auroc or mae/rmse/r2.

    ``target_scale``: regression ``(mean, std)`` the model's standardised outputs are mapped back with.
    """
    was_training = model.training
    model.eval()
    metrics = make_metrics(task, num_outputs)
    for batch in loader:
        pred = model(batch["inputs"])
        if task == "classification":
            prob = pred.softmax(-1)
            metrics.update(prob[:, 1] if num_outputs == 2 else prob, batch["target"].long())
        else:
            scale = target_scale or (0.0, 1.0)
            metrics.update(pred.squeeze(-1) * scale[1] + scale[0], batch["target"].to(pred.dtype))
    model.train(was_training)
    return {k: float(v) for k, v in metrics.compute().items()}


def missing_input_sweep(
    model: nn.Module, data: FusionDataModule, *, part: str = "test", max_missing: int | None = None,
    names: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """Evaluate with every subset of inputs (up to ``max_missing`` of them) marked missing.

    Returns one record per condition: ``{"missing": tuple, "num_missing": m, **metrics}``; the
    first record (``m = 0``) has every input present. The subset of all inputs is skipped.
    """
    names = sorted(data.input_names) if names is None else list(names)
    limit = len(names) - 1 if max_missing is None else min(max_missing, len(names) - 1)
    records = []
    for m in range(limit + 1):
        for subset in itertools.combinations(names, m):
            loader = data.loader(data.dataset(part, missing=list(subset)))
            metrics = evaluate(model, loader, task=data.task, num_outputs=data.num_outputs, target_scale=data.target_scale)
            records.append({"missing": subset, "num_missing": m, **metrics})
    return records


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = list(values)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

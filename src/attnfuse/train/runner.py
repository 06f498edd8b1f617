"""Run experiments from configs: fit + test one config (the same objects as ``attnfuse fit``), sweeps, seeds."""

from __future__ import annotations

import copy
import itertools
import statistics
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError

from attnfuse.train.console import quiet_console
from attnfuse.train.datamodule import FusionDataModule
from attnfuse.train.lightning_cli import add_default_callbacks, make_cli
from attnfuse.train.module import FusionTask

__all__ = ["RunResult", "evaluate", "fit_and_test", "mean_std", "missing_input_sweep", "run_config"]


@dataclass
class RunResult:
    """Metrics of one fitted configuration, the fitted module (best checkpoint's weights) and its data."""

    metrics: dict[str, float]
    task: FusionTask
    data: FusionDataModule
    extra: dict[str, Any] = field(default_factory=dict)


def run_config(
    config: Mapping[str, Any],
    *,
    seed: int | None = None,
    max_epochs: int | None = None,
    out_dir: str | Path | None = None,
    progress: bool = False,
) -> RunResult:
    """Fit a fit config (the mapping a ``--config`` YAML holds), then validate and test the best checkpoint.

    The config is parsed and instantiated by the same LightningCLI as ``attnfuse fit`` (so every key
    ``fit`` accepts works here and nothing else does), with the same defaults (early stopping and the
    best checkpoint on the task's validation metric; ``patience`` at the top level as in the CLI).

    Args:
        config: ``{"data": ..., "model": ..., "trainer": ..., "seed_everything": ...}``.
        seed: sets ``seed_everything`` and ``data.seed`` (split and initialisation).
        max_epochs: overrides ``trainer.max_epochs``.
        out_dir: run folder (CSV logs, checkpoints); default a temporary folder removed afterwards.
        progress: show the progress bar.

    Returns:
        :class:`RunResult` with ``val_*`` and ``test_*`` metrics; ``task`` holds the best weights.
    """
    cfg = copy.deepcopy({k: v for k, v in config.items()})
    patience = int(cfg.pop("patience", 10))
    for key in ("test_after_fit", "output", "attention", "tensorboard"):
        cfg.pop(key, None)
    if seed is not None:
        cfg["seed_everything"] = seed
        cfg["data"] = {**(cfg.get("data") or {}), "seed": seed}
    trainer = dict(cfg.get("trainer") or {})
    if max_epochs is not None:
        trainer["max_epochs"] = max_epochs
    trainer.setdefault("enable_progress_bar", progress)
    trainer.setdefault("enable_model_summary", False)
    with tempfile.TemporaryDirectory(prefix="attnfuse-run-") as tmp:
        root = str(out_dir) if out_dir is not None else tmp
        trainer["default_root_dir"] = root
        trainer.setdefault("logger", {"class_path": "lightning.pytorch.loggers.CSVLogger",
                                      "init_args": {"save_dir": root, "name": "", "version": ""}}
                           if out_dir is not None else False)
        cfg["trainer"] = trainer
        # adverts and warnings a user cannot act on; without progress also Lightning's per-run info lines (seed,
        # checkpoint restored, ...), noise in a multi-run job. make_cli's ThreadsCallback picks the thread count.
        with quiet_console(info=progress):
            try:
                cli = make_cli(cfg, run=False, parser_kwargs={"exit_on_error": False})
            except ArgumentError as err:  # a config error, as `attnfuse fit` would report it
                raise ValueError(f"config error: {err}") from None
            add_default_callbacks(cli.trainer, cli.model, patience=patience)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            best = getattr(cli.trainer.checkpoint_callback, "best_model_path", "") or None
            val = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False, weights_only=True)
            test = cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path=best, verbose=False, weights_only=True)
    metrics = {k: float(v) for k, v in {**val[0], **test[0]}.items()}
    return RunResult(metrics, cli.model, cli.datamodule, {"best_checkpoint": best, "epochs": cli.trainer.current_epoch})


def fit_and_test(data: Mapping[str, Any], model: Mapping[str, Any], *, seed: int = 0, max_epochs: int = 30,
                 out_dir: str | Path | None = None, progress: bool = False) -> RunResult:
    """:func:`run_config` of ``{"data": data, "model": model}`` (config sections as mappings)."""
    return run_config({"data": dict(data), "model": dict(model)}, seed=seed, max_epochs=max_epochs, out_dir=out_dir,
                      progress=progress)


@torch.no_grad()
def evaluate(module: FusionTask, loader: Iterable[dict]) -> dict[str, float]:
    """The task's metrics of ``module`` (in eval mode) over the batches of ``loader`` (no ``val_`` prefix)."""
    was_training = module.training
    module.eval()
    metrics = module.task.make_metrics()
    for batch in loader:
        module.task.update_metrics(metrics, module(batch["inputs"]), batch["target"])
    module.train(was_training)
    out: dict[str, float] = {}
    for k, v in metrics.compute().items():
        out.update({kk: float(vv) for kk, vv in v.items()} if isinstance(v, Mapping) else {k: float(v)})
    return out


def missing_input_sweep(
    module: FusionTask, data: FusionDataModule, *, part: str = "test", max_missing: int | None = None,
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
            metrics = evaluate(module, loader)
            records.append({"missing": subset, "num_missing": m, **metrics})
    return records


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    vals = list(values)
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)

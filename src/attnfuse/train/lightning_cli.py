"""``attnfuse fit | validate | test | predict``: LightningCLI over FusionTask and FusionDataModule.

The data module's description of the inputs and the target is linked into the model
(``encoder_configs``, ``target_info``), so a config only says what to fuse and which task to train.
Sub-modules are configured the LightningCLI way (``class_path`` / ``init_args``); registered short
names (``fusion: early``, ``task: survival``) are accepted and expanded to class paths first.
Safe defaults: early stopping on the task's validation metric, the best checkpoint kept, and
``fit`` ends by testing the best checkpoint.

Checkpoints and outputs: every checkpoint is saved atomically with a ``.sha256`` beside it and read back
through :mod:`attnfuse.train.checkpoints` (no URLs, checksum verified, ``weights_only=True``). One run
folder per ``fit`` (``split.json`` / ``preprocessor.json`` written into it once the logger created it);
``validate`` / ``test`` / ``predict`` log nothing (no new ``version_N``) and print their metrics;
``predict --output`` is written atomically and never replaces a file without ``--overwrite true``.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import yaml
from jsonargparse import Namespace
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, EarlyStopping, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from attnfuse.fusion import FUSIONS
from attnfuse.train.checkpoints import (
    SPECIAL_CKPT_PATHS,
    CheckpointError,
    atomic_path,
    load_lightning_checkpoint,
    use_checked_checkpoints,
)
from attnfuse.train.datamodule import FusionDataModule
from attnfuse.train.module import FusionTask
from attnfuse.train.tasks import TASKS

__all__ = [
    "AttnfuseCLI", "PredictionWriter", "RunFiles", "add_default_callbacks", "check_output", "expand_short_names",
    "fit_summary", "make_cli", "predictions_frame", "run_lightning",
]

#: subcommands that read a checkpoint and do not train: no logger, no saved config, no new run folder
EVALUATION_COMMANDS = ("validate", "test", "predict")

#: config keys whose value may be a registered short name: key -> registry
SHORT_NAMES: dict[str, Mapping[str, type]] = {"model.fusion": FUSIONS, "model.task": TASKS}


def _class_path(registry: Mapping[str, type], value: Any) -> Any:
    if isinstance(value, str) and value in registry:
        cls = registry[value]
        return f"{cls.__module__}.{cls.__qualname__}"
    return value


def expand_short_names(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a config mapping with registered short names (``early``, ``survival``) as class paths."""
    out = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in config.items()}
    for key, registry in SHORT_NAMES.items():
        section, _, name = key.partition(".")
        sect = out.get(section)
        if not isinstance(sect, dict) or name not in sect:
            continue
        value = sect[name]
        if isinstance(value, str):
            sect[name] = _class_path(registry, value)
        elif isinstance(value, Mapping) and "class_path" in value:
            sect[name] = {**value, "class_path": _class_path(registry, value["class_path"])}
    return out


def _expand_args(args: list[str]) -> list[str]:
    """Expand short names in ``--model.fusion NAME`` / ``--model.task NAME`` and in ``--config`` files."""
    out, i = [], 0
    while i < len(args):
        arg = args[i]
        key, eq, inline = arg.partition("=")
        value = inline if eq else (args[i + 1] if i + 1 < len(args) else None)
        step = 1 if eq else 2
        if key in ("--model.fusion", "--model.task") and value is not None:
            out.append(f"{key}={_class_path(SHORT_NAMES[key[2:]], value)}")
            i += step
        elif key == "--config" and value is not None and Path(value).is_file():
            raw = yaml.safe_load(Path(value).read_text())
            if isinstance(raw, Mapping):
                expanded = expand_short_names(raw)
                if expanded != raw:  # pass the expanded config as a YAML string (relative paths stay relative to cwd)
                    value = yaml.safe_dump(expanded, sort_keys=False)
            out.append(f"{key}={value}")
            i += step
        else:
            out.append(arg)
            i += 1
    return out


class PredictionWriter(BasePredictionWriter):
    """Write predictions (and optionally per-input attention shares) to CSV or Parquet.

    Columns: ``row`` (position in the predicted table), the task's prediction columns (e.g.
    ``prediction`` with the original label values and ``prob_<label>`` in class order for
    classification, ``risk`` for survival, ``emb_<j>`` for retrieval), ``attention_<input>`` with
    ``attention=True``. The file is written to a temporary file beside it and renamed into place, so a
    reader never sees half a table; an existing file is replaced only with ``overwrite=True``.

    Raises:
        ValueError: see :func:`check_output`.
    """

    def __init__(self, path: str | Path, *, attention: bool = False, overwrite: bool = False) -> None:
        super().__init__(write_interval="epoch")
        self.path, self.attention, self.overwrite = Path(path), attention, overwrite
        check_output(self.path, overwrite=overwrite)

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        table = predictions_frame(predictions)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            # every rank predicted a shard (the distributed sampler pads with repeats): gather on rank 0
            shards = [None] * trainer.world_size
            torch.distributed.all_gather_object(shards, table)
            if not trainer.is_global_zero:
                return
            table = pd.concat(shards, ignore_index=True).drop_duplicates("row").sort_values("row")
        check_output(self.path, overwrite=self.overwrite)  # again: the file may have appeared while predicting
        with atomic_path(self.path) as tmp:
            if self.path.suffix == ".csv":
                table.to_csv(tmp, index=False)
            else:
                table.to_parquet(tmp, index=False)
        print(f"attnfuse predict: wrote {len(table)} rows to {self.path}")


def check_output(path: str | Path, *, overwrite: bool = False) -> Path:
    """``path`` as a prediction output: ``.csv`` / ``.parquet``, not a folder, not an existing file unless ``overwrite``.

    Raises:
        ValueError: another suffix, a folder, or an existing file without ``overwrite`` (naming the file and
            ``--overwrite true``).
    """
    out = Path(path)
    if out.suffix not in (".csv", ".parquet"):
        raise ValueError(f"--output must end in .csv or .parquet, got {str(out)!r}")
    if out.is_dir():
        raise ValueError(f"--output {str(out)!r} is a folder; give a .csv or .parquet file")
    if out.exists() and not overwrite:
        raise ValueError(f"--output {str(out)!r} exists; pass --overwrite true to replace it")
    return out


def predictions_frame(predictions: list[dict[str, Any]]) -> pd.DataFrame:
    """One table from :meth:`FusionTask.predict_step` outputs, sorted by ``row``."""
    rows = []
    for out in predictions:
        frame = pd.DataFrame({"row": out["index"].cpu().numpy(), **out["columns"]})
        if "attention" in out:
            for j, name in enumerate(out["attention_names"]):
                frame[f"attention_{name}"] = out["attention"][:, j].cpu().numpy()
        rows.append(frame)
    return pd.concat(rows, ignore_index=True).sort_values("row").reset_index(drop=True)


class AttnfuseCLI(LightningCLI):
    """LightningCLI with the data -> model links, short names, safe defaults and a prediction writer."""

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        if args is None:
            args = sys.argv[1:]
        if isinstance(args, Mapping | Namespace):
            self.config = parser.parse_object(expand_short_names(dict(args)))
        else:
            self.config = parser.parse_args(_expand_args(list(args)))

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.encoder_configs", "model.encoder_configs", apply_on="instantiate")
        parser.link_arguments("data.target_info", "model.target_info", apply_on="instantiate")
        parser.add_argument("--output", type=str | None, default=None,
                            help="predict: write predictions to this .csv or .parquet file")
        parser.add_argument("--attention", type=bool, default=False,
                            help="predict: add each input's share of the fusion token's attention")
        parser.add_argument("--overwrite", type=bool, default=False,
                            help="predict: replace an existing --output file (otherwise an error)")
        parser.add_argument("--patience", type=int, default=10,
                            help="fit: stop after this many validation checks without improvement of the task's "
                                 "metric (0 = never stop early)")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="fit: test the best checkpoint when training ends and print the metrics")
        parser.add_argument("--tensorboard", type=bool, default=False,
                            help="also log to TensorBoard (needs `pip install tensorboard`)")

    def _parse_ckpt_path(self) -> None:
        """Check ``--ckpt_path`` first (no URL, an existing file, its checksum, readable with ``weights_only=True``),
        then merge its hyperparameters into the config as LightningCLI does."""
        sub = self.config.get("subcommand")
        ckpt_path = self.config[sub].get("ckpt_path") if sub else None
        if not ckpt_path or str(ckpt_path) in SPECIAL_CKPT_PATHS or str(ckpt_path).startswith("registry"):
            return  # special values are resolved by the trainer and read through CheckedCheckpointIO
        try:
            checkpoint = load_lightning_checkpoint(ckpt_path)
        except CheckpointError as err:
            raise CheckpointError(f"--ckpt_path: {err}") from None
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        if "_class_path" in hparams:
            hparams = {"class_path": hparams.pop("_class_path"), "dict_kwargs": hparams}
        try:
            self.config = self.parser.parse_object({sub: {"model": hparams}}, self.config)
        except SystemExit:
            sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
            raise

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand] if self.subcommand else self.config
        ckpt = config.get("ckpt_path")
        if self.subcommand in EVALUATION_COMMANDS and not ckpt:
            raise ValueError(f"{self.subcommand} needs --ckpt_path (a checkpoint written by `attnfuse fit`); "
                             "without it the model would be untrained")
        if self.subcommand and "weights_only" in config:
            if config.get("weights_only") is False:
                raise ValueError("--weights_only false is not supported: attnfuse checkpoints hold tensors and plain "
                                 "values only and are always read with weights_only=True")
            config.weights_only = True
        if self.subcommand == "predict" and config.get("output"):
            check_output(config.output, overwrite=bool(config.get("overwrite")))
        if self.subcommand == "predict" and config.data.get("predict_chunk_rows"):
            if not (config.get("output") and config.data.get("predict_path")):
                raise ValueError("--data.predict_chunk_rows streams --data.predict_path into --output: give both")
            config.return_predictions = False  # predictions go to the file batch by batch, none kept in memory
        # evaluate / predict with the preprocessing saved beside the checkpoint (never re-fitted), so a
        # moved or changed training table cannot silently change the inputs the model sees
        if self.subcommand in ("validate", "test", "predict") and not config.data.get("preprocessor"):
            saved = Path(ckpt).resolve().parent.parent / "preprocessor.json"
            if saved.is_file():
                config.data.preprocessor = str(saved)
        trainer = config.trainer
        callbacks = list(trainer.callbacks or [])
        # a rich progress bar by default (unless the user disabled the bar or chose one)
        has_bar = any("ProgressBar" in str(getattr(c, "class_path", c)) for c in callbacks)
        if trainer.enable_progress_bar is not False and not has_bar and _importable("rich"):
            callbacks.append(Namespace(class_path="attnfuse.train.console.RichProgressBar", init_args=Namespace()))
            trainer.callbacks = callbacks
        if self.subcommand in EVALUATION_COMMANDS:
            # evaluation and prediction do not train: no logger and no saved config, so no new version_N folder
            # (metrics are printed; the run folder of the checkpoint is left as fit wrote it)
            trainer.logger = False
            self.save_config_callback = None
        elif config.get("tensorboard"):
            if not (_importable("tensorboard") or _importable("tensorboardX")):
                raise ValueError("--tensorboard true needs the tensorboard package: pip install tensorboard")
            loggers = trainer.logger if isinstance(trainer.logger, list) else ([trainer.logger] if trainer.logger not in
                                                                               (None, True, False) else [])
            if trainer.logger in (None, True):
                loggers = [Namespace(class_path="lightning.pytorch.loggers.CSVLogger",
                                     init_args=Namespace(save_dir=trainer.default_root_dir or "."))]
            root = trainer.default_root_dir or "."
            loggers.append(Namespace(class_path="lightning.pytorch.loggers.TensorBoardLogger",
                                     init_args=Namespace(save_dir=str(Path(root) / "tensorboard"))))
            trainer.logger = loggers

    def instantiate_trainer(self, **kwargs: Any):
        trainer = super().instantiate_trainer(**kwargs)
        use_checked_checkpoints(trainer, keep_callback_states=self.subcommand not in EVALUATION_COMMANDS)
        return trainer

    def before_fit(self) -> None:
        cfg = self.config[self.subcommand]
        own = any("ModelCheckpoint" in str(getattr(c, "class_path", c)) for c in (cfg.trainer.callbacks or []))
        add_default_callbacks(self.trainer, self.model, patience=int(cfg.get("patience", 10)), keep_checkpointing=own)
        self.trainer.callbacks.append(RunFiles())

    def after_fit(self) -> None:
        cfg = self.config[self.subcommand]
        best = getattr(self.trainer.checkpoint_callback, "best_model_path", "") or None
        metrics = {}
        if cfg.get("test_after_fit", True) and not self.trainer.interrupted:
            results = self.trainer.test(self.model, datamodule=self.datamodule, ckpt_path=best or None,
                                        verbose=False, weights_only=True)
            metrics = results[0] if results else {}
        run_dir = self.trainer.log_dir or self.trainer.default_root_dir  # a collective under DDP: every rank calls it
        if self.trainer.is_global_zero:
            print(fit_summary(run_dir, best, metrics))

    def after_validate(self) -> None:
        self._print_metrics("val_")

    def after_test(self) -> None:
        self._print_metrics("test_")

    def _print_metrics(self, prefix: str) -> None:
        """``attnfuse test: CKPT: test_acc=..., ...``: evaluation logs no files, so its metrics are printed."""
        metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith(prefix)}
        if self.trainer.is_global_zero:
            ckpt = self.config[self.subcommand].get("ckpt_path")
            print(f"attnfuse {self.subcommand}: {ckpt}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))

    def before_predict(self) -> None:
        cfg = self.config[self.subcommand]
        self.model.predict_attention = bool(cfg.get("attention"))
        if cfg.get("output") and cfg.data.get("predict_chunk_rows"):
            from attnfuse.train.streaming import StreamingPredictionWriter

            self.trainer.callbacks.append(StreamingPredictionWriter(cfg["output"], attention=bool(cfg.get("attention")),
                                                                    overwrite=bool(cfg.get("overwrite"))))
        elif cfg.get("output"):
            self.trainer.callbacks.append(PredictionWriter(cfg["output"], attention=bool(cfg.get("attention")),
                                                           overwrite=bool(cfg.get("overwrite"))))


class RunFiles(Callback):
    """Write the run's ``split.json`` and ``preprocessor.json`` into the run folder (``trainer.log_dir``).

    In ``setup`` of ``fit``: after the logger created the run folder (so the logger does not find a non-empty
    folder and warn that it deletes previous logs), on rank 0.
    """

    def setup(self, trainer, pl_module, stage: str) -> None:
        if stage != "fit":
            return
        run_dir = trainer.log_dir or trainer.default_root_dir  # a collective under DDP: every rank calls it
        save_run = getattr(trainer.datamodule, "save_run", None)
        if trainer.is_global_zero and save_run is not None:
            save_run(run_dir)


def add_default_callbacks(trainer, model: FusionTask, *, patience: int = 10, keep_checkpointing: bool = False) -> None:
    """Best-checkpoint and early stopping on the task's validation metric.

    Lightning's implicit ``ModelCheckpoint`` (last epoch only) is replaced by one that keeps the best
    epoch by ``model.monitor`` and the last one, unless ``keep_checkpointing`` (the user configured
    their own) or checkpointing is off. Early stopping is added unless ``patience`` is 0 or the user
    configured an ``EarlyStopping``. Without validation batches neither is added. Checkpoints are saved and
    read through :class:`~attnfuse.train.checkpoints.CheckedCheckpointIO` (atomic, ``.sha256``, ``weights_only``).
    """
    use_checked_checkpoints(trainer)
    monitor, mode = model.monitor
    has_val = trainer.limit_val_batches != 0
    if trainer.checkpoint_callback is not None and has_val and not keep_checkpointing:
        for cb in [c for c in trainer.callbacks if isinstance(c, ModelCheckpoint)]:
            trainer.callbacks.remove(cb)
        trainer.callbacks.append(ModelCheckpoint(monitor=monitor, mode=mode, save_top_k=1, save_last=True,
                                                 filename="best-{epoch}-{step}", auto_insert_metric_name=False))
    if patience > 0 and has_val and not any(isinstance(c, EarlyStopping) for c in trainer.callbacks):
        # strict=False: a run that stops before its first validation (max_steps < one epoch) is not an error
        trainer.callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=patience, check_finite=False, strict=False))


def fit_summary(run_dir: str | Path | None, best: str | None, metrics: Mapping[str, float]) -> str:
    """The lines ``fit`` prints at the end: run folder, best checkpoint, test metrics."""
    lines = [f"attnfuse fit: run folder {run_dir}", f"attnfuse fit: best checkpoint {best or '(none written)'}"]
    if metrics:
        lines.append("attnfuse fit: test " + ", ".join(f"{k}={float(v):.4f}" for k, v in sorted(metrics.items())))
    return "\n".join(lines)


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def make_cli(args: Any, *, run: bool = True, **kwargs: Any) -> AttnfuseCLI:
    """The attnfuse LightningCLI over ``args`` (argv list, or a config mapping with ``run=False``).

    A parser error raises ``argparse.ArgumentError`` (an unknown option's message says which one was meant)
    instead of printing the usage and exiting; options are never abbreviated. Every stage runs with the
    intra-op thread count chosen from the model size (:class:`~attnfuse.train.console.ThreadsCallback`).
    """
    from attnfuse.train.console import ArgumentParser, ThreadsCallback

    torch.set_float32_matmul_precision("high")
    epilog = "attnfuse also takes --threads N (intra-op CPU threads; default from the model size, or ATTNFUSE_THREADS)."
    parser_kwargs = {"exit_on_error": False, **{cmd: {"epilog": epilog} for cmd in ("fit", "validate", "test", "predict")},
                     **kwargs.pop("parser_kwargs", {})}
    return AttnfuseCLI(
        FusionTask,
        FusionDataModule,
        args=args,
        run=run,
        seed_everything_default=0,
        trainer_defaults={"max_epochs": 20, "deterministic": True, "default_root_dir": "runs/cli",
                          "callbacks": [ThreadsCallback()]},  # trainer_defaults callbacks are always added
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
        parser_class=ArgumentParser,
        parser_kwargs=parser_kwargs,
        **kwargs,
    )


def run_lightning(args: list[str] | None) -> int:
    """Run a LightningCLI subcommand with ``args`` (``["fit", "--config", ...]``; None = ``sys.argv[1:]``)."""
    make_cli(args)
    return 0

"""``FusionPredictor``: fit / predict / evaluate / save / export on a DataFrame, beside the CLI.

In the spirit of AutoGluon's ``MultiModalPredictor``: describe the table once (a
:class:`~attnfuse.data.TableSchema`), then ``fit(df)``, ``predict(df)``, ``predict_proba(df)``,
``evaluate(df)``, ``save(dir)`` / ``FusionPredictor.load(dir)``, ``export(path, df)``.

Status: the same objects as ``attnfuse fit`` (:class:`FusionDataModule`, :class:`FusionTask`, a Lightning
``Trainer`` with the CLI's defaults and :func:`add_default_callbacks`), seeded as LightningCLI seeds, so a
predictor and a CLI run with the same settings give the same metrics (tested to 1e-6 on CPU).
Predictions go through :meth:`FusionTask.predict_step`, i.e. the task's prediction columns that
``attnfuse predict --output`` writes.

Example:
    >>> df, schema = attnfuse.data.make_synthetic_table(300)  # doctest: +SKIP
    >>> predictor = FusionPredictor(schema, max_epochs=5).fit(df)  # doctest: +SKIP
    >>> predictor.predict(df.head())  # Series of labels, index of df  # doctest: +SKIP
    >>> predictor.predict_proba(df.head())  # one column per class, in class order  # doctest: +SKIP
    >>> predictor.evaluate(df)  # {"acc": ..., "f1": ..., "auroc": ..., "loss": ...}  # doctest: +SKIP
    >>> predictor.save("my_model"); FusionPredictor.load("my_model").predict(df)  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib.util
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import pandas as pd
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import move_data_to_device
from torch import Tensor, nn
from torch.utils.data import DataLoader

from attnfuse.data import (
    InputSpec,
    Source,
    Split,
    TableDataset,
    TablePreprocessor,
    TableSchema,
    collate_fn,
    load_table,
    text_arrays,
)
from attnfuse.fusion import get_fusion
from attnfuse.models.fusion_model import FusionFactory, describe_factory, resolve_fusion
from attnfuse.train.checkpoints import CheckpointError, atomic_path, load_checked, save_checked
from attnfuse.train.console import ThreadsCallback, quiet_console
from attnfuse.train.datamodule import FusionDataModule
from attnfuse.train.lightning_cli import add_default_callbacks, fit_summary, predictions_frame
from attnfuse.train.module import FusionTask, import_class_path
from attnfuse.train.tasks import Classification, Multilabel, Regression, Retrieval, Survival, Task, get_task
from attnfuse.train.threads import model_threads

__all__ = ["FusionPredictor"]

#: files of a saved predictor (:meth:`FusionPredictor.save`)
CONFIG_FILE, PREPROCESSOR_FILE, WEIGHTS_FILE = "predictor.json", "preprocessor.json", "model.pt"
_FORMAT, _VERSION = "attnfuse.FusionPredictor", 1


class FusionPredictor:
    """Train and use a fusion model on a table held in a DataFrame.

    The table is described by ``schema`` (or by ``inputs`` + ``target``); every other argument is a
    setting of ``attnfuse fit`` with the same name and default (``model.*``, ``data.*``, ``trainer.max_epochs``,
    ``seed_everything``, ``--patience``), except ``test_fraction`` (0: train on every row but the validation rows).

    Args:
        schema: the table's :class:`~attnfuse.data.TableSchema` or its dict (``{"target", "task", "inputs"}``;
            survival: ``time`` + ``event``).
        inputs: instead of ``schema``: the inputs (:class:`~attnfuse.data.InputSpec` or dicts), with ``target``.
        target: with ``inputs``: the target column (a list of 0/1 columns for multilabel).
        task: the task: a registered name (``classification``, ``multilabel``, ``regression``, ``survival``,
            ``retrieval``), a :class:`~attnfuse.train.tasks.Task` with its options (e.g.
            ``Classification(loss="focal")``) or ``{"class_path", "init_args"}``; default the schema's task.
        fusion: the fusion: a registered name (``attnfuse list``), a class, a ``functools.partial`` of one
            with options bound, or ``{"class_path", "init_args"}`` as in a config.
        dim, pooling, dropout, lr, weight_decay, encoder_options, baseline: as :class:`FusionTask`.
        max_epochs: training epochs (early stopping may end sooner).
        batch_size: batch size of training, validation and prediction.
        seed: seeds the split, the initialisation and the shuffling (as ``seed_everything`` + ``data.seed``).
        val_fraction: validation rows drawn from the training table (stratified as in the CLI) when
            :meth:`fit` gets no ``tuning_df``; they choose the best epoch and stop training early.
        test_fraction: rows held out of training and tested after fit (``test_metrics``).
        patience: validation checks without improvement before stopping (0 = never stop early).
        id_columns: columns copied into the frames :meth:`predict` / :meth:`predict_proba` return, before the
            predictions (the index is always the input frame's index).
        path: run folder (CSV logs, checkpoints, split and preprocessing); default ``runs/predictor``.
        trainer_options: further ``lightning.pytorch.Trainer`` arguments (``accelerator``, ``precision``,
            ``logger``, ...) for a single-process run; for multi-device training use ``attnfuse fit``.
        progress: show Lightning's progress bar, model summary and info lines.

    Attributes (after :meth:`fit` or :meth:`load`):
        module: the :class:`FusionTask` with the best epoch's weights. preprocessor: the fitted
        :class:`~attnfuse.data.TablePreprocessor`. task: the bound task. classes: label values
        (classification, retrieval), label columns (multilabel) or None. metrics: validation metrics of
        the best checkpoint (``val_*``). test_metrics: ``test_*`` (empty without a test split).
        run_dir, best_checkpoint, split (row positions of the table given to :meth:`fit`).

    Raises:
        ValueError: conflicting or invalid arguments (a schema and ``inputs``, bad fractions ...).
        KeyError: an unknown fusion or task name (listing the registered ones).
    """

    def __init__(
        self,
        schema: TableSchema | Mapping[str, Any] | None = None,
        *,
        inputs: Sequence[InputSpec | Mapping[str, Any]] | None = None,
        target: str | Sequence[str] | None = None,
        task: str | Task | Mapping[str, Any] | None = None,
        fusion: FusionFactory | str | Mapping[str, Any] = "early",
        dim: int = 64,
        pooling: Literal["auto", "mean", "fusion", "cls", "attention"] = "auto",
        dropout: float = 0.1,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        max_epochs: int = 20,
        batch_size: int = 64,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.0,
        patience: int = 10,
        id_columns: Sequence[str] | None = None,
        path: str | os.PathLike | None = None,
        baseline: Literal["concat_mlp", "linear"] | None = None,
        encoder_options: Mapping[str, Mapping[str, Any]] | None = None,
        trainer_options: Mapping[str, Any] | None = None,
        progress: bool = False,
    ) -> None:
        self.task_spec = _task(task)
        self.schema = _schema(schema, inputs, target, self.task_spec)
        self.fusion = _fusion(fusion)
        for name, value, low in (("dim", dim, 1), ("max_epochs", max_epochs, 1), ("batch_size", batch_size, 1),
                                 ("patience", patience, 0)):
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
            raise ValueError(f"val_fraction and test_fraction must be >= 0 and sum to less than 1, got {val_fraction}, "
                             f"{test_fraction}")
        self.id_columns = list(id_columns or [])
        used = set(self.schema.target_columns) | {c for s in self.schema.inputs for c in s.columns}
        clash = sorted(set(self.id_columns) & used)
        if clash:
            raise ValueError(f"id_columns {clash} are input or target columns of the schema; id columns are only copied")
        self.options: dict[str, Any] = {
            "dim": dim, "pooling": pooling, "dropout": dropout, "lr": lr, "weight_decay": weight_decay,
            "max_epochs": max_epochs, "batch_size": batch_size, "seed": seed, "val_fraction": val_fraction,
            "test_fraction": test_fraction, "patience": patience, "id_columns": self.id_columns, "baseline": baseline,
            "encoder_options": _plain(encoder_options, "encoder_options"),
        }
        self.path = Path(path) if path is not None else Path("runs") / "predictor"
        self.trainer_options = dict(trainer_options or {})
        self.progress = progress
        self.module: FusionTask | None = None
        self.preprocessor: TablePreprocessor | None = None
        self.split: Split | None = None
        self.run_dir: str | None = None
        self.best_checkpoint: str | None = None
        self.metrics: dict[str, float] = {}
        self.test_metrics: dict[str, float] = {}
        self.epochs: int | None = None

    # ------------------------------------------------------------------ training
    def fit(self, train_df: pd.DataFrame | str | os.PathLike, tuning_df: pd.DataFrame | str | os.PathLike | None = None
            ) -> FusionPredictor:
        """Train on ``train_df`` (a DataFrame or a CSV / Parquet path) and keep the best epoch's weights.

        Without ``tuning_df``, ``val_fraction`` (and ``test_fraction``) of ``train_df`` are split off
        exactly as ``attnfuse fit`` splits a table (same seed, same stratification), so a CLI run on the same
        table gives the same model. With ``tuning_df``, its rows are the validation rows and every row of
        ``train_df`` trains (the preprocessing is fitted on ``train_df`` only); ``test_fraction`` must be 0.

        Steps, as LightningCLI runs ``fit``: ``seed_everything(seed, workers=True)``, the data module,
        :class:`FusionTask` (encoder configs and target description from the data), a ``Trainer``
        (``deterministic=True``, ``max_epochs``, ``default_root_dir=path``, CSV logs) with
        :func:`add_default_callbacks` (best checkpoint and early stopping on the task's metric), ``fit``;
        then the best checkpoint is validated (``metrics``) and, with a test split, tested (``test_metrics``).

        Returns:
            self.

        Raises:
            SchemaError: the table does not match the schema. ValueError: ``test_fraction`` with ``tuning_df``.
        """
        frame = _frame(train_df, "train_df")
        opts = self.options
        with _quiet_unless(self.progress):
            pl.seed_everything(opts["seed"], workers=True)  # as LightningCLI._set_seed, before the data and model
        if tuning_df is None:
            data = FusionDataModule.from_source(
                Source(frame, self.schema, text_arrays(frame, self.schema)), batch_size=opts["batch_size"],
                seed=opts["seed"], val_fraction=opts["val_fraction"], test_fraction=opts["test_fraction"])
        else:
            if opts["test_fraction"]:
                raise ValueError("test_fraction holds rows of train_df out only when fit gets no tuning_df; set "
                                 "test_fraction=0 and evaluate() on your own test table")
            tuning = _frame(tuning_df, "tuning_df")
            both = pd.concat([frame, tuning], ignore_index=True)
            n, m = len(frame), len(tuning)
            split = Split(train=np.arange(n), val=np.arange(n, n + m), test=np.arange(0), num_rows=n + m,
                          seed=opts["seed"], fractions=(n / (n + m), m / (n + m), 0.0), stratified=False)
            data = _GivenSplitData.with_split(Source(both, self.schema, text_arrays(both, self.schema)), split,
                                              batch_size=opts["batch_size"], seed=opts["seed"])
        with _matmul_precision(), _quiet_unless(self.progress):
            module = self._build_module(data.encoder_configs, data.target_info)
            has_val = len(data.split["val"]) > 0
            logger = CSVLogger(save_dir=str(self.path))
            trainer = pl.Trainer(**{
                "max_epochs": opts["max_epochs"], "deterministic": True, "default_root_dir": str(self.path),
                "logger": logger, "enable_progress_bar": self.progress, "enable_model_summary": self.progress,
                **({} if has_val else {"limit_val_batches": 0}), **self.trainer_options})
            add_default_callbacks(trainer, module, patience=opts["patience"])
            trainer.callbacks.append(ThreadsCallback())  # intra-op threads from the model size, as in `attnfuse fit`
            trainer.fit(module, datamodule=data)
            run_dir = trainer.log_dir or trainer.default_root_dir
            if trainer.is_global_zero:  # split.json and preprocessor.json beside the logs, as `attnfuse fit` writes them
                data.save_run(run_dir)
            best = getattr(trainer.checkpoint_callback, "best_model_path", "") or None
            val = trainer.validate(module, datamodule=data, ckpt_path=best, verbose=False, weights_only=True) if has_val else [{}]
            test = (trainer.test(module, datamodule=data, ckpt_path=best, verbose=False, weights_only=True)
                    if len(data.split["test"]) else [{}])
        module.cpu().eval()
        self.module, self.preprocessor, self.split = module, data.preprocessor, data.split
        self.run_dir, self.best_checkpoint, self.epochs = str(run_dir), best, trainer.current_epoch
        self.metrics = {k: float(v) for k, v in (val[0] if val else {}).items()}
        self.test_metrics = {k: float(v) for k, v in (test[0] if test else {}).items()}
        return self

    def _build_module(self, encoder_configs: Mapping[str, Any], target_info: Mapping[str, Any]) -> FusionTask:
        opts = self.options
        return FusionTask(
            self.fusion, copy.deepcopy(self.task_spec) if isinstance(self.task_spec, Task) else self.task_spec,
            dim=opts["dim"], pooling=opts["pooling"], dropout=opts["dropout"],
            encoder_options=copy.deepcopy(opts["encoder_options"]), baseline=opts["baseline"], lr=opts["lr"],
            weight_decay=opts["weight_decay"], encoder_configs=dict(encoder_configs), target_info=dict(target_info))

    def fit_summary(self) -> dict[str, Any]:
        """Run folder, best checkpoint, epochs trained, validation and test metrics, task and fusion."""
        self._fitted()
        return {"run_dir": self.run_dir, "best_checkpoint": self.best_checkpoint, "epochs": self.epochs,
                "metrics": dict(self.metrics), "test_metrics": dict(self.test_metrics),
                "task": self.task.describe(), "fusion": describe_factory(self.fusion),
                "text": fit_summary(self.run_dir, self.best_checkpoint, {**self.metrics, **self.test_metrics})}

    # ------------------------------------------------------------------ using the model
    @property
    def task(self) -> Task:
        """The task bound to the data (after :meth:`fit` / :meth:`load`)."""
        return self._fitted().task

    @property
    def classes(self) -> list[Any] | None:
        """Label values in class order (classification, retrieval), label columns (multilabel), else None."""
        self._fitted()
        if self.preprocessor.classes is not None:
            return list(self.preprocessor.classes)
        if self.schema.task == "multilabel":
            return list(self.schema.target_columns)
        return None

    def predict_columns(self, df: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
        """Every prediction column of the task, as ``attnfuse predict --output`` writes them (without ``row``).

        E.g. ``prediction`` and ``prob_<label>`` (classification, + ``uncertainty`` when evidential),
        ``prediction`` / ``pred_<target>`` (+ ``std*``) for regression, ``risk`` for survival,
        ``pred_<label>`` and ``prob_<label>`` for multilabel, ``emb_<j>`` for retrieval. Index: ``df``'s
        index; ``id_columns`` first. Missing inputs (columns absent, or null cells) are masked as in the CLI.
        """
        frame = _frame(df, "df")
        return self._with_ids(self._columns(frame), frame)

    def predict(self, df: pd.DataFrame | str | os.PathLike) -> pd.Series | pd.DataFrame:
        """Predictions for the rows of ``df`` (the target columns may be absent).

        Returns:
            classification: a Series of original label values named after the target; regression: the
            values (a Series, or one column per target); survival: a Series ``risk`` (higher = earlier
            event); multilabel: a 0/1 frame with one column per label; retrieval: the embeddings
            (``emb_0 ...``). Index: ``df``'s index. With ``id_columns``: a DataFrame with those columns first.
        """
        frame = _frame(df, "df")
        cols, task = self._columns(frame), self.task
        names = list(self.schema.target_columns)
        if isinstance(task, Retrieval):
            out: pd.Series | pd.DataFrame = cols[[c for c in cols.columns if c.startswith("emb_")]]
        elif isinstance(task, Classification | Regression) and "prediction" in cols:
            out = cols["prediction"].rename(names[0] if names else "prediction")
        elif isinstance(task, Multilabel | Regression):
            out = cols[[f"pred_{t}" for t in names]].set_axis(names, axis=1)
        elif isinstance(task, Survival):
            out = cols["risk"]
        else:  # a task registered elsewhere: its own columns
            out = cols
        return self._with_ids(out, frame)

    def predict_proba(self, df: pd.DataFrame | str | os.PathLike) -> pd.DataFrame:
        """Class probabilities: one column per class in class order, named by the original labels
        (classification), or per label column (multilabel). Index: ``df``'s index; ``id_columns`` first.

        Raises:
            ValueError: another task (regression, survival, retrieval have no class probabilities).
        """
        task = self.task
        if not isinstance(task, Classification | Multilabel):
            raise ValueError(f"predict_proba is for classification and multilabel tasks; this predictor's task is "
                             f"{task.name!r}: use predict()")
        frame = _frame(df, "df")
        cols = self._columns(frame)
        labels = self.classes
        out = cols[[f"prob_{c}" for c in labels]].set_axis(pd.Index(labels), axis=1)
        return self._with_ids(out, frame)

    def evaluate(self, df: pd.DataFrame | str | os.PathLike) -> dict[str, float]:
        """The task's metrics and loss on a labelled table, as ``attnfuse test`` computes them.

        Returns:
            ``{"acc", "f1", "auroc", "loss"}`` for classification (regression ``mae, rmse, r2``, survival
            ``cindex``, multilabel ``acc, f1, auroc``, retrieval ``recall@k``): the CLI's ``test_*`` names
            without the ``test_`` prefix. Inputs missing in ``df`` are masked, as in the CLI.

        Raises:
            SchemaError: target columns missing or an unseen class.
        """
        module = self._fitted()
        frame = _frame(df, "df")
        loader = self._loader(frame, labelled=True)
        device = _device(module)
        accelerator, devices = ("gpu", [device.index or 0]) if device.type == "cuda" else ("cpu", 1)
        with _matmul_precision(), _quiet_unless(self.progress):
            trainer = pl.Trainer(accelerator=accelerator, devices=devices, logger=False, enable_checkpointing=False,
                                 enable_progress_bar=False, enable_model_summary=False, callbacks=[ThreadsCallback()])
            (result,) = trainer.test(module, dataloaders=loader, verbose=False)
        module.to(device).eval()
        return {k.removeprefix("test_"): float(v) for k, v in result.items()}

    def to(self, device: str | torch.device) -> FusionPredictor:
        """Move the model (predict and evaluate run where it is; CPU after fit and load). Returns self."""
        self._fitted().to(device)
        return self

    def model_inputs(self, df: pd.DataFrame | str | os.PathLike) -> dict[str, dict[str, Tensor]]:
        """The model's input batch for the rows of ``df``: ``{input: {"x": (B, ...), "mask": (B,)}}`` (CPU)."""
        frame = _frame(df, "df")
        self._fitted()
        return collate_fn([self._dataset(frame, labelled=False)[i] for i in range(len(frame))])["inputs"]

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write the predictor to the folder ``path``: ``predictor.json`` (constructor arguments, fusion as
        ``{"class_path", "init_args"}``, task as ``task.describe()``, the data's encoder configs and target
        description, metrics), ``preprocessor.json``, ``model.pt`` (the module's state dict) and
        ``model.pt.sha256`` (checked by :meth:`load`).

        Each file is written to a temporary file beside it and renamed into place; ``predictor.json`` comes
        last, so a folder holding it holds a complete bundle.

        Args:
            path: the bundle folder (created if needed).
            overwrite: replace a bundle already saved there (otherwise an error).

        Raises:
            ValueError: a fusion factory that cannot be written as a class path with plain options.
            FileExistsError: ``path`` already holds a saved predictor and ``overwrite`` is False.
        """
        module = self._fitted()
        fusion = describe_factory(self.fusion)
        partial = self.fusion if isinstance(self.fusion, functools.partial) else None
        if not isinstance(fusion, dict) or (partial is not None and (partial.args or len(fusion["init_args"]) != len(partial.keywords))):
            raise ValueError(f"cannot save fusion {self.fusion!r}: pass a fusion class, a registered name or "
                             "functools.partial(FusionClass, **plain options) (numbers, strings, lists, dicts)")
        config = {
            "format": _FORMAT, "version": _VERSION, "schema": self.schema.to_dict(), "task": self.task.describe(),
            "fusion": fusion, "options": self.options, "encoder_configs": module.hparams["encoder_configs"],
            "target_info": module.hparams["target_info"], "metrics": self.metrics, "test_metrics": self.test_metrics,
            "path": str(self.path), "run_dir": self.run_dir, "best_checkpoint": self.best_checkpoint, "epochs": self.epochs,
        }
        out = Path(path)
        if out.exists() and not out.is_dir():
            raise FileExistsError(f"cannot save a FusionPredictor to {str(out)!r}: it is a file, not a folder")
        existing = [n for n in (CONFIG_FILE, PREPROCESSOR_FILE, WEIGHTS_FILE) if (out / n).exists()]
        if existing and not overwrite:
            raise FileExistsError(f"{str(out)!r} already holds a saved FusionPredictor ({', '.join(existing)}); pass "
                                  "overwrite=True to replace it")
        out.mkdir(parents=True, exist_ok=True)
        text = json.dumps(config, indent=1, default=_json_default)
        save_checked({k: v.detach().cpu() for k, v in module.state_dict().items()}, out / WEIGHTS_FILE)
        with atomic_path(out / PREPROCESSOR_FILE) as tmp:
            self.preprocessor.save(tmp)
        with atomic_path(out / CONFIG_FILE) as tmp:
            tmp.write_text(text)
        return out

    @classmethod
    def load(cls, path: str | os.PathLike) -> FusionPredictor:
        """Read a predictor written by :meth:`save`.

        The weights are checked against ``model.pt.sha256`` (a bundle without it loads with an
        :class:`~attnfuse.train.checkpoints.UncheckedCheckpointWarning`) and read with
        ``torch.load(weights_only=True)``.

        Raises:
            FileNotFoundError: no such folder, or a file of the bundle missing.
            ValueError: a corrupt or foreign bundle (unreadable JSON / weights, weights that do not fit, weights
                that do not match their checksum: a :class:`~attnfuse.train.checkpoints.CheckpointError`).
        """
        folder = Path(path)
        if not folder.is_dir():
            raise FileNotFoundError(f"no saved FusionPredictor at {str(folder)!r} (not a folder); write one with "
                                    "predictor.save(path)")
        missing = [n for n in (CONFIG_FILE, PREPROCESSOR_FILE, WEIGHTS_FILE) if not (folder / n).is_file()]
        if missing:
            raise FileNotFoundError(f"{str(folder)!r} is not a complete saved FusionPredictor: missing {missing}")
        try:
            config = json.loads((folder / CONFIG_FILE).read_text())
            pre = TablePreprocessor.load(folder / PREPROCESSOR_FILE)
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
            raise ValueError(f"corrupt FusionPredictor bundle {str(folder)!r}: {type(err).__name__}: {err}") from None
        if not isinstance(config, dict) or config.get("format") != _FORMAT:
            raise ValueError(f"{str(folder / CONFIG_FILE)!r} is not a FusionPredictor config (format {_FORMAT!r})")
        if config.get("version") != _VERSION:
            raise ValueError(f"{str(folder)!r} was saved in FusionPredictor format version {config.get('version')}; "
                             f"this attnfuse reads version {_VERSION}")
        try:
            state = load_checked(folder / WEIGHTS_FILE, what="FusionPredictor weights")
        except CheckpointError as err:
            raise CheckpointError(f"corrupt {err}") from None
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"corrupt FusionPredictor weights {str(folder / WEIGHTS_FILE)!r}: not a state dict "
                                  f"of tensors ({type(state).__name__})")
        try:
            predictor = cls(pre.schema, task=config["task"], fusion=config["fusion"], path=config.get("path"),
                            **config["options"])
            with torch.random.fork_rng(devices=[]):  # building the module must not move the global RNG
                module = predictor._build_module(config["encoder_configs"], config["target_info"])
            module.load_state_dict(state)
        except (KeyError, TypeError, RuntimeError) as err:
            raise ValueError(f"corrupt FusionPredictor bundle {str(folder)!r}: {type(err).__name__}: {err}") from None
        predictor.module, predictor.preprocessor = module.eval(), pre
        predictor.metrics, predictor.test_metrics = dict(config.get("metrics") or {}), dict(config.get("test_metrics") or {})
        predictor.run_dir, predictor.best_checkpoint = config.get("run_dir"), config.get("best_checkpoint")
        predictor.epochs = config.get("epochs")
        return predictor

    def export(self, path: str | os.PathLike, example_df: pd.DataFrame | str | os.PathLike, *,
               format: Literal["torch", "onnx"] = "torch", overwrite: bool = False) -> Path:
        """Export the whole trained model (encoders, fusion, head) for the batch tensors of :meth:`model_inputs`.

        ``format="torch"``: ``torch.export`` with a dynamic batch size, saved with ``torch.export.save``;
        use ``torch.export.load(path).module()(predictor.model_inputs(df))``, which returns the task's raw
        output (logits, risks, embeddings ...; ``predictor.task.predict(output)`` turns it into the
        prediction columns). ``format="onnx"``: ``torch.onnx.export(..., dynamo=True)``.

        The file is written to a temporary file beside it and renamed into place.

        Args:
            path: output file (``.pt2`` for torch, ``.onnx``).
            example_df: rows to trace with (at least 2; the batch size stays dynamic).
            overwrite: replace an existing file at ``path`` (otherwise an error).

        Raises:
            ImportError: ONNX without the ``onnx`` / ``onnxscript`` packages.
            FileExistsError: ``path`` exists and ``overwrite`` is False.
        """
        module = self._fitted()
        if format not in ("torch", "onnx"):
            raise ValueError(f"format must be 'torch' or 'onnx', got {format!r}")
        if format == "onnx" and not all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript")):
            raise ImportError("ONNX export needs the onnx and onnxscript packages: pip install onnx onnxscript")
        inputs = self.model_inputs(example_df)
        if next(iter(next(iter(inputs.values())).values())).shape[0] < 2:
            raise ValueError("example_df needs at least 2 rows (a batch of 1 would fix the batch size)")
        wrapper = _ExportModel(module.cpu().eval())
        batch = torch.export.Dim.DYNAMIC
        shapes = ({name: {key: {0: batch} for key in tensors} for name, tensors in inputs.items()},)
        out = Path(path)
        if out.exists() and not overwrite:
            raise FileExistsError(f"{str(out)!r} exists; pass overwrite=True to replace it")
        with _matmul_precision(), atomic_path(out) as tmp:
            if format == "onnx":
                torch.onnx.export(wrapper, (inputs,), str(tmp), dynamo=True, dynamic_shapes=shapes)
            else:
                torch.export.save(torch.export.export(wrapper, (inputs,), dynamic_shapes=shapes), str(tmp))
        return out

    # ------------------------------------------------------------------ helpers
    def _fitted(self) -> FusionTask:
        if self.module is None or self.preprocessor is None:
            raise RuntimeError("this FusionPredictor is not trained: call fit(df) or FusionPredictor.load(path) first")
        return self.module

    def _dataset(self, frame: pd.DataFrame, *, labelled: bool) -> TableDataset:
        if len(frame) == 0:
            raise ValueError("the table has no rows")
        pre = self.preprocessor
        encoded = pre.transform(frame, arrays=text_arrays(frame, pre.schema), require_target=labelled,
                                allow_missing_inputs=True)
        return TableDataset(encoded)

    def _loader(self, frame: pd.DataFrame, *, labelled: bool) -> DataLoader:
        return DataLoader(self._dataset(frame, labelled=labelled), batch_size=self.options["batch_size"],
                          collate_fn=collate_fn)

    @torch.inference_mode()
    def _columns(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The task's prediction columns via :meth:`FusionTask.predict_step`, index = ``frame.index``."""
        module = self._fitted()
        loader = self._loader(frame, labelled=False)
        device, was_training = _device(module), module.training
        module.eval()
        try:
            with _matmul_precision(), model_threads(module):
                outputs = [module.predict_step(move_data_to_device(b, device), i) for i, b in enumerate(loader)]
        finally:
            module.train(was_training)
        table = predictions_frame(outputs)
        return table.drop(columns="row").set_axis(frame.index[table["row"].to_numpy()], axis=0)

    def _with_ids(self, out: pd.Series | pd.DataFrame, frame: pd.DataFrame) -> pd.Series | pd.DataFrame:
        if not self.id_columns:
            return out
        absent = [c for c in self.id_columns if c not in frame.columns]
        if absent:
            raise ValueError(f"id column(s) {absent} are not in the table; columns: {list(frame.columns)}")
        return pd.concat([frame[self.id_columns], out.to_frame() if isinstance(out, pd.Series) else out], axis=1)

    def __repr__(self) -> str:
        state = f"trained, run {self.run_dir}" if self.module is not None else "not trained"
        return f"FusionPredictor(task={self.schema.task!r}, inputs={self.schema.names}, {state})"


class _GivenSplitData(FusionDataModule):
    """A :class:`FusionDataModule` whose split is given (``given_split``: the rows of ``tuning_df`` validate)
    instead of drawn; the preprocessing is fitted on the given training rows."""

    given_split: Split

    @classmethod
    def with_split(cls, source: Source, split: Split, **kwargs: Any) -> _GivenSplitData:
        data = cls.from_source(source, **kwargs)
        data.given_split = split
        return data

    def _load(self) -> None:
        if self.encoded is not None:
            return
        source = self._source()
        self.split = self.given_split
        self.preprocessor = TablePreprocessor.fit(source.frame, source.schema, arrays=source.arrays,
                                                  rows=self.split["train"], standardize=self.hparams.standardize)
        self.encoded = self.preprocessor.transform(source.frame, arrays=source.arrays)
        self.source = source


class _ExportModel(nn.Module):
    """``forward(inputs) -> output``: the trained module on a batch ``{input: {"x", "mask"}}`` (for ``torch.export``)."""

    def __init__(self, module: FusionTask) -> None:
        super().__init__()
        self.module = module

    def forward(self, inputs: dict[str, dict[str, Tensor]]) -> Tensor:
        return self.module(inputs)


def _schema(schema: TableSchema | Mapping[str, Any] | None, inputs: Sequence[Any] | None,
            target: str | Sequence[str] | None, task: str | Task | None) -> TableSchema:
    if schema is not None:
        if inputs is not None or target is not None:
            raise ValueError("give either schema= or inputs= with target=, not both")
        if isinstance(schema, TableSchema):
            return schema
        if isinstance(schema, Mapping):
            return TableSchema.from_dict(schema)
        raise TypeError(f"schema must be a TableSchema or a dict, got {type(schema).__name__}")
    if inputs is None or target is None:
        raise ValueError("describe the table: FusionPredictor(schema) or FusionPredictor(inputs=[...], target=COLUMN) "
                         "(survival needs a schema with time and event)")
    specs = [s if isinstance(s, InputSpec) else InputSpec(**dict(s)) for s in inputs]
    if task is None:
        kind = "classification" if isinstance(target, str) or len(target) == 1 else "multilabel"
    else:  # the schema kind the task trains on (retrieval also trains on classification tables)
        kind = (get_task(task) if isinstance(task, str) else type(task)).accepts[0]
    return TableSchema(inputs=tuple(specs), target=target if isinstance(target, str) else tuple(target), task=kind)


def _task(task: str | Task | Mapping[str, Any] | None) -> str | Task | None:
    if task is None or isinstance(task, Task):
        return task
    if isinstance(task, str):
        get_task(task)  # unknown names fail now, listing the registered tasks
        return task
    if isinstance(task, Mapping) and "class_path" in task:
        path = task["class_path"]
        cls = get_task(path) if "." not in path else import_class_path(path)
        return cls(**dict(task.get("init_args") or {}))
    raise TypeError(f"task must be a registered name, a Task or {{'class_path', 'init_args'}}, got {task!r}")


def _fusion(fusion: FusionFactory | str | Mapping[str, Any]) -> FusionFactory:
    if isinstance(fusion, Mapping):
        if "class_path" not in fusion:
            raise ValueError(f"a fusion mapping needs class_path (and init_args), got {dict(fusion)}")
        path = fusion["class_path"]
        cls = import_class_path(path) if "." in path else get_fusion(path)
        return functools.partial(cls, **dict(fusion.get("init_args") or {}))
    return resolve_fusion(fusion)


def _plain(value: Mapping[str, Any] | None, name: str) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        return json.loads(json.dumps(value))
    except TypeError:
        raise ValueError(f"{name} must hold plain values (numbers, strings, lists, dicts), got {value!r}") from None


def _frame(df: pd.DataFrame | str | os.PathLike, name: str) -> pd.DataFrame:
    if isinstance(df, pd.DataFrame):
        return df
    if isinstance(df, str | os.PathLike):
        return load_table(df)
    raise TypeError(f"{name} must be a pandas DataFrame or a .csv / .parquet path, got {type(df).__name__}")


def _device(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} {value!r} to the predictor config")


@contextlib.contextmanager
def _matmul_precision(precision: str = "high") -> Iterator[None]:
    """The float32 matmul precision ``attnfuse fit`` sets (``make_cli``), restored afterwards."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _quiet_unless(progress: bool) -> contextlib.AbstractContextManager:
    return quiet_console(info=progress)

"""``attnfuse fit | validate | test | predict``: LightningCLI over FusionTask and FusionDataModule.

The data module's input description is linked into the model (``encoder_configs``, ``num_outputs``,
``task``), so a config only says what to fuse and how. The resolved config is saved beside the
checkpoints, with the split and the fitted preprocessing.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import torch
from jsonargparse import Namespace
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from attnfuse.train import FusionDataModule, FusionTask

__all__ = ["AttnfuseCLI", "PredictionWriter", "run_lightning"]


class PredictionWriter(BasePredictionWriter):
    """Write predictions (and optionally per-input attention shares) to CSV or Parquet.

    Columns: ``row`` (position in the predicted table), ``prediction``, ``prob_<class>`` for
    classification, ``attention_<input>`` with ``attention=True``.
    """

    def __init__(self, path: str | Path, *, attention: bool = False) -> None:
        super().__init__(write_interval="epoch")
        self.path, self.attention = Path(path), attention
        if self.path.suffix not in (".csv", ".parquet"):
            raise ValueError(f"--output must end in .csv or .parquet, got {str(self.path)!r}")

    def write_on_epoch_end(self, trainer, pl_module, predictions, batch_indices) -> None:
        rows = []
        for out in predictions:
            frame = pd.DataFrame({"row": out["index"].numpy(), "prediction": out["prediction"].numpy()})
            if "probabilities" in out:
                classes = getattr(trainer.datamodule.preprocessor, "classes", None) or range(out["probabilities"].shape[1])
                for j, c in enumerate(classes):
                    frame[f"prob_{c}"] = out["probabilities"][:, j].numpy()
            if "attention" in out:
                for j, name in enumerate(out["attention_names"]):
                    frame[f"attention_{name}"] = out["attention"][:, j].numpy()
            rows.append(frame)
        table = pd.concat(rows, ignore_index=True)
        if torch.distributed.is_available() and torch.distributed.is_initialized() and trainer.world_size > 1:
            # every rank predicted a shard (the distributed sampler pads with repeats): gather on rank 0
            shards = [None] * trainer.world_size
            torch.distributed.all_gather_object(shards, table)
            if not trainer.is_global_zero:
                return
            table = pd.concat(shards, ignore_index=True).drop_duplicates("row")
        table = table.sort_values("row")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.suffix == ".csv":
            table.to_csv(self.path, index=False)
        else:
            table.to_parquet(self.path, index=False)
        print(f"attnfuse predict: wrote {len(table)} rows to {self.path}")


class AttnfuseCLI(LightningCLI):
    """LightningCLI with the data -> model links and a prediction writer."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.encoder_configs", "model.encoder_configs", apply_on="instantiate")
        parser.link_arguments("data.num_outputs", "model.num_outputs", apply_on="instantiate")
        parser.link_arguments("data.task", "model.task", apply_on="instantiate")
        parser.link_arguments("data.target_scale", "model.target_scale", apply_on="instantiate")
        parser.add_argument("--output", type=str | None, default=None,
                            help="predict: write predictions to this .csv or .parquet file")
        parser.add_argument("--attention", type=bool, default=False,
                            help="predict: add each input's share of the fusion token's attention")

    def before_instantiate_classes(self) -> None:
        config = self.config[self.subcommand]
        # evaluate / predict with the preprocessing saved beside the checkpoint (never re-fitted), so a
        # moved or changed training table cannot silently change the inputs the model sees
        ckpt = config.get("ckpt_path")
        if self.subcommand in ("validate", "test", "predict") and ckpt and not config.data.get("preprocessor"):
            saved = Path(ckpt).resolve().parent.parent / "preprocessor.json"
            if saved.is_file():
                config.data.preprocessor = str(saved)
        # a rich progress bar by default (unless the user disabled the bar or chose one)
        trainer = config.trainer
        callbacks = list(trainer.callbacks or [])
        has_bar = any("ProgressBar" in str(getattr(c, "class_path", c)) for c in callbacks)
        if trainer.enable_progress_bar is not False and not has_bar and _rich_available():
            callbacks.append(Namespace(class_path="lightning.pytorch.callbacks.RichProgressBar", init_args=Namespace()))
            trainer.callbacks = callbacks

    def before_fit(self) -> None:
        if self.trainer.is_global_zero:
            self.datamodule.save_run(self.trainer.log_dir or self.trainer.default_root_dir)

    def before_predict(self) -> None:
        cfg = self.config[self.subcommand]
        self.model.predict_attention = bool(cfg.get("attention"))
        if cfg.get("output"):
            self.trainer.callbacks.append(PredictionWriter(cfg["output"], attention=bool(cfg.get("attention"))))


def _rich_available() -> bool:
    try:
        import rich  # noqa: F401
    except ImportError:
        return False
    return True


def run_lightning(args: list[str] | None) -> int:
    """Run a LightningCLI subcommand with ``args`` (``["fit", "--config", ...]``; None = ``sys.argv[1:]``)."""
    torch.set_float32_matmul_precision("high")
    AttnfuseCLI(
        FusionTask,
        FusionDataModule,
        args=args,
        seed_everything_default=0,
        trainer_defaults={"max_epochs": 20, "deterministic": True, "default_root_dir": "runs/cli"},
        save_config_kwargs={"overwrite": True},
        auto_configure_optimizers=False,
    )
    return 0

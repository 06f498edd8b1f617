"""Lightning module: encoders -> fusion -> the task's head, trained with the task's loss and metrics."""

from __future__ import annotations

import functools
import importlib
import random
from collections.abc import Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
from torch import Tensor, nn

from attnfuse.fusion import EarlyFusion, FusionOutput, HierarchicalFusion, LatentBottleneck
from attnfuse.models.fusion_model import (
    ConcatMLP,
    FusionFactory,
    FusionModel,
    build_fusion_model,
    describe_factory,
    factory_class,
    resolve_fusion,
)
from attnfuse.train.tasks import Classification, TargetInfo, Task, get_task, resolve_task

__all__ = ["FusionTask", "import_class_path"]


def import_class_path(path: str) -> type:
    """Import ``"package.module.Class"``. Raises ``ValueError`` naming the path if it does not resolve."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(f"cannot import class_path {path!r}") from None


def _fusion_from(value: FusionFactory | str | Mapping[str, Any]) -> FusionFactory:
    if isinstance(value, Mapping):  # {"class_path", "init_args"} as saved in hparams / run configs
        cls = import_class_path(value["class_path"])
        return functools.partial(cls, **dict(value.get("init_args") or {}))
    return resolve_fusion(value)


def _task_from(value: Task | str | Mapping[str, Any] | None, kind: str) -> Task:
    if isinstance(value, Mapping):
        path = value["class_path"]
        cls = get_task(path) if "." not in path else import_class_path(path)
        return cls(**dict(value.get("init_args") or {}))
    return resolve_task(value, kind)


class FusionTask(pl.LightningModule):
    """Train / evaluate a multi-input model: encoders -> ``fusion`` -> the ``task``'s head and loss.

    Batches are ``{"inputs": {name: {"x", "mask"}}, "target": ...}`` (see :mod:`attnfuse.data.collate`).
    ``encoder_configs`` and ``target_info`` describe the data and are linked from the data module by
    the CLI (and by :class:`attnfuse.train.FusionPredictor`).

    Args:
        fusion: the fusion: a class or ``class_path``/``init_args`` in a config (short names such as
            ``early``, ``EarlyFusion`` are accepted; ``attnfuse list`` shows them); every option has a default.
        task: the task type and its loss options (``Classification``, ``Multilabel``, ``Regression``,
            ``Survival``, ``Retrieval``, or their registered names); default: the data schema's task
            (with an evidential fusion, classification with the evidential loss).
        dim: token width of the encoders and the fusion.
        pooling: head pooling; ``"auto"`` reads the fusion token when it attends to the inputs.
        dropout: dropout in the head (and in the baseline MLP).
        encoder_options: extra encoder arguments by input kind, e.g. ``{"vector": {"num_tokens": 2}}``.
        baseline: ``"concat_mlp"`` (concatenated inputs -> MLP) or ``"linear"`` (a linear model of the
            concatenated inputs) instead of encoders + fusion; ``fusion`` is then unused.
        lr, weight_decay: AdamW settings; cosine decay over all optimiser steps of the run.
        encoder_configs: per-input encoder configuration (linked from the data module).
        target_info: the data's target description (:class:`~attnfuse.train.tasks.TargetInfo`, linked).
        model: a ready model (overrides the builder arguments).
    """

    def __init__(
        self,
        fusion: FusionFactory | str = EarlyFusion,
        task: Task | None = None,
        *,
        dim: int = 64,
        pooling: Literal["auto", "mean", "fusion", "cls", "attention"] = "auto",
        dropout: float = 0.1,
        encoder_options: dict[str, dict[str, Any]] | None = None,
        baseline: Literal["concat_mlp", "linear"] | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        encoder_configs: dict[str, dict[str, Any]] | None = None,
        target_info: dict[str, Any] | None = None,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        info = TargetInfo.from_dict(target_info)
        factory = _fusion_from(fusion)
        if task is None and getattr(factory_class(factory), "output", "tokens") == "dirichlet" and info.kind == "classification":
            task = Classification(loss="evidential")  # an evidential fusion outputs a Dirichlet opinion: train it as one
        self.task = _task_from(task, info.kind)
        self.task.bind(info)
        self.save_hyperparameters(ignore=["model", "fusion", "task"])
        self.hparams["fusion"] = describe_factory(factory)
        self.hparams["task"] = self.task.describe()
        if model is None:
            if not encoder_configs:
                raise ValueError("FusionTask needs encoder_configs (linked from the data module) or model=")
            if baseline is not None:
                model = ConcatMLP(encoder_configs, self.task.output_size(), hidden=2 * dim if baseline == "concat_mlp" else None,
                                  dropout=dropout)
            else:
                model = build_fusion_model(
                    encoder_configs, lambda width, pool: self.task.make_head(width, pooling=pool, dropout=dropout),
                    fusion=factory, dim=dim, pooling=pooling, encoder_options=encoder_options,
                    num_classes=info.num_classes or None, reads_output=self.task.reads_fusion_output,
                )
        self.model = model
        self.val_metrics = self.task.make_metrics().clone(prefix="val_")
        self.test_metrics = self.task.make_metrics().clone(prefix="test_")
        self.predict_attention = False

    @property
    def monitor(self) -> tuple[str, str]:
        """``(logged validation metric, "max" | "min")`` for early stopping and the best checkpoint."""
        name, mode = self.task.monitor
        return f"val_{name}", mode

    def forward(self, inputs: Mapping[str, Mapping[str, Tensor]]) -> Tensor:
        """The task's output for a batch of inputs (logits, alpha, risk, embeddings ...)."""
        return self._run(inputs)[0]

    def _run(self, inputs: Mapping[str, Mapping[str, Tensor]]) -> tuple[Tensor, dict[str, Any]]:
        if not isinstance(self.model, FusionModel):
            out = self.model(inputs)
            return (self.task.from_raw(out) if isinstance(self.model, ConcatMLP) else out), {}
        pred, fused = self.model(inputs, return_fusion=True)
        return pred, _extra(fused)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        """The task's loss on one batch.

        Raises:
            ValueError: the loss is NaN or infinite (names the epoch, step and batch): the run stops
                before this step's optimiser update and no further checkpoint is written.
        """
        pred, extra = self._run(batch["inputs"])
        loss = self.task.loss(pred, batch["target"], epoch=self.current_epoch, extra=extra)
        if not bool(torch.isfinite(loss.detach()).all()):
            raise ValueError(
                f"training loss is {loss.detach().float().mean().item()} at epoch {self.current_epoch}, global step "
                f"{self.global_step} (batch {batch_idx} of the epoch); training stopped. The data "
                f"module gives finite inputs (inf counts as missing), so training diverged: lower model.lr "
                f"(now {self.hparams.lr}), clip gradients (--trainer.gradient_clip_val 1.0) or check the target's scale"
            )
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=pred.shape[0], sync_dist=True)
        return loss

    def _eval_step(self, batch: dict, metrics, stage: str) -> None:
        pred, extra = self._run(batch["inputs"])
        loss = self.task.loss(pred, batch["target"], epoch=self.current_epoch, extra=extra)
        self.log(f"{stage}_loss", loss, prog_bar=True, batch_size=pred.shape[0], sync_dist=True)
        self.task.update_metrics(metrics, pred, batch["target"])

    def _log_metrics(self, metrics, stage: str) -> None:
        values = {k: v for k, v in _flatten(metrics.compute()).items()}
        self.log_dict(values, prog_bar=stage == "val", sync_dist=True)  # equal on every rank (torchmetrics syncs): no warning
        metrics.reset()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def on_test_epoch_end(self) -> None:
        self._log_metrics(self.test_metrics, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Any]:
        pred = self(batch["inputs"])
        out: dict[str, Any] = {"columns": self.task.predict(pred)}
        if "index" in batch:
            out["index"] = batch["index"]
        if self.predict_attention:
            out["attention_names"], out["attention"] = self.input_attention(batch["inputs"])
        return out

    @torch.no_grad()
    def input_attention(self, inputs: Mapping[str, Mapping[str, Tensor]]) -> tuple[list[str], Tensor]:
        """Share of the fusion token's attention going to each input, averaged over layers and heads.

        Returns:
            ``(names, share (B, n_inputs))``: for early / hierarchical fusion the fusion token's attention
            (averaged over cross-source layers and heads; rows sum to at most 1, the rest goes to the
            fusion tokens), for latent fusion the latents' attention over the inputs; zeros for late
            fusion, whose fusion token attends to nothing.

        Raises:
            ValueError: another fusion module (e.g. a baseline, cross).
        """
        fusion = getattr(self.model, "fusion", None)
        if not isinstance(fusion, HierarchicalFusion | LatentBottleneck):
            name = type(fusion).__name__ if fusion is not None else f"baseline {self.hparams.baseline!r}"
            raise ValueError(f"per-input attention is reported for early / late / hierarchical / latent fusion, not {name}")
        _, out = self.model(inputs, return_weights=True)
        names = [n for n in out.layout if n != "fusion"]
        if isinstance(fusion, LatentBottleneck):
            row = out.weights["cross"].mean(dim=(1, 2))  # (B, S): latents' attention over the input tokens
        else:
            maps = [w for k, w in out.weights.items() if k.startswith("cross.")]
            if not maps:  # late fusion: the fusion token attends to nothing
                return names, torch.zeros(out.fused.x.shape[0], len(names), device=out.fused.x.device)
            row = torch.stack([w[:, :, 0] for w in maps]).mean(dim=(0, 2))  # (B, N): fusion token's attention
        return names, torch.stack([row[:, a:b].sum(-1) for n, (a, b) in out.layout.items() if n != "fusion"], dim=1)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # random states, so a resumed run continues exactly as an uninterrupted one (dropout, modality dropout)
        # (plain tensors / ints only, so checkpoints load with torch.load(weights_only=True))
        _kind, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["attnfuse_rng"] = {
            "torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["attnfuse_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("attnfuse_rng")
        if state is not None:
            torch.set_rng_state(state["torch"])
            random.setstate(state["python"])
            keys, pos, has_gauss, gauss = state["numpy"]
            np.random.set_state(("MT19937", keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
                torch.cuda.set_rng_state_all(state["cuda"])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        # cosine decay over every optimiser step of the run (works for max_epochs and max_steps alike)
        steps = int(self.trainer.estimated_stepping_batches) if self._trainer is not None else 1
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


def _flatten(values: Mapping[str, Any], prefix: str = "") -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for k, v in values.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix))
        else:
            out[prefix + k] = v
    return out


def _extra(fused: FusionOutput) -> dict[str, Any]:
    """Model outputs a task's loss may use besides the prediction: per-source Dirichlet parameters."""
    if getattr(fused, "per_source_alpha", None) is not None:
        return {"per_source_alpha": list(fused.per_source_alpha)}
    return {}

"""Lightning task: a multi-input model, its loss, optimiser and torchmetrics metrics."""

from __future__ import annotations

import random
from typing import Any, Literal

import lightning.pytorch as pl
import numpy as np
import torch
import torchmetrics
from torch import Tensor, nn

from attnfuse.fusion import HierarchicalFusion, LatentBottleneck
from attnfuse.models.fusion_model import build_fusion_model

__all__ = ["FusionTask", "make_metrics"]


def make_metrics(task: str, num_outputs: int) -> torchmetrics.MetricCollection:
    """Accuracy, macro-F1 and AUROC for classification; MAE, RMSE and R² for regression."""
    if task == "classification":
        kind = "binary" if num_outputs == 2 else "multiclass"
        if kind == "binary":
            return torchmetrics.MetricCollection({
                "acc": torchmetrics.Accuracy(task="binary"),
                "f1": torchmetrics.F1Score(task="binary"),
                "auroc": torchmetrics.AUROC(task="binary"),
            })
        return torchmetrics.MetricCollection({
            "acc": torchmetrics.Accuracy(task="multiclass", num_classes=num_outputs),
            "f1": torchmetrics.F1Score(task="multiclass", num_classes=num_outputs, average="macro"),
            "auroc": torchmetrics.AUROC(task="multiclass", num_classes=num_outputs),
        })
    if task == "regression":
        return torchmetrics.MetricCollection({
            "mae": torchmetrics.MeanAbsoluteError(),
            "rmse": torchmetrics.MeanSquaredError(squared=False),
            "r2": torchmetrics.R2Score(),
        })
    raise ValueError(f"task must be 'classification' or 'regression', got {task!r}")


class FusionTask(pl.LightningModule):
    """Train / evaluate a multi-input model built from a config.

    Batches are ``{"inputs": {name: {"x", "mask"}}, "target": (B,)}`` (see
    :mod:`attnfuse.data.collate`). The model is built by :func:`attnfuse.models.build_fusion_model`
    from ``encoder_configs``, ``num_outputs`` and ``task`` (all three linked from the data module by
    the CLI), or injected directly with ``model=``.

    Args:
        encoder_configs: per-input encoder configuration (set by the data module).
        num_outputs: classes or regression targets (set by the data module).
        task: ``"classification"`` or ``"regression"``.
        fusion: registered fusion name or ``"concat_mlp"``.
        dim, heads, pooling, dropout, fusion_options, encoder_options: see ``build_fusion_model``.
        lr, weight_decay: AdamW settings; cosine decay over all optimiser steps of the run.
        target_scale: regression: ``(mean, std)`` of the train targets (linked from the data module);
            the model learns the standardised target, metrics and predictions are in target units.
        model: a ready model (overrides the builder arguments).
    """

    def __init__(
        self,
        encoder_configs: dict[str, dict[str, Any]] | None = None,
        num_outputs: int = 2,
        *,
        task: Literal["classification", "regression"] = "classification",
        fusion: str = "early",
        dim: int = 64,
        heads: int = 4,
        pooling: Literal["auto", "mean", "fusion", "cls", "attention"] = "auto",
        dropout: float = 0.1,
        fusion_options: dict[str, Any] | None = None,
        encoder_options: dict[str, dict[str, Any]] | None = None,
        lr: float = 2e-3,
        weight_decay: float = 0.01,
        target_scale: tuple[float, float] | None = None,
        model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["model"])
        if model is None:
            if not encoder_configs:
                raise ValueError("FusionTask needs encoder_configs (linked from the data module) or model=")
            model = build_fusion_model(encoder_configs, num_outputs, task=task, fusion=fusion, dim=dim, heads=heads,
                                       pooling=pooling, dropout=dropout, fusion_options=fusion_options,
                                       encoder_options=encoder_options)
        self.model, self.task, self.num_outputs = model, task, num_outputs
        self.target_scale = tuple(target_scale) if target_scale is not None else (0.0, 1.0)
        if self.target_scale[1] <= 0:
            raise ValueError(f"target_scale std must be > 0, got {target_scale}")
        metrics = make_metrics(task, num_outputs)
        self.val_metrics = metrics.clone(prefix="val_")
        self.test_metrics = metrics.clone(prefix="test_")

    def forward(self, inputs: dict[str, dict[str, Tensor]]) -> Tensor:
        return self.model(inputs)

    def _loss(self, pred: Tensor, target: Tensor) -> Tensor:
        if self.task == "classification":
            return nn.functional.cross_entropy(pred, target.long())
        mean, std = self.target_scale
        scaled = (target.to(pred.dtype) - mean) / std  # the model predicts the standardised target
        return nn.functional.mse_loss(pred.squeeze(-1) if self.num_outputs == 1 else pred, scaled)

    def _scores(self, pred: Tensor) -> Tensor:
        if self.task == "classification":
            prob = pred.softmax(-1)
            return prob[:, 1] if self.num_outputs == 2 else prob
        mean, std = self.target_scale
        pred = pred * std + mean  # back to the target's units
        return pred.squeeze(-1) if self.num_outputs == 1 else pred

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        pred = self(batch["inputs"])
        loss = self._loss(pred, batch["target"])
        self.log("train_loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=pred.shape[0], sync_dist=True)
        return loss

    def _eval_step(self, batch: dict, metrics: torchmetrics.MetricCollection, stage: str) -> None:
        pred = self(batch["inputs"])
        target = batch["target"]
        self.log(f"{stage}_loss", self._loss(pred, target), prog_bar=True, batch_size=pred.shape[0], sync_dist=True)
        metrics.update(self._scores(pred), target.long() if self.task == "classification" else target)
        self.log_dict(metrics, prog_bar=stage == "val", batch_size=pred.shape[0])

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics, "val")

    def test_step(self, batch: dict, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics, "test")

    def predict_step(self, batch: dict, batch_idx: int) -> dict[str, Tensor]:
        pred = self(batch["inputs"])
        out = {"prediction": pred.argmax(-1) if self.task == "classification" else self._scores(pred)}
        if self.task == "classification":
            out["probabilities"] = pred.softmax(-1)
        if "index" in batch:
            out["index"] = batch["index"]
        if getattr(self, "predict_attention", False):
            out["attention_names"], out["attention"] = self.input_attention(batch["inputs"])
        return out

    @torch.no_grad()
    def input_attention(self, inputs: dict[str, dict[str, Tensor]]) -> tuple[list[str], Tensor]:
        """Share of the fusion token's attention going to each input, averaged over layers and heads.

        Returns:
            ``(names, share (B, n_inputs))``: for early / hierarchical fusion the fusion token's attention
            (averaged over cross-source layers and heads; rows sum to at most 1, the rest goes to the
            fusion tokens), for latent fusion the latents' attention over the inputs; zeros for late
            fusion, whose fusion token attends to nothing.

        Raises:
            ValueError: another fusion module (e.g. concat_mlp, cross).
        """
        fusion = getattr(self.model, "fusion", None)
        if not isinstance(fusion, HierarchicalFusion | LatentBottleneck):
            raise ValueError(
                f"per-input attention is reported for early / late / hierarchical / latent fusion, not fusion={self.hparams.fusion!r}"
            )
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

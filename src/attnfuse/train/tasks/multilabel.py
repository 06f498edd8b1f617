"""Multilabel classification: several 0/1 target columns, independent sigmoid outputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
import torchmetrics
from torch import Tensor, nn

from attnfuse.train.tasks.base import Task, register_task

__all__ = ["Multilabel"]


@register_task("multilabel")
class Multilabel(Task):
    """Predict every 0/1 target column; binary cross-entropy per label.

    Args:
        pos_weight: ``"balanced"`` (negatives / positives per label over the training rows),
            explicit per-label weights, or None.
        threshold: probability above which a label is predicted.

    Metrics: label-wise accuracy ``acc`` (mean over labels), ``f1`` (macro), ``auroc`` (macro);
    ``val_f1`` is monitored. Prediction columns:
    ``pred_<label>`` (0/1) and ``prob_<label>`` per target column.
    """

    accepts = ("multilabel",)
    monitor = ("f1", "max")

    def __init__(self, *, pos_weight: Literal["balanced"] | list[float] | None = None, threshold: float = 0.5) -> None:
        if isinstance(pos_weight, str) and pos_weight != "balanced":
            raise ValueError(f"pos_weight must be 'balanced', a list of per-label weights or None, got {pos_weight!r}")
        if not 0 < threshold < 1:
            raise ValueError(f"threshold must be in (0, 1), got {threshold}")
        self.pos_weight, self.threshold = pos_weight, threshold

    def output_size(self) -> int:
        return len(self.info.target_names)

    def bind(self, info) -> None:
        super().bind(info)
        t = len(info.target_names)
        weights = self.pos_weight
        if weights == "balanced":
            pos = np.asarray(info.class_counts or [1] * t, dtype=np.float64)
            n = float(info.num_train or 2 * pos.max())
            weights = ((n - pos) / np.maximum(pos, 1)).tolist()
        if weights is not None and len(weights) != t:
            raise ValueError(f"pos_weight has {len(weights)} entries, but the target has {t} labels {info.target_names}")
        self._pos_weight = None if weights is None else torch.tensor(weights, dtype=torch.float32)

    def loss(self, output: Tensor, target: Tensor, *, epoch: int = 0, extra: Mapping[str, Tensor] | None = None) -> Tensor:
        pw = None if self._pos_weight is None else self._pos_weight.to(output.device)
        return nn.functional.binary_cross_entropy_with_logits(output, target.float(), pos_weight=pw)

    def make_metrics(self) -> torchmetrics.MetricCollection:
        t = self.output_size()
        kw = {"task": "multilabel", "num_labels": t}
        return torchmetrics.MetricCollection({
            "acc": torchmetrics.Accuracy(**kw, threshold=self.threshold),
            "f1": torchmetrics.F1Score(**kw, average="macro", threshold=self.threshold),
            "auroc": torchmetrics.AUROC(**kw, average="macro"),
        })

    def update_metrics(self, metrics: torchmetrics.MetricCollection, output: Tensor, target: Tensor) -> None:
        metrics.update(output.sigmoid(), target.long())

    def predict(self, output: Tensor) -> dict[str, np.ndarray | list]:
        prob = output.float().sigmoid().cpu()
        out: dict[str, np.ndarray | list] = {}
        for j, name in enumerate(self.info.target_names):
            out[f"pred_{name}"] = (prob[:, j] > self.threshold).to(torch.int64).numpy()
        for j, name in enumerate(self.info.target_names):
            out[f"prob_{name}"] = prob[:, j].numpy()
        return out

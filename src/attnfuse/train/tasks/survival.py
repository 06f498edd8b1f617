"""Survival: a risk score trained with the (weighted) Cox partial likelihood, judged by Harrell's C."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torchmetrics
from torch import Tensor

from attnfuse.losses import class_balance_weights, cox_partial_likelihood
from attnfuse.metrics import ConcordanceIndex
from attnfuse.train.tasks.base import Task, register_task

__all__ = ["Survival"]


@register_task("survival")
class Survival(Task):
    """Predict a log-hazard (risk) per row from the schema's ``time`` and ``event`` columns.

    Args:
        ties: ``"breslow"`` or ``"efron"`` handling of tied event times
            (:func:`attnfuse.losses.cox_partial_likelihood`).
        event_weight: if set, events weigh this much and censored rows 1 (BioFusionNet's weighted
            Cox loss, :func:`attnfuse.losses.class_balance_weights`; 5 in the released code).

    The loss is computed over the risk sets of each mini-batch (use large batches; the whole
    training set in one batch gives the exact Cox likelihood). Metric: ``cindex`` (Harrell's C over
    the whole split, monitored). Prediction column: ``risk`` (higher = earlier event).
    """

    accepts = ("survival",)
    monitor = ("cindex", "max")

    def __init__(self, *, ties: Literal["breslow", "efron"] = "breslow", event_weight: float | None = None) -> None:
        if ties not in ("breslow", "efron"):
            raise ValueError(f"ties must be 'breslow' or 'efron', got {ties!r}")
        if event_weight is not None and not event_weight > 0:
            raise ValueError(f"event_weight must be > 0 (or None), got {event_weight}")
        self.ties, self.event_weight = ties, event_weight

    def output_size(self) -> int:
        return 1

    def loss(self, output: Tensor, target: Tensor, *, epoch: int = 0, extra: Mapping[str, Tensor] | None = None) -> Tensor:
        time, event = target[:, 0], target[:, 1]
        weights = None if self.event_weight is None else class_balance_weights(event, self.event_weight).to(output)
        return cox_partial_likelihood(output.reshape(-1), time, event, weights, ties=self.ties)

    def make_metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection({"cindex": ConcordanceIndex()})

    def update_metrics(self, metrics: torchmetrics.MetricCollection, output: Tensor, target: Tensor) -> None:
        metrics.update(output.reshape(-1), target)

    def predict(self, output: Tensor) -> dict[str, np.ndarray | list]:
        return {"risk": output.reshape(-1).float().cpu().numpy()}

"""Metric learning / retrieval: embeddings where rows with the same identity label are near."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
import torchmetrics
from torch import Tensor, nn

from attnfuse.heads import EmbeddingHead
from attnfuse.losses import adaptive_margin_triplet_loss, info_nce
from attnfuse.metrics import RecallAtK
from attnfuse.train.tasks.base import Pooling, Task, register_task

__all__ = ["Retrieval"]


@register_task("retrieval")
class Retrieval(Task):
    """Learn L2-normalised embeddings from identity labels (the schema's target column).

    Args:
        loss: ``"triplet"``: M2FNet's adaptive-margin triplet loss
            (:func:`attnfuse.losses.adaptive_margin_triplet_loss`) on batch-hard triplets (for each
            anchor with a positive in the batch: the farthest positive and the nearest negative);
            ``"info_nce"``: supervised InfoNCE (:func:`attnfuse.losses.info_nce`): each anchor's
            first other same-label row in the batch is its positive, every other-label row a negative.
        embedding_dim: embedding width.
        temperature: InfoNCE temperature.
        recall_at: the ``k`` of the ``recall@k`` metrics (leave-one-out retrieval over the split).

    Metric ``recall@1`` is monitored. Prediction columns: ``emb_0 ... emb_{E-1}``.
    Rows whose label occurs once in a batch contribute no triplet / InfoNCE term.
    """

    accepts = ("retrieval", "classification")
    monitor = ("recall@1", "max")

    def __init__(self, *, loss: Literal["triplet", "info_nce"] = "triplet", embedding_dim: int = 32,
                 temperature: float = 0.1, recall_at: list[int] | None = None) -> None:
        if loss not in ("triplet", "info_nce"):
            raise ValueError(f"loss must be 'triplet' or 'info_nce', got {loss!r}")
        if embedding_dim < 1 or temperature <= 0:
            raise ValueError(f"need embedding_dim >= 1 and temperature > 0, got {embedding_dim}, {temperature}")
        ks = [1, 5] if recall_at is None else [int(k) for k in recall_at]
        if not ks or min(ks) < 1 or 1 not in ks:
            raise ValueError(f"recall_at must be positive cut-offs including 1 (monitored), got {recall_at}")
        self.loss_name, self.embedding_dim, self.temperature, self.recall_at = loss, embedding_dim, temperature, ks

    def describe(self) -> dict:
        out = super().describe()
        out["init_args"]["loss"] = out["init_args"].pop("loss_name")
        return out

    def output_size(self) -> int:
        return self.embedding_dim

    def make_head(self, dim: int, *, pooling: Pooling, dropout: float) -> nn.Module:
        return EmbeddingHead(dim, self.embedding_dim, pooling=pooling, dropout=dropout)

    def from_raw(self, output: Tensor) -> Tensor:
        return nn.functional.normalize(output, dim=-1)

    def loss(self, output: Tensor, target: Tensor, *, epoch: int = 0, extra: Mapping[str, Tensor] | None = None) -> Tensor:
        labels = target.long()
        same = labels[:, None] == labels[None, :]  # (B, B)
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos, neg = same & ~eye, ~same
        anchors = pos.any(1) & neg.any(1)
        if not anchors.any():
            return output.sum() * 0.0  # no usable pair in this batch: a zero that keeps the graph
        z = output
        if self.loss_name == "triplet":
            dist = torch.cdist(z, z).detach()  # (B, B): mining only, no gradient through the choice
            hard_pos = dist.masked_fill(~pos, -1.0).argmax(1)  # farthest positive
            hard_neg = dist.masked_fill(~neg, float("inf")).argmin(1)  # nearest negative
            a = anchors.nonzero().squeeze(1)
            return adaptive_margin_triplet_loss(z[a], z[hard_pos[a]], z[hard_neg[a]])
        a = anchors.nonzero().squeeze(1)
        first_pos = pos.float().argmax(1)  # (B,): the first other row with the same label
        neg_keys = z[None].expand(len(a), -1, -1)  # (A, B, E): every row a candidate negative
        return info_nce(z[a], z[first_pos[a]], temperature=self.temperature, negatives="paired",
                        negative_keys=neg_keys, negative_mask=neg[a])

    def make_metrics(self) -> torchmetrics.MetricCollection:
        return torchmetrics.MetricCollection({"recall": RecallAtK(self.recall_at)})

    def update_metrics(self, metrics: torchmetrics.MetricCollection, output: Tensor, target: Tensor) -> None:
        metrics.update(output, target.long())

    def predict(self, output: Tensor) -> dict[str, np.ndarray | list]:
        z = output.float().cpu().numpy()
        return {f"emb_{j}": z[:, j] for j in range(z.shape[1])}

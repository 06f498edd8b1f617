"""Binary / multiclass classification: cross-entropy, focal or evidential (Dirichlet) loss."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import numpy as np
import torch
import torchmetrics
from torch import Tensor, nn

from attnfuse.heads import ClassificationHead, DirichletHead
from attnfuse.losses import evidential_loss, focal_loss, kl_annealing_coefficient
from attnfuse.train.tasks.base import Pooling, Task, register_task

__all__ = ["Classification"]


@register_task("classification")
class Classification(Task):
    """Predict one label per row; metrics accuracy, macro-F1, AUROC (``val_acc`` is monitored).

    Args:
        loss: ``"cross_entropy"``; ``"focal"`` (:func:`attnfuse.losses.focal_loss`, for imbalanced
            classes); ``"evidential"``: a Dirichlet head (or an evidential fusion's combined opinion)
            trained with :func:`attnfuse.losses.evidential_loss` (expected CE + annealed KL, TMC),
            predictions get an ``uncertainty`` column ``K / sum(alpha)``.
        class_weights: ``"balanced"`` (``n / (K · n_k)`` from the training rows), explicit per-class
            weights in class order, or None.
        focal_gamma: focusing parameter of the focal loss.
        label_smoothing: cross-entropy label smoothing.
        kl_anneal_epochs: evidential: the KL weight grows linearly to 1 over this many epochs.
        evidence: evidential head activation.

    Prediction columns: ``prediction`` (the original label value), ``prob_<label>`` per class in
    class order, ``uncertainty`` (evidential only).
    """

    accepts = ("classification",)
    monitor = ("acc", "max")

    def __init__(
        self,
        *,
        loss: Literal["cross_entropy", "focal", "evidential"] = "cross_entropy",
        class_weights: Literal["balanced"] | list[float] | None = None,
        focal_gamma: float = 2.0,
        label_smoothing: float = 0.0,
        kl_anneal_epochs: int = 10,
        evidence: Literal["softplus", "relu", "exp"] = "softplus",
    ) -> None:
        if loss not in ("cross_entropy", "focal", "evidential"):
            raise ValueError(f"loss must be 'cross_entropy', 'focal' or 'evidential', got {loss!r}")
        if isinstance(class_weights, str) and class_weights != "balanced":
            raise ValueError(f"class_weights must be 'balanced', a list of per-class weights or None, got {class_weights!r}")
        if focal_gamma < 0 or not 0 <= label_smoothing < 1 or kl_anneal_epochs < 1:
            raise ValueError(f"need focal_gamma >= 0, 0 <= label_smoothing < 1, kl_anneal_epochs >= 1; got {focal_gamma}, "
                             f"{label_smoothing}, {kl_anneal_epochs}")
        self.loss_name, self.class_weights, self.focal_gamma = loss, class_weights, focal_gamma
        self.label_smoothing, self.kl_anneal_epochs, self.evidence = label_smoothing, kl_anneal_epochs, evidence

    def describe(self) -> dict:
        out = super().describe()
        out["init_args"]["loss"] = out["init_args"].pop("loss_name")
        return out

    @property
    def evidential(self) -> bool:
        return self.loss_name == "evidential"

    def reads_fusion_output(self, kind: str) -> bool:
        return self.evidential and kind == "dirichlet"

    def output_size(self) -> int:
        return self.info.num_classes

    def bind(self, info) -> None:
        super().bind(info)
        k = info.num_classes
        if k < 2:
            column = f"target column {info.target_names[0]!r}" if info.target_names else "the target"
            found = f"every row has the value {info.classes[0]!r}" if info.classes else "it has no values"
            raise ValueError(f"classification needs at least 2 classes in {column}, but {found}; "
                             "check the target column (or the rows kept in the table)")
        weights = self.class_weights
        if weights == "balanced":
            counts = np.asarray(info.class_counts or [1] * k, dtype=np.float64)
            weights = (counts.sum() / (k * np.maximum(counts, 1))).tolist()
        if weights is not None and len(weights) != k:
            raise ValueError(f"class_weights has {len(weights)} entries, but the target has {k} classes {info.classes}")
        self._weight = None if weights is None else torch.tensor(weights, dtype=torch.float32)

    def make_head(self, dim: int, *, pooling: Pooling, dropout: float) -> nn.Module:
        if self.evidential:
            return DirichletHead(dim, self.output_size(), evidence=self.evidence, pooling=pooling, dropout=dropout)
        return ClassificationHead(dim, self.output_size(), pooling=pooling, dropout=dropout)

    def from_raw(self, output: Tensor) -> Tensor:
        return nn.functional.softplus(output) + 1.0 if self.evidential else output

    def loss(self, output: Tensor, target: Tensor, *, epoch: int = 0, extra: Mapping[str, Tensor] | None = None) -> Tensor:
        target = target.long()
        weight = None if self._weight is None else self._weight.to(output.device)
        if self.loss_name == "cross_entropy":
            return nn.functional.cross_entropy(output, target, weight=weight, label_smoothing=self.label_smoothing)
        if self.loss_name == "focal":
            return focal_loss(output, target, gamma=self.focal_gamma, weight=weight)
        kl = kl_annealing_coefficient(epoch, self.kl_anneal_epochs)
        loss = evidential_loss(output, target, kl_weight=kl)
        for alpha in (extra or {}).get("per_source_alpha", ()):  # TMC: every view's opinion is trained too
            loss = loss + evidential_loss(alpha, target, kl_weight=kl)
        return loss

    def probabilities(self, output: Tensor) -> Tensor:
        """``(B, K)`` class probabilities (softmax, or the Dirichlet mean for the evidential loss)."""
        if self.evidential:
            return output / output.sum(-1, keepdim=True)
        return output.softmax(-1)

    def make_metrics(self) -> torchmetrics.MetricCollection:
        k = self.output_size()
        if k == 2:
            return torchmetrics.MetricCollection({
                "acc": torchmetrics.Accuracy(task="binary"), "f1": torchmetrics.F1Score(task="binary"),
                "auroc": torchmetrics.AUROC(task="binary"),
            })
        return torchmetrics.MetricCollection({
            "acc": torchmetrics.Accuracy(task="multiclass", num_classes=k),
            "f1": torchmetrics.F1Score(task="multiclass", num_classes=k, average="macro"),
            "auroc": torchmetrics.AUROC(task="multiclass", num_classes=k),
        })

    def update_metrics(self, metrics: torchmetrics.MetricCollection, output: Tensor, target: Tensor) -> None:
        prob = self.probabilities(output)
        metrics.update(prob[:, 1] if prob.shape[1] == 2 else prob, target.long())

    def predict(self, output: Tensor) -> dict[str, np.ndarray | list]:
        prob = self.probabilities(output).float().cpu()
        classes = list(self.info.classes or range(prob.shape[1]))
        out: dict[str, np.ndarray | list] = {"prediction": [classes[i] for i in prob.argmax(-1).tolist()]}
        for j, c in enumerate(classes):
            out[f"prob_{c}"] = prob[:, j].numpy()
        if self.evidential:
            out["uncertainty"] = (prob.shape[1] / output.float().sum(-1)).cpu().numpy()
        return out

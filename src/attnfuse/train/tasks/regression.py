"""Regression of one or more numeric targets, optionally heteroscedastic (Gaussian NLL with a learned variance)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torchmetrics
from torch import Tensor, nn

from attnfuse.train.tasks.base import Task, register_task

__all__ = ["Regression"]


@register_task("regression")
class Regression(Task):
    """Predict numeric targets; the model learns the standardised target (train-split mean / std).

    Args:
        heteroscedastic: also predict a per-sample log-variance and train with the Gaussian negative
            log-likelihood; predictions get a ``std_<target>`` column.

    Metrics (in target units): MAE, RMSE, R² (``val_rmse`` is monitored). Prediction columns:
    ``prediction`` (one target) or ``pred_<target>`` (several), plus ``std_*`` when heteroscedastic.
    """

    accepts = ("regression",)
    monitor = ("rmse", "min")

    def __init__(self, *, heteroscedastic: bool = False) -> None:
        self.heteroscedastic = heteroscedastic

    @property
    def num_targets(self) -> int:
        return max(1, len(self.info.target_names))

    def output_size(self) -> int:
        return self.num_targets * (2 if self.heteroscedastic else 1)

    def _scale(self, device: torch.device) -> tuple[Tensor, Tensor]:
        means, stds = self.info.target_scale or ([0.0] * self.num_targets, [1.0] * self.num_targets)
        return torch.tensor(means, device=device), torch.tensor(stds, device=device)

    def _split(self, output: Tensor) -> tuple[Tensor, Tensor | None]:
        t = self.num_targets
        return (output[:, :t], output[:, t:]) if self.heteroscedastic else (output, None)

    def _target(self, target: Tensor) -> Tensor:
        return target.reshape(target.shape[0], -1).float()

    def loss(self, output: Tensor, target: Tensor, *, epoch: int = 0, extra: Mapping[str, Tensor] | None = None) -> Tensor:
        mean, std = self._scale(output.device)
        scaled = (self._target(target) - mean) / std  # the model predicts the standardised target
        pred, log_var = self._split(output)
        if log_var is None:
            return nn.functional.mse_loss(pred, scaled)
        return nn.functional.gaussian_nll_loss(pred, scaled, log_var.clamp(-10, 10).exp(), full=True)

    def values(self, output: Tensor) -> tuple[Tensor, Tensor | None]:
        """Predictions and standard deviations in target units, ``(B, T)`` each (std None unless heteroscedastic)."""
        mean, std = self._scale(output.device)
        pred, log_var = self._split(output)
        sd = None if log_var is None else (0.5 * log_var.clamp(-10, 10)).exp() * std
        return pred * std + mean, sd

    def make_metrics(self) -> torchmetrics.MetricCollection:
        t = self.num_targets
        return torchmetrics.MetricCollection({
            "mae": torchmetrics.MeanAbsoluteError(), "rmse": torchmetrics.MeanSquaredError(squared=False),
            "r2": torchmetrics.R2Score(multioutput="uniform_average") if t > 1 else torchmetrics.R2Score(),
        })

    def update_metrics(self, metrics: torchmetrics.MetricCollection, output: Tensor, target: Tensor) -> None:
        pred, _ = self.values(output)
        y = self._target(target)
        if self.num_targets == 1:
            pred, y = pred[:, 0], y[:, 0]
        metrics.update(pred, y)

    def predict(self, output: Tensor) -> dict[str, np.ndarray | list]:
        pred, sd = self.values(output.float())
        names = self.info.target_names or ["target"]
        out: dict[str, np.ndarray | list] = {}
        for j, name in enumerate(names):
            key = "prediction" if len(names) == 1 else f"pred_{name}"
            out[key] = pred[:, j].cpu().numpy()
            if sd is not None:
                out["std" if len(names) == 1 else f"std_{name}"] = sd[:, j].cpu().numpy()
        return out

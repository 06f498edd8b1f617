"""Shared pieces of the dense-vision metrics: image input checks and the per-image-mean ``Metric`` base.

Conventions used by every dense-vision metric in :mod:`attnfuse.metrics`:

* images are ``(B, C, H, W)`` (a single ``(H, W)`` image is accepted where a docstring says so and gives a
  0-d result); functionals return one value per image, ``(B,)``;
* ``data_range`` is the value of white: ``None`` means 255 for integer tensors and 1.0 for floating ones;
* a ``Metric`` averages the per-image values over every image seen since the last reset (the mean over
  images, as the published evaluation scripts do), so batch boundaries do not change the result.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["PerImageMean", "as_batch", "check_same_shape", "resolve_data_range"]


def resolve_data_range(x: Tensor, data_range: float | None) -> float:
    """The value of white: ``data_range`` if given, else 255 for integer tensors and 1.0 for floating ones."""
    if data_range is None:
        return 1.0 if x.is_floating_point() else 255.0
    data_range = float(data_range)
    if not data_range > 0:
        raise ValueError(f"data_range must be > 0, got {data_range}")
    return data_range


def as_batch(x: Tensor, name: str, *, channels: int | None = None, allow_2d: bool = True,
             min_size: int = 1) -> tuple[Tensor, bool]:
    """``x`` as a ``(B, C, H, W)`` batch, and whether it was a single ``(H, W)`` image.

    Raises:
        TypeError: ``x`` is not a tensor.
        ValueError: another number of dimensions, a channel count other than ``channels``, a side below ``min_size``.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    single = False
    if x.dim() == 2 and allow_2d:
        x, single = x[None, None], True
    if x.dim() != 4:
        shapes = "(B, C, H, W) or (H, W)" if allow_2d else "(B, C, H, W)"
        raise ValueError(f"{name} must be {shapes}, got shape {tuple(x.shape)}")
    if channels is not None and x.shape[1] != channels:
        hint = " (convert colour images to grey or Y first)" if channels == 1 else ""
        raise ValueError(f"{name} must have {channels} channel(s), got shape {tuple(x.shape)}{hint}")
    if min(x.shape[-2:]) < min_size:
        raise ValueError(f"{name} must be at least {min_size}x{min_size} pixels, got {tuple(x.shape[-2:])}")
    return x, single


def check_same_shape(ref: Tensor, ref_name: str, **others: Tensor) -> None:
    """Raise ``ValueError`` naming the argument whose shape differs from ``ref``'s."""
    for name, t in others.items():
        if t.shape != ref.shape:
            raise ValueError(f"{name} must have the shape of {ref_name} {tuple(ref.shape)}, got {tuple(t.shape)}")


def check_range(x: Tensor, name: str, data_range: float) -> None:
    """Raise ``ValueError`` if ``x`` has values outside ``[0, data_range]`` (or NaN)."""
    if x.numel() == 0:
        return
    lo, hi = x.min().item(), x.max().item()
    if not (lo >= 0 and hi <= data_range):  # also catches NaN
        raise ValueError(f"{name} must lie in [0, data_range={data_range:g}], got values in [{lo:g}, {hi:g}]")


class PerImageMean(Metric):
    """Base of the dense-vision ``Metric`` s: the mean of per-image values over every image seen.

    Subclasses compute ``(B,)`` per-image values in ``update`` and pass them to :meth:`_add`.
    ``compute()`` returns the mean as a 0-d float tensor (NaN before any update); the states are a sum and
    a count (summed across processes under DDP).
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, values: Tensor) -> None:
        values = values.detach().reshape(-1)
        self.total += values.to(self.total.dtype).sum()
        self.count += values.numel()

    def compute(self) -> Tensor:
        if self.count == 0:
            return torch.tensor(float("nan"), device=self.total.device)
        return (self.total / self.count).float()

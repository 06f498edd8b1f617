"""Full-reference restoration metrics: PSNR and SSIM per image (wrapping torchmetrics), on RGB or Y, with a border crop.

Conventions (Flickerformer / BasicSR evaluation, see ``docs/metrics.md``):

* ``PSNR = 10·log₁₀(MAX² / MSE)`` per image (MSE over channels and pixels), averaged over images; identical
  images give ``+inf`` (not capped).
* SSIM (Wang et al. 2004): Gaussian window σ = 1.5 (11 taps), ``K = (0.01, 0.03)``, population statistics,
  averaged over the *valid* window positions (a 5-pixel border is left out), per channel then over channels —
  the convention of the reference MATLAB code, scikit-image (``gaussian_weights=True, sigma=1.5,
  use_sample_covariance=False``) and BasicSR. torchmetrics averages over a reflect-padded full image instead;
  we take its SSIM map and average the valid part, so the value equals scikit-image's.
* ``crop_border=k`` drops ``k`` pixels on every side first (Flickerformer: 4); ``color="y"`` converts RGB to
  the BT.601 luma ``Y = 16/255 + (65.481 R + 128.553 G + 24.966 B)/255`` (inputs scaled to [0, 1], as MATLAB's
  ``rgb2ycbcr`` and BasicSR) and scores that channel.

Shapes: ``pred``, ``target`` ``(B, C, H, W)``; results ``(B,)``.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

from attnfuse.metrics._image import PerImageMean, as_batch, check_same_shape, resolve_data_range

__all__ = ["PSNR", "SSIM", "psnr", "rgb_to_y", "ssim"]

#: SSIM window: Gaussian σ = 1.5 truncated at 3.5 σ, 11 taps (scikit-image and torchmetrics agree on this).
SSIM_SIGMA = 1.5
SSIM_RADIUS = int(3.5 * SSIM_SIGMA + 0.5)


def rgb_to_y(x: Tensor, data_range: float = 1.0) -> Tensor:
    """BT.601 luma of RGB images, in the units of ``data_range``: ``(B, 3, H, W) -> (B, 1, H, W)``.

    ``Y = (16 + 65.481 R' + 128.553 G' + 24.966 B') / 255 · data_range`` with ``R' = R / data_range``
    (MATLAB ``rgb2ycbcr``; BasicSR ``rgb2ycbcr(y_only=True)``).
    """
    x, _ = as_batch(x, "x", channels=3, allow_2d=False)
    xf = x.to(torch.promote_types(x.dtype, torch.float32)) / data_range
    w = torch.tensor([65.481, 128.553, 24.966], dtype=xf.dtype, device=xf.device).view(1, 3, 1, 1)
    return ((xf * w).sum(dim=1, keepdim=True) + 16.0) / 255.0 * data_range


def _prepare(pred: Tensor, target: Tensor, data_range: float | None, crop_border: int,
             color: Literal["rgb", "y"], min_size: int = 1) -> tuple[Tensor, Tensor, float]:
    pred, _ = as_batch(pred, "pred", allow_2d=False)
    target, _ = as_batch(target, "target", allow_2d=False)
    check_same_shape(pred, "pred", target=target)
    rng = resolve_data_range(pred, data_range)
    if int(crop_border) != crop_border or crop_border < 0:
        raise ValueError(f"crop_border must be an integer >= 0, got {crop_border}")
    if color not in ("rgb", "y"):
        raise ValueError(f"color must be 'rgb' or 'y', got {color!r}")
    dtype = torch.promote_types(pred.dtype, torch.float32)
    if not target.is_floating_point():
        dtype = torch.promote_types(dtype, torch.float32)
    pred, target = pred.to(dtype), target.to(dtype)
    if color == "y":
        if pred.shape[1] != 3:
            raise ValueError(f"color='y' needs RGB images (B, 3, H, W), got {tuple(pred.shape)}")
        pred, target = rgb_to_y(pred, rng), rgb_to_y(target, rng)
    if crop_border:
        pred = pred[..., crop_border:-crop_border, crop_border:-crop_border]
        target = target[..., crop_border:-crop_border, crop_border:-crop_border]
    if min(pred.shape[-2:]) < min_size:
        raise ValueError(f"images must be at least {min_size}x{min_size} pixels after crop_border={crop_border}, "
                         f"got {tuple(pred.shape[-2:])}")
    return pred, target, rng


def psnr(pred: Tensor, target: Tensor, *, data_range: float | None = None, crop_border: int = 0,
         color: Literal["rgb", "y"] = "rgb") -> Tensor:
    """Peak signal-to-noise ratio per image, ``10·log₁₀(data_range² / MSE)`` in dB.

    Wraps ``torchmetrics.functional.image.peak_signal_noise_ratio`` with ``dim=(1, 2, 3)`` (one MSE per image).

    Args:
        pred, target: ``(B, C, H, W)`` in ``[0, data_range]``.
        data_range: value of white; default 1.0 for floating and 255 for integer tensors.
        crop_border: pixels dropped on every side before scoring.
        color: ``"rgb"`` (all channels) or ``"y"`` (BT.601 luma of RGB input).

    Returns:
        ``(B,)``; ``+inf`` for an image equal to its target.
    """
    pred, target, rng = _prepare(pred, target, data_range, crop_border, color)
    if pred.shape[0] == 0:
        return pred.new_zeros(0)
    return peak_signal_noise_ratio(pred, target, data_range=rng, reduction="none", dim=(1, 2, 3))


def ssim(pred: Tensor, target: Tensor, *, data_range: float | None = None, crop_border: int = 0,
         color: Literal["rgb", "y"] = "rgb") -> Tensor:
    """Structural similarity per image (Gaussian σ = 1.5, K = (0.01, 0.03), valid window positions).

    Takes torchmetrics' SSIM map (``return_full_image=True``) and averages it without the 5-pixel border whose
    windows reach past the image, which equals ``skimage.metrics.structural_similarity(..., gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, channel_axis=0)``. Differentiable (usable in a loss).

    Args:
        pred, target: ``(B, C, H, W)`` in ``[0, data_range]``, at least 11×11 after the crop.
        data_range, crop_border, color: as in :func:`psnr`.

    Returns:
        ``(B,)`` in ``[-1, 1]``; 1 for identical images.
    """
    pred, target, rng = _prepare(pred, target, data_range, crop_border, color, min_size=2 * SSIM_RADIUS + 1)
    if pred.shape[0] == 0:
        return pred.new_zeros(0)
    _, full = structural_similarity_index_measure(
        pred, target, gaussian_kernel=True, sigma=SSIM_SIGMA, data_range=rng, k1=0.01, k2=0.03,
        reduction="none", return_full_image=True,
    )
    r = SSIM_RADIUS
    return full[..., r:-r, r:-r].mean(dim=(1, 2, 3))


class PSNR(PerImageMean):
    """Mean over images of :func:`psnr`; ``update(pred, target)``, options as in :func:`psnr`."""

    higher_is_better = True
    is_differentiable = True

    def __init__(self, *, data_range: float | None = None, crop_border: int = 0, color: Literal["rgb", "y"] = "rgb",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_range, self.crop_border, self.color = data_range, crop_border, color

    def update(self, pred: Tensor, target: Tensor) -> None:
        self._add(psnr(pred, target, data_range=self.data_range, crop_border=self.crop_border, color=self.color))


class SSIM(PerImageMean):
    """Mean over images of :func:`ssim`; ``update(pred, target)``, options as in :func:`ssim`."""

    higher_is_better = True
    is_differentiable = True

    def __init__(self, *, data_range: float | None = None, crop_border: int = 0, color: Literal["rgb", "y"] = "rgb",
                 **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_range, self.crop_border, self.color = data_range, crop_border, color

    def update(self, pred: Tensor, target: Tensor) -> None:
        self._add(ssim(pred, target, data_range=self.data_range, crop_border=self.crop_border, color=self.color))

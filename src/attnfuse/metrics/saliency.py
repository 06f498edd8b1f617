"""Salient-object-detection metrics per image: MAE, F-measure (adaptive, max, mean), S-measure, E-measure.

Definitions follow the SOD evaluation toolkits (Fan et al.'s MATLAB toolbox, PySODMetrics; the GL-DMNet authors'
toolkit), re-implemented in torch; see ``docs/metrics.md``. Inputs: a saliency map ``pred`` in ``[0, 1]`` and a
binary ground truth ``gt`` (bool, or values in [0, 1] binarised at ``> 0.5``, as the toolkits' ``gt > 128``), of shape
``(B, 1, H, W)`` or one ``(H, W)`` map (0-d results); integer maps are 8-bit (``pred / 255``; ``gt`` 0/255 binarised
at ``> 128`` as the toolkits, or a 0/1 label map). Conventions:

* the toolkits min–max normalise each 8-bit prediction first; we do not (pass ``normalize=True`` to do so);
* thresholded curves use 256 thresholds ``t/255``, ``t = 0..255``, on the prediction quantised as
  ``floor(255·pred)`` (the toolkits' ``uint8`` cast), foreground = ``≥ t``; index ``t`` of a curve is threshold
  ``t``. Dataset-level max-F / max-E are the maximum of the **mean curve over images** (what the ``Metric``
  classes return), not the mean of per-image maxima;
* adaptive threshold ``min(2·mean(pred), 1)``, foreground = ``pred ≥`` it;
* F_β with β² = 0.3; F = 0 when there is no true positive;
* S-measure with α = 0.5, sample standard deviations (``N − 1``) and ``eps = 2.2e-16`` as the toolkits; a
  one-pixel block uses ``N`` instead of ``N − 1`` and an empty quadrant contributes 0 (the toolkits give NaN there);
* E-measure divides the enhanced-alignment sum by ``N`` (its definition, so a perfect map scores exactly 1); the
  toolkits divide by ``N − 1`` (larger by ``N/(N−1)``, 1.00002 at 224×224).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

from attnfuse.metrics._image import PerImageMean, as_batch, check_range

__all__ = [
    "EMeasure",
    "FMeasure",
    "SMeasure",
    "SaliencyMAE",
    "adaptive_e_measure",
    "adaptive_f_measure",
    "e_measure_curve",
    "f_measure_curve",
    "s_measure",
    "saliency_mae",
]

EPS = 2.220446049250313e-16  # numpy.spacing(1), the toolkits' eps
THRESHOLDS = 256


def _prepare(pred: Tensor, gt: Tensor, normalize: bool) -> tuple[Tensor, Tensor, bool]:
    """``pred`` as ``(B, H, W)`` float64 in [0, 1], ``gt`` as ``(B, H, W)`` bool, and whether one map was given."""
    p4, single = as_batch(pred, "pred", channels=1)
    g4, _ = as_batch(gt, "gt", channels=1)
    if g4.shape != p4.shape:
        raise ValueError(f"gt must have the shape of pred {tuple(pred.shape)}, got {tuple(gt.shape)}")
    p = p4[:, 0].to(torch.float64)
    if not p4.is_floating_point():
        p = p / 255.0
    if normalize:
        lo = p.amin(dim=(1, 2), keepdim=True)
        hi = p.amax(dim=(1, 2), keepdim=True)
        p = torch.where(hi > lo, (p - lo) / torch.where(hi > lo, hi - lo, 1.0), p)
    check_range(p, "pred", 1.0)
    g = g4[:, 0]
    if g.dtype != torch.bool:
        if g4.is_floating_point():
            g = g > 0.5
        else:  # 8-bit masks (0 / 255, binarised > 128 as the toolkits) or 0 / 1 label maps
            g = g > (128 if g.numel() and g.max() > 1 else 0)
    return p, g, single


def _out(values: Tensor, single: bool) -> Tensor:
    return values[0] if single else values


def saliency_mae(pred: Tensor, gt: Tensor, *, normalize: bool = False) -> Tensor:
    """MAE per image, ``mean |S − G|``; ``(B,)`` in ``[0, 1]`` (0 for a perfect map, the foreground share for an all-zero one)."""
    p, g, single = _prepare(pred, gt, normalize)
    return _out((p - g.to(p.dtype)).abs().mean(dim=(1, 2)), single)


def _counts_per_threshold(p: Tensor, g: Tensor) -> tuple[Tensor, Tensor]:
    """Per image and threshold ``t``: true positives and predicted positives of ``floor(255 p) ≥ t``; ``(B, 256)`` each."""
    b = p.shape[0]
    q = (p * 255).floor().clamp(0, THRESHOLDS - 1).long().reshape(b, -1)  # the toolkits' uint8 cast
    offsets = torch.arange(b, device=q.device)[:, None] * THRESHOLDS
    fg = g.reshape(b, -1)
    hist_fg = torch.bincount((q + offsets)[fg], minlength=b * THRESHOLDS).reshape(b, THRESHOLDS)
    hist_all = torch.bincount((q + offsets).reshape(-1), minlength=b * THRESHOLDS).reshape(b, THRESHOLDS)
    # count of values >= t: reverse cumulative sum
    tp = hist_fg.flip(1).cumsum(1).flip(1).to(torch.float64)
    pp = hist_all.flip(1).cumsum(1).flip(1).to(torch.float64)
    return tp, pp


def _f(tp: Tensor, pp: Tensor, n_fg: Tensor, beta2: float) -> Tensor:
    precision = tp / pp.clamp_min(1)
    recall = tp / n_fg.clamp_min(1)
    num = (1 + beta2) * precision * recall
    den = beta2 * precision + recall
    return torch.where(num > 0, num / torch.where(num > 0, den, 1.0), torch.zeros_like(num))


def f_measure_curve(pred: Tensor, gt: Tensor, *, beta2: float = 0.3, normalize: bool = False) -> Tensor:
    """F_β per image at the 256 thresholds ``t/255``: ``(1 + β²)·P·R / (β²·P + R)``; ``(B, 256)``, index = threshold.

    Max-F of a set = ``f_measure_curve(...).mean(0).max()``; mean-F = ``.mean(0).mean()``.
    """
    p, g, single = _prepare(pred, gt, normalize)
    tp, pp = _counts_per_threshold(p, g)
    n_fg = g.flatten(1).sum(1, keepdim=True).to(torch.float64)
    return _out(_f(tp, pp, n_fg, beta2), single)


def _adaptive_binary(p: Tensor) -> Tensor:
    thr = (2 * p.mean(dim=(1, 2), keepdim=True)).clamp(max=1.0)
    return p >= thr


def adaptive_f_measure(pred: Tensor, gt: Tensor, *, beta2: float = 0.3, normalize: bool = False) -> Tensor:
    """F_β at the adaptive threshold ``min(2·mean(pred), 1)``; ``(B,)``."""
    p, g, single = _prepare(pred, gt, normalize)
    binary = _adaptive_binary(p)
    tp = (binary & g).flatten(1).sum(1).to(torch.float64)
    pp = binary.flatten(1).sum(1).to(torch.float64)
    n_fg = g.flatten(1).sum(1).to(torch.float64)
    return _out(_f(tp, pp, n_fg, beta2), single)


def _enhanced_alignment(tp: Tensor, pp: Tensor, n_fg: Tensor, n: int) -> Tensor:
    """E-measure of binary maps from their counts (any broadcastable shapes): the mean of ``(1 + ξ)²/4``.

    ``ξ = 2 φ_S φ_G / (φ_S² + φ_G²)`` with ``φ = map − mean(map)`` takes four values, one per (prediction, truth)
    pair of labels, so the sum is four products of a pixel count and a value. An empty truth scores the share of
    predicted background, a full truth the share of predicted foreground (Fan et al. 2018).
    """
    mean_s, mean_g = pp / n, n_fg / n
    fp, fn = pp - tp, n_fg - tp
    tn = n - pp - fn
    total = torch.zeros_like(tp)
    for count, s_val, g_val in ((tp, 1.0, 1.0), (fp, 1.0, 0.0), (fn, 0.0, 1.0), (tn, 0.0, 0.0)):
        a, b = s_val - mean_s, g_val - mean_g
        xi = 2 * a * b / (a * a + b * b + EPS)
        total = total + count * (xi + 1).square() / 4
    total = torch.where(n_fg == 0, n - pp, torch.where(n_fg == n, pp, total))
    return total / n


def e_measure_curve(pred: Tensor, gt: Tensor, *, normalize: bool = False) -> Tensor:
    """E-measure per image at the 256 thresholds (as :func:`f_measure_curve`); ``(B, 256)``."""
    p, g, single = _prepare(pred, gt, normalize)
    tp, pp = _counts_per_threshold(p, g)
    n_fg = g.flatten(1).sum(1, keepdim=True).to(torch.float64)
    return _out(_enhanced_alignment(tp, pp, n_fg, p[0].numel() if p.shape[0] else 1), single)


def adaptive_e_measure(pred: Tensor, gt: Tensor, *, normalize: bool = False) -> Tensor:
    """E-measure at the adaptive threshold ``min(2·mean(pred), 1)``; ``(B,)``."""
    p, g, single = _prepare(pred, gt, normalize)
    binary = _adaptive_binary(p)
    tp = (binary & g).flatten(1).sum(1).to(torch.float64)
    pp = binary.flatten(1).sum(1).to(torch.float64)
    n_fg = g.flatten(1).sum(1).to(torch.float64)
    return _out(_enhanced_alignment(tp, pp, n_fg, p[0].numel() if p.shape[0] else 1), single)


def _object_score(x: Tensor) -> Tensor:
    """``2·mean / (mean² + 1 + std + eps)`` of the values ``x`` (sample std; 0 for one value)."""
    mean = x.mean()
    std = x.std(correction=1) if x.numel() > 1 else x.new_zeros(())
    return 2 * mean / (mean * mean + 1 + std + EPS)


def _block_ssim(p: Tensor, g: Tensor) -> Tensor:
    """The S-measure's region similarity of one block (Fan et al. 2017, eq. 5), with the toolkits' special cases."""
    n = p.numel()
    x, y = p.mean(), g.mean()
    d = max(n - 1, 1)
    sx, sy = (p - x).square().sum() / d, (g - y).square().sum() / d
    sxy = ((p - x) * (g - y)).sum() / d
    alpha = 4 * x * y * sxy
    beta = (x * x + y * y) * (sx + sy)
    if alpha != 0:
        return alpha / (beta + EPS)
    return torch.ones((), dtype=p.dtype) if beta == 0 else torch.zeros((), dtype=p.dtype)


def _s_measure_one(p: Tensor, g: Tensor, alpha: float) -> Tensor:
    y = g.to(p.dtype).mean()
    if y == 0:
        return 1 - p.mean()
    if y == 1:
        return p.mean()
    object_score = y * _object_score(p[g]) + (1 - y) * _object_score(1 - p[~g])
    h, w = g.shape
    coords = g.nonzero().to(torch.float64).mean(dim=0).round()  # centroid; round half to even, as numpy
    cy, cx = int(coords[0]) + 1, int(coords[1]) + 1
    region_score = p.new_zeros(())
    for rows, cols in ((slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, w)),
                       (slice(cy, h), slice(0, cx)), (slice(cy, h), slice(cx, w))):
        pb, gb = p[rows, cols], g[rows, cols].to(p.dtype)
        if pb.numel():
            region_score = region_score + pb.numel() / (h * w) * _block_ssim(pb, gb)
    return (alpha * object_score + (1 - alpha) * region_score).clamp_min(0)


def s_measure(pred: Tensor, gt: Tensor, *, alpha: float = 0.5, normalize: bool = False) -> Tensor:
    """S-measure (Fan et al., ICCV 2017): ``α·S_object + (1 − α)·S_region``; ``(B,)`` in ``[0, 1]``.

    ``S_object`` compares the prediction's distributions inside the foreground and the background (weighted by the
    foreground share); ``S_region`` splits both maps into four blocks at the (rounded) foreground centroid and sums
    an SSIM-like block score weighted by block area. An all-background truth scores ``1 − mean(pred)``, an
    all-foreground one ``mean(pred)``.
    """
    p, g, single = _prepare(pred, gt, normalize)
    values = torch.stack([_s_measure_one(p[i], g[i], alpha) for i in range(p.shape[0])]) if p.shape[0] else p.new_zeros(0)
    return _out(values, single)


class SaliencyMAE(PerImageMean):
    """Mean over images of :func:`saliency_mae`; ``update(pred, gt)``. (torchmetrics' MAE pools pixels instead.)"""

    higher_is_better = False
    is_differentiable = True

    def __init__(self, *, normalize: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.normalize = normalize

    def update(self, pred: Tensor, gt: Tensor) -> None:
        self._add(saliency_mae(pred, gt, normalize=self.normalize))


class SMeasure(PerImageMean):
    """Mean over images of :func:`s_measure`; ``update(pred, gt)``."""

    higher_is_better = True
    is_differentiable = False

    def __init__(self, *, alpha: float = 0.5, normalize: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        self.alpha, self.normalize = alpha, normalize

    def update(self, pred: Tensor, gt: Tensor) -> None:
        self._add(s_measure(pred, gt, alpha=self.alpha, normalize=self.normalize))


class _ThresholdCurve(PerImageMean):
    """Adaptive (mean of per-image values), or max / mean of the mean curve over images."""

    higher_is_better = True
    is_differentiable = False

    def __init__(self, *, variant: Literal["max", "mean", "adaptive"] = "max", normalize: bool = False, **kwargs) -> None:
        super().__init__(**kwargs)
        if variant not in ("max", "mean", "adaptive"):
            raise ValueError(f"variant must be 'max', 'mean' or 'adaptive', got {variant!r}")
        self.variant, self.normalize = variant, normalize
        self.add_state("curve", default=torch.zeros(THRESHOLDS, dtype=torch.float64), dist_reduce_fx="sum")

    def _add_curve(self, curve: Tensor) -> None:
        curve = curve.detach().reshape(-1, THRESHOLDS)
        self.curve += curve.to(self.curve.dtype).sum(dim=0)
        self.count += curve.shape[0]

    def compute(self) -> Tensor:
        if self.variant == "adaptive" or self.count == 0:
            return super().compute()
        mean_curve = self.curve / self.count
        return (mean_curve.max() if self.variant == "max" else mean_curve.mean()).float()


class FMeasure(_ThresholdCurve):
    """F_β over images: ``variant="max"`` (default), ``"mean"`` (of the mean curve) or ``"adaptive"``; ``update(pred, gt)``."""

    def __init__(self, *, variant: Literal["max", "mean", "adaptive"] = "max", beta2: float = 0.3,
                 normalize: bool = False, **kwargs) -> None:
        super().__init__(variant=variant, normalize=normalize, **kwargs)
        self.beta2 = beta2

    def update(self, pred: Tensor, gt: Tensor) -> None:
        if self.variant == "adaptive":
            self._add(adaptive_f_measure(pred, gt, beta2=self.beta2, normalize=self.normalize))
        else:
            self._add_curve(f_measure_curve(pred, gt, beta2=self.beta2, normalize=self.normalize))


class EMeasure(_ThresholdCurve):
    """E-measure over images: ``variant="max"`` (default), ``"mean"`` (of the mean curve) or ``"adaptive"``; ``update(pred, gt)``."""

    def update(self, pred: Tensor, gt: Tensor) -> None:
        if self.variant == "adaptive":
            self._add(adaptive_e_measure(pred, gt, normalize=self.normalize))
        else:
            self._add_curve(e_measure_curve(pred, gt, normalize=self.normalize))

"""Image-fusion metrics: EN, SD, SF, AG, MI, SSIM, Qabf, VIF (plus fusion PSNR and SCD), per image.

Sources ``a`` (e.g. infrared) and ``b`` (e.g. visible) and the fused image ``fused``, grey ``(B, 1, H, W)`` (or
one ``(H, W)`` image, giving 0-d results) in ``[0, data_range]``. Every metric is computed on the **8-bit scale**:
images are rescaled by ``255 / data_range`` first (``data_range`` defaults to 1.0 for floating and 255 for integer
tensors), so EN/MI histograms have 256 grey levels, SD/SF/AG are in grey levels and VIF's noise variance
σ_n² = 2 means what it means in the reference code. Definitions: ``docs/metrics.md`` and the shared spec
``dense-vision-metrics.md``; conventions follow the widely used Python/MATLAB fusion evaluators (VIFB, the
CDDFuse/PIAFusion ``Evaluator``), with these choices stated:

* EN and MI round to integer grey levels; logs are base 2 (bits), so ``MI(A, A) = EN(A)``
  (scikit-learn's ``mutual_info_score``, used by some evaluators, reports nats: ours × ln 2);
* SD is the population standard deviation; SF averages the horizontal (``H × (W−1)``) and vertical
  (``(H−1) × W``) squared differences separately; AG uses central differences inside and one-sided ones
  on the border (``numpy.gradient``);
* SSIM is :func:`attnfuse.metrics.restoration.ssim` (Gaussian σ = 1.5) of ``(F, A)`` and ``(F, B)``, summed
  (``reduce="sum"``, the usual table entry) or averaged (``reduce="mean"``);
* Qabf (Xydeas & Petrović 2000) uses 3×3 Sobel filters with zero padding (MATLAB ``conv2(…, 'same')``),
  orientation ``atan(g_y / g_x)`` (π/2 where ``g_x = 0``) and ``G = min(g_X, g_F) / max(g_X, g_F)``.
  Perfect edge transfer scores ``Γ_g/(1+e^{κ_g(1−σ_g)}) · Γ_α/(1+e^{κ_α(1−σ_α)}) = 0.97479`` (:data:`QABF_MAX`),
  not 1. An image pair without any edge (all gradients zero) scores 0; with zero padding a constant non-zero
  image has edges on its border;
* VIF is the pixel-domain, 4-scale VIF-P (Sheikh & Bovik 2006; σ_n² = 2) of torchmetrics
  (``visual_information_fidelity``), ``VIF(A, F) + VIF(B, F)``; images must be at least 41×41. A constant
  source has no information to preserve and gives NaN.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.image import visual_information_fidelity

from attnfuse.metrics._image import PerImageMean, as_batch, check_range, check_same_shape, resolve_data_range
from attnfuse.metrics.restoration import ssim

__all__ = [
    "QABF_MAX",
    "AverageGradient",
    "Entropy",
    "FusionMI",
    "FusionSSIM",
    "FusionVIF",
    "Qabf",
    "SpatialFrequency",
    "StandardDeviation",
    "average_gradient",
    "entropy",
    "fusion_mi",
    "fusion_psnr",
    "fusion_ssim",
    "fusion_vif",
    "mutual_information",
    "qabf",
    "scd",
    "spatial_frequency",
    "standard_deviation",
]

#: Qabf constants (Xydeas & Petrović 2000): (Γ, κ, σ) for edge strength and for orientation.
QABF_EDGE = (0.9994, -15.0, 0.5)
QABF_ORIENTATION = (0.9879, -22.0, 0.8)
#: Qabf of a perfect transfer (F = A = B): the product of the two sigmoids at G = A = 1.
QABF_MAX = QABF_EDGE[0] / (1 + math.exp(QABF_EDGE[1] * (1 - QABF_EDGE[2]))) * \
    QABF_ORIENTATION[0] / (1 + math.exp(QABF_ORIENTATION[1] * (1 - QABF_ORIENTATION[2])))

LEVELS = 256


def _to_8bit(x: Tensor, name: str, data_range: float | None, *, min_size: int = 1,
             like: tuple[str, Tensor] | None = None) -> tuple[Tensor, bool]:
    """``x`` as ``(B, H, W)`` float64 on the 8-bit scale (and whether it was one ``(H, W)`` image)."""
    x4, single = as_batch(x, name, channels=1, min_size=min_size)
    if like is not None:
        check_same_shape(like[1], like[0], **{name: x})
    rng = resolve_data_range(x4, data_range)
    check_range(x4, name, rng)
    return x4[:, 0].to(torch.float64) * (255.0 / rng), single


def _out(values: Tensor, single: bool) -> Tensor:
    return values[0] if single else values


def _levels(x8: Tensor) -> Tensor:
    """Integer grey levels 0..255, ``(B, H, W)`` long."""
    return x8.round().clamp(0, LEVELS - 1).long()


def entropy(fused: Tensor, *, data_range: float | None = None) -> Tensor:
    """EN: Shannon entropy in bits of the 256-level grey histogram, ``−Σ p_i log₂ p_i``.

    Args:
        fused: ``(B, 1, H, W)`` or ``(H, W)`` in ``[0, data_range]``.

    Returns:
        ``(B,)`` (0-d for one image) in ``[0, 8]``: 0 for a constant image, 8 for a uniform histogram.
    """
    x8, single = _to_8bit(fused, "fused", data_range)
    b = x8.shape[0]
    q = _levels(x8).reshape(b, -1)
    offsets = torch.arange(b, device=q.device)[:, None] * LEVELS
    hist = torch.bincount((q + offsets).reshape(-1), minlength=b * LEVELS).reshape(b, LEVELS).to(torch.float64)
    p = hist / q.shape[1]
    en = -torch.where(p > 0, p * torch.log2(p.clamp_min(1e-300)), torch.zeros_like(p)).sum(dim=1)
    return _out(en, single)


def standard_deviation(fused: Tensor, *, data_range: float | None = None) -> Tensor:
    """SD: population standard deviation of the grey levels, ``sqrt(mean((F − mean F)²))``; ``(B,)``."""
    x8, single = _to_8bit(fused, "fused", data_range)
    return _out(x8.flatten(1).std(dim=1, correction=0), single)


def spatial_frequency(fused: Tensor, *, data_range: float | None = None) -> Tensor:
    """SF: ``sqrt(RF² + CF²)`` with ``RF² = mean((F[i,j] − F[i,j−1])²)``, ``CF² = mean((F[i,j] − F[i−1,j])²)``; ``(B,)``.

    Needs at least 2×2 pixels.
    """
    x8, single = _to_8bit(fused, "fused", data_range, min_size=2)
    rf2 = (x8[:, :, 1:] - x8[:, :, :-1]).square().mean(dim=(1, 2))
    cf2 = (x8[:, 1:, :] - x8[:, :-1, :]).square().mean(dim=(1, 2))
    return _out((rf2 + cf2).sqrt(), single)


def average_gradient(fused: Tensor, *, data_range: float | None = None) -> Tensor:
    """AG: ``mean(sqrt((∂_x F² + ∂_y F²) / 2))`` with ``numpy.gradient`` differences (central inside, one-sided on the border).

    Needs at least 2×2 pixels. Returns ``(B,)``.
    """
    x8, single = _to_8bit(fused, "fused", data_range, min_size=2)
    gy, gx = torch.gradient(x8, dim=(1, 2))
    return _out(((gx.square() + gy.square()) / 2).sqrt().mean(dim=(1, 2)), single)


def _mi(x8: Tensor, y8: Tensor) -> Tensor:
    b = x8.shape[0]
    qx, qy = _levels(x8).reshape(b, -1), _levels(y8).reshape(b, -1)
    offsets = torch.arange(b, device=qx.device)[:, None] * LEVELS * LEVELS
    joint = torch.bincount((qx * LEVELS + qy + offsets).reshape(-1), minlength=b * LEVELS * LEVELS)
    p = joint.reshape(b, LEVELS, LEVELS).to(torch.float64) / qx.shape[1]
    px, py = p.sum(dim=2, keepdim=True), p.sum(dim=1, keepdim=True)
    ratio = p / (px * py).clamp_min(1e-300)
    return torch.where(p > 0, p * torch.log2(ratio.clamp_min(1e-300)), torch.zeros_like(p)).sum(dim=(1, 2))


def mutual_information(x: Tensor, y: Tensor, *, data_range: float | None = None) -> Tensor:
    """MI in bits of two images over their 256×256 joint grey-level histogram, ``Σ p_xy log₂(p_xy / (p_x p_y))``.

    Args:
        x, y: ``(B, 1, H, W)`` or ``(H, W)`` of one shape, in ``[0, data_range]``.

    Returns:
        ``(B,)``; ``MI(x, x) = EN(x)``.
    """
    x8, single = _to_8bit(x, "x", data_range)
    y8, _ = _to_8bit(y, "y", data_range, like=("x", x))
    return _out(_mi(x8, y8), single)


def fusion_mi(fused: Tensor, a: Tensor, b: Tensor, *, data_range: float | None = None) -> Tensor:
    """MI of a fusion: ``MI(F, A) + MI(F, B)`` in bits; ``(B,)``."""
    f8, single = _to_8bit(fused, "fused", data_range)
    a8, _ = _to_8bit(a, "a", data_range, like=("fused", fused))
    b8, _ = _to_8bit(b, "b", data_range, like=("fused", fused))
    return _out(_mi(f8, a8) + _mi(f8, b8), single)


def _reduce_pair(fa: Tensor, fb: Tensor, reduce: str) -> Tensor:
    if reduce == "sum":
        return fa + fb
    if reduce == "mean":
        return (fa + fb) / 2
    raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")


def fusion_ssim(fused: Tensor, a: Tensor, b: Tensor, *, data_range: float | None = None,
                reduce: Literal["sum", "mean"] = "sum") -> Tensor:
    """``SSIM(F, A) + SSIM(F, B)`` (``reduce="sum"``, in ``[-2, 2]``) or their mean (``"mean"``); ``(B,)``.

    SSIM as :func:`attnfuse.metrics.restoration.ssim` (Gaussian σ = 1.5, valid windows), images at least 11×11.
    """
    f8, single = _to_8bit(fused, "fused", data_range)
    a8, _ = _to_8bit(a, "a", data_range, like=("fused", fused))
    b8, _ = _to_8bit(b, "b", data_range, like=("fused", fused))
    f4, a4, b4 = f8[:, None], a8[:, None], b8[:, None]
    return _out(_reduce_pair(ssim(f4, a4, data_range=255.0), ssim(f4, b4, data_range=255.0), reduce), single)


def fusion_psnr(fused: Tensor, a: Tensor, b: Tensor, *, data_range: float | None = None) -> Tensor:
    """Fusion PSNR ``10·log₁₀(255² / ((MSE(F, A) + MSE(F, B)) / 2))`` on the 8-bit scale; ``(B,)``."""
    f8, single = _to_8bit(fused, "fused", data_range)
    a8, _ = _to_8bit(a, "a", data_range, like=("fused", fused))
    b8, _ = _to_8bit(b, "b", data_range, like=("fused", fused))
    mse = ((f8 - a8).square().mean(dim=(1, 2)) + (f8 - b8).square().mean(dim=(1, 2))) / 2
    return _out(10 * torch.log10(255.0**2 / mse), single)


def _corr(x: Tensor, y: Tensor) -> Tensor:
    x = x.flatten(1) - x.flatten(1).mean(dim=1, keepdim=True)
    y = y.flatten(1) - y.flatten(1).mean(dim=1, keepdim=True)
    return (x * y).sum(dim=1) / ((x.square().sum(dim=1) * y.square().sum(dim=1)).sqrt())


def scd(fused: Tensor, a: Tensor, b: Tensor, *, data_range: float | None = None) -> Tensor:
    """SCD (sum of the correlations of differences, Aslantas & Bendes 2015): ``corr(F − B, A) + corr(F − A, B)``; ``(B,)``."""
    f8, single = _to_8bit(fused, "fused", data_range)
    a8, _ = _to_8bit(a, "a", data_range, like=("fused", fused))
    b8, _ = _to_8bit(b, "b", data_range, like=("fused", fused))
    return _out(_corr(f8 - b8, a8) + _corr(f8 - a8, b8), single)


def _sobel(x8: Tensor) -> tuple[Tensor, Tensor]:
    """Sobel edge strength and orientation, zero padding; ``(B, H, W)`` each."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=x8.dtype, device=x8.device)
    k = torch.stack([kx, kx.T])[:, None]  # (2, 1, 3, 3): d/dx, d/dy
    g = F.conv2d(x8[:, None], k, padding=1)
    gx, gy = g[:, 0], g[:, 1]
    strength = (gx.square() + gy.square()).sqrt()
    angle = torch.where(gx == 0, torch.full_like(gx, math.pi / 2), torch.atan(gy / torch.where(gx == 0, 1.0, gx)))
    return strength, angle


def _edge_preservation(g_x: Tensor, a_x: Tensor, g_f: Tensor, a_f: Tensor) -> Tensor:
    hi, lo = torch.maximum(g_x, g_f), torch.minimum(g_x, g_f)
    strength = torch.where(hi > 0, lo / torch.where(hi > 0, hi, 1.0), torch.zeros_like(hi))
    orientation = 1 - (a_x - a_f).abs() / (math.pi / 2)
    (tg, kg, sg), (ta, ka, sa) = QABF_EDGE, QABF_ORIENTATION
    return tg / (1 + torch.exp(kg * (strength - sg))) * ta / (1 + torch.exp(ka * (orientation - sa)))


def qabf(fused: Tensor, a: Tensor, b: Tensor, *, data_range: float | None = None) -> Tensor:
    """Qabf (Xydeas & Petrović 2000): edge information transferred from A and B to F, weighted by source edge strength.

    ``Qabf = Σ(Q^{AF} g_A + Q^{BF} g_B) / Σ(g_A + g_B)`` with, per source X, ``Q^{XF}`` the product of two sigmoids
    of the strength ratio ``G = min(g_X, g_F)/max(g_X, g_F)`` and the orientation agreement
    ``1 − |α_X − α_F|/(π/2)`` (constants :data:`QABF_EDGE`, :data:`QABF_ORIENTATION`).

    Args:
        fused, a, b: ``(B, 1, H, W)`` or ``(H, W)`` of one shape, in ``[0, data_range]``.

    Returns:
        ``(B,)`` in ``[0, QABF_MAX]`` (``QABF_MAX = 0.97479``: the score of F = A = B); 0 when A and B have no edge.
    """
    f8, single = _to_8bit(fused, "fused", data_range)
    a8, _ = _to_8bit(a, "a", data_range, like=("fused", fused))
    b8, _ = _to_8bit(b, "b", data_range, like=("fused", fused))
    (gf, af), (ga, aa), (gb, ab) = _sobel(f8), _sobel(a8), _sobel(b8)
    num = (_edge_preservation(ga, aa, gf, af) * ga + _edge_preservation(gb, ab, gf, af) * gb).sum(dim=(1, 2))
    den = (ga + gb).sum(dim=(1, 2))
    return _out(torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.zeros_like(den)), single)


VIF_MIN_SIZE = 41


def fusion_vif(fused: Tensor, a: Tensor, b: Tensor, *, data_range: float | None = None,
               reduce: Literal["sum", "mean"] = "sum") -> Tensor:
    """``VIF(A, F) + VIF(B, F)`` (or their mean): pixel-domain 4-scale VIF-P, σ_n² = 2, on the 8-bit scale; ``(B,)``.

    Wraps ``torchmetrics.functional.image.visual_information_fidelity(preds=F, target=X)``. Images must be at
    least 41×41; ``VIF(X, X) = 1``; a constant source gives NaN.
    """
    f8, single = _to_8bit(fused, "fused", data_range, min_size=VIF_MIN_SIZE)
    a8, _ = _to_8bit(a, "a", data_range, like=("fused", fused))
    b8, _ = _to_8bit(b, "b", data_range, like=("fused", fused))
    if f8.shape[0] == 0:
        return f8.new_zeros(0)
    f4, a4, b4 = f8[:, None], a8[:, None], b8[:, None]
    va = visual_information_fidelity(f4, a4, sigma_n_sq=2.0, reduction="none")
    vb = visual_information_fidelity(f4, b4, sigma_n_sq=2.0, reduction="none")
    return _out(_reduce_pair(va, vb, reduce), single)


class _FusedOnly(PerImageMean):
    """A reference-free fusion metric: ``update(fused)`` (sources, if passed, are ignored)."""

    higher_is_better = True
    is_differentiable = False
    _fn = staticmethod(entropy)

    def __init__(self, *, data_range: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_range = data_range

    def update(self, fused: Tensor, a: Tensor | None = None, b: Tensor | None = None) -> None:
        self._add(type(self)._fn(fused, data_range=self.data_range))


class _WithSources(PerImageMean):
    """A fusion metric of the fused image and both sources: ``update(fused, a, b)``."""

    higher_is_better = True
    is_differentiable = False
    _fn = staticmethod(fusion_mi)

    def __init__(self, *, data_range: float | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.data_range = data_range

    def update(self, fused: Tensor, a: Tensor, b: Tensor) -> None:
        self._add(type(self)._fn(fused, a, b, data_range=self.data_range))


class Entropy(_FusedOnly):
    """Mean over images of :func:`entropy` (EN); ``update(fused)``."""

    _fn = staticmethod(entropy)


class StandardDeviation(_FusedOnly):
    """Mean over images of :func:`standard_deviation` (SD); ``update(fused)``."""

    _fn = staticmethod(standard_deviation)


class SpatialFrequency(_FusedOnly):
    """Mean over images of :func:`spatial_frequency` (SF); ``update(fused)``."""

    _fn = staticmethod(spatial_frequency)


class AverageGradient(_FusedOnly):
    """Mean over images of :func:`average_gradient` (AG); ``update(fused)``."""

    _fn = staticmethod(average_gradient)


class FusionMI(_WithSources):
    """Mean over images of :func:`fusion_mi` (``MI(F, A) + MI(F, B)``); ``update(fused, a, b)``."""

    _fn = staticmethod(fusion_mi)


class Qabf(_WithSources):
    """Mean over images of :func:`qabf`; ``update(fused, a, b)``. Its maximum is :data:`QABF_MAX` = 0.97479, not 1."""

    _fn = staticmethod(qabf)


class FusionSSIM(_WithSources):
    """Mean over images of :func:`fusion_ssim`; ``update(fused, a, b)``; ``reduce="sum"`` (default) or ``"mean"``."""

    is_differentiable = True

    def __init__(self, *, data_range: float | None = None, reduce: Literal["sum", "mean"] = "sum", **kwargs) -> None:
        super().__init__(data_range=data_range, **kwargs)
        _reduce_pair(torch.zeros(()), torch.zeros(()), reduce)  # validate early
        self.reduce = reduce

    def update(self, fused: Tensor, a: Tensor, b: Tensor) -> None:
        self._add(fusion_ssim(fused, a, b, data_range=self.data_range, reduce=self.reduce))


class FusionVIF(_WithSources):
    """Mean over images of :func:`fusion_vif`; ``update(fused, a, b)``; ``reduce="sum"`` (default) or ``"mean"``."""

    def __init__(self, *, data_range: float | None = None, reduce: Literal["sum", "mean"] = "sum", **kwargs) -> None:
        super().__init__(data_range=data_range, **kwargs)
        _reduce_pair(torch.zeros(()), torch.zeros(()), reduce)
        self.reduce = reduce

    def update(self, fused: Tensor, a: Tensor, b: Tensor) -> None:
        self._add(fusion_vif(fused, a, b, data_range=self.data_range, reduce=self.reduce))

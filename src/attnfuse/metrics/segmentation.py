"""Segmentation metrics per case and region: Dice (wrapping torchmetrics) and HD95, plus the BraTS regions.

Conventions (HFF-Net evaluation, see ``docs/metrics.md``):

* Regions are binary channels ``(B, R, *spatial)`` (2-D or 3-D), possibly overlapping (BraTS ET ⊂ TC ⊂ WT; build
  them from label maps with :func:`brats_regions`). Predicted probabilities are binarised at a fixed
  ``threshold`` (``p > 0.5``); boolean or integer predictions are used as they are. Targets are boolean / {0, 1}.
* Dice is computed **per case** (``2|P ∩ G| / (|P| + |G|)``) and then averaged over cases; the Dice of an empty
  prediction on an empty target is ``empty`` (default 1, the BraTS convention; ``float("nan")`` leaves such cases
  out of the means). A pooled-voxel / oracle-threshold Dice is not offered (non-standard).
* HD95 is the larger of the two directed 95th-percentile distances between the surfaces (a voxel of the mask with
  a 6-/4-connected neighbour outside it or on the array border, as ``mask ^ binary_erosion(mask)`` in
  scipy / MONAI), in the units of ``spacing`` (voxel size, e.g. mm). Both empty: 0; exactly one empty:
  ``one_empty`` (default ``inf``; BraTS reports 373.13, the diagonal of its volume). The percentile interpolates
  linearly (``numpy.percentile``'s default).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.functional.segmentation import dice_score
from torchmetrics.utilities import dim_zero_cat

__all__ = ["HD95", "Dice", "brats_regions", "dice", "hd95", "surface"]

BRATS_REGIONS = ("ET", "TC", "WT")


def brats_regions(labels: Tensor, *, et_label: int = 4) -> Tensor:
    """BraTS evaluation regions from a label map: ET = ``et_label``, TC = 1 + ET, WT = 1 + 2 + ET.

    Args:
        labels: ``(B, *spatial)`` integer labels (0 background, 1 necrosis / non-enhancing core, 2 oedema,
            ``et_label`` enhancing tumour: 4 up to BraTS 2021, 3 in BraTS 2023).

    Returns:
        ``(B, 3, *spatial)`` bool, channels in the order ``("ET", "TC", "WT")``.
    """
    if labels.is_floating_point() or labels.dim() < 2:
        raise ValueError(f"labels must be an integer (B, *spatial) label map, got {labels.dtype} {tuple(labels.shape)}")
    et = labels == et_label
    tc = et | (labels == 1)
    wt = tc | (labels == 2)
    return torch.stack([et, tc, wt], dim=1)


def _binary(pred: Tensor, target: Tensor, threshold: float) -> tuple[Tensor, Tensor]:
    """Check shapes and binarise: ``(B, R, *spatial)`` bool each."""
    for name, t in (("pred", pred), ("target", target)):
        if not isinstance(t, Tensor) or t.dim() not in (4, 5):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must be (B, R, H, W) or (B, R, D, H, W) region maps, got {shape}")
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
    p = pred > threshold if pred.is_floating_point() else pred.bool() if pred.dtype != torch.bool else pred
    if target.is_floating_point():
        if ((target != 0) & (target != 1)).any():
            raise ValueError("target must be binary (bool, or 0/1 values)")
        t = target.bool()
    else:
        t = target.bool()
    return p, t


def dice(pred: Tensor, target: Tensor, *, threshold: float = 0.5, empty: float = 1.0) -> Tensor:
    """Dice per case and region, ``2|P ∩ G| / (|P| + |G|)``.

    Wraps ``torchmetrics.functional.segmentation.dice_score(average="none", input_format="one-hot")``.

    Args:
        pred: ``(B, R, H, W)`` or ``(B, R, D, H, W)``: probabilities (binarised ``> threshold``) or bool / 0-1 ints.
        target: same shape, binary.
        threshold: for floating ``pred``.
        empty: the value when prediction and target are both empty (1 by default; NaN to leave the case out).

    Returns:
        ``(B, R)`` in ``[0, 1]``.
    """
    p, t = _binary(pred, target, threshold)
    if p.shape[0] == 0:
        return torch.zeros(p.shape[:2], device=p.device)
    d = dice_score(p.long(), t.long(), num_classes=p.shape[1], include_background=True, average="none",
                   input_format="one-hot")
    d = d.reshape(p.shape[:2]).float()
    return torch.where(torch.isnan(d), torch.full_like(d, float(empty)), d)


def surface(mask: Tensor) -> Tensor:
    """Surface voxels of boolean masks ``(N, *spatial)`` (2-D or 3-D): in the mask with a face neighbour outside it.

    Equals ``mask & ~scipy.ndimage.binary_erosion(mask)`` (cross-shaped structure, outside the array = background).
    """
    nd = mask.dim() - 1
    x = mask[:, None].float()
    pad = (1, 1) * nd
    xp = F.pad(x, pad, value=0.0)
    eroded = x.clone()
    for axis in range(nd):
        dim = 2 + axis
        n = x.shape[dim]
        eroded = torch.minimum(eroded, _shift(xp, dim, 0, n, nd))
        eroded = torch.minimum(eroded, _shift(xp, dim, 2, n, nd))
    return mask & ~(eroded[:, 0] > 0)


def _shift(xp: Tensor, dim: int, start: int, n: int, nd: int) -> Tensor:
    """The padded tensor shifted by ``start − 1`` along ``dim``, cropped back to the unpadded size on every axis."""
    out = xp.narrow(dim, start, n)
    for other in range(2, 2 + nd):
        if other != dim:
            out = out.narrow(other, 1, xp.shape[other] - 2)
    return out


def _directed_percentile(src: Tensor, dst: Tensor, q: float, chunk: int = 4096) -> Tensor:
    """``q``-th percentile over the points of ``src`` of the distance to the nearest point of ``dst``."""
    nearest = torch.cat([torch.cdist(src[i:i + chunk], dst).amin(dim=1) for i in range(0, src.shape[0], chunk)])
    return torch.quantile(nearest, q / 100.0)


def hd95(pred: Tensor, target: Tensor, *, spacing: Sequence[float] | None = None, threshold: float = 0.5,
         percentile: float = 95.0, one_empty: float = float("inf")) -> Tensor:
    """95th-percentile symmetric Hausdorff distance between prediction and target surfaces, per case and region.

    Exact: the nearest-surface distances are computed by brute force (``torch.cdist`` in chunks), so time grows with
    the product of the two surface sizes.

    Args:
        pred, target: as in :func:`dice`.
        spacing: voxel size per spatial axis (default 1 each).
        threshold: for floating ``pred``.
        percentile: in ``[0, 100]`` (95: HD95; 100: the Hausdorff distance).
        one_empty: the value when exactly one of prediction and target is empty.

    Returns:
        ``(B, R)`` float64, ``≥ 0``; 0 when both are empty.
    """
    p, t = _binary(pred, target, threshold)
    nd = p.dim() - 2
    if spacing is None:
        spacing = (1.0,) * nd
    spacing = tuple(float(s) for s in spacing)
    if len(spacing) != nd or any(s <= 0 for s in spacing):
        raise ValueError(f"spacing must be {nd} positive voxel sizes, got {spacing}")
    if not 0 <= percentile <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    b, r = p.shape[:2]
    out = torch.zeros(b, r, dtype=torch.float64, device=p.device)
    if b * r == 0:
        return out
    sp, st = surface(p.flatten(0, 1)), surface(t.flatten(0, 1))
    scale = torch.tensor(spacing, dtype=torch.float64, device=p.device)
    for i in range(b * r):
        ps = sp[i].nonzero().to(torch.float64) * scale
        ts = st[i].nonzero().to(torch.float64) * scale
        if ps.shape[0] == 0 and ts.shape[0] == 0:
            value = 0.0
        elif ps.shape[0] == 0 or ts.shape[0] == 0:
            value = float(one_empty)
        else:
            value = torch.maximum(_directed_percentile(ps, ts, percentile), _directed_percentile(ts, ps, percentile)).item()
        out.view(-1)[i] = value
    return out


class _PerCaseRegions(Metric):
    """Per-case, per-region values, kept for ``compute()``: mean over cases per region, then over regions."""

    full_state_update = False

    def __init__(self, *, average: Literal["macro", "none"] = "macro", **kwargs) -> None:
        super().__init__(**kwargs)
        if average not in ("macro", "none"):
            raise ValueError(f"average must be 'macro' or 'none', got {average!r}")
        self.average = average
        self.add_state("values", default=[], dist_reduce_fx="cat")

    def compute(self) -> Tensor:
        """``(R,)`` mean over cases per region (``average="none"``) or their mean (``"macro"``); NaN values are left out."""
        if not self.values:
            return torch.tensor(float("nan"))
        v = dim_zero_cat(self.values).to(torch.float64)  # (N, R)
        per_region = v.nanmean(dim=0)
        return (per_region if self.average == "none" else per_region.nanmean()).float()


class Dice(_PerCaseRegions):
    """Mean over cases of :func:`dice`; ``update(pred, target)`` with ``(B, R, *spatial)`` region maps.

    ``compute()`` gives the per-region means ``(R,)`` (``average="none"``) or their mean (``"macro"``, default).
    """

    higher_is_better = True
    is_differentiable = False

    def __init__(self, *, threshold: float = 0.5, empty: float = 1.0, average: Literal["macro", "none"] = "macro",
                 **kwargs) -> None:
        super().__init__(average=average, **kwargs)
        self.threshold, self.empty = threshold, empty

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.values.append(dice(pred, target, threshold=self.threshold, empty=self.empty).to(self.device))


class HD95(_PerCaseRegions):
    """Mean over cases of :func:`hd95`; ``update(pred, target)``; options as in :func:`hd95`, ``average`` as in :class:`Dice`."""

    higher_is_better = False
    is_differentiable = False

    def __init__(self, *, spacing: Sequence[float] | None = None, threshold: float = 0.5, percentile: float = 95.0,
                 one_empty: float = float("inf"), average: Literal["macro", "none"] = "macro", **kwargs) -> None:
        super().__init__(average=average, **kwargs)
        self.spacing, self.threshold, self.percentile, self.one_empty = spacing, threshold, percentile, one_empty

    def update(self, pred: Tensor, target: Tensor) -> None:
        self.values.append(hd95(pred, target, spacing=self.spacing, threshold=self.threshold, percentile=self.percentile,
                                one_empty=self.one_empty).to(self.device))

"""Pooled gates: squeeze-excitation (avg / max / avg+max / DCT pooling), coordinate attention (2-D, 3-D)
and DFYP's resolution-aware channel attention.

Papers:
* SE: Hu, Shen, Sun, "Squeeze-and-Excitation Networks", CVPR 2018 (arXiv 1709.01507); the avg+max
  shared-MLP form is CBAM's channel branch (Woo et al., ECCV 2018, arXiv 1807.06521) and the DCT pooling
  is FcaNet (Qin et al., ICCV 2021, arXiv 2012.11879) as used by FSATFusion's FSAM.
* Coordinate attention: Hou, Zhou, Feng, "Coordinate Attention for Efficient Mobile Network Design",
  CVPR 2021 (arXiv 2103.02907); 3-D form as MPFNet uses it (arXiv 2506.09735).
* DFYP RCA: Zhang et al., arXiv 2507.05849.

Status: :class:`CoordinateAttention` with ``preset="official"`` equals ``houqb/CoordAttention``'s
``CoordAtt`` with the same weights (state dicts load as they are: ``conv1``, ``bn1``, ``conv_h``,
``conv_w``), ``preset="timm"`` equals timm 1.0.31 ``CoordAttn``; :class:`SqueezeExcite` equals timm's
``SEModule`` with ``hidden=`` set to timm's width (tested). See ``docs/vision-blocks.md``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnfuse.nn._registry import register_module
from attnfuse.ops.frequency import dct_basis, dct_pool, fcanet_frequencies

__all__ = ["CoordinateAttention", "ResolutionAwareChannelAttention", "SqueezeExcite", "make_divisible"]

_ACTS = {"relu": nn.ReLU, "hardswish": nn.Hardswish, "silu": nn.SiLU, "gelu": nn.GELU, "relu6": nn.ReLU6}
_GATES = {"sigmoid": torch.sigmoid, "hardsigmoid": F.hardsigmoid}


def _act(name: str) -> nn.Module:
    if name not in _ACTS:
        raise ValueError(f"act must be one of {sorted(_ACTS)}, got {name!r}")
    return _ACTS[name]()


def _check_gate(gate: str) -> str:
    if gate not in _GATES:
        raise ValueError(f"gate must be one of {sorted(_GATES)}, got {gate!r}")
    return gate


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round ``v`` to a multiple of ``divisor`` (at least ``min_value``), timm / MobileNet convention:
    ``max(min_value, int(v + divisor/2) // divisor · divisor)``, plus ``divisor`` if that is below ``round_limit · v``."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def _check_input(x: Tensor, channels: int, spatial: int, name: str) -> None:
    if x.dim() != 2 + spatial or x.shape[1] != channels:
        layout = {1: "(B, C, L)", 2: "(B, C, H, W)", 3: "(B, C, T, H, W)"}[spatial]
        raise ValueError(f"{name} expects x {layout} with C={channels}, got {tuple(x.shape)=}")


_LETTERS = "tuvwxyz"


class _GateProduct(torch.autograd.Function):
    """``y = x ⊙ Π_k g_k`` for gates ``g_k (B, C, 1.., S_k, ..1)``, gate ``k`` varying along spatial axis ``axes[k]``.

    Same values as the chain of broadcast multiplies; the backward contracts ``dy ⊙ x`` with the product of the
    other gates through ``einsum`` (a batched mat-vec) instead of materialising one full-size temporary per gate,
    which makes forward+backward cheaper than autograd's chain (``benchmarks/bench_vision.py``).
    """

    @staticmethod
    def forward(ctx, axes: tuple[int, ...], x: Tensor, *gates: Tensor) -> Tensor:
        ctx.axes = axes
        ctx.save_for_backward(x, *gates)
        y = x
        for g in reversed(gates):  # official order: x * g_w * g_h
            y = y * g
        return y

    @staticmethod
    def backward(ctx, dy: Tensor):
        x, *gates = ctx.saved_tensors
        dx = None
        if ctx.needs_input_grad[1]:
            dx = dy
            for g in reversed(gates):
                dx = dx * g
        if not any(ctx.needs_input_grad[2:]):
            return (None, dx, *([None] * len(gates)))
        p = dy * x  # (B, C, *spatial)
        n = x.dim() - 2
        letters = _LETTERS[:n]
        axis_of = ctx.axes
        grads = []
        for k, g in enumerate(gates):
            if not ctx.needs_input_grad[2 + k]:
                grads.append(None)
                continue
            others = [h for j, h in enumerate(gates) if j != k]
            out_sub = "bc" + letters[axis_of[k]]
            if not others:
                dg = p.sum(dim=[2 + a for a in range(n) if a != axis_of[k]])
            else:
                other = others[0]
                for h in others[1:]:
                    other = other * h  # small: at most C x (product of the other gated axes)
                keep = sorted(axis_of[j] for j in range(len(gates)) if j != k)
                other_sub = "bc" + "".join(letters[a] for a in keep)
                other = other.reshape(*other.shape[:2], *[other.shape[2 + a] for a in keep])
                dg = torch.einsum(f"bc{letters},{other_sub}->{out_sub}", p, other)
            grads.append(dg.reshape(g.shape))
        return (None, dx, *grads)


# --------------------------------------------------------------------------------------- squeeze-excite
def _tiny_se():
    return SqueezeExcite(16, reduction=4, pools=("avg", "max")), (torch.randn(2, 16, 5, 6),)


@register_module("squeeze_excite", group="vision", example=_tiny_se)
class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation channel gate ``y = x ⊙ gate(Σ_p W₂ act(W₁ pool_p(x) + b₁) + b₂)``.

    One MLP is shared by every pool in ``pools`` and the pre-gate logits are summed (CBAM's channel branch
    for ``("avg", "max")``; classic SE for ``("avg",)``). ``pools=("dct",)`` is FcaNet's multi-spectral
    pooling: the input is average-pooled to ``dct_size`` and channel group ``k`` is projected on DCT basis
    image ``k`` (:func:`attnfuse.ops.frequency.dct_pool`), as in FSATFusion's FSAM.

    Args:
        channels: ``C``.
        reduction: hidden width ``max(C // reduction, min_hidden)`` unless ``hidden`` is given.
        hidden: explicit hidden width.
        min_hidden: lower bound of the hidden width (DFYP: 1; collapses to 1 unit for 9 bands, r = 16).
        pools: any of ``"avg"``, ``"max"``, ``"dct"`` (``"dct"`` only alone).
        act: hidden activation (``relu`` default).
        gate: ``"sigmoid"`` or ``"hardsigmoid"``.
        bias: biases in the two linear layers (timm: True; FcaNet / CBAM: False).
        dct_size: DCT pooling grid ``(h, w)`` (FcaNet on 7x7 multiples; FSATFusion 224x224).
        dct_frequencies: FcaNet list name (``"top16"``); ``C`` must be divisible by its length.
        device, dtype: for the parameters.

    Shapes:
        x ``(B, C, *spatial)`` (any number of spatial axes; DCT pooling needs 2) -> same shape.
        ``return_gate=True`` also returns the gate ``(B, C)``.

    Example:
        >>> SqueezeExcite(32)(torch.randn(2, 32, 7, 7)).shape
        torch.Size([2, 32, 7, 7])
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        hidden: int | None = None,
        min_hidden: int = 1,
        pools: str | Sequence[str] = ("avg",),
        act: str = "relu",
        gate: str = "sigmoid",
        bias: bool = True,
        dct_size: tuple[int, int] = (7, 7),
        dct_frequencies: str = "top16",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        pools = (pools,) if isinstance(pools, str) else tuple(pools)
        if not pools or any(p not in ("avg", "max", "dct") for p in pools) or ("dct" in pools and len(pools) > 1):
            raise ValueError(f"pools must be a non-empty subset of ('avg', 'max'), or ('dct',); got {pools}")
        if channels <= 0 or reduction <= 0:
            raise ValueError(f"channels and reduction must be positive, got {channels=}, {reduction=}")
        self.channels, self.pools, self.gate = channels, pools, _check_gate(gate)
        width = hidden if hidden is not None else max(channels // reduction, min_hidden)
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(channels, width, bias=bias, **dd)
        self.act = _act(act)
        self.fc2 = nn.Linear(width, channels, bias=bias, **dd)
        if "dct" in pools:
            freqs = fcanet_frequencies(dct_frequencies, dct_size)
            if channels % len(freqs):
                raise ValueError(f"pools=('dct',) with {dct_frequencies!r} needs channels divisible by {len(freqs)}, "
                                 f"got {channels=}")
            self.dct_size = tuple(dct_size)
            self.register_buffer("dct_weight", dct_basis(*dct_size, freqs, dtype=dtype or torch.float32,
                                                         device=device), persistent=False)

    def _pooled(self, x: Tensor, pool: str) -> Tensor:
        if pool == "avg":
            return x.flatten(2).mean(-1)
        if pool == "max":
            return x.flatten(2).amax(-1)
        if x.dim() != 4:
            raise ValueError(f"pools=('dct',) needs x (B, C, H, W), got {tuple(x.shape)=}")
        p = x if tuple(x.shape[-2:]) == self.dct_size else F.adaptive_avg_pool2d(x, self.dct_size)
        return dct_pool(p, self.dct_weight)

    def forward(self, x: Tensor, return_gate: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        if x.dim() < 3 or x.shape[1] != self.channels:
            raise ValueError(f"SqueezeExcite expects x (B, C={self.channels}, *spatial), got {tuple(x.shape)=}")
        logits = sum(self.fc2(self.act(self.fc1(self._pooled(x, p)))) for p in self.pools)  # (B, C)
        g = _GATES[self.gate](logits)
        y = x * g.view(*g.shape, *([1] * (x.dim() - 2)))
        return (y, g) if return_gate else y


_RCA_PRESETS = {"modis": ("max", 16), "sentinel": ("avg", 8)}


def _tiny_rca():
    # 8 hidden units: the released 1-unit width (9 bands, r = 16, no bias) can be a dead ReLU on a batch
    return ResolutionAwareChannelAttention(32, source="modis", reduction=4), (torch.rand(2, 32, 6, 5),)


@register_module("resolution_aware_channel_attention", group="vision", example=_tiny_rca)
class ResolutionAwareChannelAttention(SqueezeExcite):
    """DFYP's RCA: an SE gate on the input bands with the pooling and reduction of the data source.

    ``source="modis"``: global max pooling, ``r = 16``; ``source="sentinel"``: global average pooling, ``r = 8``;
    hidden width ``max(C // r, 1)`` (1 unit for 9 MODIS bands and for RGB, as released; pinned by a test),
    no biases. "Resolution-aware" means per-source pooling and ratio, not a function of the spatial
    resolution (see dfyp.md). ``reduction`` / ``pool`` override the preset.

    Shapes: x ``(B, C, H, W)`` -> same.
    """

    def __init__(
        self,
        channels: int,
        *,
        source: str = "modis",
        reduction: int | None = None,
        pool: str | None = None,
        bias: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if source not in _RCA_PRESETS:
            raise ValueError(f"source must be one of {sorted(_RCA_PRESETS)}, got {source!r}")
        preset_pool, preset_r = _RCA_PRESETS[source]
        super().__init__(channels, reduction=reduction or preset_r, min_hidden=1, pools=(pool or preset_pool,),
                         bias=bias, device=device, dtype=dtype)
        self.source = source


# ----------------------------------------------------------------------------------- coordinate attention
_AXIS_NAMES = {2: ("h", "w"), 3: ("t", "h", "w")}


def _tiny_ca():
    return CoordinateAttention(16, reduction=4), (torch.randn(2, 16, 5, 7),)


@register_module("coordinate_attention", group="vision", example=_tiny_ca)
class CoordinateAttention(nn.Module):
    """Coordinate attention: direction-aware strip pooling, one shared transform, a sigmoid gate per axis.

    2-D (``axes=2``, ``x (B, C, H, W)``)::

        z_h = mean_W x  (B, C, H)      z_w = mean_H x  (B, C, W)
        f   = act(norm(conv1([z_h ; z_w])))              # one 1x1 conv C -> m over the H + W strip positions
        g_h = gate(conv_h(f_h)),  g_w = gate(conv_w(f_w)) # per-axis 1x1 convs m -> C
        y   = x ⊙ g_h ⊙ g_w                              # per channel a rank-1 (H x W) gate

    3-D (``axes=3``, ``x (B, C, T, H, W)``, MPFNet): strips ``z_t, z_h, z_w`` (each the mean over the two
    other axes), gates ``g_t, g_h, g_w``. Width ``m = max(min_width, C // reduction)`` (official) unless
    ``width`` is given; ``preset="timm"`` uses timm's ``make_divisible(C / 24, 8)`` and no biases.

    Args:
        channels: ``C``.
        reduction, min_width, width: hidden width rule (see above).
        act: activation after the norm (``"hardswish"`` = the official ``h_swish``).
        norm: ``"batch"`` (BatchNorm over the concatenated strips, so train-mode statistics mix both
            directions, as released) or ``None``.
        gate: ``"sigmoid"`` or ``"hardsigmoid"``.
        bias: biases in the three 1x1 convs.
        share_hw: one output conv for every axis (then ``CA(xᵀ) = CA(x)ᵀ`` for the H/W swap).
        directions: which axes get a gate, a subset of ``("h", "w")`` / ``("t", "h", "w")`` (one-direction
            ablations); default all.
        axes: 2 or 3 spatial axes.
        skip: return ``x + x ⊙ g`` (timm's ``has_skip``).
        preset: ``"official"`` (houqb/CoordAttention defaults: r = 32, min width 8, biases, BN, h_swish,
            sigmoid) or ``"timm"`` (timm 1.0.31 ``CoordAttn`` defaults); explicit arguments still apply
            for anything a preset does not fix (``preset="timm"`` sets ``width`` and ``bias``).
        variant: ``"intended"`` (strip-pooled coordinate attention, above) or ``"released"``: MPFNet's released
            ``CoordinateAttention`` (Mac0504/MPFNet ``CA-I3D.py``), which has no pooling at all:
            ``y = x ⊙ σ(MLP_c(x)) ⊙ σ(MLP_s(x))`` with 1x1(x1) conv MLPs ``C -> C -> C`` (ReLU, biases); a
            pointwise gate, equivariant to any pixel permutation. ``return_gates`` then returns ``(y, g_c, g_s)``.
        device, dtype: for the parameters.

    Raises:
        ValueError: bad sizes, unknown preset / activation / gate / direction.

    Shapes:
        x ``(B, C, H, W)`` or ``(B, C, T, H, W)`` -> same. ``return_gates=True`` returns
        ``(y, *gates)`` with one gate per direction, broadcastable to ``x`` (``g_h (B, C, H, 1)``,
        ``g_w (B, C, 1, W)``).

    Deviations from the released code: the official ``CoordAtt(inp, oup)`` accepts ``oup ≠ inp`` and then
    fails at the product; here there is one ``channels``. The block is not identity at initialisation
    (gates start near ½, their product near ¼), as released; ``skip=True`` gives ``x + x ⊙ g``.

    Example:
        >>> ca = CoordinateAttention(64)
        >>> ca(torch.randn(2, 64, 56, 56)).shape
        torch.Size([2, 64, 56, 56])
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 32,
        min_width: int = 8,
        width: int | None = None,
        act: str = "hardswish",
        norm: str | None = "batch",
        gate: str = "sigmoid",
        bias: bool = True,
        share_hw: bool = False,
        directions: Sequence[str] | None = None,
        axes: int = 2,
        skip: bool = False,
        preset: str | None = None,
        variant: str = "intended",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if variant not in ("intended", "released"):
            raise ValueError(f"variant must be 'intended' or 'released', got {variant!r}")
        self.variant = variant
        if axes not in _AXIS_NAMES:
            raise ValueError(f"axes must be 2 or 3, got {axes=}")
        if channels <= 0 or reduction <= 0:
            raise ValueError(f"channels and reduction must be positive, got {channels=}, {reduction=}")
        if preset == "timm":
            width = width or make_divisible(channels / 16 * 2 / 3, 8, round_limit=0.0)
            bias = False
        elif preset not in (None, "official"):
            raise ValueError(f"preset must be None, 'official' or 'timm', got {preset!r}")
        names = _AXIS_NAMES[axes]
        directions = names if directions is None else tuple(directions)
        if not directions or any(d not in names for d in directions) or len(set(directions)) != len(directions):
            raise ValueError(f"directions must be a non-empty subset of {names}, got {directions}")
        if norm not in ("batch", None):
            raise ValueError(f"norm must be 'batch' or None, got {norm!r}")
        self.channels, self.axes, self.skip, self.gate = channels, axes, skip, _check_gate(gate)
        self.directions = tuple(d for d in names if d in directions)  # canonical order
        self.share_hw = share_hw
        m = width if width is not None else max(min_width, channels // reduction)
        self.width = m
        dd = {"device": device, "dtype": dtype}
        if variant == "released":  # MPFNet's released "CoordinateAttention": a pointwise gate, no pooling
            conv = nn.Conv2d if axes == 2 else nn.Conv3d
            self.mlp_c = nn.Sequential(conv(channels, channels, 1, **dd), nn.ReLU(), conv(channels, channels, 1, **dd))
            self.mlp_s = nn.Sequential(conv(channels, channels, 1, **dd), nn.ReLU(), conv(channels, channels, 1, **dd))
            return
        self.conv1 = nn.Conv2d(channels, m, 1, bias=bias, **dd)
        self.bn1 = nn.BatchNorm2d(m, **dd) if norm == "batch" else nn.Identity()
        self.act = _act(act)
        first = None
        for d in self.directions:
            conv = first if (share_hw and first is not None) else nn.Conv2d(m, channels, 1, bias=bias, **dd)
            first = first or conv
            setattr(self, f"conv_{d}", conv)

    def forward(self, x: Tensor, return_gates: bool = False) -> Tensor | tuple[Tensor, ...]:
        _check_input(x, self.channels, self.axes, "CoordinateAttention")
        if self.variant == "released":
            g_c, g_s = _GATES[self.gate](self.mlp_c(x)), _GATES[self.gate](self.mlp_s(x))
            y = x * g_c * g_s
            y = y + x if self.skip else y
            return (y, g_c, g_s) if return_gates else y
        names = _AXIS_NAMES[self.axes]
        spatial = list(range(2, 2 + self.axes))
        strips, lengths = [], []
        for d in self.directions:
            axis = 2 + names.index(d)
            strips.append(x.mean(dim=[a for a in spatial if a != axis]))  # (B, C, S_d)
            lengths.append(x.shape[axis])
        z = torch.cat(strips, dim=2).unsqueeze(-1)  # (B, C, ΣS, 1): the official (H + W, 1) strip layout
        f = self.act(self.bn1(self.conv1(z)))  # (B, m, ΣS, 1)
        gates = []
        for d, f_d in zip(self.directions, torch.split(f, lengths, dim=2)):
            g = _GATES[self.gate](getattr(self, f"conv_{d}")(f_d)).squeeze(-1)  # (B, C, S_d)
            shape = [g.shape[0], g.shape[1]] + [1] * self.axes
            shape[2 + names.index(d)] = g.shape[2]
            gates.append(g.view(shape))  # broadcastable to x
        y = _GateProduct.apply(tuple(names.index(d) for d in self.directions), x, *gates)
        if self.skip:
            y = y + x
        return (y, *gates) if return_gates else y

"""Local attention modules with their own parameters: HaloNet halo attention and BiFormer routing attention.

Papers: Vaswani et al., "Scaling Local Self-Attention for Parameter Efficient Visual Backbones"
(HaloNet, https://arxiv.org/abs/2103.12731); Zhu et al., "BiFormer: Vision Transformer with Bi-Level
Routing Attention" (https://arxiv.org/abs/2303.08810).
Status: projections + one operator call (:func:`attnfuse.ops.halo_attention`,
:func:`attnfuse.ops.routing_attention`) + the parameters each paper adds to it: HaloNet's relative
position logits (``rel_pos="logits"``, content dependent as in the paper and timm) or a learned relative
bias table (``rel_pos="bias"``); BiFormer's local context enhancement (LePE, a depthwise convolution
over the values added to the attention output). Without those extras, ``nn.Attention(op="halo", ...)``
/ ``nn.Attention(op="routing", ...)`` give the plain operators.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from attnfuse.nn._checks import resolve_head_dim
from attnfuse.ops import halo_attention, routing_attention
from attnfuse.ops.halo import halo_relative_index, halo_relative_logits
from attnfuse.tokens import zero_invalid

__all__ = ["HaloAttention", "RoutingAttention"]


def _sizes(value: int | Sequence[int], rank: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, Sequence) else (value,) * rank


class _GridAttention(nn.Module):
    """Shared q/k/v and output projections for channels-last grids ``(B, *grid, C)``."""

    def __init__(self, dim: int, heads: int, head_dim: int | None, qkv_bias: bool, dropout: float, rank: int, dd: dict) -> None:
        super().__init__()
        head_dim = resolve_head_dim(dim, heads, head_dim)
        if rank not in (1, 2, 3):
            raise ValueError(f"rank must be 1, 2 or 3, got {rank=}")
        self.heads, self.head_dim, self.rank = heads, head_dim, rank
        self.to_qkv = nn.Linear(dim, 3 * heads * head_dim, bias=qkv_bias, **dd)
        self.proj = nn.Linear(heads * head_dim, dim, **dd)
        self.dropout = nn.Dropout(dropout)

    def _check(self, x: Tensor, mask: Tensor | None) -> None:
        if x.dim() != self.rank + 2:
            raise ValueError(f"x must be (B, *grid, C) with a {self.rank}-D grid, got x.shape={tuple(x.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:-1]):
            raise ValueError(f"mask must be bool with shape {tuple(x.shape[:-1])}, got {mask.dtype} {tuple(mask.shape)}")

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        # (B, *grid, C) -> 3 x (B, H, *grid, Dh)
        return tuple(t.unflatten(-1, (self.heads, self.head_dim)).movedim(-2, 1) for t in self.to_qkv(x).chunk(3, dim=-1))

    def _out(self, out: Tensor) -> Tensor:
        return self.dropout(self.proj(out.movedim(1, -2).flatten(-2)))  # (B, H, *grid, Dh) -> (B, *grid, C)


class HaloAttention(_GridAttention):
    """Multi-head halo self-attention (HaloNet) on a channels-last grid.

    Args:
        dim: channel width ``C``.
        heads: number of heads.
        block_size: query block size, int or one per axis (HaloNet: 8).
        halo_size: halo width, int or one per axis (HaloNet: 3).
        rank: grid dimension (1, 2 or 3; default 2 or the tuple length).
        rel_pos: ``"logits"``: HaloNet's relative logits ``q . (r_x[dx] + r_y[dy])`` with learned
            per-axis embeddings ``(2 (b + h) - 1, Dh)`` (added unscaled, as timm's default);
            ``"bias"``: a learned content-independent table ``(heads, 2 (b + h) - 1, ...)``; None: none.
        head_dim, qkv_bias, dropout, scale, backend: as :class:`attnfuse.nn.Attention`.
        device, dtype: for the parameters.

    Shapes:
        x ``(B, *grid, C)``, mask ``(B, *grid)`` (which tokens exist; the operator's key mask) -> ``(B, *grid, C)``;
        weights ``(B, heads, N, N)``.

    Example:
        >>> attn = HaloAttention(32, 4, block_size=4, halo_size=1)
        >>> attn(torch.randn(2, 9, 10, 32)).shape
        torch.Size([2, 9, 10, 32])
    """

    def __init__(
        self, dim: int, heads: int, *, block_size: int | tuple[int, ...] = 8, halo_size: int | tuple[int, ...] = 3,
        rank: int | None = None, rel_pos: Literal["logits", "bias"] | None = "logits", head_dim: int | None = None,
        qkv_bias: bool = False, dropout: float = 0.0, scale: float | None = None, backend: str = "auto",
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        rank = len(block_size) if isinstance(block_size, Sequence) else (len(halo_size) if isinstance(halo_size, Sequence) else (rank or 2))
        dd = {"device": device, "dtype": dtype}
        super().__init__(dim, heads, head_dim, qkv_bias, dropout, rank, dd)
        self.block_size, self.halo_size = _sizes(block_size, rank), _sizes(halo_size, rank)
        if len(self.block_size) != rank or len(self.halo_size) != rank:
            raise ValueError(f"block_size and halo_size need one entry per axis ({rank}), got {block_size=}, {halo_size=}")
        if rel_pos not in ("logits", "bias", None):
            raise ValueError(f"rel_pos must be 'logits', 'bias' or None, got {rel_pos!r}")
        self.rel_pos, self.scale, self.backend = rel_pos, scale, backend
        spans = [2 * (b + h) - 1 for b, h in zip(self.block_size, self.halo_size)]
        self.register_buffer("rel_index", halo_relative_index(self.block_size, self.halo_size, device), persistent=False)
        self.rel = nn.ParameterList()
        if rel_pos == "logits":
            for span in spans:
                self.rel.append(nn.Parameter(torch.randn(span, self.head_dim, **dd) * self.head_dim**-0.5))
        elif rel_pos == "bias":
            table = nn.Parameter(torch.empty(heads, *spans, **dd))
            nn.init.trunc_normal_(table, std=0.02)
            self.rel.append(table)

    def _bias(self, q: Tensor) -> Tensor | None:
        idx = self.rel_index  # (k, Bq, W)
        if self.rel_pos == "bias":
            return self.rel[0][(slice(None), *idx)].unsqueeze(1)  # (H, 1, Bq, W)
        if self.rel_pos == "logits":
            return halo_relative_logits(q, list(self.rel), self.block_size, self.halo_size)  # (B, H, NB, Bq, W)
        return None

    def forward(self, x: Tensor, *, mask: Tensor | None = None, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend; see the class docstring. Returns ``out`` or ``(out, weights)``."""
        self._check(x, mask)
        q, k, v = self._qkv(x)
        result = halo_attention(q, k, v, self.block_size, self.halo_size, key_mask=mask,
                                bias=self._bias(q), scale=self.scale, return_weights=return_weights, backend=self.backend)
        out, weights = result if return_weights else (result, None)
        out = self._out(out)
        return (out, weights) if return_weights else out


class RoutingAttention(_GridAttention):
    """Multi-head bi-level routing attention (BiFormer) with local context enhancement.

    ``out = proj(routing_attention(q, k, v, scale=s) + LCE(v))`` where LCE ("LePE" in the code) is a
    depthwise convolution of the values (all heads, zero at masked tokens), as BiFormer's ``lepe``.

    Defaults are the official module's (``rayleizhu/BiFormer`` ``BiLevelRoutingAttention`` as used by the
    released models), so released weights reproduce: ``scale = qk_dim ** -0.5`` with
    ``qk_dim = heads * head_dim`` (the width of **all** heads, not one head) and a 5×5 depthwise LCE
    (``side_dwconv=5``). ``scale="head_dim"`` gives the usual per-head ``head_dim ** -0.5`` and
    ``lepe_kernel=3`` the smaller LCE (both the attnfuse defaults before issue 13).

    Grids not divisible by ``regions``: the official ``bra_legacy.py`` zero-pads ``x`` before the
    projection, so padded tokens get q / k / v equal to the projection biases and are pooled into the
    region means and attended; attnfuse pads after the projection and masks the padding (never pooled,
    never attended), so outputs differ from the official code on such grids (they agree on divisible
    grids, where ``ops/torch/bra.py`` asserts divisibility anyway).

    Args:
        dim: channel width ``C``.
        heads: number of heads.
        regions: regions per axis (BiFormer's ``n_win``, 7), int or one per axis.
        topk: routed regions per query region.
        rank: grid dimension (1, 2 or 3; default 2 or the tuple length).
        lepe_kernel: odd kernel size of the LCE depthwise convolution (official: 5, the default); 0 = none.
        scale: token-attention score scale: ``"qk_dim"`` (default, official: ``(heads * head_dim) ** -0.5``),
            ``"head_dim"`` (``head_dim ** -0.5``) or a float.
        head_dim, qkv_bias, dropout, backend: as :class:`attnfuse.nn.Attention`.
        device, dtype: for the parameters.

    Shapes:
        x ``(B, *grid, C)``, mask ``(B, *grid)`` (which tokens exist; the operator's key mask) -> ``(B, *grid, C)``;
        weights ``(B, heads, N, N)``.

    Example:
        >>> attn = RoutingAttention(32, 4, regions=4, topk=2)
        >>> attn(torch.randn(2, 16, 16, 32)).shape
        torch.Size([2, 16, 16, 32])
    """

    def __init__(
        self, dim: int, heads: int, *, regions: int | tuple[int, ...] = 7, topk: int = 4, rank: int | None = None,
        lepe_kernel: int = 5, head_dim: int | None = None, qkv_bias: bool = True, dropout: float = 0.0,
        scale: float | Literal["qk_dim", "head_dim"] = "qk_dim", backend: str = "auto",
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        rank = len(regions) if isinstance(regions, Sequence) else (rank or 2)
        dd = {"device": device, "dtype": dtype}
        super().__init__(dim, heads, head_dim, qkv_bias, dropout, rank, dd)
        if lepe_kernel < 0 or (lepe_kernel and lepe_kernel % 2 == 0):
            raise ValueError(f"lepe_kernel must be 0 or odd, got {lepe_kernel=}")
        if scale == "qk_dim":
            scale = (heads * self.head_dim) ** -0.5
        elif scale == "head_dim":
            scale = self.head_dim**-0.5
        elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
            raise ValueError(f"scale must be 'qk_dim', 'head_dim' or a float, got {scale!r}")
        self.regions, self.topk, self.scale, self.backend = regions, topk, float(scale), backend
        inner = heads * self.head_dim
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[rank - 1]
        self.lepe = conv(inner, inner, lepe_kernel, padding=lepe_kernel // 2, groups=inner, **dd) if lepe_kernel else None

    def forward(self, x: Tensor, *, mask: Tensor | None = None, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend; see the class docstring. Returns ``out`` or ``(out, weights)``."""
        self._check(x, mask)
        q, k, v = self._qkv(x)
        result = routing_attention(q, k, v, self.regions, self.topk, key_mask=mask,
                                   scale=self.scale, return_weights=return_weights, backend=self.backend)
        out, weights = result if return_weights else (result, None)
        if self.lepe is not None and math.prod(q.shape[2:-1]):  # an empty grid has nothing to convolve
            v_cl = v.movedim(1, -2).flatten(-2)  # (B, *grid, H*Dh)
            if mask is not None:
                v_cl = zero_invalid(v_cl, mask)  # where, not a product: NaN at masked tokens cannot reach the conv
            local = self.lepe(v_cl.movedim(-1, 1)).movedim(1, -1)  # (B, *grid, H*Dh)
            out = out + local.unflatten(-1, (self.heads, self.head_dim)).movedim(-2, 1)  # (B, H, *grid, Dh)
        out = self._out(out)
        return (out, weights) if return_weights else out

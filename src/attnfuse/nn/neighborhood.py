"""Neighborhood attention module: q/k/v projections, a relative-position bias table, one op call.

Paper: Hassani et al., "Neighborhood Attention Transformer" (https://arxiv.org/abs/2204.07143).
Status: exact NATTEN semantics through :func:`attnfuse.ops.neighborhood_attention`; the bias
table and its initialisation (truncated normal, std 0.02) follow the NAT paper's modules.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnfuse.nn._checks import resolve_head_dim
from attnfuse.ops import neighborhood_attention

__all__ = ["NeighborhoodAttention"]


class NeighborhoodAttention(nn.Module):
    """Multi-head neighborhood self-attention on a channels-last token grid.

    Every token attends to its ``kernel_size`` neighbours per axis (NATTEN's window rule: shifted
    at the borders, dilation groups, optional causal axes, odd or even kernels); optional
    ``context`` tokens act as extra global keys seen by every query. ``stride`` groups queries that
    share one window (Generalized Neighborhood Attention); ``kernel_size = b + 2h, stride = b,
    border="clip"`` is HaloNet's blocked attention (block ``b``, halo ``h``).

    Args:
        dim: channel width ``C``.
        heads: number of heads; ``dim`` must be divisible by it unless ``head_dim`` is given.
        kernel_size: window size (odd or even), one int or one per axis.
        rank: grid dimension (1, 2 or 3); defaults to ``len(kernel_size)`` for a tuple, else 2.
        dilation: one int or one per axis.
        is_causal: one bool or one per axis.
        stride: queries per shared window, ``1 <= stride <= kernel_size``, one int or one per axis.
        border: ``"shift"`` (NATTEN, windows shifted inward at the grid border) or ``"clip"``
            (windows cut at the border, HaloNet's masked padding).
        rel_pos_bias: learn a relative-position bias ``(heads, 2k_0 - 1, ...)`` (non-causal only).
        head_dim: per-head width (default ``dim // heads``).
        qkv_bias: bias in the q/k/v projections.
        dropout: dropout on the output.
        scale: score scale (default ``1/sqrt(head_dim)``).
        backend: operator backend (``"auto"``, ``"tiled"``, ``"flex"``, ``"natten"``, ``"reference"``).
        device, dtype: for the parameters.

    Raises:
        ValueError: bad sizes, a ``rank`` that does not match a tuple ``kernel_size``, or
            ``rel_pos_bias`` with a causal axis.

    Shapes:
        x ``(B, *grid, C)``; mask ``(B, *grid)`` bool, which tokens exist (the operator's key mask);
        context ``(B, S, C)`` (all context tokens are valid);
        out ``(B, *grid, C)``; weights ``(B, heads, *grid, prod(kernel_size) + S)``.

    Example:
        >>> na = NeighborhoodAttention(32, 4, kernel_size=3)
        >>> na(torch.randn(2, 8, 8, 32)).shape
        torch.Size([2, 8, 8, 32])
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        kernel_size: int | tuple[int, ...],
        *,
        rank: int | None = None,
        dilation: int | tuple[int, ...] = 1,
        is_causal: bool | tuple[bool, ...] = False,
        stride: int | tuple[int, ...] = 1,
        border: str = "shift",
        rel_pos_bias: bool = True,
        head_dim: int | None = None,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        scale: float | None = None,
        backend: str = "auto",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        head_dim = resolve_head_dim(dim, heads, head_dim)
        if isinstance(kernel_size, (tuple, list)):
            if rank is not None and rank != len(kernel_size):
                raise ValueError(f"rank={rank} does not match kernel_size={tuple(kernel_size)}")
            rank = len(kernel_size)
            kernel = tuple(kernel_size)
        else:
            rank = 2 if rank is None else rank
            kernel = (kernel_size,) * rank
        if rank not in (1, 2, 3):
            raise ValueError(f"rank must be 1, 2 or 3, got {rank=}")
        causal = is_causal if isinstance(is_causal, (tuple, list)) else (is_causal,) * rank
        if rel_pos_bias and any(causal):
            raise ValueError("rel_pos_bias=True needs non-causal windows (NATTEN has no causal relative-position bias); "
                             "pass rel_pos_bias=False")
        self.heads, self.head_dim, self.rank = heads, head_dim, rank
        self.kernel_size, self.dilation, self.is_causal = kernel, dilation, is_causal
        strides = stride if isinstance(stride, (tuple, list)) else (stride,) * rank
        if len(strides) != rank or any(not isinstance(st, int) or st < 1 or st > k for st, k in zip(strides, kernel)):
            raise ValueError(f"stride must be one int or {rank} ints in [1, kernel_size], got stride={stride!r}, kernel_size={kernel}")
        if border not in ("shift", "clip"):
            raise ValueError(f"border must be 'shift' or 'clip', got border={border!r}")
        self.stride, self.border = tuple(strides), border
        self.scale, self.backend = scale, backend
        dd = {"device": device, "dtype": dtype}
        inner = heads * head_dim
        self.to_qkv = nn.Linear(dim, 3 * inner, bias=qkv_bias, **dd)
        self.proj = nn.Linear(inner, dim, **dd)
        self.dropout = nn.Dropout(dropout)
        self.rpb = None
        if rel_pos_bias:
            self.rpb = nn.Parameter(torch.empty(heads, *(2 * k - 1 for k in kernel), **dd))
            nn.init.trunc_normal_(self.rpb, std=0.02, a=-2.0, b=2.0)

    def _heads(self, t: Tensor) -> Tensor:
        # (B, *tokens, H*Dh) -> (B, H, *tokens, Dh)
        return t.unflatten(-1, (self.heads, self.head_dim)).movedim(-2, 1)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Attend; see the class docstring for shapes. Returns ``out`` or ``(out, weights)``."""
        if x.dim() != self.rank + 2:
            raise ValueError(f"x must be (B, *grid, C) with a {self.rank}-D grid, got x.shape={tuple(x.shape)}")
        if mask is not None and (mask.dtype != torch.bool or mask.shape != x.shape[:-1]):
            raise ValueError(f"mask must be bool with shape {tuple(x.shape[:-1])}, got {mask.dtype} {tuple(mask.shape)}")
        q, k, v = (self._heads(t) for t in self.to_qkv(x).chunk(3, dim=-1))  # (B, H, *grid, Dh) each
        extra_k = extra_v = None
        if context is not None:
            if context.dim() != 3 or context.shape[0] != x.shape[0] or context.shape[-1] != x.shape[-1]:
                raise ValueError(f"context must be (B, S, C) = ({x.shape[0]}, S, {x.shape[-1]}), got {tuple(context.shape)}")
            _, extra_k, extra_v = (self._heads(t) for t in self.to_qkv(context).chunk(3, dim=-1))  # (B, H, S, Dh)
        result = neighborhood_attention(
            q, k, v, self.kernel_size, dilation=self.dilation, is_causal=self.is_causal,
            stride=self.stride, border=self.border, key_mask=mask, rpb=self.rpb, extra_k=extra_k, extra_v=extra_v,
            scale=self.scale, return_weights=return_weights, backend=self.backend,
        )
        out, weights = result if return_weights else (result, None)
        out = out.movedim(1, -2).flatten(-2)  # (B, *grid, H*Dh)
        out = self.dropout(self.proj(out))
        return (out, weights) if return_weights else out

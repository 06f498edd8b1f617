"""Factorized (axial) transformer encoder over the named axes of a token grid (Wayformer).

Paper: Nayakanti et al., "Wayformer: Motion Forecasting via Simple & Efficient Attention Networks"
(https://arxiv.org/abs/2207.05844), section 3 (factorized attention).
Status: as described: every block attends along one named axis only
(:func:`attnfuse.ops.axial_attention`), *sequential* (the first ``depth / n`` blocks along the
first axis, then the next axis, ...) or *interleaved* (block ``i`` along axis ``i mod n``). Cost per
block: ``O(T^2 S)`` along time, ``O(S^2 T)`` along space instead of ``O(S^2 T^2)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from attnfuse.nn.transformer import TransformerBlock
from attnfuse.ops import OpConfig, get_operator, op_config
from attnfuse.tokens import TokenSet

__all__ = ["FactorizedEncoder"]


class FactorizedEncoder(nn.Module):
    """Pre-norm transformer blocks, each attending along one named axis of a :class:`TokenSet`.

    Args:
        dim: token width ``D``.
        heads: attention heads.
        axes: the axis names to factorize over, e.g. ``("time", "space")``; every input must have
            exactly these axes (in any order).
        depth: total number of blocks.
        mode: ``"sequential"`` (``depth / len(axes)`` blocks per axis, in the order of ``axes``;
            ``depth`` must be divisible) or ``"interleaved"`` (block ``i`` along ``axes[i % len(axes)]``).
        mlp_ratio, dropout, gate: as :class:`attnfuse.nn.TransformerBlock`.
        op: the ``"axial"`` operator's options (``attnfuse.ops.configs.Axial(axis=0, backend="reference")``)
            or the name ``"axial"``; the encoder sets ``axis`` per block.
        op_options: legacy form of the axial options (e.g. ``{"backend": "reference"}``).
        final_norm: LayerNorm after the last block.
        device, dtype: for the parameters.

    Raises:
        ValueError: empty / repeated axis names, bad ``mode`` or ``depth``, an operator other than
            ``"axial"``, ``axis`` in ``op_options``; at call time, a token set whose axes are not exactly ``axes``.

    Shapes:
        ``TokenSet x (B, *axes, D), mask (B, *axes)`` -> ``TokenSet`` of the same shape and axes.

    Example:
        >>> enc = FactorizedEncoder(16, 2, axes=("time", "space"), depth=2)
        >>> ts = TokenSet(torch.randn(3, 5, 7, 16), axes=("time", "space"))
        >>> enc(ts).x.shape
        torch.Size([3, 5, 7, 16])
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        axes: Sequence[str] = ("time", "space"),
        depth: int,
        mode: Literal["sequential", "interleaved"] = "sequential",
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        op: str | OpConfig = "axial",
        op_options: Mapping | None = None,
        gate: bool = False,
        final_norm: bool = True,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        axes = tuple(axes)
        if not axes or len(set(axes)) != len(axes) or not all(isinstance(a, str) for a in axes):
            raise ValueError(f"axes must be distinct axis names, got {axes=}")
        if mode not in ("sequential", "interleaved"):
            raise ValueError(f"mode must be 'sequential' or 'interleaved', got {mode=}")
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth=}")
        if mode == "sequential" and depth % len(axes):
            raise ValueError(f"mode='sequential' needs depth divisible by len(axes)={len(axes)}, got {depth=}")
        if op_options is not None and "axis" in op_options:
            raise ValueError("op_options must not set 'axis': the encoder assigns one axis per block")
        name = op.name if isinstance(op, OpConfig) else get_operator(op).name
        if name != "axial":
            raise ValueError(f"FactorizedEncoder attends along one axis per block: op must be the 'axial' operator, got {name!r}")
        base = op_config(op, **{"axis": 0, **dict(op_options or {})})  # axis is set per block below
        if mode == "sequential":
            per_axis = depth // len(axes)
            self.block_axes = tuple(a for a in axes for _ in range(per_axis))
        else:
            self.block_axes = tuple(axes[i % len(axes)] for i in range(depth))
        self.axes, self.mode = axes, mode
        dd = {"device": device, "dtype": dtype}
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio=mlp_ratio, dropout=dropout, op=op_config(base, axis=axes.index(a)),
                             gate=gate, **dd)
            for a in self.block_axes
        )
        self.norm = nn.LayerNorm(dim, **dd) if (final_norm and depth > 0) else None

    def forward(self, tokens: TokenSet, *, return_weights: bool = False) -> TokenSet | tuple[TokenSet, list[Tensor]]:
        """Encode ``tokens``; returns a TokenSet and, with ``return_weights``, one dense ``(B, H, N, N)`` map per block
        (grid flattened in the order of the encoder's ``axes``)."""
        if not isinstance(tokens, TokenSet):
            raise TypeError(f"FactorizedEncoder takes a TokenSet, got {type(tokens).__name__}")
        if sorted(tokens.axes) != sorted(self.axes) or len(tokens.axes) != len(self.axes):
            raise ValueError(f"token set axes {tokens.axes} must be exactly the encoder axes {self.axes} (in any order)")
        order = [tokens.axes.index(a) for a in self.axes]  # token-set axis of each encoder axis
        x = tokens.x if tokens.pos is None else tokens.x + tokens.pos
        x = x.permute(0, *(1 + i for i in order), x.dim() - 1)  # (B, *encoder axes, D)
        mask = None if tokens.mask is None else tokens.mask.permute(0, *(1 + i for i in order))
        maps: list[Tensor] = []
        for block in self.blocks:
            x = block(x, mask=mask, return_weights=return_weights)
            if return_weights:
                x, w = x
                maps.append(w["self"])
        if self.norm is not None:
            x = self.norm(x)
        inverse = [order.index(i) for i in range(len(order))]  # encoder position of each token-set axis
        x = x.permute(0, *(1 + i for i in inverse), x.dim() - 1)  # back to the token set's axis order
        out = TokenSet(x, tokens.mask, tokens.axes, None, dict(tokens.meta))
        return (out, maps) if return_weights else out

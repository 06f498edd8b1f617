"""Pre-norm transformer blocks and encoder stacks over any registered attention operator."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from attnfuse.nn.attention import Attention
from attnfuse.ops import OpConfig, op_config

__all__ = ["MLP", "Encoder", "TransformerBlock"]


class MLP(nn.Module):
    """Two-layer feed-forward network ``Linear -> GELU -> Dropout -> Linear -> Dropout``.

    Shapes: ``(..., dim) -> (..., dim)``.
    """

    def __init__(
        self, dim: int, *, hidden: int, dropout: float = 0.0,
        device: torch.device | None = None, dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, **dd)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + g1*SelfAttn(LN x)``, optionally ``+ g2*CrossAttn(LN x, LN context)``, ``+ g3*MLP(LN x)``.

    Args:
        dim: channel width.
        heads: attention heads.
        mlp_ratio: hidden width of the MLP relative to ``dim``.
        dropout: dropout in attention output and MLP.
        op: attention operator for self- and cross-attention: typed options
            (``attnfuse.ops.configs.Dense(backend="reference")``) or a registered name.
        op_options: legacy form of the operator options (e.g. ``{"backend": "reference"}``); they
            override the fields of ``op``. Prefer ``op=<Config>(...)``.
        self_attention: include the self-attention sublayer.
        cross_attention: include a cross-attention sublayer (needs ``context`` in forward).
        context_dim: channel width of ``context`` (default ``dim``).
        gate: zero-initialised learnable per-channel gates on every residual branch, so the
            block is the identity at initialisation.
        device, dtype: for the parameters.

    Shapes:
        x ``(B, *tokens, C)``, mask ``(B, *tokens)``, context ``(B, S, Cc)``, context_mask ``(B, S)``.
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        op: str | OpConfig = "dense",
        op_options: Mapping | None = None,
        self_attention: bool = True,
        cross_attention: bool = False,
        context_dim: int | None = None,
        gate: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not (self_attention or cross_attention):
            raise ValueError("TransformerBlock needs self_attention or cross_attention (or both)")
        dd = {"device": device, "dtype": dtype}
        op = op_config(op, **dict(op_options or {}))
        self.norm_self = nn.LayerNorm(dim, **dd) if self_attention else None
        self.attn = Attention(dim, heads, op=op, dropout=dropout, **dd) if self_attention else None
        self.norm_cross = nn.LayerNorm(dim, **dd) if cross_attention else None
        self.norm_context = nn.LayerNorm(dim if context_dim is None else context_dim, **dd) if cross_attention else None
        self.cross = (
            Attention(dim, heads, op=op, context_dim=context_dim, dropout=dropout, **dd)
            if cross_attention else None
        )
        self.norm_mlp = nn.LayerNorm(dim, **dd)
        self.mlp = MLP(dim, hidden=int(dim * mlp_ratio), dropout=dropout, **dd)
        n_branches = int(self_attention) + int(cross_attention) + 1
        self.gates = nn.Parameter(torch.zeros(n_branches, dim, **dd)) if gate else None

    def _gate(self, i: int, branch: Tensor) -> Tensor:
        return branch if self.gates is None else branch * self.gates[i]

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        context: Tensor | None = None,
        context_mask: Tensor | None = None,
        value: Tensor | None = None,
        is_causal: bool = False,
        return_weights: bool = False,
    ) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        """Apply the block. Returns ``x`` or ``(x, {"self": (B,H,L,L), "cross": (B,H,L,S)})``."""
        weights: dict[str, Tensor] = {}
        i = 0
        if self.attn is not None:
            h = self.attn(self.norm_self(x), mask=mask, is_causal=is_causal, return_weights=return_weights)
            if return_weights:
                h, weights["self"] = h
            x = x + self._gate(i, h)
            i += 1
        if self.cross is not None:
            if context is None:
                raise ValueError("this block has cross_attention=True: pass context= (B, S, Cc)")
            value = None if value is None else self.norm_context(value)
            h = self.cross(self.norm_cross(x), context=self.norm_context(context), context_mask=context_mask, value=value,
                           return_weights=return_weights)
            if return_weights:
                h, weights["cross"] = h
            x = x + self._gate(i, h)
            i += 1
        x = x + self._gate(i, self.mlp(self.norm_mlp(x)))
        return (x, weights) if return_weights else x


class Encoder(nn.Module):
    """A stack of :class:`TransformerBlock` s with a final LayerNorm; ``depth=0`` is the identity.

    Args:
        dim, heads, mlp_ratio, dropout, op, op_options, gate, device, dtype: as
            :class:`TransformerBlock` (``op_options`` is the legacy form).
        depth: number of blocks.
        final_norm: LayerNorm after the last block (only when ``depth > 0``).
        pattern: the layer pattern: one operator per block (names or typed options, ``depth`` of them), e.g.
            ``["dense", Kernel(similarity="taylor")] * 2`` for a hybrid stack; None = ``op`` in every block.
            (Mixers that are not an attention operator, and fixed Q/K streams, are
            :class:`attnfuse.nn.DeconstructedEncoder`.)

    Shapes: ``x (B, *tokens, C)``, ``mask (B, *tokens)`` -> ``(B, *tokens, C)``.
    """

    def __init__(
        self,
        dim: int,
        *,
        depth: int,
        heads: int,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        op: str | OpConfig = "dense",
        op_options: Mapping | None = None,
        gate: bool = False,
        final_norm: bool = True,
        pattern: Sequence[str | OpConfig] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if depth < 0:
            raise ValueError(f"depth must be >= 0, got {depth=}")
        dd = {"device": device, "dtype": dtype}
        op = op_config(op, **dict(op_options or {}))
        if pattern is not None and (isinstance(pattern, str) or len(pattern) != depth):
            raise ValueError(f"pattern must be a sequence of {depth} operators (one per block), got {pattern!r}")
        layer_ops = [op] * depth if pattern is None else [op_config(p) for p in pattern]
        self.blocks = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio=mlp_ratio, dropout=dropout, op=layer_op, gate=gate, **dd)
            for layer_op in layer_ops
        )
        self.norm = nn.LayerNorm(dim, **dd) if (final_norm and depth > 0) else None

    @property
    def depth(self) -> int:
        return len(self.blocks)

    def forward(
        self, x: Tensor, *, mask: Tensor | None = None, is_causal: bool = False, return_weights: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Returns ``x`` or ``(x, [self-attention weights (B, H, L, L) per block])``."""
        maps: list[Tensor] = []
        for block in self.blocks:
            x = block(x, mask=mask, is_causal=is_causal, return_weights=return_weights)
            if return_weights:
                x, w = x
                maps.append(w["self"])
        if self.norm is not None:
            x = self.norm(x)
        return (x, maps) if return_weights else x

"""Conditional cross-attention: a condition embedding queries all context tokens (one embedding space per condition).

Paper: Song et al., "Conditional Cross Attention Network for Multi-Space Embedding without
Entanglement in Only a SINGLE Network", ICCV 2023 (https://arxiv.org/abs/2307.13254). Status: the
block as described in the paper notes (no official code): the condition token replaces the
self-attention of the last transformer block, ``x' = x + CA(Q = E[c], K = V = LN(x))``,
``y = x' + MLP(LN(x'))``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from attnfuse.fusion._registry import register_fusion
from attnfuse.fusion.sources import FusionOutput, SourceEmbedding
from attnfuse.nn import MLP, Attention
from attnfuse.tokens import TokenSet, zero_invalid

__all__ = ["ConditionalCrossAttention"]


@register_fusion("conditional")
class ConditionalCrossAttention(nn.Module):
    """One condition vector ``c`` is the query of a cross-attention over the context tokens.

    ``u = CA(Q = c, K = V = LN(x))`` is one vector per sample (the query is the same at every
    position, so it is computed once); ``x' = x + u`` at every valid position;
    ``y = x' + MLP(LN(x'))``. With ``query_positions="cls_only"`` only token ``cls_index`` is
    computed (the same ``y`` there, less work); that output is order-dependent, so such an instance
    declares ``symmetry = "ordered"``.

    The condition is either an id looked up in a learned table (``num_conditions=``, pass
    ``condition=`` ids to ``forward``) or a source of the inputs (``condition_source=``; the masked
    mean of its tokens). A missing condition (all-False / absent source) gives ``u = 0``; a fully
    masked context gives ``u = 0`` and zero outputs (mask all False).

    Args:
        context: name of the context source (e.g. ``"image"`` tokens with the CLS token).
        dim: token width ``D``.
        heads: attention heads.
        num_conditions: size of the condition table (exclusive with ``condition_source``).
        condition_source: name of a source giving the condition vector.
        query_positions: ``"all"`` or ``"cls_only"``.
        cls_index: index of the CLS token in the (flattened) context.
        mlp_ratio, dropout, op, op_options: as :class:`attnfuse.nn.TransformerBlock`.
        device, dtype: for the parameters.

    Raises:
        ValueError: neither or both of ``num_conditions`` / ``condition_source``; bad options;
            at call time, missing context or condition ids of the wrong shape.

    Shapes:
        inputs ``{context: TokenSet (B, *axes, D)}`` (+ ``{condition_source: (B, Nc, D)}``),
        ``condition (B,)`` long -> ``fused (B, N, D)`` (``(B, 1, D)`` for ``"cls_only"``); weights
        ``"cross" (B, H, 1, N)``.

    Example:
        >>> cca = ConditionalCrossAttention("image", 32, heads=4, num_conditions=3)
        >>> out = cca({"image": TokenSet(torch.randn(2, 17, 32))}, condition=torch.tensor([0, 2]))
        >>> out.fused.x.shape
        torch.Size([2, 17, 32])
    """

    symmetry: ClassVar[str] = "equivariant"
    has_parameters: ClassVar[bool] = True

    def __init__(
        self,
        context: str,
        dim: int,
        *,
        heads: int,
        num_conditions: int | None = None,
        condition_source: str | None = None,
        query_positions: Literal["all", "cls_only"] = "all",
        cls_index: int = 0,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        op: str = "dense",
        op_options: Mapping | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if (num_conditions is None) == (condition_source is None):
            raise ValueError("give exactly one of num_conditions= (a learned table) or condition_source= (a source name)")
        if num_conditions is not None and num_conditions < 1:
            raise ValueError(f"num_conditions must be >= 1, got {num_conditions}")
        if query_positions not in ("all", "cls_only"):
            raise ValueError(f"query_positions must be 'all' or 'cls_only', got {query_positions!r}")
        if condition_source == context:
            raise ValueError(f"condition_source and context must differ, both are {context!r}")
        dd = {"device": device, "dtype": dtype}
        self.context, self.condition_source, self.query_positions, self.cls_index = context, condition_source, query_positions, cls_index
        if query_positions == "cls_only":
            self.symmetry = "ordered"  # the CLS readout depends on token order
        names = [context] if condition_source is None else [context, condition_source]
        self.embed = SourceEmbedding(names, dim, type_embedding=None, **dd)
        self.table = nn.Embedding(num_conditions, dim, **dd) if num_conditions is not None else None
        if self.table is not None:
            nn.init.normal_(self.table.weight, std=0.02)
        self.norm_context = nn.LayerNorm(dim, **dd)
        self.cross = Attention(dim, heads, op=op, dropout=dropout, **dd, **dict(op_options or {}))
        self.norm_mlp = nn.LayerNorm(dim, **dd)
        self.mlp = MLP(dim, hidden=int(dim * mlp_ratio), dropout=dropout, **dd)

    @property
    def sources(self) -> tuple[str, ...]:
        return self.embed.sources

    def _condition(self, prepared: dict, condition: Tensor | None, batch: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """The query ``(B, 1, D)`` and whether each sample has a condition ``(B,)``."""
        if self.table is not None:
            if condition is None:
                raise ValueError("this module looks conditions up in a table: pass condition= ids (B,) of dtype long")
            if condition.shape != (batch,) or condition.dtype not in (torch.long, torch.int32, torch.int64):
                raise ValueError(f"condition must be integer ids of shape ({batch},), got {condition.dtype} {tuple(condition.shape)}")
            q = self.table(condition.long()).to(like.dtype).unsqueeze(1)  # (B, 1, D)
            return q, torch.ones(batch, dtype=torch.bool, device=like.device)
        if condition is not None:
            raise ValueError(f"condition ids need num_conditions=; here the condition comes from source {self.condition_source!r}")
        src = prepared.get(self.condition_source)
        if src is None:
            return like.new_zeros(batch, 1, like.shape[-1]), torch.zeros(batch, dtype=torch.bool, device=like.device)
        m = src.mask.unsqueeze(-1).to(src.x.dtype)  # (B, Nc, 1)
        q = (src.x * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1, D)
        return q, src.mask.any(dim=1)

    def forward(
        self, inputs: Mapping[str, TokenSet], *, condition: Tensor | None = None, return_weights: bool = False
    ) -> FusionOutput:
        """Condition the context tokens; see the class docstring."""
        prepared = {s.name: s for s in self.embed(inputs)}
        if self.context not in prepared:
            raise ValueError(f"the context source {self.context!r} is required (its tokens are the output positions)")
        ctx = prepared[self.context]
        batch = ctx.x.shape[0]
        q, has_condition = self._condition(prepared, condition, batch, ctx.x)
        u = self.cross(q, context=self.norm_context(ctx.x), context_mask=ctx.mask, return_weights=return_weights)
        u, w = u if return_weights else (u, None)
        u = u * has_condition.to(u.dtype)[:, None, None]  # (B, 1, D): one update for every position
        x, mask = ctx.x, ctx.mask
        if self.query_positions == "cls_only":
            x, mask = x[:, self.cls_index : self.cls_index + 1], mask[:, self.cls_index : self.cls_index + 1]
        x = x + u
        y = x + self.mlp(self.norm_mlp(x))
        y = zero_invalid(y, mask)
        fused = TokenSet(y, mask)
        weights = {"cross": w} if w is not None else {}
        return FusionOutput(fused, {self.context: fused}, weights, {self.context: (0, y.shape[1])})

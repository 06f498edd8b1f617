"""Conditional cross-attention: a condition embedding queries all context tokens (one embedding space per condition).

Paper: Song et al., "Conditional Cross Attention Network for Multi-Space Embedding without
Entanglement in Only a SINGLE Network", ICCV 2023 (https://arxiv.org/abs/2307.13254). Status: the
block as described in the paper notes (no official code): the condition token replaces the
self-attention of the last transformer block, ``x' = x + CA(Q = E[c], K = V = LN(x))``,
``y = x' + MLP(LN(x'))``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from attnfuse.fusion._registry import register_fusion
from attnfuse.fusion.sources import FusionOutput, SourceEmbedding, concat_sources, role_names
from attnfuse.nn import MLP, Attention
from attnfuse.ops import OpConfig
from attnfuse.tokens import TokenSet, zero_invalid

__all__ = ["ConditionalCrossAttention"]


@register_fusion("conditional")
class ConditionalCrossAttention(nn.Module):
    """One condition vector ``c`` is the query of a cross-attention over the context tokens.

    ``u = CA(Q = c, K = V = LN(x))`` is one vector per sample (the query is the same at every
    position, so it is computed once); ``x' = x + u`` at every valid position;
    ``y = x' + MLP(LN(x'))``. ``x`` are the tokens of the ``context`` source(s), concatenated in
    sorted name order (masks kept); they are the output positions. With
    ``query_positions="cls_only"`` only token ``cls_index`` of that concatenation is computed (the
    same ``y`` there, less work); that output is order-dependent, so such an instance declares
    ``symmetry = "ordered"``.

    The condition is either an id looked up in a learned table (``num_conditions=``, pass
    ``condition=`` ids to ``forward``: the paper's CCA) or taken from sources of the inputs
    (``condition_source=``; the masked mean of their tokens). Defaults (neither given): the condition
    is ``sources[0]`` (the first name as given) and the context is every other source, so the module
    fuses any two or more named sources. A missing condition (all-False / absent source) gives
    ``u = 0``; a fully masked context gives ``u = 0`` and zero outputs (mask all False), and an absent
    context gives no output tokens (``fused`` ``(B, 0, D)``), the same valid tokens.

    Args:
        sources: every source name this module receives.
        dim: token width ``D`` (also ``out_dim``).
        context: the context source name(s) (default: every source that is not a condition source).
        condition_source: the condition source name(s) (default ``sources[0]`` unless
            ``num_conditions`` is given); exclusive with ``num_conditions``.
        num_conditions: size of a learned condition table; ``forward`` then needs ``condition=`` ids.
        heads: attention heads (must divide ``dim``).
        query_positions: ``"all"`` or ``"cls_only"``.
        cls_index: index of the CLS token in the (flattened, concatenated) context.
        mlp_ratio, dropout: as :class:`attnfuse.nn.TransformerBlock`.
        op: the attention operator of the cross-attention: a registered name (``"dense"``) or a typed config
            (:class:`attnfuse.ops.OpConfig`) such as ``Dense(backend="reference")``; it must take
            cross-attention (``dense``, ``silu_kernel``, ``axial``). In YAML
            ``op: {class_path: Dense, init_args: {backend: reference}}``.
        device, dtype: for the parameters.

    Raises:
        ValueError: both ``num_conditions`` and ``condition_source``; no context or no condition left;
            a source in both roles or in neither; bad options; at call time, condition ids missing
            or of the wrong shape.

    Shapes:
        inputs ``{context_j: TokenSet (B, *axes_j, D)}`` (+ ``{condition_source: (B, Nc, D)}``),
        ``condition (B,)`` long -> ``fused (B, N, D)`` with ``N = sum_j N_j`` (``(B, 1, D)`` for
        ``"cls_only"``); ``per_source[context_j]`` its slice; weights ``"cross" (B, H, 1, N)``.

    Example:
        >>> cca = ConditionalCrossAttention(["image"], 32, heads=4, num_conditions=3)   # the paper's CCA
        >>> out = cca({"image": TokenSet(torch.randn(2, 17, 32))}, condition=torch.tensor([0, 2]))
        >>> out.fused.x.shape
        torch.Size([2, 17, 32])
        >>> fuse = ConditionalCrossAttention(["attr", "image"], 32)  # condition "attr" (pooled), context "image"
    """

    symmetry: ClassVar[str] = "equivariant"
    has_parameters: ClassVar[bool] = True
    output: ClassVar[str] = "tokens"

    def __init__(
        self,
        sources: Sequence[str],
        dim: int,
        *,
        context: str | Sequence[str] | None = None,
        condition_source: str | Sequence[str] | None = None,
        num_conditions: int | None = None,
        heads: int = 4,
        query_positions: Literal["all", "cls_only"] = "all",
        cls_index: int = 0,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        op: str | OpConfig = "dense",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.embed = SourceEmbedding(sources, dim, type_embedding=None, **dd)
        names = list(sources)
        if num_conditions is not None and condition_source is not None:
            raise ValueError("give at most one of num_conditions= (a learned table) or condition_source= (source names)")
        if num_conditions is not None and num_conditions < 1:
            raise ValueError(f"num_conditions must be >= 1, got {num_conditions}")
        if query_positions not in ("all", "cls_only"):
            raise ValueError(f"query_positions must be 'all' or 'cls_only', got {query_positions!r}")
        conditions: tuple[str, ...] = ()
        if num_conditions is None:
            default = [n for n in names if context is None or n not in _as_names(context)][:1]
            if condition_source is None and (not default or (context is None and len(names) < 2)):
                raise ValueError(f"no condition: pass num_conditions= (a learned table; forward(condition=ids)) or a source "
                                 f"for condition_source=; sources={names}, context={context!r}")
            conditions = role_names(condition_source, "condition_source", names, default)
        overlap = sorted(set(conditions) & set(_as_names(context))) if context is not None else []
        if overlap:
            raise ValueError(f"condition_source and context must differ, both name {overlap}")
        rest = [n for n in names if n not in conditions]
        if context is None and not rest:
            raise ValueError(f"no context source left: sources={names} are all condition sources; add the source whose "
                             "tokens are to be conditioned")
        contexts = role_names(context, "context", names, rest)
        unused = [n for n in names if n not in conditions and n not in contexts]
        if unused:
            raise ValueError(f"sources {unused} take no part: add them to context= or condition_source=, or leave them out")
        self.context, self.condition_source = tuple(sorted(contexts)), tuple(sorted(conditions))
        self.query_positions, self.cls_index, self.out_dim = query_positions, cls_index, dim
        if query_positions == "cls_only":
            self.symmetry = "ordered"  # the CLS readout depends on token order
        self.table = nn.Embedding(num_conditions, dim, **dd) if num_conditions is not None else None
        if self.table is not None:
            nn.init.normal_(self.table.weight, std=0.02)
        self.norm_context = nn.LayerNorm(dim, **dd)
        self.cross = Attention(dim, heads, op=op, dropout=dropout, **dd)
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
            raise ValueError(f"condition ids need num_conditions=; here the condition comes from {list(self.condition_source)}")
        present = [prepared[n] for n in self.condition_source if n in prepared]
        if not present:
            return like.new_zeros(batch, 1, like.shape[-1]), torch.zeros(batch, dtype=torch.bool, device=like.device)
        x, mask, _ = concat_sources(present)  # (B, Nc, D), invalid tokens are zero
        m = mask.unsqueeze(-1).to(x.dtype)  # (B, Nc, 1)
        q = x.sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1, D)
        return q, mask.any(dim=1)

    def forward(
        self, inputs: Mapping[str, TokenSet], *, condition: Tensor | None = None, return_weights: bool = False
    ) -> FusionOutput:
        """Condition the context tokens; see the class docstring."""
        prepared = {s.name: s for s in self.embed(inputs)}
        contexts = [prepared[n] for n in self.context if n in prepared]
        ref = next(iter(prepared.values())).x
        batch = ref.shape[0]
        if not contexts:  # no context: no output positions (the same valid tokens as a fully masked context)
            self._condition(prepared, condition, batch, ref)  # still validate condition ids
            empty = TokenSet(ref.new_zeros(batch, 0, ref.shape[-1]), torch.zeros(batch, 0, dtype=torch.bool, device=ref.device))
            return FusionOutput(empty, {}, {}, {})
        x, mask, layout = concat_sources(contexts)  # (B, N, D), (B, N)
        q, has_condition = self._condition(prepared, condition, batch, x)
        u = self.cross(q, context=self.norm_context(x), context_mask=mask, return_weights=return_weights)
        u, w = u if return_weights else (u, None)
        u = u * has_condition.to(u.dtype)[:, None, None]  # (B, 1, D): one update for every position
        if self.query_positions == "cls_only":
            if not 0 <= self.cls_index < x.shape[1]:
                raise ValueError(f"cls_index={self.cls_index} is outside the {x.shape[1]} context tokens")
            owner = next(n for n, (a, b) in layout.items() if a <= self.cls_index < b)
            layout = {owner: (0, 1)}
            x, mask = x[:, self.cls_index : self.cls_index + 1], mask[:, self.cls_index : self.cls_index + 1]
        x = x + u
        y = x + self.mlp(self.norm_mlp(x))
        y = zero_invalid(y, mask)
        fused = TokenSet(y, mask)
        per_source = {n: TokenSet(y[:, a:b], mask[:, a:b]) for n, (a, b) in layout.items()}
        weights = {"cross": w} if w is not None else {}
        return FusionOutput(fused, per_source, weights, layout)


def _as_names(arg: str | Sequence[str]) -> tuple[str, ...]:
    return (arg,) if isinstance(arg, str) else tuple(arg)

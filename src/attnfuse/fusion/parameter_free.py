"""Parameter-free cross-attention (ADEM-VL): SiLU-kernel scores, no softmax, weakest visual tokens dropped.

Paper: Hao et al., "ADEM-VL: Adaptive and Embedded Fusion for Efficient Vision-Language Tuning"
(https://arxiv.org/abs/2410.17779). Status: exact as the released code (``adem/adapter.py``,
``Adapter.forward`` with ``vis_weight``) computes ``Fuse``, plus key / query masks; the learnable
offsets E1 / E2 are owned by the caller (this module has zero parameters) and passed per call.
Place it in a frozen language model with :class:`attnfuse.fusion.Inject` (query at the MLP input,
output added at the MLP output, ``scale = alpha = 0.1``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnfuse.fusion._registry import register_fusion
from attnfuse.fusion.sources import FusionOutput, SourceEmbedding, concat_sources, role_names
from attnfuse.ops import OpConfig, op_config
from attnfuse.tokens import TokenSet, zero_invalid

__all__ = ["ParameterFreeCrossAttention", "multiscale_bank"]


def multiscale_bank(tokens: TokenSet, sizes: Sequence[tuple[int, int]] | None = None) -> TokenSet:
    """ADEM-VL's multiscale visual bank: average-pool a token grid to several sizes and concatenate.

    Pooling is masked: a pooled token is the mean of the valid tokens in its window, and is valid if
    the window holds any (adaptive average pooling, so window edges follow
    :func:`torch.nn.functional.adaptive_avg_pool2d`).

    Args:
        tokens: a grid ``x (B, H, W, D)`` with two token axes.
        sizes: output grid sizes, in order (default ``[(H, W), (H // 2, W // 2)]``: ADEM-VL's
            16×16 + 8×8 bank from a 16×16 grid).

    Returns:
        TokenSet ``(B, sum_i h_i w_i, D)`` with axes ``("token",)``, scales concatenated in order.

    Raises:
        ValueError: a TokenSet without exactly two token axes, or an empty / non-positive size.

    Example:
        >>> bank = multiscale_bank(TokenSet(torch.randn(2, 16, 16, 8), axes=("h", "w")))
        >>> bank.x.shape
        torch.Size([2, 320, 8])
    """
    if tokens.x.dim() != 4:
        raise ValueError(f"multiscale_bank needs a token grid (B, H, W, D), got x.shape={tuple(tokens.x.shape)}")
    h, w = tokens.x.shape[1:3]
    sizes = [(h, w), (max(1, h // 2), max(1, w // 2))] if sizes is None else [tuple(s) for s in sizes]
    if not sizes or any(len(s) != 2 or min(s) < 1 for s in sizes):
        raise ValueError(f"sizes must be a non-empty list of (h, w) with positive entries, got {sizes}")
    m = tokens.valid().unsqueeze(1).to(tokens.x.dtype)  # (B, 1, H, W)
    x = tokens.x.permute(0, 3, 1, 2) * m  # (B, D, H, W), invalid tokens zeroed
    xs, masks = [], []
    for size in sizes:
        num = F.adaptive_avg_pool2d(x, size)  # (B, D, h, w): window mean of x * m
        den = F.adaptive_avg_pool2d(m, size)  # (B, 1, h, w): fraction of valid tokens
        ok = den > 0
        pooled = torch.where(ok, num / torch.where(ok, den, torch.ones_like(den)), torch.zeros_like(num))
        xs.append(pooled.flatten(2).transpose(1, 2))  # (B, h*w, D)
        masks.append(ok.flatten(1))  # (B, h*w)
    return TokenSet(torch.cat(xs, dim=1), torch.cat(masks, dim=1))


@register_fusion("parameter_free")
class ParameterFreeCrossAttention(nn.Module):
    """``Fuse(x) = (A * M)(X_v + E2)`` with ``A = SiLU(x) SiLU(X_v + E1)^T``; zero parameters.

    The query tokens ``x`` (e.g. the language model's hidden states at the MLP input) are used as
    they are (no projections); ``X_v`` are the context (visual) tokens: the ``context`` sources'
    tokens concatenated in sorted name order (masks kept). ``E1`` / ``E2`` are optional offsets added
    to the keys / values (``key_offset`` / ``value_offset``, owned and trained by the caller; they are
    position-specific and break the invariance to the order of visual tokens). ``M`` drops the lowest
    ``floor(drop_ratio * n)`` of each query's ``n`` valid scores
    (:func:`attnfuse.ops.silu_kernel_attention`). With ``heads > 1`` the channels are split into
    groups, each with its own scores (ADEM-VL: one head). The output is the update alone, no residual.

    An absent or fully masked context gives ``Fuse = 0``; invalid query tokens give 0; an absent query
    source gives no output tokens (``fused`` ``(B, 0, D)``, the same valid tokens as a fully masked one).

    Args:
        sources: every source name this module receives.
        dim: token width ``D`` (also ``out_dim``).
        query: the query source (default ``sources[0]``, the first name as given; e.g. ``"text"``).
        context: the context source name(s) (default: every other source; e.g. ``"visual"``, a
            :func:`multiscale_bank`).
        drop_ratio: ``gamma`` in ``[0, 1)`` (ADEM-VL: 0.1); it sets the ``drop_ratio`` field of an
            operator that has one (``SiluKernel``), replacing the config's value.
        heads: channel groups (must divide ``dim``).
        op: the attention operator: a registered name or a typed config (:class:`attnfuse.ops.OpConfig`):
            ``"silu_kernel"`` / ``SiluKernel(backend="reference")`` (the method) or e.g. ``"dense"`` /
            ``Dense(backend="reference")`` (the softmax ablation; ``drop_ratio`` must then be 0). In YAML
            ``op: {class_path: Dense, init_args: {backend: reference}}``.
        device, dtype: accepted for the fusion protocol (there are no parameters).

    Raises:
        ValueError: fewer than two sources, the query among the context, a source in neither role,
            ``heads`` not dividing ``dim``, ``drop_ratio`` with an operator that does not take it, an
            operator without cross-attention; at call time, offsets that do not broadcast.
        KeyError: unknown operator name.

    Shapes:
        inputs ``{query: (B, *axes_q, D), context_j: (B, *axes_j, D)}`` (flattened to ``L`` and
        ``S = sum_j S_j`` tokens); ``key_offset`` / ``value_offset`` broadcastable to ``(B, S, D)`` ->
        ``fused (B, L, D)``; weights ``"cross" (B, H, L, S)``.

    Example:
        >>> fuse = ParameterFreeCrossAttention(["text", "visual"], 32, drop_ratio=0.1)
        >>> out = fuse({"text": TokenSet(torch.randn(2, 5, 32)), "visual": TokenSet(torch.randn(2, 20, 32))})
        >>> out.fused.x.shape, sum(p.numel() for p in fuse.parameters())
        (torch.Size([2, 5, 32]), 0)
    """

    symmetry: ClassVar[str] = "equivariant"
    has_parameters: ClassVar[bool] = False
    output: ClassVar[str] = "tokens"

    def __init__(
        self,
        sources: Sequence[str],
        dim: int,
        *,
        query: str | None = None,
        context: str | Sequence[str] | None = None,
        drop_ratio: float = 0.1,
        heads: int = 1,
        op: str | OpConfig = "silu_kernel",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        del device, dtype  # accepted for the fusion protocol; there are no parameters
        # validation and zeroing of invalid tokens only: no type embedding, no parameters
        self.embed = SourceEmbedding(sources, dim, type_embedding=None)
        names = list(sources)
        if len(names) < 2:
            raise ValueError(f"ParameterFreeCrossAttention needs a query and a context source, got sources={names}")
        if query is not None and not isinstance(query, str):
            raise ValueError(f"query= names one source, got {query!r}")
        (query,) = role_names(query, "query", names, names[:1])
        contexts = role_names(context, "context", names, [n for n in names if n != query])
        if query in contexts:
            raise ValueError(f"query and context must be different sources, {query!r} is both")
        unused = [n for n in names if n != query and n not in contexts]
        if unused:
            raise ValueError(f"sources {unused} take no part: add them to context= or leave them out of sources")
        if heads < 1 or dim % heads:
            raise ValueError(f"heads must be >= 1 and divide dim, got {heads=}, {dim=}")
        config = op_config(op)
        if "drop_ratio" in config.spec.options:
            config = op_config(config, drop_ratio=drop_ratio)
        elif drop_ratio:
            raise ValueError(f"operator {config.name!r} takes no drop_ratio; use op='silu_kernel' or drop_ratio=0")
        if not config.spec.cross:
            raise ValueError(f"operator {config.name!r} has no cross-attention (keys from other tokens than the queries); "
                             "use 'silu_kernel' or 'dense'")
        self.op = config
        self.query, self.context, self.heads, self.out_dim = query, tuple(sorted(contexts)), heads, dim

    @property
    def sources(self) -> tuple[str, ...]:
        return self.embed.sources

    def forward(
        self,
        inputs: Mapping[str, TokenSet],
        *,
        key_offset: Tensor | None = None,
        value_offset: Tensor | None = None,
        return_weights: bool = False,
    ) -> FusionOutput:
        """``Fuse`` of the query tokens over the context; see the class docstring."""
        prepared = {s.name: s for s in self.embed(inputs)}
        dim = self.out_dim
        if self.query not in prepared:  # no output positions
            ref = next(iter(prepared.values())).x
            empty = TokenSet(ref.new_zeros(ref.shape[0], 0, dim), torch.zeros(ref.shape[0], 0, dtype=torch.bool, device=ref.device))
            return FusionOutput(empty, {}, {}, {})
        q = prepared[self.query]
        b, lq, _ = q.x.shape
        h = self.heads

        def split(t: Tensor) -> Tensor:
            return t.unflatten(-1, (h, dim // h)).transpose(1, 2)  # (B, N, D) -> (B, H, N, D/H)

        contexts = [prepared[n] for n in self.context if n in prepared]
        if contexts:
            keys, key_mask, _ = concat_sources(contexts)  # (B, S, D), (B, S)
            values = keys
            for name, off in (("key_offset", key_offset), ("value_offset", value_offset)):
                if off is not None:
                    try:
                        torch.broadcast_shapes(off.shape, keys.shape)
                    except RuntimeError:
                        raise ValueError(f"{name} must broadcast to {tuple(keys.shape)} (B, S, D), got {tuple(off.shape)}") from None
            keys = keys if key_offset is None else keys + key_offset
            values = values if value_offset is None else values + value_offset
        else:  # no context: one fully masked key gives exactly zero
            keys = values = q.x.new_zeros(b, 1, dim)
            key_mask = torch.zeros(b, 1, dtype=torch.bool, device=q.x.device)  # (B, S=1)
        res = self.op(split(q.x), split(keys), split(values), key_mask=key_mask, return_weights=return_weights)
        out, w = res if return_weights else (res, None)
        out = out.transpose(1, 2).reshape(b, lq, dim)  # (B, L, D)
        out = zero_invalid(out, q.mask)
        fused = TokenSet(out, q.mask)
        return FusionOutput(fused, {self.query: fused}, {"cross": w} if w is not None else {}, {self.query: (0, lq)})

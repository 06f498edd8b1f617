"""Early, late and hierarchical attention fusion: one axis of configuration over the same blocks.

Paper: Nayakanti et al., "Wayformer: Motion Forecasting via Simple & Efficient Attention
Networks" (https://arxiv.org/abs/2207.05844), section 3 (fusion).
Status: exact as described; positional / factorized encoders come with the local-attention issue.

``HierarchicalFusion(per_source_depth=p, cross_depth=c)`` runs ``p`` transformer blocks on each
source alone (own weights per source), then ``c`` blocks over the concatenation
``[fusion tokens; source_1; ...; source_n]``. ``EarlyFusion(depth=d)`` is ``p=0, c=d`` and
``LateFusion(depth=d)`` is ``p=d, c=0``; their state dicts are interchangeable with the
hierarchical one of the same configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import nn

from attnfuse.fusion._registry import register_fusion
from attnfuse.fusion.sources import FusionOutput, SourceEmbedding
from attnfuse.nn import Encoder
from attnfuse.ops import OpConfig
from attnfuse.tokens import TokenSet

__all__ = ["EarlyFusion", "HierarchicalFusion", "LateFusion"]


@register_fusion("hierarchical")
class HierarchicalFusion(nn.Module):
    """Per-source transformer blocks, then cross-source blocks over all tokens.

    Args:
        sources: names of the sources to fuse.
        dim: token width ``D`` (also ``out_dim``).
        heads: attention heads (must divide ``dim``).
        per_source_depth: blocks applied to each source alone (separate weights per source).
        cross_depth: blocks applied to the concatenation of all sources and the fusion tokens.
        num_fusion_tokens: always-present learned tokens placed first in the fused sequence.
        mlp_ratio, dropout: as :class:`attnfuse.nn.TransformerBlock`.
        op: the attention operator of every block: a registered name (``"dense"``) or a typed config
            (:class:`attnfuse.ops.OpConfig`) such as ``Dense(backend="reference")`` or
            ``Neighborhood(kernel_size=7)``; in YAML ``op: {class_path: Halo, init_args: {block_size: 4,
            halo_size: 2}}``.
        type_embedding, missing_token, modality_dropout: as
            :class:`attnfuse.fusion.SourceEmbedding`.
        device, dtype: for the parameters.

    Shapes:
        inputs ``{name: TokenSet (B, *axes_i, D)}`` -> ``fused (B, F + sum_i N_i, D)`` with
        ``F = num_fusion_tokens`` and ``N_i`` the flattened token count of present source ``i``.

    Example:
        >>> fusion = HierarchicalFusion(["audio", "text"], 32, heads=4, per_source_depth=1, cross_depth=1)
        >>> out = fusion({"audio": TokenSet(torch.randn(2, 7, 32)), "text": TokenSet(torch.randn(2, 5, 32))})
        >>> out.fused.x.shape
        torch.Size([2, 13, 32])
    """

    symmetry: ClassVar[str] = "equivariant"
    has_parameters: ClassVar[bool] = True
    output: ClassVar[str] = "tokens"

    def __init__(
        self,
        sources: Sequence[str],
        dim: int,
        *,
        heads: int = 4,
        per_source_depth: int = 1,
        cross_depth: int = 1,
        num_fusion_tokens: int = 1,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        op: str | OpConfig = "dense",
        type_embedding: Literal["learned", "zeros"] | None = "learned",
        missing_token: bool = False,
        modality_dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if per_source_depth < 0 or cross_depth < 0:
            raise ValueError(f"per_source_depth and cross_depth must be >= 0, got {per_source_depth=}, {cross_depth=}")
        if num_fusion_tokens < 1:
            raise ValueError(f"num_fusion_tokens must be >= 1 (samples with every source missing need an output), got {num_fusion_tokens}")
        dd = {"device": device, "dtype": dtype}
        self.out_dim = dim
        block = {"heads": heads, "mlp_ratio": mlp_ratio, "dropout": dropout, "op": op}
        self.embed = SourceEmbedding(sources, dim, type_embedding=type_embedding, missing_token=missing_token,
                                     modality_dropout=modality_dropout, **dd)
        self.fusion_tokens = nn.Parameter(torch.randn(num_fusion_tokens, dim, **dd) * 0.02)
        self.source_encoders = nn.ModuleDict(
            {name: Encoder(dim, depth=per_source_depth, **block, **dd) for name in self.embed.sources}
        )
        self.encoder = Encoder(dim, depth=cross_depth, **block, **dd)

    @property
    def sources(self) -> tuple[str, ...]:
        return self.embed.sources

    @property
    def fusion_token_attends(self) -> bool:
        """Whether the fusion tokens see the inputs (False for late fusion: they are constants)."""
        return self.encoder.depth > 0

    def forward(self, inputs: Mapping[str, TokenSet], *, return_weights: bool = False) -> FusionOutput:
        """Fuse ``inputs``; see the class docstring. Maps are keyed ``"<source>.<i>"`` and ``"cross.<i>"``."""
        prepared = self.embed(inputs)
        weights: dict[str, torch.Tensor] = {}
        ref = next(iter(self.embed.align(inputs).values())).x  # batch, device and the common dtype
        batch, n_fusion = ref.shape[0], self.fusion_tokens.shape[0]
        xs = [self.fusion_tokens.to(ref.dtype).expand(batch, -1, -1)]
        masks = [torch.ones(batch, n_fusion, dtype=torch.bool, device=ref.device)]
        layout = {"fusion": (0, n_fusion)}
        start = n_fusion
        for src in prepared:
            x = self.source_encoders[src.name](src.x, mask=src.mask, return_weights=return_weights)
            if return_weights:
                x, maps = x
                weights.update({f"{src.name}.{i}": w for i, w in enumerate(maps)})
            xs.append(x)
            masks.append(src.mask)
            layout[src.name] = (start, start + x.shape[1])
            start += x.shape[1]
        x, mask = torch.cat(xs, dim=1), torch.cat(masks, dim=1)  # (B, F + sum N_i, D), (B, F + sum N_i)
        x = self.encoder(x, mask=mask, return_weights=return_weights)
        if return_weights:
            x, maps = x
            weights.update({f"cross.{i}": w for i, w in enumerate(maps)})
        per_source = {
            name: TokenSet(x[:, a:b], mask[:, a:b]) for name, (a, b) in layout.items() if name != "fusion"
        }
        return FusionOutput(TokenSet(x, mask), per_source, weights, layout)


@register_fusion("early")
class EarlyFusion(HierarchicalFusion):
    """Concatenate all sources' tokens (plus fusion tokens) and run one shared encoder.

    ``EarlyFusion(sources, dim, heads=h, depth=d)`` (defaults ``heads=4, depth=2``) is
    ``HierarchicalFusion(per_source_depth=0, cross_depth=d)``; see :class:`HierarchicalFusion` for the
    other arguments.
    """

    def __init__(self, sources: Sequence[str], dim: int, *, heads: int = 4, depth: int = 2, num_fusion_tokens: int = 1,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, op: str | OpConfig = "dense",
                 type_embedding: Literal["learned", "zeros"] | None = "learned", missing_token: bool = False,
                 modality_dropout: float = 0.0, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(sources, dim, heads=heads, per_source_depth=0, cross_depth=depth,
                         num_fusion_tokens=num_fusion_tokens, mlp_ratio=mlp_ratio, dropout=dropout, op=op,
                         type_embedding=type_embedding, missing_token=missing_token,
                         modality_dropout=modality_dropout, device=device, dtype=dtype)


@register_fusion("late")
class LateFusion(HierarchicalFusion):
    """Encode each source alone; sources meet only in the head (via the concatenated output).

    ``LateFusion(sources, dim, heads=h, depth=d)`` (defaults ``heads=4, depth=2``) is
    ``HierarchicalFusion(per_source_depth=d, cross_depth=0)``. The fusion tokens are learned constants here (nothing attends across
    sources), so pool with ``"mean"`` or ``"attention"`` rather than the fusion token.
    """

    def __init__(self, sources: Sequence[str], dim: int, *, heads: int = 4, depth: int = 2, num_fusion_tokens: int = 1,
                 mlp_ratio: float = 4.0, dropout: float = 0.0, op: str | OpConfig = "dense",
                 type_embedding: Literal["learned", "zeros"] | None = "learned", missing_token: bool = False,
                 modality_dropout: float = 0.0, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(sources, dim, heads=heads, per_source_depth=depth, cross_depth=0,
                         num_fusion_tokens=num_fusion_tokens, mlp_ratio=mlp_ratio, dropout=dropout, op=op,
                         type_embedding=type_embedding, missing_token=missing_token,
                         modality_dropout=modality_dropout, device=device, dtype=dtype)

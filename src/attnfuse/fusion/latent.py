"""Latent-bottleneck fusion: learned latent queries cross-attend all sources, then self-attend.

Papers: Jaegle et al., "Perceiver" (https://arxiv.org/abs/2103.03206); Wayformer's latent query
encoder (https://arxiv.org/abs/2207.05844, section 3.2). Status: exact as described.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import nn

from attnfuse.fusion._registry import register_fusion
from attnfuse.fusion.sources import FusionOutput, SourceEmbedding, concat_sources
from attnfuse.nn import Encoder, TransformerBlock
from attnfuse.ops import OpConfig
from attnfuse.tokens import TokenSet

__all__ = ["DEFAULT_NUM_LATENTS", "LatentBottleneck"]

#: ``M`` when neither ``num_latents`` nor ``latent_ratio`` is given.
DEFAULT_NUM_LATENTS = 8


@register_fusion("latent")
class LatentBottleneck(nn.Module):
    """``M`` learned latents read every source's valid tokens, then ``depth`` self-attention blocks.

    The output does not depend on the order of any source's tokens (no positions are added here),
    and the latents are always present, so a sample with every source missing still yields an
    output.

    Args:
        sources: names of the sources to fuse.
        dim: token width ``D`` (also ``out_dim``).
        heads: attention heads (must divide ``dim``).
        num_latents: ``M``, the number of latent queries (default :data:`DEFAULT_NUM_LATENTS` = 8);
            or give ``latent_ratio`` and ``num_tokens`` instead (``M = ceil(latent_ratio * num_tokens)``,
            Wayformer's latent ratio).
        latent_ratio: fraction of the expected input token count.
        num_tokens: expected total number of input tokens (for ``latent_ratio``).
        depth: self-attention blocks over the latents after the cross-attention.
        mlp_ratio, dropout: as :class:`attnfuse.nn.TransformerBlock`.
        op: the attention operator of every block: a registered name (``"dense"``) or a typed config
            (:class:`attnfuse.ops.OpConfig`) such as ``Dense(backend="reference")``; it must take
            cross-attention (``dense``, ``silu_kernel``, ``axial``). In YAML
            ``op: {class_path: Dense, init_args: {backend: reference}}``.
        type_embedding, missing_token, modality_dropout: as :class:`attnfuse.fusion.SourceEmbedding`.
        device, dtype: for the parameters.

    Raises:
        ValueError: both ``num_latents`` and ``latent_ratio``; bad values.

    Shapes:
        inputs ``{name: TokenSet (B, *axes_i, D)}`` -> ``fused (B, M, D)`` (all valid).
    """

    symmetry: ClassVar[str] = "invariant"
    has_parameters: ClassVar[bool] = True
    output: ClassVar[str] = "tokens"
    #: the first output token (a fusion token / latent) attends to the inputs
    fusion_token_attends: ClassVar[bool] = True

    def __init__(
        self,
        sources: Sequence[str],
        dim: int,
        *,
        heads: int = 4,
        num_latents: int | None = None,
        latent_ratio: float | None = None,
        num_tokens: int | None = None,
        depth: int = 1,
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
        if num_latents is not None and latent_ratio is not None:
            raise ValueError(f"give at most one of num_latents= or latent_ratio= (with num_tokens=), got {num_latents=}, "
                             f"{latent_ratio=}")
        if num_latents is None and latent_ratio is None:
            num_latents = DEFAULT_NUM_LATENTS
        if latent_ratio is not None:
            if not 0 < latent_ratio <= 1 or not num_tokens or num_tokens < 1:
                raise ValueError(f"latent_ratio must be in (0, 1] with num_tokens >= 1, got {latent_ratio=}, {num_tokens=}")
            num_latents = math.ceil(latent_ratio * num_tokens)
        if num_latents < 1:
            raise ValueError(f"num_latents must be >= 1, got {num_latents}")
        dd = {"device": device, "dtype": dtype}
        self.out_dim = dim
        block = {"mlp_ratio": mlp_ratio, "dropout": dropout, "op": op}
        self.embed = SourceEmbedding(sources, dim, type_embedding=type_embedding, missing_token=missing_token,
                                     modality_dropout=modality_dropout, **dd)
        self.latents = nn.Parameter(torch.randn(num_latents, dim, **dd) * 0.02)
        self.read = TransformerBlock(dim, heads, self_attention=False, cross_attention=True, **block, **dd)
        self.encoder = Encoder(dim, depth=depth, heads=heads, **block, **dd)

    @property
    def sources(self) -> tuple[str, ...]:
        return self.embed.sources

    def forward(self, inputs: Mapping[str, TokenSet], *, return_weights: bool = False) -> FusionOutput:
        """Fuse ``inputs`` into ``M`` latents. Maps: ``"cross"`` ``(B, H, M, S)``, ``"latent.<i>"``."""
        prepared = self.embed(inputs)
        ref = next(iter(self.embed.align(inputs).values())).x  # batch, device and the common dtype
        batch = ref.shape[0]
        latents = self.latents.to(ref.dtype).expand(batch, -1, -1)  # (B, M, D)
        weights: dict[str, torch.Tensor] = {}
        context, context_mask, layout = concat_sources(prepared)  # (B, S, D), (B, S)
        x = self.read(latents, context=context, context_mask=context_mask, return_weights=return_weights)
        if return_weights:
            x, w = x
            weights["cross"] = w["cross"]
        x = self.encoder(x, return_weights=return_weights)
        if return_weights:
            x, maps = x
            weights.update({f"latent.{i}": w for i, w in enumerate(maps)})
        fused = TokenSet(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))
        per_source = {s.name: TokenSet(s.x, s.mask) for s in prepared}
        return FusionOutput(fused, per_source, weights, layout)

"""Cross-attention fusion: one source queries others; keys and values may come from different sources.

Papers: M2FNet (https://arxiv.org/abs/2206.02187; Q = V = text, K = audio / visual), GPCR-Filter
(ligand atoms decode over receptor residues). Status: exact as described; the paper models
themselves come with their issues.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from attnfuse.fusion._registry import register_fusion
from attnfuse.fusion.sources import FusionOutput, SourceEmbedding, role_names
from attnfuse.nn import TransformerBlock
from attnfuse.ops import OpConfig
from attnfuse.tokens import TokenSet

__all__ = ["CrossAttentionFusion"]


@register_fusion("cross")
class CrossAttentionFusion(nn.Module):
    """Stacked cross-attention of a query source over key/value sources.

    Each layer is a pre-norm block ``x + CrossAttn(x, keys, values)`` (+ self-attention of the
    queries first when ``decoder=True``) ``+ MLP``. The query sequence is ``[fusion tokens; query
    source tokens]``; keys are the concatenation of the ``key`` sources, values of the ``value``
    sources (pairwise: ``value[i]`` must have the same token layout as ``key[i]``; a pair takes part
    where both are valid).

    Args:
        sources: every source name this module may receive.
        dim: token width ``D`` (also ``out_dim``).
        heads: attention heads (must divide ``dim``).
        query: the query source (default: ``sources[0]``, the first name as given).
        key: key source name(s) (default: every other source, in the order given).
        value: value source name(s), pairwise with ``key`` (default: the key sources).
        depth: number of stacked layers.
        decoder: add query self-attention in each layer (a transformer decoder layer).
        num_fusion_tokens: always-present learned query tokens placed first.
        mlp_ratio, dropout: as :class:`attnfuse.nn.TransformerBlock`.
        op: the attention operator of every block: a registered name (``"dense"``) or a typed config
            (:class:`attnfuse.ops.OpConfig`) such as ``Dense(backend="reference")``; it must take
            cross-attention (``dense``, ``silu_kernel``, ``axial``). In YAML
            ``op: {class_path: Dense, init_args: {backend: reference}}``.
        type_embedding, missing_token, modality_dropout: as :class:`attnfuse.fusion.SourceEmbedding`.
        device, dtype: for the parameters.

    With one source and the default ``key``, there is nothing to attend to: the queries get a zero
    attention update (only the MLPs act).

    Raises:
        ValueError: names not among ``sources``, ``key``/``value`` of different lengths, query
            among the keys, ``depth < 1``; at call time, a key/value pair with different layouts.

    Shapes:
        inputs ``{name: TokenSet (B, *axes_i, D)}`` -> ``fused (B, F + N_query, D)``.

    Example:
        >>> fusion = CrossAttentionFusion(["audio", "text"], 32, heads=4, query="text", key="audio", value="text")
        >>> default = CrossAttentionFusion(["text", "audio", "video"], 32)  # query "text", keys audio + video
    """

    symmetry: ClassVar[str] = "equivariant"
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
        query: str | None = None,
        key: str | Sequence[str] | None = None,
        value: str | Sequence[str] | None = None,
        depth: int = 1,
        decoder: bool = False,
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
        names = list(sources)
        if query is not None and not isinstance(query, str):
            raise ValueError(f"query= names one source, got {query!r}")
        (query,) = role_names(query, "query", names, names[:1])
        if key is None and len(names) == 1:
            keys: tuple[str, ...] = ()
        else:
            keys = role_names(key, "key", names, [n for n in names if n != query])
        values = keys if value is None else role_names(value, "value", names, ())
        if len(values) != len(keys):
            raise ValueError(f"value must pair with key one to one, got key={keys}, value={values}")
        if query in keys:
            raise ValueError(f"query source {query!r} cannot also be a key source; use self-attention fusion")
        if missing_token and any(k != v for k, v in zip(keys, values)):
            raise ValueError(
                "missing_token=True is not supported when keys and values come from different sources "
                f"(key={keys}, value={values}): a missing token has no aligned partner; use missing_token=False"
            )
        if depth < 1 or num_fusion_tokens < 1:
            raise ValueError(f"depth and num_fusion_tokens must be >= 1, got {depth=}, {num_fusion_tokens=}")
        dd = {"device": device, "dtype": dtype}
        self.out_dim = dim
        self.query, self.keys, self.values = query, keys, values
        self.embed = SourceEmbedding(sources, dim, type_embedding=type_embedding, missing_token=missing_token,
                                     modality_dropout=modality_dropout, **dd)
        self.fusion_tokens = nn.Parameter(torch.randn(num_fusion_tokens, dim, **dd) * 0.02)
        self.layers = nn.ModuleList(
            TransformerBlock(dim, heads, mlp_ratio=mlp_ratio, dropout=dropout, op=op,
                             self_attention=decoder, cross_attention=True, **dd)
            for _ in range(depth)
        )

    @property
    def sources(self) -> tuple[str, ...]:
        return self.embed.sources

    def _memory(self, prepared: dict, batch: int, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ks, vs, ms = [], [], []
        for kname, vname in zip(self.keys, self.values):
            if kname not in prepared or vname not in prepared:
                continue  # an absent pair takes no part
            k, v = prepared[kname], prepared[vname]
            if k.x.shape[:2] != v.x.shape[:2]:
                raise ValueError(f"key source {kname!r} has {k.x.shape[1]} tokens but its value source {vname!r} has {v.x.shape[1]}")
            ks.append(k.x)
            vs.append(v.x)
            ms.append(k.mask & v.mask)
        if not ks:  # nothing to attend to: a single fully masked key gives a zero update
            empty = torch.zeros(batch, 1, like.shape[-1], dtype=like.dtype, device=like.device)
            return empty, empty, torch.zeros(batch, 1, dtype=torch.bool, device=like.device)
        return torch.cat(ks, dim=1), torch.cat(vs, dim=1), torch.cat(ms, dim=1)

    def forward(self, inputs: Mapping[str, TokenSet], *, return_weights: bool = False) -> FusionOutput:
        """Fuse; maps are keyed ``"cross.<i>"`` ``(B, H, F + Nq, S)`` and ``"self.<i>"``."""
        prepared = {s.name: s for s in self.embed(inputs)}
        ref = next(iter(self.embed.align(inputs).values())).x  # batch, device and the common dtype
        batch, n_fusion = ref.shape[0], self.fusion_tokens.shape[0]
        xs = [self.fusion_tokens.to(ref.dtype).expand(batch, -1, -1)]
        masks = [torch.ones(batch, n_fusion, dtype=torch.bool, device=ref.device)]
        layout = {"fusion": (0, n_fusion)}
        if self.query in prepared:
            q = prepared[self.query]
            xs.append(q.x)
            masks.append(q.mask)
            layout[self.query] = (n_fusion, n_fusion + q.x.shape[1])
        x, mask = torch.cat(xs, dim=1), torch.cat(masks, dim=1)  # (B, F + Nq, D), (B, F + Nq)
        k, v, kmask = self._memory(prepared, batch, ref)
        weights: dict[str, Tensor] = {}
        for i, layer in enumerate(self.layers):
            x = layer(x, mask=mask, context=k, context_mask=kmask, value=v, return_weights=return_weights)
            if return_weights:
                x, w = x
                weights.update({f"{kind}.{i}": m for kind, m in w.items()})
        per_source = {}
        if self.query in layout:
            a, b = layout[self.query]
            per_source[self.query] = TokenSet(x[:, a:b], mask[:, a:b])
        return FusionOutput(TokenSet(x, mask), per_source, weights, layout)

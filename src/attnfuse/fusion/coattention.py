"""Co-attention: two cross-attentions with the roles swapped (a attends b, b attends a), then a merge.

Papers: ST-Align (arXiv, November 2024; released example code ``dumbgoos/ST-Align``,
``model/stalign.py``) — the attention-based fusion network ABFN; BioFusionNet (Mondol et al., IEEE
JBHI 2024; ``raktim-mondol/BioFusionNet``, ``co_dual_cross_attention.py``) — co-attention and the
first stage of its dual cross-attention. Status: ABFN exact (``merge="concat_ffn"``) up to the
key-padding masks; BioFusionNet's co-attention up to the output projection that every
:class:`attnfuse.nn.Attention` has (see ``docs/fusion-modules.md``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from attnfuse.fusion._registry import register_fusion
from attnfuse.fusion.sources import FusionOutput, SourceEmbedding
from attnfuse.nn import Attention
from attnfuse.tokens import TokenSet, zero_invalid

__all__ = ["CoAttention"]

MERGES = ("concat_ffn", "concat", "tokens")



@register_fusion("coattention")
class CoAttention(nn.Module):
    """``F_a = CA(Q = a, KV = b)``, ``F_b = CA(Q = b, KV = a)``, merged.

    Each cross-attention has its own parameters, optional pre-LayerNorms on the query and on the
    key/value tokens (ST-Align), and no residual unless ``residual=True`` (then ``F_a = a + CA``).
    Merges:

    * ``"concat_ffn"`` (ST-Align ABFN): ``fused = LN([FFN_a(F_a) ; FFN_b(F_b)])``, channel
      concatenation of token ``i`` of ``a`` with token ``i`` of ``b`` (equal token counts), each FFN
      ``Linear(D, ffn_hidden) -> GELU -> Linear(ffn_hidden, ffn_out)``; output width ``2 * ffn_out``;
    * ``"concat"`` (BioFusionNet): ``fused = [F_a ; F_b]`` on channels, width ``2 D``;
    * ``"tokens"``: ``fused = [F_a ; F_b]`` on the token axis, width ``D`` (no pairing needed; chain
      a second :class:`CoAttention` on ``per_source`` for BioFusionNet's dual cross-attention).

    Missing inputs: a token that is padding, or a source absent / fully masked, contributes zeros to
    the merge (its FFN output is zeroed, not ``FFN(0)``); ``CA`` over an absent source is exactly 0.
    The fused mask is ``mask_a | mask_b`` for the channel merges and the concatenation for
    ``"tokens"``; invalid fused tokens are zero.

    Args:
        a, b: the two source names.
        dim: token width ``D`` of both sources.
        heads: attention heads.
        merge: ``"concat_ffn"``, ``"concat"`` or ``"tokens"``.
        head_dim: per-head width (default ``D // heads``; ST-Align: 64).
        scale: score scale (None: ``1/sqrt(head_dim)``; BioFusionNet's co-attention: 1.0).
        qkv_bias: bias in the q/k/v projections (ST-Align and BioFusionNet: False).
        pre_norm: LayerNorm on the query and on the key/value tokens before each cross-attention.
        residual: add the query tokens to each cross-attention output.
        ffn_hidden, ffn_out: widths of the ``"concat_ffn"`` FFNs (default ``D // 8`` and ``D // 2``).
        dropout: attention-output dropout.
        op, op_options: attention operator and its options (e.g. ``{"backend": "reference"}``).
        modality_dropout: as :class:`attnfuse.fusion.SourceEmbedding`.
        device, dtype: for the parameters.

    Raises:
        ValueError: equal or empty names, unknown ``merge``; at call time, a channel merge of
            sources with different token counts.

    Shapes:
        inputs ``{a: TokenSet (B, *axes_a, D), b: TokenSet (B, *axes_b, D)}`` (flattened to
        ``N_a``, ``N_b`` tokens) -> ``fused (B, N, 2 ffn_out)`` / ``(B, N, 2 D)`` with ``N = N_a = N_b``,
        or ``(B, N_a + N_b, D)`` for ``"tokens"``; ``per_source[a] = F_a (B, N_a, D)``; weights
        ``"cross.<a>" (B, H, N_a, N_b)`` (a's queries over b) and ``"cross.<b>"``.

    Example:
        >>> abfn = CoAttention("image", "gene", 64, heads=4, head_dim=16, qkv_bias=False)
        >>> out = abfn({"image": TokenSet(torch.randn(2, 8, 64)), "gene": TokenSet(torch.randn(2, 8, 64))})
        >>> out.fused.x.shape
        torch.Size([2, 8, 64])
    """

    symmetry: ClassVar[str] = "equivariant"
    has_parameters: ClassVar[bool] = True

    def __init__(
        self,
        a: str,
        b: str,
        dim: int,
        *,
        heads: int,
        merge: Literal["concat_ffn", "concat", "tokens"] = "concat_ffn",
        head_dim: int | None = None,
        scale: float | None = None,
        qkv_bias: bool = True,
        pre_norm: bool = True,
        residual: bool = False,
        ffn_hidden: int | None = None,
        ffn_out: int | None = None,
        dropout: float = 0.0,
        op: str = "dense",
        op_options: Mapping | None = None,
        modality_dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if a == b:
            raise ValueError(f"CoAttention needs two different sources, got a={a!r}, b={b!r}")
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        dd = {"device": device, "dtype": dtype}
        opts = dict(op_options or {})
        if scale is not None:
            opts["scale"] = scale
        self.a, self.b, self.merge, self.residual = a, b, merge, residual
        self.embed = SourceEmbedding([a, b], dim, type_embedding=None, modality_dropout=modality_dropout, **dd)

        def attention() -> Attention:
            return Attention(dim, heads, op=op, head_dim=head_dim, qkv_bias=qkv_bias, dropout=dropout, **dd, **opts)

        def norm() -> nn.Module:
            return nn.LayerNorm(dim, **dd) if pre_norm else nn.Identity()

        # role "a": a's tokens query b; role "b": b's tokens query a (keys by role, not by source name)
        self.cross_a, self.cross_b = attention(), attention()
        self.norm_q_a, self.norm_kv_a, self.norm_q_b, self.norm_kv_b = norm(), norm(), norm(), norm()
        self.ffn_a = self.ffn_b = self.norm_out = None
        if merge == "concat_ffn":
            hidden = max(1, dim // 8) if ffn_hidden is None else ffn_hidden
            out = max(1, dim // 2) if ffn_out is None else ffn_out

            def ffn() -> nn.Sequential:
                return nn.Sequential(nn.Linear(dim, hidden, **dd), nn.GELU(), nn.Linear(hidden, out, **dd))

            self.ffn_a, self.ffn_b = ffn(), ffn()
            self.norm_out = nn.LayerNorm(2 * out, **dd)

    @property
    def sources(self) -> tuple[str, ...]:
        return self.embed.sources

    def _stream(self, role: str, q, kv, return_weights: bool) -> tuple[Tensor, Tensor | None]:
        """``F`` for one role: ``(B, Nq, D)`` (zero where the query token is invalid) and its map."""
        cross, norm_q, norm_kv = (
            (self.cross_a, self.norm_q_a, self.norm_kv_a) if role == "a" else (self.cross_b, self.norm_q_b, self.norm_kv_b)
        )
        if kv is None:  # nothing to attend to: the attention update is exactly zero
            h, w = torch.zeros_like(q.x), None
        else:
            h = cross(norm_q(q.x), context=norm_kv(kv.x), context_mask=kv.mask, return_weights=return_weights)
            h, w = h if return_weights else (h, None)
        if self.residual:
            h = q.x + h
        return zero_invalid(h, q.mask), w

    def forward(self, inputs: Mapping[str, TokenSet], *, return_weights: bool = False) -> FusionOutput:
        """Fuse ``{a, b}``; see the class docstring. Maps are keyed ``"cross.<query source>"``."""
        prepared = {s.name: s for s in self.embed(inputs)}
        pa, pb = prepared.get(self.a), prepared.get(self.b)
        streams: dict[str, tuple[Tensor, Tensor]] = {}
        weights: dict[str, Tensor] = {}
        for role, name, q, kv in (("a", self.a, pa, pb), ("b", self.b, pb, pa)):
            if q is None:
                continue
            h, w = self._stream(role, q, kv, return_weights)
            streams[name] = (h, q.mask)
            if w is not None:
                weights[f"cross.{name}"] = w
        per_source = {name: TokenSet(h, m) for name, (h, m) in streams.items()}
        if self.merge == "tokens":
            names = [n for n in (self.a, self.b) if n in streams]
            layout, start = {}, 0
            for n in names:
                layout[n] = (start, start + streams[n][0].shape[1])
                start = layout[n][1]
            x = torch.cat([streams[n][0] for n in names], dim=1)  # (B, N_a + N_b, D)
            mask = torch.cat([streams[n][1] for n in names], dim=1)
            return FusionOutput(TokenSet(x, mask), per_source, weights, layout)
        counts = {n: h.shape[1] for n, (h, _) in streams.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(
                f"merge={self.merge!r} pairs token i of {self.a!r} with token i of {self.b!r} and needs equal token counts, "
                f"got {counts}; use merge='tokens' or pool first"
            )
        ref_h, ref_m = next(iter(streams.values()))
        halves, mask = [], torch.zeros_like(ref_m)
        for role, name in (("a", self.a), ("b", self.b)):
            if name in streams:
                h, m = streams[name]
                if self.merge == "concat_ffn":
                    h = zero_invalid((self.ffn_a if role == "a" else self.ffn_b)(h), m)
                mask = mask | m
            else:
                width = ref_h.shape[-1] if self.merge == "concat" else self.ffn_a[-1].out_features
                h = ref_h.new_zeros(*ref_h.shape[:-1], width)
            halves.append(h)
        x = torch.cat(halves, dim=-1)  # (B, N, 2 * width)
        if self.norm_out is not None:
            x = self.norm_out(x)
        x = zero_invalid(x, mask)
        n = ref_h.shape[1]
        layout = {name: (0, n) for name in streams}
        return FusionOutput(TokenSet(x, mask), per_source, weights, layout)

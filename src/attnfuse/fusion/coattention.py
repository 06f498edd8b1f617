"""Co-attention: two cross-attentions with the roles swapped (a attends b, b attends a), then a merge.

Papers: ST-Align (arXiv, November 2024; released example code ``dumbgoos/ST-Align``,
``model/stalign.py``) — the attention-based fusion network ABFN; BioFusionNet (Mondol et al., IEEE
JBHI 2024; ``raktim-mondol/BioFusionNet``, ``co_dual_cross_attention.py``) — co-attention and the
first stage of its dual cross-attention. Status: ABFN exact (``merge="concat_ffn"``) up to the
key-padding masks; BioFusionNet's co-attention up to the output projection that every
:class:`attnfuse.nn.Attention` has (see ``docs/fusion-modules.md``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from attnfuse.fusion._registry import register_fusion
from attnfuse.fusion.sources import FusionOutput, PreparedSource, SourceEmbedding, concat_sources, role_names
from attnfuse.nn import Attention
from attnfuse.ops import OpConfig, op_config
from attnfuse.tokens import TokenSet, zero_invalid

__all__ = ["CoAttention"]

MERGES = ("concat_ffn", "concat", "tokens")


@register_fusion("coattention")
class CoAttention(nn.Module):
    """``F_a = CA(Q = a, KV = b)``, ``F_b = CA(Q = b, KV = a)``, merged.

    Role ``a`` is one source; role ``b`` is one or more sources whose tokens are concatenated (in
    sorted name order, masks kept) into one key/value set for ``a`` and one query set that attends
    ``a`` (each ``b`` source's queries see only ``a``; ``per_source`` and the maps are split back per
    source). With the defaults ``a = sources[0]`` and ``b`` = every other source, so any number
    (``>= 2``) of sources works.

    Each cross-attention has its own parameters, optional pre-LayerNorms on the query and on the
    key/value tokens (ST-Align), and no residual unless ``residual=True`` (then ``F_a = a + CA``).
    Merges:

    * ``"tokens"`` (default): ``fused = [F_a ; F_b]`` on the token axis, width ``D`` (no pairing
      needed; chain a second :class:`CoAttention` on ``per_source`` for BioFusionNet's dual
      cross-attention);
    * ``"concat_ffn"`` (ST-Align ABFN): ``fused = LN([FFN_a(F_a) ; FFN_b(F_b)])``, channel
      concatenation of token ``i`` of ``a`` with token ``i`` of ``b`` (equal token counts, one ``b``
      source), each FFN ``Linear(D, ffn_hidden) -> GELU -> Linear(ffn_hidden, ffn_out)``; output width
      ``2 * ffn_out``;
    * ``"concat"`` (BioFusionNet): ``fused = [F_a ; F_b]`` on channels, width ``2 D`` (one ``b`` source).

    Missing inputs: a token that is padding, or a source absent / fully masked, contributes zeros to
    the merge (its FFN output is zeroed, not ``FFN(0)``); ``CA`` over an absent source is exactly 0.
    The fused mask is ``mask_a | mask_b`` for the channel merges and the concatenation for
    ``"tokens"``; invalid fused tokens are zero.

    Args:
        sources: the source names (at least two; every one takes part, as ``a`` or in ``b``).
        dim: token width ``D`` of every source.
        a: the source of role ``a`` (default ``sources[0]``, the first name as given).
        b: the source(s) of role ``b`` (default: every source other than ``a``).
        heads: attention heads (``heads * head_dim`` inner width).
        merge: ``"tokens"``, ``"concat_ffn"`` or ``"concat"``.
        head_dim: per-head width (default ``D // heads``; ST-Align: 64).
        scale: score scale (None: ``1/sqrt(head_dim)``; BioFusionNet's co-attention: 1.0).
        qkv_bias: bias in the q/k/v projections (ST-Align and BioFusionNet: False).
        pre_norm: LayerNorm on the query and on the key/value tokens before each cross-attention.
        residual: add the query tokens to each cross-attention output.
        ffn_hidden, ffn_out: widths of the ``"concat_ffn"`` FFNs (default ``D // 8`` and ``D // 2``).
        dropout: attention-output dropout.
        op: the attention operator of both cross-attentions: a registered name (``"dense"``) or a typed config
            (:class:`attnfuse.ops.OpConfig`) such as ``Dense(backend="reference")``; it must take
            cross-attention (``dense``, ``silu_kernel``, ``axial``). In YAML
            ``op: {class_path: Dense, init_args: {backend: reference}}``. With ``scale`` given, the config's ``scale`` field is replaced.
        modality_dropout: as :class:`attnfuse.fusion.SourceEmbedding`.
        device, dtype: for the parameters.

    Raises:
        ValueError: fewer than two sources, ``a`` in ``b``, a source in neither role, unknown
            ``merge``, a channel merge with several ``b`` sources; at call time, a channel merge of
            sources with different token counts.

    Shapes:
        inputs ``{a: TokenSet (B, *axes_a, D), b_j: TokenSet (B, *axes_j, D)}`` (flattened to ``N_a``,
        ``N_j`` tokens; ``N_b = sum_j N_j``) -> ``fused (B, N_a + N_b, D)`` for ``"tokens"``, or
        ``(B, N, 2 ffn_out)`` / ``(B, N, 2 D)`` with ``N = N_a = N_b``; ``out_dim`` is that width;
        ``per_source[a] = F_a (B, N_a, D)``, ``per_source[b_j] (B, N_j, D)``; weights
        ``"cross.<a>" (B, H, N_a, N_b)`` (a's queries over b) and ``"cross.<b_j>" (B, H, N_j, N_a)``.

    Example:
        >>> abfn = CoAttention(["image", "gene"], 64, heads=4, head_dim=16, qkv_bias=False, merge="concat_ffn")
        >>> out = abfn({"image": TokenSet(torch.randn(2, 8, 64)), "gene": TokenSet(torch.randn(2, 8, 64))})
        >>> out.fused.x.shape
        torch.Size([2, 8, 64])
        >>> table = CoAttention(["age", "labs", "notes"], 32)  # a = "age", b = labs + notes, merge="tokens"
    """

    symmetry: ClassVar[str] = "equivariant"
    has_parameters: ClassVar[bool] = True
    output: ClassVar[str] = "tokens"

    def __init__(
        self,
        sources: Sequence[str],
        dim: int,
        *,
        a: str | None = None,
        b: str | Sequence[str] | None = None,
        heads: int = 4,
        merge: Literal["tokens", "concat_ffn", "concat"] = "tokens",
        head_dim: int | None = None,
        scale: float | None = None,
        qkv_bias: bool = True,
        pre_norm: bool = True,
        residual: bool = False,
        ffn_hidden: int | None = None,
        ffn_out: int | None = None,
        dropout: float = 0.0,
        op: str | OpConfig = "dense",
        modality_dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.embed = SourceEmbedding(sources, dim, type_embedding=None, modality_dropout=modality_dropout, **dd)
        names = list(sources)
        if len(names) < 2:
            raise ValueError(f"CoAttention needs at least two sources (roles a and b), got sources={names}")
        if a is not None and not isinstance(a, str):
            raise ValueError(f"a= names one source, got {a!r}")
        (a,) = role_names(a, "a", names, names[:1])
        b_names = role_names(b, "b", names, [n for n in names if n != a])
        if a in b_names:
            raise ValueError(f"CoAttention needs two different sources for a and b, got a={a!r}, b={list(b_names)}")
        unused = [n for n in names if n != a and n not in b_names]
        if unused:
            raise ValueError(f"sources {unused} take no part: add them to b= or leave them out of sources")
        if merge not in MERGES:
            raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")
        if merge != "tokens" and len(b_names) > 1:
            raise ValueError(f"merge={merge!r} pairs token i of a with token i of b and needs a single b source, "
                             f"got b={list(b_names)}; use merge='tokens'")
        if scale is not None:
            op = op_config(op, scale=scale)
        self.a, self.b, self.merge, self.residual = a, tuple(sorted(b_names)), merge, residual

        def attention() -> Attention:
            return Attention(dim, heads, op=op, head_dim=head_dim, qkv_bias=qkv_bias, dropout=dropout, **dd)

        def norm() -> nn.Module:
            return nn.LayerNorm(dim, **dd) if pre_norm else nn.Identity()

        # role "a": a's tokens query b; role "b": b's tokens query a (keys by role, not by source name)
        self.cross_a, self.cross_b = attention(), attention()
        self.norm_q_a, self.norm_kv_a, self.norm_q_b, self.norm_kv_b = norm(), norm(), norm(), norm()
        self.ffn_a = self.ffn_b = self.norm_out = None
        self.out_dim = 2 * dim if merge == "concat" else dim
        if merge == "concat_ffn":
            hidden = max(1, dim // 8) if ffn_hidden is None else ffn_hidden
            out = max(1, dim // 2) if ffn_out is None else ffn_out

            def ffn() -> nn.Sequential:
                return nn.Sequential(nn.Linear(dim, hidden, **dd), nn.GELU(), nn.Linear(hidden, out, **dd))

            self.ffn_a, self.ffn_b = ffn(), ffn()
            self.norm_out = nn.LayerNorm(2 * out, **dd)
            self.out_dim = 2 * out

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
        """Fuse ``a`` with ``b``; see the class docstring. Maps are keyed ``"cross.<query source>"``."""
        prepared = {s.name: s for s in self.embed(inputs)}
        pa = prepared.get(self.a)
        present_b = [prepared[n] for n in self.b if n in prepared]
        pb, b_layout = None, {}
        if present_b:
            xb, mb, b_layout = concat_sources(present_b)  # (B, N_b, D): every b source, sorted
            pb = PreparedSource("b", xb, mb)
        streams: dict[str, tuple[Tensor, Tensor]] = {}
        weights: dict[str, Tensor] = {}
        if pa is not None:
            h, w = self._stream("a", pa, pb, return_weights)
            streams[self.a] = (h, pa.mask)
            if w is not None:
                weights[f"cross.{self.a}"] = w
        if pb is not None:
            h, w = self._stream("b", pb, pa, return_weights)
            for name, (start, stop) in b_layout.items():
                streams[name] = (h[:, start:stop], pb.mask[:, start:stop])
                if w is not None:
                    weights[f"cross.{name}"] = w[:, :, start:stop]
        per_source = {name: TokenSet(h, m) for name, (h, m) in streams.items()}
        if self.merge == "tokens":
            names = [n for n in (self.a, *self.b) if n in streams]
            layout, start = {}, 0
            for n in names:
                layout[n] = (start, start + streams[n][0].shape[1])
                start = layout[n][1]
            x = torch.cat([streams[n][0] for n in names], dim=1)  # (B, N_a + N_b, D)
            mask = torch.cat([streams[n][1] for n in names], dim=1)
            return FusionOutput(TokenSet(x, mask), per_source, weights, layout)
        (b_name,) = self.b
        counts = {n: h.shape[1] for n, (h, _) in streams.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(
                f"merge={self.merge!r} pairs token i of {self.a!r} with token i of {b_name!r} and needs equal token counts, "
                f"got {counts}; use merge='tokens' or pool first"
            )
        ref_h, ref_m = next(iter(streams.values()))
        halves, mask = [], torch.zeros_like(ref_m)
        for role, name in (("a", self.a), ("b", b_name)):
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

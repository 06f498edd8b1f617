"""Mutual attention between two dense feature maps: position and channel mutual fusion with a gate hook.

Papers: GL-DMNet (Yi et al., "Dual Mutual Learning Network with Global-local Awareness for RGB-D
Salient Object Detection", arXiv 2501.01648) — position and channel mutual fusion; MEFN (Qi, Lin et
al., arXiv 2406.18327) — the dual/mutual-attention feature calibration (DFC) with an uncertainty
calibrator. Status: **reconstruction** — neither paper has released model code; the equations follow
DANet's position/channel attention (Fu et al., CVPR 2019) with the affinity of the *other*
modality (S²MA-style mutual attention), and the calibrator's form is unverified (a pluggable gate).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from attnfuse.fusion._registry import register_fusion
from attnfuse.fusion.sources import FusionOutput, PreparedSource, SourceEmbedding, concat_sources, role_names
from attnfuse.ops import dense_attention
from attnfuse.tokens import TokenSet, zero_invalid

__all__ = ["MutualAttention", "feature_map", "feature_map_tokens"]


def feature_map_tokens(x: Tensor, mask: Tensor | None = None) -> TokenSet:
    """A ``(B, C, H, W)`` feature map as a channels-last TokenSet with axes ``("h", "w")``.

    Shapes: ``x (B, C, H, W)``, ``mask (B, H, W)`` -> ``TokenSet x (B, H, W, C)``.
    """
    if x.dim() != 4:
        raise ValueError(f"feature map must be (B, C, H, W), got x.shape={tuple(x.shape)}")
    return TokenSet(x.permute(0, 2, 3, 1), mask, axes=("h", "w"))


def feature_map(tokens: TokenSet) -> Tensor:
    """Back to ``(B, C, H, W)`` from a TokenSet ``(B, H, W, C)`` (invalid positions as stored)."""
    if tokens.x.dim() != 4:
        raise ValueError(f"expected a TokenSet with two token axes (B, H, W, C), got x.shape={tuple(tokens.x.shape)}")
    return tokens.x.permute(0, 3, 1, 2)


def _gate_column(g: Tensor, grid: tuple[int, ...], name: str) -> Tensor:
    """A gate broadcastable to ``(B, *grid)`` (or ``(B, *grid, 1)``) as ``(B, N, 1)``."""
    if g.dim() == len(grid) + 2 and g.shape[-1] == 1:
        g = g.squeeze(-1)
    while g.dim() < len(grid) + 1:
        g = g.unsqueeze(-1)
    try:
        g = torch.broadcast_to(g, (g.shape[0], *grid))
    except RuntimeError:
        raise ValueError(f"gate of {name!r} must broadcast to (B, {', '.join(map(str, grid))}), got shape {tuple(g.shape)}") from None
    return g.reshape(g.shape[0], math.prod(grid), 1)  # (B, N, 1)


@register_fusion("mutual")
class MutualAttention(nn.Module):
    """Each of two maps (or token sets) is updated with attention computed from the other one.

    With ``X_a, X_b`` the two maps as ``(N, C)`` token matrices, ``Q_m = X_m W_q^m``,
    ``K_m = X_m W_k^m`` (``C -> max(1, C // reduction)``) and ``V_m = X_m W_v^m`` (``C -> C``)::

        position (form="cross"):          P_a = softmax(s Q_a K_b^T) V_b        # a queries b (default)
        position (form="affinity_swap"):  P_a = softmax(s Q_b K_b^T) V_a        # a's values, b's affinity
        X'_a  = X_a  + gamma_a * g_b * P_a                                       # gamma zero-init
        channel:                          B_b = softmax(s_c X_b^T X_b)   (C x C) # "danet": softmax(-s_c X_b^T X_b)
        X''_a = X'_a + beta_a  * g_b * (X'_a B_b^T)                              # beta zero-init

    and symmetrically for ``b``. Role ``a`` is one source; role ``b`` is one or more sources whose
    tokens are concatenated (sorted names, masks kept) into ``X_b``; each ``b`` source's tokens
    receive messages from ``a`` only. With the defaults (``a = sources[0]``, ``b`` = the others,
    ``form="cross"``, ``merge="tokens"``) any number (``>= 2``) of sources with any token counts works.
    GL-DMNet's two dense maps on one grid: ``form="affinity_swap", merge="sum"`` (one ``b`` source).

    ``g_b`` is the gate on messages *from* ``b`` (1 without a gate): the uncertainty re-weighting hook
    (MEFN's calibrator, form unverified), e.g. ``1 - u_b`` from an evidential head, applied at the
    receiving position (so a per-position gate needs both maps on one grid; a per-sample gate always
    works). A gate of 0 makes ``X''_a = X_a`` (as if ``b`` were absent). Gates need a single ``b``
    source.

    Masks: for ``"cross"`` the keys are the other map's valid positions and a message reaches every
    valid position of the receiving map; for ``"affinity_swap"`` positions valid in both maps are the
    keys and a position message reaches only those; a channel message reaches every valid position of
    the receiving map; an absent or fully masked map sends no message (identity for the other one) and
    has no output; invalid positions output zeros.

    Args:
        sources: the source names (at least two; every one takes part, as ``a`` or in ``b``).
        dim: channel width ``C`` of every source.
        a: the source of role ``a`` (default ``sources[0]``, the first name as given).
        b: the source(s) of role ``b`` (default: every source other than ``a``).
        form: ``"cross"`` (default) or ``"affinity_swap"`` (GL-DMNet reconstruction; needs ``a`` and
            ``b`` on one grid).
        position, channel: include the position / channel mutual fusion.
        reduction: ``max(1, C // reduction)`` is the query/key width (DANet: 8).
        scale: position score scale (DANet: 1.0, no scaling; None: ``1/sqrt(query/key width)``).
        channel_scale: channel score scale ``s_c``.
        channel_energy: ``"similarity"`` (spec: ``softmax(X^T X)``) or ``"danet"`` (DANet's
            ``softmax(max - X^T X)``, i.e. ``softmax(-X^T X)``).
        merge: fused output: ``"tokens"`` (every updated source's tokens concatenated, width ``C``),
            ``"sum"`` of the updated maps, or ``"concat"`` on channels (width ``C * len(sources)``,
            zeros for a missing source); ``"sum"`` and ``"concat"`` need every map on one grid.
        gate: optional callable ``gate(x (B, *grid, C), mask (B, *grid)) -> (B, *grid)`` giving each
            map's message weight; a module is registered (its parameters train with this one).
        device, dtype: for the parameters.

    Raises:
        ValueError: fewer than two sources, ``a`` in ``b``, a source in neither role, unknown options,
            a gate with several ``b`` sources; at call time, maps on different grids where the form,
            the merge or a per-position gate needs one grid.

    Shapes:
        inputs ``{name: TokenSet (B, *grid_m, C)}`` -> ``per_source[m] (B, *grid_m, C)``; ``fused``
        ``(B, sum_m N_m, C)`` (``"tokens"``), ``(B, *grid, C)`` (``"sum"``) or ``(B, *grid, C * n)``
        (``"concat"``), mask: the concatenation / ``OR`` of the masks; weights ``"position.<m>"
        (B, 1, N_m, N_other)``, ``"channel.<m>" (B, 1, C, C)``.

    Example:
        >>> fuse = MutualAttention(["rgb", "depth"], 32, form="affinity_swap", merge="sum")
        >>> rgb, depth = feature_map_tokens(torch.randn(2, 32, 8, 8)), feature_map_tokens(torch.randn(2, 32, 8, 8))
        >>> fuse({"rgb": rgb, "depth": depth}).per_source["rgb"].x.shape
        torch.Size([2, 8, 8, 32])
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
        form: Literal["cross", "affinity_swap"] = "cross",
        position: bool = True,
        channel: bool = True,
        reduction: int = 8,
        scale: float | None = 1.0,
        channel_scale: float = 1.0,
        channel_energy: Literal["similarity", "danet"] = "similarity",
        merge: Literal["tokens", "sum", "concat"] = "tokens",
        gate: Callable[[Tensor, Tensor], Tensor] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.embed = SourceEmbedding(sources, dim, type_embedding=None, **dd)
        names = list(sources)
        if len(names) < 2:
            raise ValueError(f"MutualAttention needs at least two sources (roles a and b), got sources={names}")
        if a is not None and not isinstance(a, str):
            raise ValueError(f"a= names one source, got {a!r}")
        (a,) = role_names(a, "a", names, names[:1])
        b_names = role_names(b, "b", names, [n for n in names if n != a])
        if a in b_names:
            raise ValueError(f"MutualAttention needs two different sources for a and b, got a={a!r}, b={list(b_names)}")
        unused = [n for n in names if n != a and n not in b_names]
        if unused:
            raise ValueError(f"sources {unused} take no part: add them to b= or leave them out of sources")
        if form not in ("affinity_swap", "cross"):
            raise ValueError(f"form must be 'cross' or 'affinity_swap', got {form!r}")
        if channel_energy not in ("similarity", "danet"):
            raise ValueError(f"channel_energy must be 'similarity' or 'danet', got {channel_energy!r}")
        if merge not in ("tokens", "sum", "concat"):
            raise ValueError(f"merge must be 'tokens', 'sum' or 'concat', got {merge!r}")
        if not (position or channel):
            raise ValueError("MutualAttention needs position=True or channel=True (or both)")
        if reduction < 1:
            raise ValueError(f"reduction must be >= 1, got {reduction}")
        if gate is not None and len(b_names) > 1:
            raise ValueError(f"gate= weights the messages of one map at the positions of the other and needs a single b "
                             f"source, got b={list(b_names)}")
        self.a, self.b, self.form, self.merge = a, tuple(sorted(b_names)), form, merge
        self.scale, self.channel_scale, self.channel_energy = scale, channel_scale, channel_energy
        self.gate = gate
        self.out_dim = dim * len(names) if merge == "concat" else dim
        inner = max(1, dim // reduction)
        # per role ("a", "b"), so swapping the sources together with the parameter sets swaps the outputs
        self.to_q = nn.ModuleDict({r: nn.Linear(dim, inner, **dd) for r in "ab"}) if position else None
        self.to_k = nn.ModuleDict({r: nn.Linear(dim, inner, **dd) for r in "ab"}) if position else None
        self.to_v = nn.ModuleDict({r: nn.Linear(dim, dim, **dd) for r in "ab"}) if position else None
        self.gamma = nn.Parameter(torch.zeros(2, **dd)) if position else None
        self.beta = nn.Parameter(torch.zeros(2, **dd)) if channel else None

    @property
    def sources(self) -> tuple[str, ...]:
        return self.embed.sources

    def _position(self, r: int, own, other, message_ok: Tensor, return_weights: bool):
        role, other_role = "ab"[r], "ab"[1 - r]
        if self.form == "affinity_swap":
            key_ok = own.mask & other.mask  # (B, N): keys valid in both maps
            q = self.to_q[other_role](other.x)  # (B, N, C/r): the other map's affinity ...
            k = self.to_k[other_role](other.x)
            v = self.to_v[role](own.x)  # ... propagates this map's values
        else:
            q = self.to_q[role](own.x)  # this map queries the other one
            k = self.to_k[other_role](other.x)
            v = self.to_v[other_role](other.x)
            key_ok = other.mask  # (B, N_other)
        res = dense_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), key_mask=key_ok, scale=self.scale,
                              return_weights=return_weights)  # (B, 1, N, C)
        out, w = res if return_weights else (res, None)
        return out.squeeze(1) * message_ok, w

    def _channel(self, x: Tensor, other: Tensor, return_weights: bool):
        keys = other.transpose(1, 2).unsqueeze(1)  # (B, 1, C, N_other): channels as tokens, positions as features
        queries = -keys if self.channel_energy == "danet" else keys
        values = x.transpose(1, 2).unsqueeze(1)  # (B, 1, C, N)
        res = dense_attention(queries, keys, values, scale=self.channel_scale, return_weights=return_weights)
        out, w = res if return_weights else (res, None)
        return out.squeeze(1).transpose(1, 2), w  # (B, N, C)

    def _message_gate(self, name: str, src, inputs: Mapping[str, TokenSet], gates: Mapping[str, Tensor] | None) -> Tensor:
        """``(B, N_src or 1, 1)``: weight of the messages sent by ``name`` (0 where it is missing)."""
        present = src.mask.any(dim=1).to(src.x.dtype)[:, None, None]  # (B, 1, 1)
        g = None
        if gates is not None and name in gates:
            g = gates[name]
        elif self.gate is not None:
            grid = tuple(inputs[name].x.shape[1:-1])
            g = self.gate(src.x.reshape(src.x.shape[0], *grid, src.x.shape[-1]), src.mask.reshape(src.mask.shape[0], *grid))
        if g is None:
            return present
        return present * _gate_column(g.to(present.dtype), tuple(inputs[name].x.shape[1:-1]), name)

    def forward(
        self, inputs: Mapping[str, TokenSet], *, gates: Mapping[str, Tensor] | None = None, return_weights: bool = False
    ) -> FusionOutput:
        """Fuse ``a`` with ``b``; ``gates`` (by source name, broadcastable to ``(B, *grid)``) override ``gate``."""
        inputs = self.embed.align(inputs)  # validated, one dtype
        grids = {n: tuple(ts.x.shape[1:-1]) for n, ts in inputs.items()}
        if self.merge != "tokens" and len(set(grids.values())) > 1:
            raise ValueError(f"merge={self.merge!r} needs every map on one grid, got {grids}; use merge='tokens'")
        if gates is not None and len(self.b) > 1 and any(n in gates for n in self.b):
            raise ValueError(f"gates on the messages of b need a single b source, got b={list(self.b)}")
        prepared = {s.name: s for s in self.embed(inputs)}
        present_b = [prepared[n] for n in self.b if n in prepared]
        streams, b_layout = {}, {}
        if self.a in prepared:
            streams["a"] = prepared[self.a]
        if present_b:
            xb, mb, b_layout = concat_sources(present_b)  # (B, N_b, C): every b source, sorted
            streams["b"] = PreparedSource("b", xb, mb)
        if self.form == "affinity_swap" and len(streams) == 2 and streams["a"].x.shape[1] != streams["b"].x.shape[1]:
            raise ValueError(f"form='affinity_swap' propagates a's values with b's affinity over the same positions and "
                             f"needs a and b on one grid (one b source), got {grids}; use form='cross'")
        msg_gate = {}
        for role, src in streams.items():
            name = self.a if role == "a" else self.b[0]
            msg_gate[role] = self._message_gate(name, src, inputs, gates)
        updated, weights = {}, {}
        for r, role in enumerate("ab"):
            if role not in streams:
                continue
            own = streams[role]
            x = own.x
            other_role = "ab"[1 - r]
            if other_role in streams:
                other = streams[other_role]
                g = msg_gate[other_role]  # (B, N_other or 1, 1): messages from the other map
                if g.shape[1] not in (1, x.shape[1]):
                    sender = self.a if other_role == "a" else self.b[0]
                    raise ValueError(f"the gate on messages from {sender!r} has {g.shape[1]} positions but the receiving "
                                     f"map has {x.shape[1]}: give a per-sample gate (B,) or maps on one grid")
                if self.gamma is not None:
                    ok = (own.mask if self.form == "cross" else own.mask & other.mask).unsqueeze(-1).to(x.dtype)
                    p, w = self._position(r, own, other, ok, return_weights)
                    x = x + self.gamma[r] * g * p
                    if w is not None:
                        weights[f"position.{role}"] = w
                if self.beta is not None:
                    c, w = self._channel(x, other.x, return_weights)
                    x = x + self.beta[r] * g * c
                    if w is not None:
                        weights[f"channel.{role}"] = w
            updated[role] = zero_invalid(x, own.mask)
        per_source, maps = {}, {}
        pieces = {self.a: (updated.get("a"), streams.get("a"), "a", (0, None))}
        pieces.update({n: (updated.get("b"), streams.get("b"), "b", span) for n, span in b_layout.items()})
        for name in (self.a, *self.b):
            x, src, role, (start, stop) = pieces.get(name, (None, None, None, (0, None)))
            if x is None:
                continue
            x, mask = x[:, start:stop], src.mask[:, start:stop]
            batch, grid = x.shape[0], grids[name]
            per_source[name] = TokenSet(x.reshape(batch, *grid, x.shape[-1]), mask.reshape(batch, *grid), inputs[name].axes)
            for kind in ("position", "channel"):
                w = weights.get(f"{kind}.{role}")
                if w is not None:
                    maps[f"{kind}.{name}"] = w[:, :, start:stop] if kind == "position" else w
        fused, layout = self._merge(per_source)
        return FusionOutput(fused, per_source, maps, layout)

    def _merge(self, per_source: dict[str, TokenSet]) -> tuple[TokenSet, dict[str, tuple[int, int]]]:
        """``(fused, layout)`` from the updated sources (see ``merge``)."""
        names = [n for n in (self.a, *self.b) if n in per_source]
        outs = [per_source[n] for n in names]
        if self.merge == "tokens":
            flat = [o.flatten() for o in outs]
            layout, start = {}, 0
            for n, f in zip(names, flat):
                layout[n] = (start, start + f.x.shape[1])
                start = layout[n][1]
            fused = TokenSet(torch.cat([f.x for f in flat], dim=1), torch.cat([f.valid() for f in flat], dim=1))
            return fused, layout
        mask = outs[0].valid()
        for o in outs[1:]:
            mask = mask | o.valid()
        if self.merge == "sum":
            fused_x = outs[0].x
            for o in outs[1:]:
                fused_x = fused_x + o.x
        else:
            zeros = torch.zeros_like(outs[0].x)
            fused_x = torch.cat([per_source[n].x if n in per_source else zeros for n in (self.a, *self.b)], dim=-1)
        layout = {n: (0, outs[0].num_tokens) for n in names}
        return TokenSet(fused_x, mask, outs[0].axes), layout

"""Mutual attention between two dense feature maps: position and channel mutual fusion with a gate hook.

Papers: GL-DMNet (Yi et al., "Dual Mutual Learning Network with Global-local Awareness for RGB-D
Salient Object Detection", arXiv 2501.01648) — position and channel mutual fusion; MEFN (Qi, Lin et
al., arXiv 2406.18327) — the dual/mutual-attention feature calibration (DFC) with an uncertainty
calibrator. Status: **reconstruction** — neither paper has released model code; the equations follow
DANet's position/channel attention (Fu et al., CVPR 2019) with the affinity of the *other*
modality (S²MA-style mutual attention), and the calibrator's form is unverified (a pluggable gate).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from attnfuse.fusion._registry import register_fusion
from attnfuse.fusion.sources import FusionOutput, SourceEmbedding
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
    return g.reshape(g.shape[0], -1, 1)  # (B, N, 1)


@register_fusion("mutual")
class MutualAttention(nn.Module):
    """Each of two dense maps is updated with attention computed from the other one.

    With ``X_a, X_b`` the two maps as ``(N = H W, C)`` token matrices, ``Q_m = X_m W_q^m``,
    ``K_m = X_m W_k^m`` (``C -> C / reduction``) and ``V_m = X_m W_v^m`` (``C -> C``)::

        position (form="affinity_swap"):  P_a = softmax(s Q_b K_b^T) V_a        # a's values, b's affinity
        position (form="cross"):          P_a = softmax(s Q_a K_b^T) V_b        # a queries b
        X'_a  = X_a  + gamma_a * g_b * P_a                                       # gamma zero-init
        channel:                          B_b = softmax(s_c X_b^T X_b)   (C x C) # "danet": softmax(-s_c X_b^T X_b)
        X''_a = X'_a + beta_a  * g_b * (X'_a B_b^T)                              # beta zero-init

    and symmetrically for ``b``. ``g_b`` is the gate on messages *from* ``b`` (1 without a gate):
    the uncertainty re-weighting hook (MEFN's calibrator, form unverified), e.g. ``1 - u_b`` from an
    evidential head. A gate of 0 makes ``X''_a = X_a`` (as if ``b`` were absent).

    Masks: positions valid in both maps are the keys (for ``"cross"``: valid in the other map); a
    position message reaches position ``i`` only where both maps are valid (for ``"cross"``: where the
    receiving map is), a channel message every valid position of the receiving map; an absent or
    fully masked map sends no message (identity for the other one) and has no output; invalid
    positions output zeros.

    Args:
        a, b: the two source names (e.g. ``"rgb"``, ``"depth"`` or ``"pet"``, ``"ct"``).
        dim: channel width ``C`` of both maps.
        form: ``"affinity_swap"`` (GL-DMNet reconstruction, default) or ``"cross"``.
        position, channel: include the position / channel mutual fusion.
        reduction: ``C / reduction`` is the query/key width (DANet: 8).
        scale: position score scale (DANet: 1.0, no scaling; None: ``1/sqrt(C / reduction)``).
        channel_scale: channel score scale ``s_c``.
        channel_energy: ``"similarity"`` (spec: ``softmax(X^T X)``) or ``"danet"`` (DANet's
            ``softmax(max - X^T X)``, i.e. ``softmax(-X^T X)``).
        merge: fused map: ``"sum"`` of the two updated maps, or ``"concat"`` on channels.
        gate: optional callable ``gate(x (B, *grid, C), mask (B, *grid)) -> (B, *grid)`` giving each
            map's message weight; a module is registered (its parameters train with this one).
        device, dtype: for the parameters.

    Raises:
        ValueError: equal names, unknown options; at call time, maps of different grids.

    Shapes:
        inputs ``{a: TokenSet (B, H, W, C), b: TokenSet (B, H, W, C)}`` (any grid axes) ->
        ``per_source[m] (B, H, W, C)``, ``fused (B, H, W, C)`` (``2 C`` for ``"concat"``), mask
        ``mask_a | mask_b``; weights ``"position.<m>" (B, 1, N, N)``, ``"channel.<m>" (B, 1, C, C)``.

    Example:
        >>> fuse = MutualAttention("rgb", "depth", 32)
        >>> rgb, depth = feature_map_tokens(torch.randn(2, 32, 8, 8)), feature_map_tokens(torch.randn(2, 32, 8, 8))
        >>> fuse({"rgb": rgb, "depth": depth}).per_source["rgb"].x.shape
        torch.Size([2, 8, 8, 32])
    """

    symmetry: ClassVar[str] = "equivariant"
    has_parameters: ClassVar[bool] = True

    def __init__(
        self,
        a: str,
        b: str,
        dim: int,
        *,
        form: Literal["affinity_swap", "cross"] = "affinity_swap",
        position: bool = True,
        channel: bool = True,
        reduction: int = 8,
        scale: float | None = 1.0,
        channel_scale: float = 1.0,
        channel_energy: Literal["similarity", "danet"] = "similarity",
        merge: Literal["sum", "concat"] = "sum",
        gate: Callable[[Tensor, Tensor], Tensor] | None = None,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if a == b:
            raise ValueError(f"MutualAttention needs two different sources, got a={a!r}, b={b!r}")
        if form not in ("affinity_swap", "cross"):
            raise ValueError(f"form must be 'affinity_swap' or 'cross', got {form!r}")
        if channel_energy not in ("similarity", "danet"):
            raise ValueError(f"channel_energy must be 'similarity' or 'danet', got {channel_energy!r}")
        if merge not in ("sum", "concat"):
            raise ValueError(f"merge must be 'sum' or 'concat', got {merge!r}")
        if not (position or channel):
            raise ValueError("MutualAttention needs position=True or channel=True (or both)")
        if reduction < 1 or dim // reduction < 1:
            raise ValueError(f"reduction must be in [1, dim], got {reduction=}, {dim=}")
        dd = {"device": device, "dtype": dtype}
        self.a, self.b, self.form, self.merge = a, b, form, merge
        self.scale, self.channel_scale, self.channel_energy = scale, channel_scale, channel_energy
        self.gate = gate
        self.embed = SourceEmbedding([a, b], dim, type_embedding=None, **dd)
        inner = dim // reduction
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
        key_ok = (own.mask & other.mask)[:, None, None, :]  # (B, 1, 1, N)
        if self.form == "affinity_swap":
            q = self.to_q[other_role](other.x)  # (B, N, C/r): the other map's affinity ...
            k = self.to_k[other_role](other.x)
            v = self.to_v[role](own.x)  # ... propagates this map's values
        else:
            q = self.to_q[role](own.x)  # this map queries the other one
            k = self.to_k[other_role](other.x)
            v = self.to_v[other_role](other.x)
            key_ok = other.mask[:, None, None, :]
        res = dense_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), mask=key_ok, scale=self.scale,
                              return_weights=return_weights)  # (B, 1, N, C)
        out, w = res if return_weights else (res, None)
        return out.squeeze(1) * message_ok, w

    def _channel(self, x: Tensor, other: Tensor, return_weights: bool):
        keys = other.transpose(1, 2).unsqueeze(1)  # (B, 1, C, N): channels as tokens, positions as features
        queries = -keys if self.channel_energy == "danet" else keys
        values = x.transpose(1, 2).unsqueeze(1)  # (B, 1, C, N)
        res = dense_attention(queries, keys, values, scale=self.channel_scale, return_weights=return_weights)
        out, w = res if return_weights else (res, None)
        return out.squeeze(1).transpose(1, 2), w  # (B, N, C)

    def forward(
        self, inputs: Mapping[str, TokenSet], *, gates: Mapping[str, Tensor] | None = None, return_weights: bool = False
    ) -> FusionOutput:
        """Fuse the two maps; ``gates`` (by source name, broadcastable to ``(B, *grid)``) override ``gate``."""
        self.embed.check(inputs)
        grids = {n: tuple(ts.x.shape[1:-1]) for n, ts in inputs.items()}
        if len(set(grids.values())) > 1:
            raise ValueError(f"MutualAttention needs both maps on one grid, got {grids}")
        name0 = next(iter(inputs))
        grid, axes = grids[name0], inputs[name0].axes
        prepared = {s.name: s for s in self.embed(inputs)}
        batch = inputs[name0].batch_size
        names = (self.a, self.b)
        msg_gate = {}
        for n in names:
            if n not in prepared:
                continue
            g = None
            if gates is not None and n in gates:
                g = gates[n]
            elif self.gate is not None:
                g = self.gate(prepared[n].x.reshape(batch, *grid, -1), prepared[n].mask.reshape(batch, *grid))
            present = prepared[n].mask.any(dim=1).to(prepared[n].x.dtype)[:, None, None]  # (B, 1, 1)
            msg_gate[n] = present if g is None else present * _gate_column(g.to(present.dtype), grid, n)
        per_source, weights = {}, {}
        for r, n in enumerate(names):
            if n not in prepared:
                continue
            own = prepared[n]
            x = own.x
            other_name = names[1 - r]
            if other_name in prepared:
                other = prepared[other_name]
                g = msg_gate[other_name]  # (B, N or 1, 1): messages from the other map
                if self.gamma is not None:
                    ok = (own.mask if self.form == "cross" else own.mask & other.mask).unsqueeze(-1).to(x.dtype)
                    p, w = self._position(r, own, other, ok, return_weights)
                    x = x + self.gamma[r] * g * p
                    if w is not None:
                        weights[f"position.{n}"] = w
                if self.beta is not None:
                    c, w = self._channel(x, other.x, return_weights)
                    x = x + self.beta[r] * g * c
                    if w is not None:
                        weights[f"channel.{n}"] = w
            x = zero_invalid(x, own.mask)
            per_source[n] = TokenSet(x.reshape(batch, *grid, -1), own.mask.reshape(batch, *grid), axes)
        outs = list(per_source.values())
        mask = outs[0].valid()
        for o in outs[1:]:
            mask = mask | o.valid()
        if self.merge == "sum":
            fused_x = outs[0].x
            for o in outs[1:]:
                fused_x = fused_x + o.x
        else:
            zeros = torch.zeros_like(outs[0].x)
            fused_x = torch.cat([per_source[n].x if n in per_source else zeros for n in names], dim=-1)
        layout = {n: (0, outs[0].num_tokens) for n in per_source}
        return FusionOutput(TokenSet(fused_x, mask, axes), per_source, weights, layout)

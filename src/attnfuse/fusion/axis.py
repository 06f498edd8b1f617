"""Attention along one named axis of a multi-axis token set, and HISTOGRAPH's layer-then-node attention.

Papers: Galron, Sinai, Maron, Eliasof, "Learning from Historical Activations in Graph Neural
Networks" (HISTOGRAPH, ICLR 2026, https://arxiv.org/abs/2601.01123) — :class:`LayerAttention`;
factorized attention over named axes as in Wayformer (https://arxiv.org/abs/2207.05844) and
BioFusionNet's patch aggregation (unscaled attention, ``block="attention"``) — :class:`AxisAttention`.
Status: HISTOGRAPH from the paper notes (the official code was not reviewed); the signed-sum
normaliser is guarded near zero (documented deviation, see :class:`LayerAttention`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import ClassVar, Literal

import torch
from torch import Tensor, nn

from attnfuse.fusion._registry import register_fusion
from attnfuse.fusion.sources import FusionOutput, SourceEmbedding
from attnfuse.nn import Attention, Encoder
from attnfuse.ops import OpConfig, op_config
from attnfuse.tokens import TokenSet, zero_invalid

__all__ = ["AxisAttention", "LayerAttention", "sinusoidal_table"]



def _mean_token(ts: TokenSet) -> TokenSet:
    """A flat TokenSet ``(B, N, D)`` as its masked mean ``(B, 1, D)``, valid where any token is."""
    mask = ts.valid()  # (B, N)
    m = mask.unsqueeze(-1).to(ts.x.dtype)
    mean = zero_invalid(ts.x, mask).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1, D)
    return TokenSet(mean, mask.any(dim=1, keepdim=True))


def sinusoidal_table(length: int, dim: int, *, dtype: torch.dtype | None = None) -> Tensor:
    """Fixed sinusoidal codes ``(length, dim)``: ``sin`` on even channels, ``cos`` on odd ones (Vaswani et al.)."""
    pos = torch.arange(length, dtype=torch.float64).unsqueeze(1)  # (L, 1)
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)  # (ceil(D/2),)
    table = torch.zeros(length, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq[: dim // 2])
    return table.to(dtype or torch.get_default_dtype())


@register_fusion("axis")
class AxisAttention(nn.Module):
    """Self-attention along the axis named ``axis`` of each source; every other axis is a batch axis.

    For a source ``x (B, *axes, D)`` the named axis is moved next to the channels and the other
    axes are folded into the batch, so token ``i`` only attends tokens that share all its other
    coordinates (e.g. ``axis="time"`` on ``("time", "agent")``: each agent's own history). The
    same blocks (shared weights) are applied to every source that is passed.

    ``block="transformer"``: ``depth`` pre-norm :class:`attnfuse.nn.TransformerBlock` s (+ final
    LayerNorm). ``block="attention"``: one plain attention output ``softmax(s q k^T) v`` with output
    projection, no residual and no MLP (BioFusionNet's patch self-attention; ``scale=1.0`` for its
    unscaled form; sum or mean the result over the axis with :mod:`attnfuse.heads`).

    With the defaults (``axis="token"``) it works on plain ``(B, N, D)`` token sets from any number
    of sources: each source's tokens self-attend (shared weights), and sources do not see each other;
    ``fused`` is the concatenation. Use it as a per-source encoder stage before another fusion, or on
    multi-axis sources (``axis="time"`` etc.).

    Args:
        sources: source names this module may receive.
        dim: token width ``D`` (also ``out_dim``).
        axis: the axis name to attend along (every passed source must have it; default ``"token"``,
            the axis of a plain ``(B, N, D)`` TokenSet).
        heads: attention heads (must divide ``dim``).
        depth: number of blocks (``block="transformer"``).
        block: ``"transformer"`` or ``"attention"``.
        scale: score scale (None: ``1/sqrt(head_dim)``).
        final_norm: LayerNorm after the blocks (``block="transformer"``).
        mlp_ratio, dropout: as :class:`attnfuse.nn.TransformerBlock`.
        op: the attention operator: a registered name (``"dense"``) or a typed config
            (:class:`attnfuse.ops.OpConfig`) such as ``Dense(backend="reference")`` or
            ``Neighborhood(kernel_size=7)``; in YAML ``op: {class_path: Halo, init_args: {block_size: 4,
            halo_size: 2}}``. With ``scale`` given, the config's ``scale`` field is replaced.
        device, dtype: for the parameters.

    Raises:
        ValueError: bad options; at call time, a source without ``axis``.

    Shapes:
        inputs ``{name: TokenSet (B, *axes_i, D)}`` -> ``per_source[name] (B, *axes_i, D)`` (same
        axes), ``fused (B, sum_i N_i, D)`` (present sources' tokens, flattened, in sorted order);
        weights ``"<name>.<i>" (B * prod(other axes), H, N_axis, N_axis)``.

    Example:
        >>> attn = AxisAttention(["scene"], 16, axis="time", heads=2)
        >>> ts = TokenSet(torch.randn(2, 5, 3, 16), axes=("time", "agent"))
        >>> attn({"scene": ts}).per_source["scene"].x.shape
        torch.Size([2, 5, 3, 16])
    """

    symmetry: ClassVar[str] = "equivariant"
    has_parameters: ClassVar[bool] = True
    output: ClassVar[str] = "tokens"

    def __init__(
        self,
        sources: Sequence[str],
        dim: int,
        *,
        axis: str = "token",
        heads: int = 4,
        depth: int = 1,
        block: Literal["transformer", "attention"] = "transformer",
        scale: float | None = None,
        final_norm: bool = True,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        op: str | OpConfig = "dense",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if block not in ("transformer", "attention"):
            raise ValueError(f"block must be 'transformer' or 'attention', got {block!r}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if block == "attention" and depth != 1:
            raise ValueError(f"block='attention' is a single attention layer, got depth={depth}")
        dd = {"device": device, "dtype": dtype}
        if scale is not None:
            op = op_config(op, scale=scale)
        self.axis, self.block, self.out_dim = axis, block, dim
        self.embed = SourceEmbedding(sources, dim, type_embedding=None, **dd)
        if block == "transformer":
            self.encoder = Encoder(dim, depth=depth, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, op=op,
                                   final_norm=final_norm, **dd)
            self.attn = None
        else:
            self.encoder = None
            self.attn = Attention(dim, heads, op=op, dropout=dropout, **dd)

    @property
    def sources(self) -> tuple[str, ...]:
        return self.embed.sources

    def attend(self, x: Tensor, mask: Tensor, axes: tuple[str, ...], *, return_weights: bool = False):
        """Attend along ``self.axis`` of ``x (B, *axes, D)`` with ``mask (B, *axes)``; invalid tokens -> 0."""
        if self.axis not in axes:
            raise ValueError(f"axis {self.axis!r} is not among the token axes {axes}")
        dim = axes.index(self.axis) + 1
        x = zero_invalid(x, mask)
        x_t = x.movedim(dim, -2)  # (B, *others, N_axis, D)
        m_t = mask.movedim(dim, -1)  # (B, *others, N_axis)
        lead = x_t.shape[:-2]
        x_f = x_t.reshape(math.prod(lead), *x_t.shape[-2:])  # (B * others, N_axis, D); explicit: -1 fails on 0 elements
        m_f = m_t.reshape(math.prod(lead), m_t.shape[-1])  # (B * others, N_axis)
        if self.encoder is not None:
            out = self.encoder(x_f, mask=m_f, return_weights=return_weights)
            out, maps = out if return_weights else (out, [])
        else:
            out = self.attn(x_f, mask=m_f, return_weights=return_weights)
            out, w = out if return_weights else (out, None)
            maps = [] if w is None else [w]
        out = out.reshape(*lead, *out.shape[-2:]).movedim(-2, dim)  # (B, *axes, D)
        return zero_invalid(out, mask), maps

    def forward(self, inputs: Mapping[str, TokenSet], *, return_weights: bool = False) -> FusionOutput:
        """Attend along the axis in every source; see the class docstring."""
        inputs = self.embed.align(inputs)  # validated, one dtype
        per_source, weights, layout = {}, {}, {}
        xs, masks, start = [], [], 0
        for name in self.sources:
            if name not in inputs:
                continue
            ts = inputs[name]
            x = ts.x if ts.pos is None else ts.x + ts.pos
            out, maps = self.attend(x, ts.valid(), ts.axes, return_weights=return_weights)
            weights.update({f"{name}.{i}": w for i, w in enumerate(maps)})
            per_source[name] = TokenSet(out, ts.valid(), ts.axes)
            flat = per_source[name].flatten()
            xs.append(flat.x)
            masks.append(flat.valid())
            layout[name] = (start, start + flat.x.shape[1])
            start = layout[name][1]
        fused = TokenSet(torch.cat(xs, dim=1), torch.cat(masks, dim=1))
        return FusionOutput(fused, per_source, weights, layout)


@register_fusion("layer")
class LayerAttention(nn.Module):
    """HISTOGRAPH: layer-wise attention over a GNN's activation history, then node-wise self-attention.

    The activations of ``L`` layers for ``N`` nodes (layer 0 = input embedding, ``L - 1`` = last)
    come either as **one source** ``x (B, N, L, D)`` with axes ``(node_axis, layer_axis)`` (either
    order; the paper's input), or as **one source per layer**: ``sources[l]`` (the order given) is
    layer ``l`` and holds plain tokens (any token axes, flattened). With one source per layer,
    ``nodes="pooled"`` (default) makes each source one token (the masked mean of its valid tokens:
    one node, so any sources work, e.g. the inputs of a table, as in GCAV's one vector per layer);
    ``nodes="tokens"`` makes token ``v`` of every source node ``v`` (every source with the same
    token count ``N``, e.g. a GNN's layers given separately). Then::

        X'_{v,l} = Proj_l(X_{v,l}) + P_l                 # per-layer linear projection, layer code P
        q_v      = X'_{v,L-1} W_Q,    k_{v,l} = X'_{v,l} W_K          # query from the last layer
        c_l      = mean over valid nodes v of  q_v . k_{v,l} / sqrt(D)       (one weighting per graph)
        alpha_l  = c_l / sum_l' c_l'      ("signed_sum": weights may be negative; or "softmax")
        H_v      = sum_l alpha_l X'_{v,l}                 # no value projection
        Z        = Encoder(H, node mask)                  # node-wise self-attention, no node positions
        G        = mean over valid nodes of Z             # readout="mean"

    A node is valid where any layer is; an absent layer source is the same as an all-False one (its
    tokens are zeros that take part as masked positions do: ``X' = Proj_l(0) + P_l``). A node token
    masked in one layer is zero there. With one source per layer the last source asks (``q``), so the
    order of ``sources`` matters (declared by the order given, not the sorted one).

    Guard (a deviation the method needs): with ``s = sum_l c_l``, the denominator is
    ``sign(s) * max(|s|, eps)`` (``sign(0) = +1``), so ``sum_l alpha_l = 1`` exactly unless
    ``|s| < eps``, and the output stays finite at ``s = 0``.

    ``readout="mean"``: ``fused`` is ``G (B, 1, D)`` (invariant to node order; the class
    declaration). ``readout=None``: ``fused`` is ``Z (B, N, D)`` and the instance declares
    ``symmetry = "equivariant"``. ``per_source[name]`` is ``Z`` on the nodes valid in that source.
    The layer axis is ordered by design (last-layer query, layer codes).

    Args:
        sources: one name (activations with node and layer axes, or a single layer), or one name
            per layer, first layer first.
        dim: width ``D`` (also ``out_dim``).
        num_layers: ``L`` (for the per-layer projections and the layer codes); default
            ``len(sources)``. Give it for one source with a layer axis (``L`` of that axis).
        heads: heads of the node-wise attention (must divide ``dim``).
        layer_axis, node_axis: axis names of a single (node, layer) source.
        nodes: with one source per layer, ``"pooled"`` (each source is one node) or ``"tokens"``
            (token ``v`` of every source is node ``v``; equal token counts).
        normalize: ``"signed_sum"`` (the method) or ``"softmax"`` (the ablation).
        layer_proj: per-layer projections ``Proj_l`` (False: identity).
        layer_pe: ``"sinusoidal"`` (fixed), ``"learned"`` (GCAV-style) or None.
        node_depth: node-wise transformer blocks (0: ``Z = H``).
        readout: ``"mean"`` or None.
        eps: the guard on ``|sum_l c_l|``.
        mlp_ratio, dropout: of the node-wise blocks.
        op: the attention operator of the node-wise blocks: a registered name (``"dense"``) or a typed config
            (:class:`attnfuse.ops.OpConfig`) such as ``Dense(backend="reference")`` or
            ``Neighborhood(kernel_size=7)``; in YAML ``op: {class_path: Halo, init_args: {block_size: 4,
            halo_size: 2}}``.
        device, dtype: for the parameters.

    Raises:
        ValueError: bad options, ``num_layers != len(sources)`` with several sources; at call time,
            wrong axes, ``L != num_layers``, or (``nodes="tokens"``) layer sources with different token
            counts.

    Shapes:
        ``{source: TokenSet (B, N, L, D)}`` or ``{layer_l: TokenSet (B, N_l, D)}`` -> ``fused (B, 1, D)``
        or ``(B, N, D)`` (``N = 1`` for ``nodes="pooled"``); weights ``"layer" (B, L)`` (the alphas) and ``"node.<i>" (B, H, N, N)``.

    Example:
        >>> hist = LayerAttention(["acts"], 16, num_layers=4, heads=2)
        >>> acts = TokenSet(torch.randn(2, 10, 4, 16), axes=("node", "layer"))
        >>> hist({"acts": acts}).fused.x.shape
        torch.Size([2, 1, 16])
        >>> per_layer = LayerAttention(["l0", "l1", "l2"], 16, nodes="tokens")   # three layers, one source each
        >>> per_layer({f"l{i}": TokenSet(torch.randn(2, 10, 16)) for i in range(3)}).fused.x.shape
        torch.Size([2, 1, 16])
    """

    symmetry: ClassVar[str] = "invariant"
    has_parameters: ClassVar[bool] = True
    output: ClassVar[str] = "tokens"

    def __init__(
        self,
        sources: Sequence[str],
        dim: int,
        *,
        num_layers: int | None = None,
        heads: int = 4,
        layer_axis: str = "layer",
        node_axis: str = "node",
        nodes: Literal["pooled", "tokens"] = "pooled",
        normalize: Literal["signed_sum", "softmax"] = "signed_sum",
        layer_proj: bool = True,
        layer_pe: Literal["sinusoidal", "learned"] | None = "sinusoidal",
        node_depth: int = 1,
        readout: Literal["mean"] | None = "mean",
        eps: float = 1e-6,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        op: str | OpConfig = "dense",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.embed = SourceEmbedding(sources, dim, type_embedding=None, **dd)  # validates the names
        self.layer_sources = tuple(sources)  # layer order: as given
        if num_layers is None:
            num_layers = len(self.layer_sources)
        if len(self.layer_sources) > 1 and num_layers != len(self.layer_sources):
            raise ValueError(f"with several sources each source is one layer: num_layers must be len(sources)="
                             f"{len(self.layer_sources)} (or None), got {num_layers}")
        if nodes not in ("pooled", "tokens"):
            raise ValueError(f"nodes must be 'pooled' or 'tokens', got {nodes!r}")
        if normalize not in ("signed_sum", "softmax"):
            raise ValueError(f"normalize must be 'signed_sum' or 'softmax', got {normalize!r}")
        if layer_pe not in ("sinusoidal", "learned", None):
            raise ValueError(f"layer_pe must be 'sinusoidal', 'learned' or None, got {layer_pe!r}")
        if readout not in ("mean", None):
            raise ValueError(f"readout must be 'mean' or None, got {readout!r}")
        if num_layers < 1 or node_depth < 0 or eps <= 0:
            raise ValueError(f"need num_layers >= 1, node_depth >= 0, eps > 0, got {num_layers=}, {node_depth=}, {eps=}")
        self.layer_axis, self.node_axis, self.nodes, self.out_dim = layer_axis, node_axis, nodes, dim
        self.normalize, self.readout, self.eps, self.num_layers = normalize, readout, eps, num_layers
        if readout is None:
            self.symmetry = "equivariant"
        self.proj_weight = self.proj_bias = None
        if layer_proj:
            bound = 1.0 / math.sqrt(dim)  # nn.Linear's default initialisation, one matrix per layer
            self.proj_weight = nn.Parameter(torch.empty(num_layers, dim, dim, **dd).uniform_(-bound, bound))
            self.proj_bias = nn.Parameter(torch.empty(num_layers, dim, **dd).uniform_(-bound, bound))
        if layer_pe == "sinusoidal":
            self.register_buffer("pe", sinusoidal_table(num_layers, dim, dtype=dtype).to(device), persistent=False)
        elif layer_pe == "learned":
            self.pe = nn.Parameter(torch.randn(num_layers, dim, **dd) * 0.02)
        else:
            self.pe = None
        self.to_q = nn.Linear(dim, dim, **dd)
        self.to_k = nn.Linear(dim, dim, **dd)
        self.encoder = Encoder(dim, depth=node_depth, heads=heads, mlp_ratio=mlp_ratio, dropout=dropout, op=op, **dd)

    @property
    def sources(self) -> tuple[str, ...]:
        return self.embed.sources

    def layer_weights(self, c: Tensor) -> Tensor:
        """Normalise layer scores ``c (B, L)`` into ``alpha (B, L)`` (signed sum with the guard, or softmax)."""
        if self.normalize == "softmax":
            return torch.softmax(c, dim=-1)
        s = c.sum(dim=-1, keepdim=True)  # (B, 1)
        sign = torch.where(s < 0, -torch.ones_like(s), torch.ones_like(s))
        return c / torch.where(s.abs() < self.eps, sign * self.eps, s)

    def _history(self, inputs: Mapping[str, TokenSet]) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``x (B, N, L, D)``, ``mask (B, N, L)`` and each present source's mask ``(B, N)`` over nodes."""
        if len(self.layer_sources) == 1 and inputs[self.layer_sources[0]].x.dim() == 4:  # one (node, layer) source
            name = self.layer_sources[0]
            ts = inputs[name]
            if set(ts.axes) != {self.node_axis, self.layer_axis}:
                raise ValueError(f"source {name!r} must have axes ({self.node_axis!r}, {self.layer_axis!r}), got {ts.axes}")
            x, mask = (ts.x if ts.pos is None else ts.x + ts.pos), ts.valid()
            if ts.axes[0] == self.layer_axis:  # to (B, N, L, D)
                x, mask = x.transpose(1, 2), mask.transpose(1, 2)
            return x, mask, {name: mask.any(dim=2)}
        flat = {n: inputs[n].flatten() for n in self.layer_sources if n in inputs}
        if self.nodes == "pooled":  # each layer source is one node: the masked mean of its valid tokens
            flat = {n: _mean_token(ts) for n, ts in flat.items()}
        counts = {n: ts.x.shape[1] for n, ts in flat.items()}
        if len(set(counts.values())) > 1:
            raise ValueError(f"nodes='tokens' stacks the sources as layers of the same nodes: every source needs the same "
                             f"token count, got {counts}; use nodes='pooled'")
        ref = next(iter(flat.values())).x
        xs, masks = [], []
        for name in self.layer_sources:
            if name in flat:
                xs.append(flat[name].x)
                masks.append(flat[name].valid())
            else:  # absent layer: the same as an all-False one
                xs.append(torch.zeros_like(ref))
                masks.append(torch.zeros(ref.shape[:2], dtype=torch.bool, device=ref.device))
        return torch.stack(xs, dim=2), torch.stack(masks, dim=2), {n: ts.valid() for n, ts in flat.items()}  # (B, N, L, D)

    def forward(self, inputs: Mapping[str, TokenSet], *, return_weights: bool = False) -> FusionOutput:
        """Layer attention, node attention, readout; see the class docstring."""
        inputs = self.embed.align(inputs)  # validated, one dtype
        x, mask, source_masks = self._history(inputs)
        if x.shape[2] != self.num_layers:
            raise ValueError(f"expected {self.num_layers} layers on axis {self.layer_axis!r}, got {x.shape[2]}; "
                             "pass num_layers=")
        node_mask = mask.any(dim=2)  # (B, N)
        x = zero_invalid(x, mask)
        if self.proj_weight is not None:
            x = torch.einsum("bnld,lde->bnle", x, self.proj_weight.to(x.dtype)) + self.proj_bias.to(x.dtype)  # (B, N, L, D)
        if self.pe is not None:
            x = x + self.pe.to(x.dtype)
        q = self.to_q(x[:, :, -1])  # (B, N, D): the last layer asks
        k = self.to_k(x)  # (B, N, L, D)
        logits = torch.einsum("bnd,bnld->bnl", q, k) / math.sqrt(x.shape[-1])  # (B, N, L)
        m = node_mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
        c = (logits * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)  # (B, L): mean over this graph's valid nodes
        alpha = self.layer_weights(c)  # (B, L)
        h = torch.einsum("bl,bnld->bnd", alpha, x)  # (B, N, D)
        h = zero_invalid(h, node_mask)
        z = self.encoder(h, mask=node_mask, return_weights=return_weights)
        z, maps = z if return_weights else (z, [])
        z = zero_invalid(z, node_mask)
        weights = {"layer": alpha, **{f"node.{i}": w for i, w in enumerate(maps)}} if return_weights else {}
        if self.readout == "mean":
            g = (z * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)  # (B, 1, D)
            fused = TokenSet(g, node_mask.any(dim=1, keepdim=True))
        else:
            fused = TokenSet(z, node_mask)
        per_source = {n: TokenSet(zero_invalid(z, sm), sm) for n, sm in source_masks.items()}
        return FusionOutput(fused, per_source, weights, {n: (0, fused.x.shape[1]) for n in per_source})

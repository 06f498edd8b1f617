"""The transport-map flow graph of a model: which map acts on which axis of every parameter.

Paper: Imfeld et al., "Transformer Fusion with Optimal Transport" (https://arxiv.org/abs/2310.05719),
the "transportation map flow graph"; released ``otfusion_lib.py::encoder_fusion`` / ``ln_fusion``.

Status: pre-norm :class:`attnfuse.nn.TransformerBlock` stacks (self-attention, no gates, no cross-attention)
with everything around them that reads from or writes to the residual stream. Derived from structure:

::

    key stream.i      the residual stream entering block i (stream.L after the last block)
    block i           norm_self (stream.i) -> to_q / to_k / to_v (outputs b{i}.q, b{i}.k, b{i}.v;
                      inputs stream.i) -> proj (output b{i}.o, input b{i}.v) ; b{i}.mid = join(stream.i, b{i}.o)
                      norm_mlp (b{i}.mid) -> fc1 (b{i}.fc1, input b{i}.mid) -> fc2 (b{i}.fc2, input b{i}.fc1)
                      stream.{i+1} = join(b{i}.mid, b{i}.fc2)
    outside blocks    a parameter is attached to stream.i, i = the number of blocks before it in
                      ``named_parameters`` order (so embeddings get stream.0 and heads / final norms stream.L):
                      LayerNorm(d) weight and bias; Linear(in, k*d) (a writer: its rows, per chunk of d; when
                      in = d too, only before the blocks); Linear(d, out) (a reader: its columns; when out is a
                      multiple of d, only after the blocks); Embedding(n, d) (columns); Conv with d
                      output channels (a patch embedding: rows); any other parameter whose last axis is d
                      (CLS / fusion tokens, position and type embeddings). Linear layers with neither side
                      of width d are averaged without alignment, as are parameters named in ``fixed``.

The blocks must form one chain in parameter order (an ``Encoder``, ``EarlyFusion``, a ViT); per-source
block stacks running side by side (``HierarchicalFusion`` with ``per_source_depth > 0``) are not one chain
and are not detected: fuse those with :func:`attnfuse.merge.vanilla_average` or fuse the stacks separately.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from attnfuse.nn.transformer import TransformerBlock

__all__ = ["Axis", "Site", "TransportGraph"]

SUPPORTED = (
    "TransformerBlock (self-attention, gate=False, no cross-attention), Encoder / EarlyFusion / ViT-style chains of "
    "them; outside blocks: LayerNorm(d), Linear(in, k*d) writers, Linear(d, out) readers, Linear with no side of "
    "width d (averaged), Embedding(n, d), Conv with d output channels, parameters whose last axis is d"
)


@dataclass(frozen=True)
class Axis:
    """One aligned axis of a parameter: map ``key``; the axis holds ``chunks`` consecutive copies of its width."""

    key: str
    chunks: int = 1


@dataclass
class Site:
    """One transport map: how it is computed.

    ``kind``: ``"linear"`` (the outputs of ``module``; weight features from ``producers``), ``"stream"``
    (the residual stream: activations at ``acts`` = ``(module, "input" | "output")``; weight features from
    every writer in ``producers``), ``"join"`` (``inputs = (residual key, branch key)``).
    """

    key: str
    kind: str
    acts: tuple[str, str] | None = None
    inputs: tuple[str, ...] = ()
    producers: list[tuple[str, int]] = field(default_factory=list)  # (parameter name, axis of the key)
    extra_acts: tuple[str, ...] = ()  # more modules whose outputs join the features (qk="shared")


@dataclass
class TransportGraph:
    """Maps of a model: ``slots`` (parameter -> per-axis :class:`Axis` or None) and ``sites`` in order.

    Build it with :meth:`from_module`. ``describe()`` lists the maps and what they act on.
    """

    dim: int
    slots: dict[str, tuple[Axis | None, ...]]
    sites: list[Site]
    blocks: list[str]

    @classmethod
    def from_module(cls, model: nn.Module, *, qk: str = "separate", fixed: Sequence[str] = ()) -> TransportGraph:
        """Derive the graph of ``model`` from its structure (see the module docstring).

        Args:
            model: a model with at least one :class:`~attnfuse.nn.TransformerBlock`.
            qk: ``"separate"`` (own maps for Q and K, released default) or ``"shared"`` (one map from the
                concatenated Q and K activations, used for both: ``eq_t_map`` in the released code).
            fixed: parameter-name prefixes to average without alignment.

        Raises:
            ValueError: no blocks, blocks of different widths, an unsupported block or parameter (the
                message lists what the graph supports).
        """
        if qk not in ("separate", "shared"):
            raise ValueError(f"qk must be 'separate' or 'shared', got {qk!r}")
        blocks = [(n, m) for n, m in model.named_modules() if isinstance(m, TransformerBlock)]
        if not blocks:
            raise ValueError(f"{type(model).__name__} has no TransformerBlock; the transport graph supports: {SUPPORTED}")
        widths = {m.norm_mlp.normalized_shape[0] for _, m in blocks}
        if len(widths) != 1:
            raise ValueError(f"all blocks must have one width, got {sorted(widths)}")
        (d,) = widths
        modules = dict(model.named_modules())
        slots: dict[str, tuple[Axis | None, ...]] = {}
        sites: list[Site] = [Site("stream.0", "stream", acts=(blocks[0][0], "input"))]
        prefixes = [n + "." for n, _ in blocks]
        seen_blocks: set[int] = set()
        for pname, param in model.named_parameters():
            owner_name, _, leaf = pname.rpartition(".")
            bi = next((i for i, p in enumerate(prefixes) if pname.startswith(p)), None)
            if bi is not None:
                if bi not in seen_blocks:
                    if bi != len(seen_blocks):
                        raise ValueError(f"block {blocks[bi][0]!r} comes out of order; the blocks must form one chain")
                    seen_blocks.add(bi)
                    sites.extend(_block(blocks[bi][0], blocks[bi][1], bi, slots, qk))
                continue
            key = f"stream.{len(seen_blocks)}"
            if any(pname == f or pname.startswith(f + ".") for f in fixed):
                slots[pname] = (None,) * param.dim()
                continue
            where = "before" if not seen_blocks else ("after" if len(seen_blocks) == len(blocks) else "between")
            slots[pname] = _outside(pname, modules[owner_name], leaf, param.shape, d, key, where)
        done = len(seen_blocks)
        if done != len(blocks):
            raise ValueError("some blocks hold no parameters; the transport graph needs every block's weights")
        for s in sites:  # writers feed the features of stream.0 in wts mode
            if s.key == "stream.0":
                s.producers = [(n, i) for n, axes in slots.items() for i, a in enumerate(axes)
                               if a is not None and a.key == "stream.0" and not any(n.startswith(p) for p in prefixes)]
        return cls(dim=d, slots=slots, sites=sites, blocks=[n for n, _ in blocks])

    def describe(self) -> str:
        """One line per map: its key, kind and what it is computed from."""
        lines = []
        for s in self.sites:
            used = sum(1 for axes in self.slots.values() for a in axes if a is not None and a.key == s.key)
            src = s.acts if s.kind != "join" else s.inputs
            lines.append(f"{s.key:<16} {s.kind:<7} from {src}; acts on {used} parameter axes")
        return "\n".join(lines)


def _outside(pname: str, owner: nn.Module, leaf: str, shape: tuple[int, ...], d: int, key: str,
             where: str) -> tuple[Axis | None, ...]:
    """Axes of a parameter outside the blocks (see the module docstring); ``where``: before / between / after them."""
    s = Axis(key)
    if isinstance(owner, nn.LayerNorm):
        if tuple(owner.normalized_shape) != (d,):
            raise ValueError(f"{pname}: LayerNorm over {tuple(owner.normalized_shape)} is not on the stream of width {d}")
        return (s,)
    if isinstance(owner, nn.Linear):
        n_in, n_out = owner.in_features, owner.out_features
        writes, reads = n_out % d == 0, n_in == d
        if writes and reads:  # Linear(d, k*d): a writer before the blocks, a reader after them, else ambiguous
            if where == "between":
                raise ValueError(f"{pname}: Linear({n_in}, {n_out}) between blocks both reads and may write the stream of width {d}; "
                                 "name it in fixed= to average it without alignment")
            writes, reads = where == "before", where == "after"
        if writes:  # a writer (k tokens of width d per input)
            a = Axis(key, n_out // d)
            return (a, None) if leaf == "weight" else (a,)
        if reads:  # a reader (head)
            return (None, s) if leaf == "weight" else (None,)
        return (None,) * len(shape)
    if isinstance(owner, nn.Embedding) and leaf == "weight" and shape[-1] == d:
        return (None, s)
    if isinstance(owner, nn.Conv1d | nn.Conv2d | nn.Conv3d):
        if owner.out_channels == d and owner.groups == 1:
            return (s,) + (None,) * (len(shape) - 1)
        raise ValueError(f"{pname}: a convolution with {owner.out_channels} output channels is not supported; "
                         f"the transport graph supports: {SUPPORTED}")
    if type(owner).__module__.startswith("torch.nn"):
        raise ValueError(f"{pname}: {type(owner).__name__} is not supported; the transport graph supports: {SUPPORTED}")
    if len(shape) >= 1 and shape[-1] == d:
        return (None,) * (len(shape) - 1) + (s,)
    raise ValueError(f"{pname} of {type(owner).__name__} {tuple(shape)}: no axis on the stream of width {d}; name it "
                     f"in fixed= to average it without alignment. The transport graph supports: {SUPPORTED}")


def _block(prefix: str, block: TransformerBlock, i: int, slots: dict, qk: str) -> list[Site]:
    """Slots and sites of one pre-norm block."""
    if block.cross is not None or block.gates is not None or block.attn is None:
        raise ValueError(f"{prefix}: only self-attention blocks without gates are supported; the transport graph "
                         f"supports: {SUPPORTED}")
    s_in, b = f"stream.{i}", f"b{i}"
    q_key, k_key = (f"{b}.qk", f"{b}.qk") if qk == "shared" else (f"{b}.q", f"{b}.k")
    layers = {
        "attn.to_q": (q_key, s_in), "attn.to_k": (k_key, s_in), "attn.to_v": (f"{b}.v", s_in),
        "attn.proj": (f"{b}.o", f"{b}.v"), "mlp.fc1": (f"{b}.fc1", f"{b}.mid"), "mlp.fc2": (f"{b}.fc2", f"{b}.fc1"),
    }
    names = {n for n, _ in block.named_parameters()}
    expected = {f"{m}.{p}" for m in layers for p in ("weight", "bias")} | {f"{n}.{p}" for n in ("norm_self", "norm_mlp")
                                                                            for p in ("weight", "bias")}
    unknown = names - expected
    if unknown:
        raise ValueError(f"{prefix}: unsupported parameters {sorted(unknown)}; the transport graph supports: {SUPPORTED}")
    for norm, key in (("norm_self", s_in), ("norm_mlp", f"{b}.mid")):
        for p in ("weight", "bias"):
            slots[f"{prefix}.{norm}.{p}"] = (Axis(key),)
    for mod, (out_key, in_key) in layers.items():
        slots[f"{prefix}.{mod}.weight"] = (Axis(out_key), Axis(in_key))
        if f"{mod}.bias" in names:
            slots[f"{prefix}.{mod}.bias"] = (Axis(out_key),)

    def lin(key: str, mod: str, extra: tuple[str, ...] = ()) -> Site:
        prods = [(f"{prefix}.{m}.{p}", 0) for m in (mod, *extra) for p in ("weight", "bias") if f"{m}.{p}" in names]
        return Site(key, "linear", acts=(f"{prefix}.{mod}", "output"), producers=prods,
                    extra_acts=tuple(f"{prefix}.{m}" for m in extra))

    sites = [lin(q_key, "attn.to_q", ("attn.to_k",))] if qk == "shared" else [lin(q_key, "attn.to_q"), lin(k_key, "attn.to_k")]
    sites += [
        lin(f"{b}.v", "attn.to_v"), lin(f"{b}.o", "attn.proj"),
        Site(f"{b}.mid", "join", acts=(f"{prefix}.norm_mlp", "input"), inputs=(s_in, f"{b}.o")),
        lin(f"{b}.fc1", "mlp.fc1"), lin(f"{b}.fc2", "mlp.fc2"),
        Site(f"stream.{i + 1}", "join", acts=(prefix, "output"), inputs=(f"{b}.mid", f"{b}.fc2")),
    ]
    return sites

"""Source preparation shared by fusion modules: validation, type embeddings, missing inputs.

Sources of different floating dtypes are promoted to one common dtype (``torch.promote_types`` over
every source's ``x`` and ``pos``, as ``torch.cat`` would) before anything else: a float32 and a bfloat16
source are fused in float32, exactly as if both had been passed in float32 (see :meth:`SourceEmbedding.align`).

Missing-input semantics (the contract every fusion module keeps):

* a declared source that is absent from the inputs, or whose mask is all False for a sample,
  takes no part in attention for that sample: the output is the same as if it were never passed;
* with ``missing_token=True`` a missing source is instead represented by one learned token per
  source (identical for "absent" and "all masked", so the equivalence still holds);
* ``modality_dropout=p`` masks each source of each sample with probability ``p`` in training;
* fusion modules add always-present fusion tokens, so a sample with every source missing still
  yields an output.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from attnfuse.tokens import TokenSet, zero_invalid

__all__ = ["RESERVED_NAMES", "FusionOutput", "PreparedSource", "SourceEmbedding", "concat_sources", "role_names"]

#: names a source may not take: they key the fusion tokens in ``FusionOutput.layout`` and the
#: cross-source / latent / self-attention maps in ``FusionOutput.weights``
RESERVED_NAMES = frozenset({"fusion", "cross", "latent", "self"})


@dataclass
class FusionOutput:
    """What every fusion module returns.

    Attributes:
        fused: the fused tokens (``x (B, N, D)``, ``mask (B, N)``); fusion tokens come first.
        per_source: each source's tokens after fusion, by name (present sources only).
        weights: attention maps by name, e.g. ``"cross.0"`` -> ``(B, H, L, S)``; empty unless
            ``return_weights=True``.
        layout: name -> ``(start, stop)`` of each source's tokens in ``fused`` (``"fusion"`` for the
            fusion tokens), for reading source-level attention off the maps.
    """

    fused: TokenSet
    per_source: dict[str, TokenSet] = field(default_factory=dict)
    weights: dict[str, Tensor] = field(default_factory=dict)
    layout: dict[str, tuple[int, int]] = field(default_factory=dict)


@dataclass
class PreparedSource:
    """One source after preparation: ``x (B, N, D)`` with type embedding, ``mask (B, N)``."""

    name: str
    x: Tensor
    mask: Tensor


class SourceEmbedding(nn.Module):
    """Validates ``{name: TokenSet}`` inputs and prepares them for attention.

    Args:
        sources: the names of the sources this module fuses (iterated in sorted order).
        dim: token width ``D`` every source must have.
        type_embedding: ``"learned"`` (normal init, std 0.02), ``"zeros"`` (learned, zero-init)
            or ``None`` (no type embedding).
        missing_token: represent a missing source by a learned token instead of nothing.
        modality_dropout: probability of dropping each source of each sample in training.
        device, dtype: for the parameters.

    Raises:
        ValueError: a string or an empty / duplicate ``sources``, ``modality_dropout`` outside [0, 1).
    """

    def __init__(
        self,
        sources: Sequence[str],
        dim: int,
        *,
        type_embedding: Literal["learned", "zeros"] | None = "learned",
        missing_token: bool = False,
        modality_dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(sources, str):
            raise ValueError(f"sources must be a sequence of names, e.g. [{sources!r}], got the string {sources!r}")
        names = list(sources)
        if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n for n in names):
            raise ValueError(f"sources must be distinct non-empty names, got {sources!r}")
        reserved = sorted(set(names) & RESERVED_NAMES)
        if reserved:
            raise ValueError(f"source names {reserved} are reserved (they name fusion tokens / attention maps): "
                             f"rename them; reserved: {sorted(RESERVED_NAMES)}")
        if not 0.0 <= modality_dropout < 1.0:
            raise ValueError(f"modality_dropout must be in [0, 1), got {modality_dropout}")
        if type_embedding not in ("learned", "zeros", None):
            raise ValueError(f"type_embedding must be 'learned', 'zeros' or None, got {type_embedding!r}")
        self.sources = tuple(sorted(names))
        self.dim = dim
        self.modality_dropout = modality_dropout
        dd = {"device": device, "dtype": dtype}
        self.type_embedding = None
        if type_embedding is not None:
            init = torch.zeros(len(names), dim, **dd)
            if type_embedding == "learned":
                nn.init.normal_(init, std=0.02)
            self.type_embedding = nn.Parameter(init)
        self.missing = nn.Parameter(torch.randn(len(names), dim, **dd) * 0.02) if missing_token else None

    def check(self, inputs: Mapping[str, TokenSet]) -> int:
        """Validate inputs; return the batch size.

        Raises:
            KeyError: an input name that is not a declared source.
            TypeError: a value that is not a TokenSet.
            ValueError: no inputs, wrong width ``D`` or mismatched batch sizes.
        """
        if not inputs:
            raise ValueError(f"fusion needs at least one input; declared sources: {list(self.sources)}")
        batch = None
        for name, ts in inputs.items():
            if name not in self.sources:
                raise KeyError(f"unknown source {name!r}; this fusion module was built for {list(self.sources)}")
            if not isinstance(ts, TokenSet):
                raise TypeError(f"inputs[{name!r}] must be a TokenSet, got {type(ts).__name__}")
            if ts.dim != self.dim:
                raise ValueError(f"inputs[{name!r}] has width D={ts.dim}, expected {self.dim}; project it first")
            if batch is None:
                batch = ts.batch_size
            elif ts.batch_size != batch:
                raise ValueError(f"inputs[{name!r}] has batch size {ts.batch_size}, others have {batch}")
        return batch

    def align(self, inputs: Mapping[str, TokenSet]) -> dict[str, TokenSet]:
        """Validate inputs (:meth:`check`) and promote them to one floating dtype.

        The common dtype is ``torch.promote_types`` over every source's ``x`` and ``pos`` (float32 with
        bfloat16 gives float32, float32 with float64 gives float64); sources already in it are returned
        as they are. A fusion then behaves exactly as if every source had been passed in that dtype.

        Raises:
            As :meth:`check`.
        """
        self.check(inputs)
        dtypes = [t.dtype for ts in inputs.values() for t in (ts.x, ts.pos) if t is not None and t.is_floating_point()]
        common = functools.reduce(torch.promote_types, dtypes)
        if all(d == common for d in dtypes):
            return dict(inputs)
        return {
            name: dataclasses.replace(ts, x=ts.x.to(common), pos=None if ts.pos is None else ts.pos.to(common))
            for name, ts in inputs.items()
        }

    def forward(self, inputs: Mapping[str, TokenSet]) -> list[PreparedSource]:
        """Prepared sources in sorted name order (absent ones only when ``missing_token``), in one dtype (:meth:`align`)."""
        inputs = self.align(inputs)
        batch = next(iter(inputs.values())).batch_size
        ref = next(iter(inputs.values())).x
        prepared = []
        for i, name in enumerate(self.sources):
            if name in inputs and inputs[name].x.shape[1:-1].numel() == 0 and self.missing is not None:
                # a source with no token positions at all: the same as absent
                x = self.missing[i].to(ref.dtype).expand(batch, 1, self.dim)
                mask = torch.ones(batch, 1, dtype=torch.bool, device=ref.device)
            elif name in inputs:
                ts = inputs[name].flatten()
                x, mask = ts.x, ts.valid()
                mask = mask.to(x.device)
                if self.training and self.modality_dropout > 0:
                    keep = torch.rand(batch, 1, device=x.device) >= self.modality_dropout  # (B, 1)
                    mask = mask & keep
                x = zero_invalid(x, mask)
                if self.missing is not None:
                    gone = ~mask.any(dim=1)  # (B,)
                    first = torch.zeros_like(mask)
                    first[:, 0] = True
                    slot = first & gone.unsqueeze(1)  # (B, N): token 0 of missing samples
                    x = torch.where(slot.unsqueeze(-1), self.missing[i].to(x.dtype), x)
                    mask = mask | slot
            elif self.missing is not None:
                x = self.missing[i].to(ref.dtype).expand(batch, 1, self.dim)
                mask = torch.ones(batch, 1, dtype=torch.bool, device=ref.device)
            else:
                continue
            if self.type_embedding is not None:
                x = x + self.type_embedding[i].to(x.dtype)
            prepared.append(PreparedSource(name, x, mask))
        return prepared


def role_names(arg: str | Sequence[str] | None, what: str, sources: Sequence[str],
               default: Sequence[str]) -> tuple[str, ...]:
    """The source names of one role (``query=``, ``key=``, ``b=`` ...): ``arg`` or ``default``.

    Raises:
        ValueError: an empty role, a repeated name or a name that is not among ``sources``.
    """
    names = tuple(default) if arg is None else ((arg,) if isinstance(arg, str) else tuple(arg))
    if not names:
        raise ValueError(f"{what}= must name at least one source; sources={list(sources)}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what}={list(names)} repeats a source")
    unknown = [n for n in names if n not in sources]
    if unknown:
        raise ValueError(f"{what}={list(names)}: {unknown} not among sources={list(sources)}")
    return names


def concat_sources(prepared: Sequence[PreparedSource]) -> tuple[Tensor, Tensor, dict[str, tuple[int, int]]]:
    """Concatenate prepared sources on the token axis: ``x (B, sum N_i, D)``, ``mask``, ``{name: (start, stop)}``.

    ``prepared`` must be non-empty; the order is kept (callers pass sorted names).
    """
    layout, start = {}, 0
    for src in prepared:
        layout[src.name] = (start, start + src.x.shape[1])
        start += src.x.shape[1]
    x = torch.cat([s.x for s in prepared], dim=1)  # (B, sum N_i, D)
    mask = torch.cat([s.mask for s in prepared], dim=1)  # (B, sum N_i)
    return x, mask, layout

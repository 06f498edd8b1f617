"""Typed options of the sequence-parallel operators, usable wherever an operator is chosen.

``nn.Attention(64, 4, op=Ring(layout="zigzag"))`` (or ``op="ring", group=...``) runs ring attention on
this rank's shard of the tokens; with no initialised process group it is the local dense operator, so
model code never branches on the world size. These configs are :class:`attnfuse.ops.OpConfig` subclasses
whose ``spec`` is built here: the sequence-parallel operators are not in :data:`attnfuse.ops.OPERATORS`
(they need a process group, so operator-wide single-process tests do not apply to them). Importing this
module registers them in :data:`attnfuse.ops.EXTENSIONS`, so ``op_config("ring")`` / ``get_operator("Ulysses")``
resolve the names (and class names) wherever an operator is chosen: ``TransformerBlock(op="ring")``, the
fusions, YAML ``op: ring`` (``attnfuse.nn`` imports this package).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from torch import Tensor

from attnfuse.distributed.ring import ring_attention
from attnfuse.distributed.ulysses import ulysses_attention
from attnfuse.ops import Capabilities, OpConfig, OperatorSpec, register_extension

__all__ = ["SEQUENCE_PARALLEL", "Ring", "Ulysses"]


def _no_weights(name: str, return_weights: bool) -> None:
    if return_weights:
        raise TypeError(f"operator {name!r} does not return attention weights (return_weights=); "
                        "it takes key_mask=, is_causal=, return_lse=")


def _ring(q: Tensor, k: Tensor, v: Tensor, *, return_weights: bool = False, **call: Any) -> Any:
    _no_weights("ring", return_weights)
    return ring_attention(q, k, v, **call)


def _ulysses(q: Tensor, k: Tensor, v: Tensor, *, return_weights: bool = False, **call: Any) -> Any:
    _no_weights("ulysses", return_weights)
    return ulysses_attention(q, k, v, **call)


@dataclass(frozen=True, kw_only=True)
class Ring(OpConfig):
    """Options of :func:`attnfuse.distributed.ring_attention` (ring attention over a process group).

    Args:
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"``: which global positions each rank holds.
        is_causal: causal over global positions.
        scale: score scale, ``1/sqrt(D)`` when None.
        group: a ``torch.distributed`` process group (None: the world; not initialised: local attention).
    """

    name: ClassVar[str] = "ring"
    layout: str = "contiguous"
    is_causal: bool = False
    scale: float | None = None
    group: Any = None

    @property
    def spec(self) -> OperatorSpec:
        return _RING_SPEC


@dataclass(frozen=True, kw_only=True)
class Ulysses(OpConfig):
    """Options of :func:`attnfuse.distributed.ulysses_attention` (all-to-all sequence parallelism).

    Args:
        op: the operator run on the whole sequence for ``H / W`` heads (name or typed options).
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"``: which global positions each rank holds.
        is_causal: causal over global positions.
        scale: score scale (overrides ``op``'s when given).
        group: a ``torch.distributed`` process group (None: the world; not initialised: ``op`` locally).
    """

    name: ClassVar[str] = "ulysses"
    op: str | OpConfig = "dense"
    layout: str = "contiguous"
    is_causal: bool = False
    scale: float | None = None
    group: Any = None

    @property
    def spec(self) -> OperatorSpec:
        return _ULYSSES_SPEC


_TAKES = Capabilities(key_mask=True, causal=True, lse=True)
_RING_SPEC = register_extension(OperatorSpec(name="ring", fn=_ring, layout="sequence", cross=True,
                                             options=frozenset({"layout", "is_causal", "scale", "group"}), takes=_TAKES, config=Ring))
_ULYSSES_SPEC = register_extension(OperatorSpec(
    name="ulysses", fn=_ulysses, layout="sequence", cross=True,
    options=frozenset({"op", "layout", "is_causal", "scale", "group"}), takes=_TAKES, config=Ulysses))

#: Name -> options class of the sequence-parallel operators (registered in ``attnfuse.ops.EXTENSIONS`` above, so
#: ``op="ring"`` / ``op="Ring"`` resolves wherever an operator is chosen).
SEQUENCE_PARALLEL: dict[str, type[OpConfig]] = {"ring": Ring, "ulysses": Ulysses}

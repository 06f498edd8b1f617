"""Window geometry of neighborhood attention, one axis at a time, exactly as NATTEN (0.21) defines it.

Along one axis of extent ``n`` with kernel size ``k`` (any ``k >= 1``, odd or even), stride ``s``
(``1 <= s <= k``), dilation ``d``, a causal flag and a border rule:

* positions with the same index modulo ``d`` form a *dilation group*; a query only sees keys of
  its own group, and inside a group positions are renumbered ``p = i // d`` (group ``g = i % d``
  has ``n_g = ceil((n - g) / d)`` members);
* *stride groups*: the queries ``p`` with equal ``p // s`` share one window, the one of their
  *leader* ``L``: the centre query ``(p // s) * s + s // 2`` (the right-hand centre for even ``s``)
  when non-causal, the last one ``(p // s) * s + s - 1`` when causal; NATTEN clamps the leader to
  ``n_g - 1`` (a partial last group). ``s = 1`` makes every query its own leader (plain NA);
* non-causal: ``left = k // 2`` keys before the leader, ``right = k // 2 - (1 - k % 2)`` after it
  (an even kernel ``2r`` sees ``r`` on the left, the leader, ``r - 1`` on the right). With
  ``border="shift"`` (NATTEN) the window ``[L - left, L + right]`` is shifted inward to stay inside
  the group, so every query sees exactly ``k`` keys: start ``clamp(L - left, 0, n_g - k)``. With
  ``border="clip"`` (HaloNet's zero padding, masked out) the leader is not clamped and the window is
  cut at the group's ends instead, so border queries see fewer keys;
* causal: the window is ``[max(L - k + 1, 0), p]``: it ends at the query itself and is truncated
  (never shifted) near the start; a stride group shares the start of its last query's window;
* the relative-position bias index of a key is ``p_key - p_query + k - 1`` in ``[0, 2k - 2]`` (a
  query always lies inside its own window when ``s <= k``).

A multi-dimensional window is the product of the per-axis windows. Window *slots* are numbered
row-major over the axes, slot ``j`` of an axis being the key ``start + j`` (``start`` unclamped
with ``border="clip"``); empty slots (past the query in causal axes, outside the grid with
``"clip"``) hold no key. Every function here works on integer tensors of any shape, so the same
code builds gather indices, tile masks and FlexAttention ``mask_mod`` predicates.

Example (1-D, ``n = 7``, ``k = 3``; rows are queries, ``x`` marks the keys each one sees)::

    non-causal, d=1        causal, d=1            non-causal, d=2 (groups 0,2,4,6 and 1,3,5)
    q0: x x x . . . .      q0: x . . . . . .      q0: x . x . x . .
    q1: x x x . . . .      q1: x x . . . . .      q1: . x . x . x .
    q2: . x x x . . .      q2: x x x . . . .      q2: x . x . x . .
    q3: . . x x x . .      q3: . x x x . . .      q3: . x . x . x .
    q4: . . . x x x .      q4: . . x x x . .      q4: . . x . x . x
    q5: . . . . x x x      q5: . . . x x x .      q5: . x . x . x .
    q6: . . . . x x x      q6: . . . . x x x      q6: . . x . x . x

Even kernel ``k = 4`` without and with stride ``s = 2`` (``n = 7``)::

    k=4, s=1               k=4, s=2 (leaders 1, 3, 5, 6)
    q0: x x x x . . .      q0: x x x x . . .
    q1: x x x x . . .      q1: x x x x . . .
    q2: x x x x . . .      q2: . x x x x . .
    q3: . x x x x . .      q3: . x x x x . .
    q4: . . x x x x .      q4: . . . x x x x
    q5: . . . x x x x      q5: . . . x x x x
    q6: . . . x x x x      q6: . . . x x x x
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "BORDERS",
    "Geometry",
    "axis_window",
    "group_size",
    "in_window",
    "make_geometry",
    "stride_leader",
    "window_bounds",
    "window_indices",
    "window_start",
]

#: the border rules: NATTEN's inward shift, or HaloNet's zero padding masked out (windows cut at the grid)
BORDERS = ("shift", "clip")


@dataclass(frozen=True)
class Geometry:
    """Validated, per-axis neighborhood parameters of one call.

    Attributes:
        grid: token grid extents ``(X,)``, ``(X, Y)`` or ``(X, Y, Z)``.
        kernel: kernel size per axis (``>= 1``, odd or even).
        dilation: dilation per axis.
        causal: causal flag per axis.
        stride: stride per axis (``1 <= stride <= kernel``); queries in one stride group share a window.
        border: ``"shift"`` (NATTEN: windows shifted inward at the borders) or ``"clip"`` (windows
            cut at the borders, as HaloNet's masked zero padding); causal axes ignore it.
    """

    grid: tuple[int, ...]
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]
    stride: tuple[int, ...] = field(default=())
    border: Literal["shift", "clip"] = "shift"

    def __post_init__(self) -> None:
        if not self.stride:
            object.__setattr__(self, "stride", (1,) * len(self.grid))

    @property
    def rank(self) -> int:
        return len(self.grid)

    @property
    def num_tokens(self) -> int:
        return math.prod(self.grid)

    @property
    def window_size(self) -> int:
        """Number of window slots per query, ``prod(kernel)``."""
        return math.prod(self.kernel)

    @property
    def rpb_shape(self) -> tuple[int, ...]:
        """Per-head shape of a relative-position bias table, ``(2k - 1, ...)``."""
        return tuple(2 * k - 1 for k in self.kernel)

    @property
    def strided(self) -> bool:
        return any(st > 1 for st in self.stride)

    @property
    def even(self) -> bool:
        return any(k % 2 == 0 for k in self.kernel)

    @property
    def clipped(self) -> bool:
        """Whether some non-causal axis cuts its windows at the border (``border="clip"``)."""
        return self.border == "clip" and not all(self.causal)

    def axes(self) -> tuple[tuple[int, int, int, bool, int, bool], ...]:
        """Per axis ``(n, k, d, causal, stride, clip)``: the arguments of the per-axis functions."""
        clip = self.border == "clip"
        return tuple(zip(self.grid, self.kernel, self.dilation, self.causal, self.stride, (clip,) * self.rank))


def _per_axis(name: str, value, rank: int, kind: type) -> tuple:
    # bool is a subclass of int: a bool kernel size or dilation is rejected by the type check below
    if isinstance(value, kind):
        return (value,) * rank
    if isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(f"{name} must be one {kind.__name__} or a tuple of {rank} (one per grid axis), got {name}={value!r}")
        return tuple(value)
    raise TypeError(f"{name} must be a {kind.__name__} or a tuple of {rank} {kind.__name__}s, got {name}={value!r}")


def make_geometry(grid: Sequence[int], kernel_size, dilation=1, is_causal=False, stride=1, border: str = "shift") -> Geometry:
    """Normalise per-axis arguments (an int/bool or a tuple per axis) and validate them.

    Raises:
        TypeError: arguments of the wrong type.
        ValueError: non-positive kernel sizes, dilation < 1, stride < 1 or larger than the kernel,
            an unknown ``border``, ``kernel * dilation`` larger than the grid extent on some axis of a
            non-empty grid, or tuples of the wrong length.
    """
    grid = tuple(int(n) for n in grid)
    rank = len(grid)
    kernel = _per_axis("kernel_size", kernel_size, rank, int)
    dil = _per_axis("dilation", dilation, rank, int)
    causal = _per_axis("is_causal", is_causal, rank, bool)
    strides = _per_axis("stride", stride, rank, int)
    for name, vals in (("kernel_size", kernel), ("dilation", dil), ("stride", strides)):
        if any(isinstance(x, bool) or not isinstance(x, int) for x in vals):
            raise TypeError(f"{name} must hold ints, got {name}={vals!r}")
    if any(not isinstance(c, bool) for c in causal):
        raise TypeError(f"is_causal must hold bools, got is_causal={causal!r}")
    if border not in BORDERS:
        raise ValueError(f"border must be one of {BORDERS} (NATTEN's inward shift or HaloNet's masked padding), got border={border!r}")
    if any(k < 1 for k in kernel):
        raise ValueError(f"kernel_size must be >= 1 on every axis, got kernel_size={kernel}")
    if any(d < 1 for d in dil):
        raise ValueError(f"dilation must be >= 1 on every axis, got dilation={dil}")
    if any(st < 1 or st > k for st, k in zip(strides, kernel)):
        raise ValueError(f"stride must be in [1, kernel_size] on every axis (NATTEN's rule), got stride={strides}, kernel_size={kernel}")
    if math.prod(grid) == 0:  # an empty grid has no queries: any window fits (the operator returns an empty result)
        return Geometry(grid, kernel, dil, causal, strides, border)
    for axis, (n, k, d) in enumerate(zip(grid, kernel, dil)):
        if k > n:
            raise ValueError(f"kernel_size {k} is larger than the grid extent {n} on axis {axis} (grid={grid})")
        if k * d > n:
            raise ValueError(
                f"kernel_size * dilation = {k} * {d} = {k * d} exceeds the grid extent {n} on axis {axis} (grid={grid}); "
                "every dilation group must hold a full window"
            )
    return Geometry(grid, kernel, dil, causal, strides, border)


def group_size(i: Tensor, n: int, d: int) -> Tensor:
    """Size ``n_g`` of the dilation group of position(s) ``i``."""
    return (n - i % d + d - 1) // d


def stride_leader(i: Tensor, n: int, d: int, causal: bool, s: int, clip: bool = False) -> Tensor:
    """Group coordinate of the leader of the stride group of query position(s) ``i``.

    Non-causal: the centre query (right-hand centre for even ``s``); causal: the last query. Clamped
    to the last group position as NATTEN does, except for non-causal ``clip`` borders (padding).
    """
    p = i // d
    if s == 1:
        return p
    lead = (p // s) * s + ((s - 1) if causal else s // 2)
    if clip and not causal:
        return lead
    return torch.minimum(lead, group_size(i, n, d) - 1)


def window_start(i: Tensor, n: int, k: int, d: int, causal: bool, s: int = 1, clip: bool = False) -> Tensor:
    """Slot-0 key of query position(s) ``i``, in group coordinates (may be < 0 with ``clip``)."""
    lead = stride_leader(i, n, d, causal, s, clip)
    if causal:
        return torch.clamp(lead - (k - 1), min=0)
    start = lead - k // 2
    if clip:
        return start
    return torch.minimum(torch.clamp(start, min=0), group_size(i, n, d) - k)


def window_bounds(i: Tensor, n: int, k: int, d: int, causal: bool, s: int = 1, clip: bool = False) -> tuple[Tensor, Tensor]:
    """First and last (inclusive) window key of query position(s) ``i``, group coordinates, inside the group."""
    start = window_start(i, n, k, d, causal, s, clip)
    if causal:
        return start, i // d
    last = start + (k - 1)
    if clip:
        return start.clamp(min=0), torch.minimum(last, group_size(i, n, d) - 1)
    return start, last


def in_window(qi: Tensor, ki: Tensor, n: int, k: int, d: int, causal: bool, s: int = 1, clip: bool = False) -> Tensor:
    """Whether key position(s) ``ki`` lie in the window of query position(s) ``qi`` (broadcasting)."""
    lo, hi = window_bounds(qi, n, k, d, causal, s, clip)
    pk = ki // d
    return (qi % d == ki % d) & (pk >= lo) & (pk <= hi)


def axis_window(
    n: int, k: int, d: int, causal: bool, s: int = 1, clip: bool = False, device: torch.device | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """All windows along one axis.

    Returns:
        ``(keys (n, k), valid (n, k), rel (n, k))``: the absolute key position of slot ``j`` of
        query ``i`` (the query itself where the slot is empty), whether the slot holds a key
        (False past the query in causal axes and outside the grid with ``clip``), and its
        relative-position bias index.
    """
    i = torch.arange(n, device=device)
    s0 = window_start(i, n, k, d, causal, s, clip)  # (n,)
    lo, hi = window_bounds(i, n, k, d, causal, s, clip)
    p_key = s0[:, None] + torch.arange(k, device=device)  # (n, k) group coordinates
    p_q = (i // d)[:, None]
    valid = (p_key >= lo[:, None]) & (p_key <= hi[:, None])
    keys = torch.where(valid, p_key * d + (i % d)[:, None], i[:, None])  # (n, k)
    rel = (p_key - p_q + k - 1).clamp(0, 2 * k - 2)
    return keys, valid, rel


def window_indices(geom: Geometry, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Flat window indices over the whole grid.

    Returns:
        ``(keys (N, K), valid (N, K), rel (N, K))`` with ``N = prod(grid)`` row-major tokens and
        ``K = prod(kernel)`` slots: flat key index, slot validity and flat index into a
        ``(prod(2k - 1),)`` relative-position table.
    """
    rank = geom.rank
    keys: Tensor | int = 0
    rel: Tensor | int = 0
    valid: Tensor | bool = True
    for a, (n, k, d, c, st, clip) in enumerate(geom.axes()):
        kk, vv, rr = axis_window(n, k, d, c, st, clip, device)  # (n, k) each
        shape = [1] * (2 * rank)
        shape[a], shape[rank + a] = n, k  # query axis a, slot axis a of (*grid, *kernel)
        stride = math.prod(geom.grid[a + 1 :])
        rstride = math.prod(2 * kb - 1 for kb in geom.kernel[a + 1 :])
        keys = keys + kk.view(shape) * stride
        rel = rel + rr.view(shape) * rstride
        valid = valid & vv.view(shape)
    n_tok, n_win = geom.num_tokens, geom.window_size
    full = (*geom.grid, *geom.kernel)
    return (
        keys.expand(full).reshape(n_tok, n_win),  # (N, K)
        valid.expand(full).reshape(n_tok, n_win),
        rel.expand(full).reshape(n_tok, n_win),
    )

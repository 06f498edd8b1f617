"""Window geometry of neighborhood attention, one axis at a time, exactly as NATTEN defines it.

Along one axis of extent ``n`` with kernel size ``k`` (odd), dilation ``d`` and a causal flag:

* positions with the same index modulo ``d`` form a *dilation group*; a query only sees keys of
  its own group, and inside a group positions are renumbered ``p = i // d`` (group ``g = i % d``
  has ``n_g = ceil((n - g) / d)`` members);
* non-causal: the window is the ``k`` group positions ``[s, s + k)`` with
  ``s = clamp(p - k // 2, 0, n_g - k)``, i.e. centred on the query and shifted (not cut, not
  padded) to stay inside the group near the borders;
* causal: the window is ``[max(p - k + 1, 0), p]``, it ends at the query and is truncated near
  the start, so early queries see fewer than ``k`` keys;
* the relative-position bias index of a key is ``p_key - p_query + k - 1`` in ``[0, 2k - 2]``.

A multi-dimensional window is the product of the per-axis windows. Window *slots* are numbered
row-major over the axes, slot ``j`` of an axis being the key ``s + j``; in causal axes the slots past
the query are empty. Every function here works on integer tensors of any shape, so the same code
builds gather indices, tile masks and FlexAttention ``mask_mod`` predicates.

Example (1-D, ``n = 7``, ``k = 3``; rows are queries, ``x`` marks the keys each one sees)::

    non-causal, d=1        causal, d=1            non-causal, d=2 (groups 0,2,4,6 and 1,3,5)
    q0: x x x . . . .      q0: x . . . . . .      q0: x . x . x . .
    q1: x x x . . . .      q1: x x . . . . .      q1: . x . x . x .
    q2: . x x x . . .      q2: x x x . . . .      q2: x . x . x . .
    q3: . . x x x . .      q3: . x x x . . .      q3: . x . x . x .
    q4: . . . x x x .      q4: . . x x x . .      q4: . . x . x . x
    q5: . . . . x x x      q5: . . . x x x .      q5: . x . x . x .
    q6: . . . . x x x      q6: . . . . x x x      q6: . . x . x . x
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "Geometry",
    "axis_window",
    "group_size",
    "in_window",
    "make_geometry",
    "window_indices",
    "window_start",
]


@dataclass(frozen=True)
class Geometry:
    """Validated, per-axis neighborhood parameters of one call.

    Attributes:
        grid: token grid extents ``(X,)``, ``(X, Y)`` or ``(X, Y, Z)``.
        kernel: odd kernel size per axis.
        dilation: dilation per axis.
        causal: causal flag per axis.
    """

    grid: tuple[int, ...]
    kernel: tuple[int, ...]
    dilation: tuple[int, ...]
    causal: tuple[bool, ...]

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


def _per_axis(name: str, value, rank: int, kind: type) -> tuple:
    # bool is a subclass of int: a bool kernel size or dilation is rejected by the type check below
    if isinstance(value, kind):
        return (value,) * rank
    if isinstance(value, (tuple, list)):
        if len(value) != rank:
            raise ValueError(f"{name} must be one {kind.__name__} or a tuple of {rank} (one per grid axis), got {name}={value!r}")
        return tuple(value)
    raise TypeError(f"{name} must be a {kind.__name__} or a tuple of {rank} {kind.__name__}s, got {name}={value!r}")


def make_geometry(grid: Sequence[int], kernel_size, dilation=1, is_causal=False) -> Geometry:
    """Normalise per-axis arguments (an int/bool or a tuple per axis) and validate them.

    Raises:
        TypeError: arguments of the wrong type.
        ValueError: even or non-positive kernel sizes, dilation < 1, ``kernel * dilation`` larger
            than the grid extent on some axis of a non-empty grid, or tuples of the wrong length.
    """
    grid = tuple(int(n) for n in grid)
    rank = len(grid)
    kernel = _per_axis("kernel_size", kernel_size, rank, int)
    dil = _per_axis("dilation", dilation, rank, int)
    causal = _per_axis("is_causal", is_causal, rank, bool)
    for name, vals in (("kernel_size", kernel), ("dilation", dil)):
        if any(isinstance(x, bool) or not isinstance(x, int) for x in vals):
            raise TypeError(f"{name} must hold ints, got {name}={vals!r}")
    if any(not isinstance(c, bool) for c in causal):
        raise TypeError(f"is_causal must hold bools, got is_causal={causal!r}")
    if any(k < 1 or k % 2 == 0 for k in kernel):
        raise ValueError(f"kernel_size must be odd and >= 1 on every axis (NATTEN's centred windows), got kernel_size={kernel}")
    if any(d < 1 for d in dil):
        raise ValueError(f"dilation must be >= 1 on every axis, got dilation={dil}")
    if math.prod(grid) == 0:  # an empty grid has no queries: any window fits (the operator returns an empty result)
        return Geometry(grid, kernel, dil, causal)
    for axis, (n, k, d) in enumerate(zip(grid, kernel, dil)):
        if k > n:
            raise ValueError(f"kernel_size {k} is larger than the grid extent {n} on axis {axis} (grid={grid})")
        if k * d > n:
            raise ValueError(
                f"kernel_size * dilation = {k} * {d} = {k * d} exceeds the grid extent {n} on axis {axis} (grid={grid}); "
                "every dilation group must hold a full window"
            )
    return Geometry(grid, kernel, dil, causal)


def group_size(i: Tensor, n: int, d: int) -> Tensor:
    """Size ``n_g`` of the dilation group of position(s) ``i``."""
    return (n - i % d + d - 1) // d


def window_start(i: Tensor, n: int, k: int, d: int, causal: bool) -> Tensor:
    """First window key of query position(s) ``i``, in group coordinates ``p = i // d``."""
    p = i // d
    if causal:
        return torch.clamp(p - (k - 1), min=0)
    return torch.minimum(torch.clamp(p - k // 2, min=0), group_size(i, n, d) - k)


def in_window(qi: Tensor, ki: Tensor, n: int, k: int, d: int, causal: bool) -> Tensor:
    """Whether key position(s) ``ki`` lie in the window of query position(s) ``qi`` (broadcasting)."""
    s = window_start(qi, n, k, d, causal)
    pk = ki // d
    ok = (qi % d == ki % d) & (pk >= s) & (pk < s + k)
    if causal:
        ok = ok & (pk <= qi // d)
    return ok


def axis_window(n: int, k: int, d: int, causal: bool, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """All windows along one axis.

    Returns:
        ``(keys (n, k), valid (n, k), rel (n, k))``: the absolute key position of slot ``j`` of
        query ``i`` (the query itself where the slot is empty), whether the slot holds a key
        (False only past the query in causal axes), and its relative-position bias index.
    """
    i = torch.arange(n, device=device)
    s = window_start(i, n, k, d, causal)  # (n,)
    p_key = s[:, None] + torch.arange(k, device=device)  # (n, k) group coordinates
    p_q = (i // d)[:, None]
    valid = p_key <= p_q if causal else torch.ones_like(p_key, dtype=torch.bool)
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
    for a, (n, k, d, c) in enumerate(zip(geom.grid, geom.kernel, geom.dilation, geom.causal)):
        kk, vv, rr = axis_window(n, k, d, c, device)  # (n, k) each
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

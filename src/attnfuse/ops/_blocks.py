"""Grid helpers shared by the blocked local operators (halo, routing): per-axis sizes, padding, blocks, windows.

All helpers act on the grid axes of a tensor laid out ``(..., *grid, *rest)``: ``start`` is the index
of the first grid axis (2 for heads-first ``(B, H, *grid, D)`` tensors and for masks ``(B, H, *grid)``),
``rest`` are trailing axes (``D``, or none for masks) that travel along unchanged. The two attention
calls those operators share are here too: :func:`attend_blocks` (one batched SDPA call over blocks,
the fast paths) and :func:`grid_reference` (dense attention under an explicit key set, the oracles).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfuse.ops._checks import check_qkv
from attnfuse.ops.dense import dense_attention
from attnfuse.ops.reference import reference_attention

__all__ = [
    "attend_blocks", "axis_coords", "blockify", "ceil_div", "check_grid_qkv", "crop_grid", "grid_reference",
    "pad_grid", "per_axis", "unblockify", "valid_keys", "windows",
]


def ceil_div(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


def per_axis(name: str, value: int | Sequence[int], rank: int, *, minimum: int) -> tuple[int, ...]:
    """An int or a per-axis tuple as a ``rank``-tuple of ints ``>= minimum``.

    Raises:
        TypeError: not an int / sequence of ints.
        ValueError: wrong length or a value below ``minimum``.
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a tuple of {rank} ints, got {value!r}")
    if isinstance(value, int):
        values = (value,) * rank
    elif isinstance(value, Sequence) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        values = tuple(value)
        if len(values) != rank:
            raise ValueError(f"{name} must have one entry per grid axis ({rank}), got {name}={value!r}")
    else:
        raise TypeError(f"{name} must be an int or a tuple of {rank} ints, got {value!r}")
    if any(v < minimum for v in values):
        raise ValueError(f"{name} must be >= {minimum} on every axis, got {name}={value!r}")
    return values


def pad_grid(t: Tensor, pads: Sequence[tuple[int, int]], *, start: int = 2, value: float | bool = 0) -> Tensor:
    """Pad the grid axes ``start .. start+len(pads)`` by ``(before, after)`` each, with ``value``."""
    if all(p == (0, 0) for p in pads):
        return t
    n_rest = t.dim() - start - len(pads)
    flat: list[int] = [0, 0] * n_rest  # F.pad lists pairs from the last axis backwards
    for before, after in reversed(pads):
        flat += [before, after]
    return F.pad(t, flat, value=value)


def crop_grid(t: Tensor, grid: Sequence[int], *, start: int = 2) -> Tensor:
    """The leading ``grid`` part of the (end-padded) grid axes ``start .. start+len(grid)``: the inverse of end padding."""
    return t[(*(slice(None) for _ in range(start)), *(slice(0, g) for g in grid))]


def valid_keys(mask: Tensor | None, grid: Sequence[int], pads: Sequence[tuple[int, int]], device: torch.device) -> Tensor:
    """Valid-key indicator ``(B', H', *padded)``: inside the grid and allowed by ``mask (B', H', *grid)`` (all True if None)."""
    valid = mask if mask is not None else torch.ones(1, 1, *grid, dtype=torch.bool, device=device)
    return pad_grid(valid, pads, value=False)


def blockify(t: Tensor, block: Sequence[int], *, start: int = 2) -> Tensor:
    """Split a grid whose extents are multiples of ``block`` into blocks.

    ``(..., n1*b1, ..., nk*bk, *rest) -> (..., n1*...*nk, b1*...*bk, *rest)``; blocks and the
    positions inside a block are both flattened row-major.
    """
    k = len(block)
    lead, grid, rest = t.shape[:start], t.shape[start:start + k], t.shape[start + k:]
    counts = [g // b for g, b in zip(grid, block)]
    split = [s for n, b in zip(counts, block) for s in (n, b)]
    t = t.reshape(*lead, *split, *rest)  # (..., n1, b1, ..., nk, bk, *rest)
    order = (list(range(start)) + [start + 2 * i for i in range(k)] + [start + 2 * i + 1 for i in range(k)]
             + list(range(start + 2 * k, t.dim())))
    t = t.permute(order)  # (..., n1, ..., nk, b1, ..., bk, *rest)
    return t.reshape(*lead, math.prod(counts), math.prod(block), *rest)  # (..., NB, BS, *rest)


def unblockify(t: Tensor, counts: Sequence[int], block: Sequence[int], *, start: int = 2) -> Tensor:
    """Inverse of :func:`blockify`: ``(..., NB, BS, *rest) -> (..., n1*b1, ..., nk*bk, *rest)``."""
    k = len(block)
    lead, rest = t.shape[:start], t.shape[start + 2:]
    t = t.reshape(*lead, *counts, *block, *rest)  # (..., n1, ..., nk, b1, ..., bk, *rest)
    order = list(range(start)) + [i for a in range(k) for i in (start + a, start + k + a)] + list(range(start + 2 * k, t.dim()))
    t = t.permute(order)  # (..., n1, b1, ..., nk, bk, *rest)
    return t.reshape(*lead, *(n * b for n, b in zip(counts, block)), *rest)


def windows(t: Tensor, window: Sequence[int], step: Sequence[int], *, start: int = 2) -> Tensor:
    """Overlapping windows of a padded grid: window ``w`` every ``step`` positions on each axis.

    ``(..., G1, ..., Gk, *rest) -> (..., n1*...*nk, w1*...*wk, *rest)`` with ``n = (G - w) // step + 1``;
    windows and the positions inside a window are flattened row-major. The result is a copy
    (windows overlap); its backward sums the overlapping gradients.
    """
    k = len(window)
    n_rest = t.dim() - start - k
    for axis, (w, s) in enumerate(zip(window, step)):
        t = t.unfold(start + axis, w, s)  # the window axis is appended at the end
    # now (..., n1, ..., nk, *rest, w1, ..., wk)
    order = (list(range(start + k)) + list(range(start + k + n_rest, start + 2 * k + n_rest))
             + list(range(start + k, start + k + n_rest)))
    t = t.permute(order)  # (..., n1, ..., nk, w1, ..., wk, *rest)
    lead, counts, wins, rest = t.shape[:start], t.shape[start:start + k], t.shape[start + k:start + 2 * k], t.shape[start + 2 * k:]
    return t.reshape(*lead, math.prod(counts), math.prod(wins), *rest)  # (..., NB, W, *rest)


def axis_coords(grid: Sequence[int], device: torch.device | None = None) -> Tensor:
    """Integer coordinates ``(N, k)`` of every position of a ``k``-D grid, row-major (N = prod(grid))."""
    axes = [torch.arange(g, device=device) for g in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, len(grid))  # (N, k)


def check_grid_qkv(q: Tensor, k: Tensor, v: Tensor, *, ranks: tuple[int, ...] = (4, 5, 6)) -> tuple[int, ...]:
    """Validate grid inputs ``(B, H, *grid, D)`` for a self-attention grid operator; return the grid.

    Raises:
        TypeError / ValueError: as :func:`attnfuse.ops._checks.check_qkv`, a rank outside ``ranks``,
            or ``k`` on another grid than ``q``.
    """
    if not isinstance(q, Tensor) or q.dim() not in ranks:
        got = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
        dims = ", ".join(f"{r - 3}-D" for r in ranks)
        raise ValueError(f"q must be a grid (B, H, *grid, D) with a {dims} grid (rank {ranks}), got q.shape={got}")
    check_qkv(q, k, v, rank=q.dim())
    if q.shape[2:-1] != k.shape[2:-1]:
        raise ValueError(f"q and k must be on the same grid (self-attention), got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    return tuple(q.shape[2:-1])


def attend_blocks(q_blk: Tensor, k_blk: Tensor, v_blk: Tensor, *, key_mask: Tensor | None = None, bias: Tensor | None = None,
                  scale: float | None = None) -> Tensor:
    """Attention inside every block: one batched SDPA call, the blocks folded into the head axis.

    Query block ``n`` attends only to its own key block ``n`` (a halo window, or the gathered routed
    regions); a query whose keys are all masked gets zeros (as :func:`attnfuse.ops.dense_attention`).

    Args:
        q_blk, k_blk, v_blk: blocked queries, keys and values (see Shapes).
        key_mask: bool, True = key takes part; ``B'`` in ``{1, B}``, ``H'`` in ``{1, H}``.
        bias: additive score bias; ``B'`` in ``{1, B}``, ``H'`` in ``{1, H}``.
        scale: score scale, ``1/sqrt(D)`` when None.

    Shapes:
        ``q_blk (B, H, NB, Bq, D)``, ``k_blk (B, H, NB, W, D)``, ``v_blk (B, H, NB, W, Dv)``,
        ``key_mask (B', H', NB, W)``, ``bias (B', H', NB, Bq, W)`` -> ``(B, H, NB, Bq, Dv)``.
    """
    b, h, nb, bq, d = q_blk.shape
    w, dv = k_blk.shape[3], v_blk.shape[-1]
    keys3 = bias4 = None
    if key_mask is not None:
        bm = key_mask.shape[0]
        keys3 = key_mask.expand(bm, h, nb, w).reshape(bm, h * nb, w)  # (B', H*NB, W)
    if bias is not None:
        bb = bias.shape[0]
        bias4 = bias.expand(bb, h, nb, bq, w).reshape(bb, h * nb, bq, w)  # (B', H*NB, Bq, W)
    out = dense_attention(
        q_blk.reshape(b, h * nb, bq, d), k_blk.reshape(b, h * nb, w, d), v_blk.reshape(b, h * nb, w, dv),
        key_mask=keys3, bias=bias4, scale=scale, backend="sdpa",
    )  # (B, H*NB, Bq, Dv)
    return out.reshape(b, h, nb, bq, dv)  # (B, H, NB, Bq, Dv)


def grid_reference(q: Tensor, k: Tensor, v: Tensor, allowed: Tensor, *, mask: Tensor | None, bias: Tensor | None = None,
                   scale: float | None, need_weights: bool) -> tuple[Tensor, Tensor | None]:
    """Dense reference attention over the row-major flattened grid under an explicit key set.

    Args:
        q, k, v: ``(B, H, *grid, D)``, ``(B, H, *grid, D)``, ``(B, H, *grid, Dv)``.
        allowed: bool (query, key) pairs the operator attends, broadcastable to ``(B, H, N, N)``.
        mask: bool key mask ``(B', H', *grid)`` (checked) combined with ``allowed``, or None.
        bias: additive score bias broadcastable to ``(B, H, N, N)``, or None.
        scale: score scale, ``1/sqrt(D)`` when None.
        need_weights: return the weights too (else None in their place).

    Returns:
        ``(out (B, H, *grid, Dv), weights (B, H, N, N) or None)``.
    """
    b, h, *grid, d = q.shape
    n = math.prod(grid)
    if mask is not None:
        allowed = allowed & mask.reshape(mask.shape[0], mask.shape[1], 1, n)  # (B', H', N, N)
    out, weights, _ = reference_attention(
        q.reshape(b, h, n, d), k.reshape(b, h, n, d), v.reshape(b, h, n, v.shape[-1]),  # (B, H, N, *)
        mask=allowed, bias=bias, scale=scale,
    )
    return out.reshape(b, h, *grid, v.shape[-1]), (weights if need_weights else None)

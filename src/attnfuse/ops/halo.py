"""Halo (blocked local) attention: query blocks attend to their block extended by a halo.

Paper: Vaswani, Ramachandran, Srinivas, Parmar, Hechtman, Shlens, "Scaling Local Self-Attention for
Parameter Efficient Visual Backbones" (HaloNet, https://arxiv.org/abs/2103.12731).
Status: exact for any grid size (pad + mask); backends ``"blocked"`` (unfolded windows, one batched
SDPA call, autograd backward) and ``"reference"`` (dense attention under the explicit key-set mask).
Deviation: positions outside the grid are *never* attended (masked). ``timm``'s ``HaloAttn`` pads the
keys with zeros and lets queries attend to them (score 0, value 0) and requires divisible grids.

Semantics, per grid axis of extent ``G`` with block ``b`` and halo ``h``: the query at coordinate
``x`` lies in block ``n = x // b``; it attends to every key ``y`` with
``n*b - h <= y < (n+1)*b + h`` and ``0 <= y < G`` (on every axis), and that is allowed by ``key_mask``.
The last block may be partial (``G % b != 0``): its missing queries are simply not computed.

Tiny materialised example, 1-D grid ``G = 5``, ``block_size = 2``, ``halo_size = 1``
(row = query, column = key, 1 = attended)::

    q0  1 1 1 0 0      block 0 = {0, 1}, window [-1, 3) -> keys 0..2
    q1  1 1 1 0 0
    q2  0 1 1 1 1      block 1 = {2, 3}, window [1, 5)  -> keys 1..4
    q3  0 1 1 1 1
    q4  0 0 0 1 1      block 2 = {4} (partial), window [3, 7) -> keys 3, 4

Equivalent dense formulation (what backend ``"reference"`` runs)::

    allowed[i, j] = all_axes(start_i - h <= c_j < start_i + b + h) & key_mask[j]   # start_i = (c_i // b) * b
    out = softmax(scale * q @ k^T + bias_dense, over allowed) @ v              # zero rows where nothing allowed
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from attnfuse.ops._blocks import (
    attend_blocks,
    axis_coords,
    blockify,
    ceil_div,
    check_grid_qkv,
    crop_grid,
    grid_reference,
    pad_grid,
    per_axis,
    unblockify,
    valid_keys,
    windows,
)
from attnfuse.ops._checks import check_key_mask
from attnfuse.ops._guards import drop_masked_keys, empty_like_result, is_empty
from attnfuse.ops._registry import operator
from attnfuse.ops.backends import Backend, Call

__all__ = [
    "halo_attention", "halo_key_sets", "halo_query_blocks", "halo_relative_index", "halo_relative_logits", "halo_windows",
]


def halo_windows(grid: Sequence[int], block: Sequence[int], halo: Sequence[int]) -> tuple[tuple[int, ...], int, int]:
    """Block counts per axis, positions per block ``Bq`` and keys per window ``W`` of a halo layout."""
    counts = tuple(ceil_div(g, b) for g, b in zip(grid, block))
    return counts, math.prod(block), math.prod(b + 2 * h for b, h in zip(block, halo))


def halo_key_sets(grid: Sequence[int], block: Sequence[int], halo: Sequence[int],
                  device: torch.device | None = None) -> tuple[Tensor, Tensor]:
    """The explicit key set of every query and the bias index of every allowed pair.

    Args:
        grid: grid extents ``(G1, ..., Gk)``.
        block, halo: per-axis block and halo sizes.

    Returns:
        ``allowed (N, N)`` bool (query, key) over the row-major flattened grid, and
        ``index (3, N, N)`` long: for each pair the (block, position in block, position in window)
        coordinates used to read a ``(..., NB, Bq, W)`` bias (meaningful where ``allowed``).
    """
    block_t = torch.tensor(block, device=device)
    halo_t = torch.tensor(halo, device=device)
    counts, _, _ = halo_windows(grid, block, halo)
    c = axis_coords(grid, device)  # (N, k)
    lo = (c // block_t) * block_t - halo_t  # (N, k) first key coordinate of each query's window
    offset = c.unsqueeze(0) - lo.unsqueeze(1)  # (N, N, k) key position inside the query's window
    width = block_t + 2 * halo_t  # (k,)
    allowed = ((offset >= 0) & (offset < width)).all(dim=-1)  # (N, N)
    offset = offset.clamp(min=0).minimum(width - 1)
    win = torch.zeros(offset.shape[:2], dtype=torch.long, device=device)
    blk = torch.zeros(c.shape[0], dtype=torch.long, device=device)
    pos = torch.zeros(c.shape[0], dtype=torch.long, device=device)
    for a in range(len(grid)):  # row-major flattening of window / block / in-block coordinates
        win = win * width[a] + offset[..., a]
        blk = blk * counts[a] + c[:, a] // block[a]
        pos = pos * block[a] + c[:, a] % block[a]
    index = torch.stack([blk.unsqueeze(1).expand_as(win), pos.unsqueeze(1).expand_as(win), win])  # (3, N, N)
    return allowed, index


def halo_relative_index(block: Sequence[int], halo: Sequence[int], device: torch.device | None = None) -> Tensor:
    """Relative offset of every (query in block, key in window) pair, per axis, as a table index.

    Returns:
        ``(k, Bq, W)`` long: on axis ``a``, ``key_offset - query_offset + block_a + halo_a - 1`` in
        ``[0, 2 * (block_a + halo_a) - 1)``, i.e. an index into a per-axis relative table of that size.
    """
    rows = []
    qpos, kpos = axis_coords(block, device), axis_coords([b + 2 * h for b, h in zip(block, halo)], device)  # (Bq, k), (W, k)
    for a, (b, h) in enumerate(zip(block, halo)):
        rows.append(kpos[:, a].view(1, -1) - (qpos[:, a] + h).view(-1, 1) + b + h - 1)  # (Bq, W)
    return torch.stack(rows)  # (k, Bq, W)


def halo_query_blocks(q: Tensor, block: Sequence[int]) -> Tensor:
    """Queries ``(B, H, *grid, D)`` cut into (end-padded) blocks ``(B, H, NB, Bq, D)``, as the operator sees them."""
    grid = q.shape[2:-1]
    extra = [ceil_div(g, b) * b - g for g, b in zip(grid, block)]
    return blockify(pad_grid(q, [(0, e) for e in extra]), block)  # (B, H, NB, Bq, D)


def halo_relative_logits(q: Tensor, tables: Sequence[Tensor], block_size: int | Sequence[int],
                         halo_size: int | Sequence[int]) -> Tensor:
    """HaloNet's relative logits ``q_i . (r_1[d_1] + ... + r_k[d_k])`` as a :func:`halo_attention` bias.

    ``d_a`` is the offset of the key from the query on axis ``a`` (an index into ``tables[a]``, as
    :func:`halo_relative_index`). The logits separate over axes, so each axis is computed on its own
    window extent only: ``q @ r_a^T`` ``(..., Bq, 2 (b_a + h_a) - 1)``, read at each query's offsets
    (a gather over ``W_a = b_a + 2 h_a`` keys, not the whole window ``W``), and the full
    ``(B, H, NB, Bq, W)`` bias is written once, by one broadcast sum over the axes. This replaces one
    full-window gather per axis plus their sum (issue 13, item 11: about 2× less forward time).

    Args:
        q: queries ``(B, H, *grid, D)``.
        tables: one relative embedding table per grid axis, ``(2 (b_a + h_a) - 1, D)``.
        block_size, halo_size: as :func:`halo_attention` (int or one per axis).

    Returns:
        ``(B, H, NB, Bq, W)`` logits (not scaled), to pass as ``bias=``.

    Raises:
        ValueError: a table count or table shape that does not match the grid rank / sizes.
    """
    grid = q.shape[2:-1]
    block = per_axis("block_size", block_size, len(grid), minimum=1)
    halo = per_axis("halo_size", halo_size, len(grid), minimum=0)
    spans = [2 * (b + h) - 1 for b, h in zip(block, halo)]
    if len(tables) != len(grid) or any(t.shape != (s, q.shape[-1]) for t, s in zip(tables, spans)):
        raise ValueError(f"tables must be one (2 (block + halo) - 1, D) tensor per axis, i.e. shapes "
                         f"{[(s, q.shape[-1]) for s in spans]}, got {[tuple(t.shape) for t in tables]}")
    q_blk = halo_query_blocks(q, block)  # (B, H, NB, Bq, D)
    lead = q_blk.shape[:-1]  # (B, H, NB, Bq)
    qpos = axis_coords(block, q.device)  # (Bq, k) coordinates of each query inside its block
    widths = [b + 2 * h for b, h in zip(block, halo)]
    total = None
    for a, (table, b, w) in enumerate(zip(tables, block, widths)):
        logits = q_blk @ table.to(q.dtype).t()  # (B, H, NB, Bq, span_a)
        index = torch.arange(w, device=q.device).view(1, w) - qpos[:, a].view(-1, 1) + b - 1  # (Bq, W_a)
        part = logits.gather(-1, index.expand(*lead, w))  # (B, H, NB, Bq, W_a)
        shape = [1] * len(grid)
        shape[a] = w
        part = part.reshape(*lead, *shape)  # (B, H, NB, Bq, 1.., W_a, ..1)
        total = part if total is None else total + part  # broadcast: the full window once at the end
    return total.reshape(*lead, math.prod(widths))  # (B, H, NB, Bq, W) row-major window


def _bias5(bias: Tensor, counts: Sequence[int], bq: int, w: int) -> Tensor:
    b5 = bias.reshape((1,) * (5 - bias.dim()) + tuple(bias.shape))  # (B', H', NB', Bq', W')
    return b5.expand(b5.shape[0], b5.shape[1], math.prod(counts), bq, w)  # (B', H', NB, Bq, W)


def _reference(q, k, v, *, block, halo, mask, bias, scale, need_weights):
    grid = q.shape[2:-1]
    allowed, index = halo_key_sets(grid, block, halo, q.device)  # (N, N), (3, N, N)
    dense_bias = None
    if bias is not None:
        counts, bq, w = halo_windows(grid, block, halo)
        dense_bias = _bias5(bias, counts, bq, w)[:, :, index[0], index[1], index[2]]  # (B', H', N, N)
    return grid_reference(q, k, v, allowed, mask=mask, bias=dense_bias, scale=scale, need_weights=need_weights)


def _blocked(q, k, v, *, block, halo, mask, bias, scale, need_weights):
    grid = q.shape[2:-1]
    counts, bq, w = halo_windows(grid, block, halo)
    extra = [n * s - g for n, s, g in zip(counts, block, grid)]
    win = [s + 2 * hh for s, hh in zip(block, halo)]
    kpads = [(hh, hh + e) for hh, e in zip(halo, extra)]
    q_blk = blockify(pad_grid(q, [(0, e) for e in extra]), block)  # (B, H, NB, Bq, D)
    k_win = windows(pad_grid(k, kpads), win, block)  # (B, H, NB, W, D)
    v_win = windows(pad_grid(v, kpads), win, block)  # (B, H, NB, W, Dv)
    key_mask = None
    if mask is not None or any(p != (0, 0) for p in kpads):
        key_mask = windows(valid_keys(mask, grid, kpads, q.device), win, block)  # (B', H', NB, W)
    b5 = None if bias is None else _bias5(bias, counts, bq, w)  # (B', H', NB, Bq, W)
    out = attend_blocks(q_blk, k_win, v_win, key_mask=key_mask, bias=b5, scale=scale)  # (B, H, NB, Bq, Dv)
    return crop_grid(unblockify(out, counts, block), grid), None  # (B, H, *grid, Dv)


@operator("halo", layout="grid", cross=False, backends=(
    Backend("blocked", _blocked),
    Backend("reference", _reference, weights=True),
))
def halo_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    block_size: int | Sequence[int],
    halo_size: int | Sequence[int],
    *,
    key_mask: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    return_weights: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Blocked local self-attention (HaloNet) on a 1-, 2- or 3-D grid; see the module docstring.

    Args:
        q: queries ``(B, H, *grid, D)``.
        k: keys ``(B, H, *grid, D)`` (same grid).
        v: values ``(B, H, *grid, Dv)``.
        block_size: query block size, an int or one per grid axis (HaloNet: 8).
        halo_size: halo width added on each side of the block, an int or one per axis (HaloNet: 3).
        key_mask: bool key mask, ``True`` = the key exists: ``(B, *grid)`` or ``(B, H, *grid)`` (B, H may be 1).
        bias: additive score bias broadcastable to ``(B, H, NB, Bq, W)`` (``NB`` blocks, ``Bq`` =
            prod(block) queries per block, ``W`` = prod(block + 2*halo) keys per window, both
            row-major); e.g. a relative-position bias ``(H, 1, Bq, W)``. Receives gradients.
        scale: score scale, ``1/sqrt(D)`` when None.
        return_weights: also return dense weights ``(B, H, N, N)`` over the flattened grid (reference path).
        backend: ``"auto"``, ``"blocked"`` or ``"reference"``.

    Returns:
        ``out (B, H, *grid, Dv)`` or ``(out, weights)``.

    Raises:
        TypeError: non-float inputs, mixed dtypes, non-bool key mask, non-float bias, non-int sizes,
            a pair mask (``mask=``).
        ValueError: ranks, grids, key-mask or bias shapes that do not match, ``block_size < 1``, ``halo_size < 0``.

    Shapes:
        See :mod:`attnfuse.ops`; grids are ``(B, H, X, Y, D)`` in 2-D. Takes: key mask ``(B, *grid)`` /
        ``(B, H, *grid)``; bias ``(B, H, NB, Bq, W)`` (broadcastable); weights. No pair mask, no causal
        flag, no log-sum-exp.

    Example:
        >>> q = k = v = torch.randn(1, 2, 10, 7, 16)  # any grid size: no divisibility needed
        >>> halo_attention(q, k, v, block_size=4, halo_size=1).shape
        torch.Size([1, 2, 10, 7, 16])
    """
    grid = check_grid_qkv(q, k, v)
    block = per_axis("block_size", block_size, len(grid), minimum=1)
    halo = per_axis("halo_size", halo_size, len(grid), minimum=0)
    mask = check_key_mask("halo", key_mask, q.shape[0], q.shape[1], grid, legend="*grid")  # (B', H', *grid)
    if bias is not None:
        if not isinstance(bias, Tensor) or not bias.is_floating_point():
            raise TypeError(f"bias must be a floating-point tensor, got {getattr(bias, 'dtype', type(bias).__name__)}")
        counts, bq, w = halo_windows(grid, block, halo)
        target = (q.shape[0], q.shape[1], math.prod(counts), bq, w)
        if bias.dim() > 5 or any(have not in (1, want) for have, want in zip(reversed(bias.shape), reversed(target))):
            raise ValueError(f"bias must broadcast to (B, H, NB, Bq, W) = {target}, got bias.shape={tuple(bias.shape)}")
        bias = bias.to(q.dtype)
    call = Call.of(q, k, v, mask=mask, bias=bias, need_weights=return_weights)
    impl = halo_attention.spec.choose_backend(backend, call)
    b, h, n = q.shape[0], q.shape[1], math.prod(grid)
    if is_empty(b, h, n):  # nothing to compute
        out, weights, _ = empty_like_result(q, (b, h, *grid, v.shape[-1]), inputs=(q, k, v, bias),
                                            weights_shape=(b, h, n, n) if return_weights else None)
        return (out, weights) if return_weights else out
    k, v = drop_masked_keys(k, v, mask)  # masked keys never reach a matmul (NaN there included)
    out, weights = impl.fn(q, k, v, block=block, halo=halo, mask=mask, bias=bias, scale=scale, need_weights=return_weights)
    return (out, weights) if return_weights else out

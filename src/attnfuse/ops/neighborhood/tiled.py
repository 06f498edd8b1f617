"""Tiled neighborhood attention: query tiles attend densely to their key region under a window mask.

The CPU training path, in pure PyTorch (forward and backward through autograd). Queries are cut
into tiles of ``T = prod(tile)`` tokens of one dilation group, rounded up to whole stride groups;
the union of the windows of a tile is a box of at most ``tile - stride + kernel`` group positions
per axis (window starts move by at most ``stride`` per stride group; ``tile + kernel - 1`` for plain
NA, exactly ``tile`` when ``stride = kernel``), its *key region* of ``R`` tokens. Each tile then runs one dense ``T x R``
attention with a boolean mask that keeps exactly each query's NATTEN window, so the work is a few
large batched matmuls (``scaled_dot_product_attention`` when no log-sum-exp is needed) instead of
a gather per query. The region is gathered with one row ``index_select`` on ``(B*H*N, D)``
(fast on CPU), and results are scattered back with another.

Trade-off: a tile computes ``T * R`` scores for ``T * prod(kernel)`` useful ones; small tiles
waste less but give small matmuls. :func:`default_tile` holds the tile sizes measured on CPU.

Strided layout (issue 13, item 10; no-grad calls on 1-D / 2-D grids without dilation, mask, bias,
rpb or log-sum-exp): the region of a tile is a box of the grid, so instead of gathering ``R / T``
copies of every key, the keys are copied once per x tile into ``rx``-wide strips (none in 1-D) and
each run of y tiles reads its regions as one overlapping ``torch.as_strided`` view that SDPA takes
as it is (:func:`_strided_forward`). With the gathers gone, small tiles (``2 x 8``: 60 % of the
computed scores useful at k=13, vs 30 % for ``8 x 16``) pay off.

Busy machines: calls without gradients cut the tiles into chunks that a persistent pool of
single-threaded workers takes one at a time (:class:`TiledOptions`), so a thread the OS deschedules
delays its own chunk instead of every op's OpenMP barrier (issue 13, item 8).

Shapes: ``q (B, H, *grid, D)``, ``k (B, H, *grid, D)``, ``v (B, H, *grid, Dv)``; ``N = prod(grid)``,
``K = prod(kernel)``, ``nT`` tiles of ``T`` queries with regions of ``R`` keys.
"""

from __future__ import annotations

import functools
import itertools
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfuse.ops.neighborhood._windows import Geometry, in_window, window_bounds, window_start
from attnfuse.ops.reference import masked_softmax

__all__ = ["TilePlan", "TiledOptions", "default_strided_tile", "default_tile", "plan_rel", "plan_slot", "tile_plan", "tiled_neighborhood"]


def default_tile(geom: Geometry) -> tuple[int, ...]:
    """Query tile extent per axis (in dilation-group positions), tuned on a 2-core CPU, fp32, D=64."""
    if geom.rank == 1:
        return (min(128, max(32, geom.kernel[0] // 2)),)
    if geom.rank == 2:
        return (8, 8) if max(geom.kernel) <= 9 else (8, 16)
    return (4, 4, 4) if max(geom.kernel) <= 5 else (4, 4, 8)


@dataclass(frozen=True, eq=False)
class TilePlan:
    """Index tensors of one tiling (all on the compute device).

    Attributes:
        num_tiles, tile_len, region_len: ``nT``, ``T``, ``R``.
        q_index: ``(nT * T,)`` flat token index of each tile slot (padding slots repeat a token).
        k_index: ``(nT * R,)`` flat token index of each region slot.
        allowed: ``(nT, T, R)`` bool, key in the query's window.
        out_index: ``(N,)`` position ``tile * T + slot`` holding each token's result.

    The ``(nT, T, R)`` relative-position-bias and window-slot indices are built on demand by
    :func:`plan_rel` / :func:`plan_slot` (they are only needed with ``rpb`` / ``bias``).
    """

    num_tiles: int
    tile_len: int
    region_len: int
    q_index: Tensor
    k_index: Tensor
    allowed: Tensor
    out_index: Tensor


def _axis_tiles(n: int, k: int, d: int, causal: bool, st: int, clip: bool, t: int) -> tuple[Tensor, ...]:
    """Tiles of one axis: per tile its queries, region keys, mask, bias and slot indices.

    A tile holds ``t`` group positions, rounded up to whole stride groups (tiles start at group
    position 0, so they never split a stride group); the windows of its queries then span at
    most ``t - stride + k`` keys (window starts grow by ``stride`` per stride group), the region.

    Returns ``(q (nt, t), q_valid (nt, t), keys (nt, r), allowed (nt, t, r), rel, slot)`` in
    absolute positions; tiles never mix dilation groups.
    """
    largest = -(-n // d)  # largest dilation group
    t = min(-(-t // st) * st, largest)
    r = min(t - st + k, largest)
    parts: list[tuple[Tensor, ...]] = []
    for g in range(d):
        ng = (n - g + d - 1) // d
        nt = -(-ng // t)
        p = torch.arange(nt * t).view(nt, t)  # (nt, t) group positions
        q_valid = p < ng
        p = p.clamp(max=ng - 1)  # padding slots repeat the last query
        qi = p * d + g
        start = window_start(qi, n, k, d, causal, st, clip)  # (nt, t), slot 0 (may be < 0 with clip)
        first, _ = window_bounds(qi[:, :1], n, k, d, causal, st, clip)  # (nt, 1)
        region_start = first[:, 0].clamp(max=max(ng - r, 0))  # the region [rs, rs + r) holds every window of the tile
        pk = region_start[:, None] + torch.arange(r)  # (nt, r)
        k_valid = pk < ng  # a group shorter than r pads its region
        pk = pk.clamp(max=ng - 1)
        ki = pk * d + g
        allowed = k_valid[:, None, :] & in_window(qi[:, :, None], ki[:, None, :], n, k, d, causal, st, clip)  # (nt, t, r)
        rel = (pk[:, None, :] - p[:, :, None] + k - 1).clamp(0, 2 * k - 2)
        slot = (pk[:, None, :] - start[:, :, None]).clamp(0, k - 1)
        parts.append((qi, q_valid, ki, allowed, rel, slot))
    return tuple(torch.cat(xs, dim=0) for xs in zip(*parts))


@functools.lru_cache(maxsize=64)
def _axes(geom: Geometry, tile: tuple[int, ...]) -> tuple[tuple[Tensor, ...], ...]:
    return tuple(_axis_tiles(n, k, d, c, st, clip, t) for (n, k, d, c, st, clip), t in zip(geom.axes(), tile))


def _place(x: Tensor, a: int, rank: int) -> Tensor:
    """An axis tensor ``(nt_a, s_a[, r_a])`` viewed on the broadcast layout ``(*nt, *s[, *r])``."""
    shape = [1] * (x.dim() * rank)
    for j, size in enumerate(x.shape):
        shape[j * rank + a] = size
    return x.reshape(shape)


def _combine(geom: Geometry, tile: tuple[int, ...], which: int, radices: tuple[int, ...], device: torch.device) -> Tensor:
    """Flat index ``(nT, T, R)`` from the per-axis ``(nt, t, r)`` tensors ``which`` (4: rel, 5: slot)."""
    axes = _axes(geom, tile)
    rank = geom.rank
    flat: Tensor | int = 0
    for a, axis in enumerate(axes):
        flat = flat + _place(axis[which], a, rank) * math.prod(radices[a + 1 :])
    nts, ts, rs = ([ax[0].shape[0] for ax in axes], [ax[0].shape[1] for ax in axes], [ax[2].shape[1] for ax in axes])
    full = (*nts, *ts, *rs)
    return flat.expand(full).reshape(math.prod(nts), math.prod(ts), math.prod(rs)).to(device)


@functools.lru_cache(maxsize=16)
def plan_rel(geom: Geometry, tile: tuple[int, ...], device: torch.device) -> Tensor:
    """``(nT, T, R)`` flat index into the ``(prod(2k - 1),)`` relative-position table (clamped where not allowed)."""
    return _combine(geom, tile, 4, geom.rpb_shape, device)


@functools.lru_cache(maxsize=16)
def plan_slot(geom: Geometry, tile: tuple[int, ...], device: torch.device) -> Tensor:
    """``(nT, T, R)`` flat window-slot index (clamped where not allowed)."""
    return _combine(geom, tile, 5, geom.kernel, device)


@functools.lru_cache(maxsize=64)
def tile_plan(geom: Geometry, tile: tuple[int, ...], device: torch.device) -> TilePlan:
    """Build (and cache) the tiling of ``geom`` with query tiles of extent ``tile``."""
    rank = geom.rank
    axes = _axes(geom, tile)
    nts = [a[0].shape[0] for a in axes]
    ts = [a[0].shape[1] for a in axes]
    rs = [a[2].shape[1] for a in axes]
    n_tiles, t_len, r_len = math.prod(nts), math.prod(ts), math.prod(rs)
    q_index: Tensor | int = 0
    k_index: Tensor | int = 0
    allowed: Tensor | bool = True
    for a, (qi, _, ki, al, _rl, _sl) in enumerate(axes):
        stride = math.prod(geom.grid[a + 1 :])
        q_index = q_index + _place(qi, a, rank) * stride  # (*nt, *t)
        k_index = k_index + _place(ki, a, rank) * stride  # (*nt, *r)
        allowed = allowed & _place(al, a, rank)  # (*nt, *t, *r)
    # where each token's result lands: per axis (tile, slot) of its non-padding occurrence
    out_index: Tensor | int = 0
    for a, (qi, qv, *_rest) in enumerate(axes):
        where = torch.empty(geom.grid[a], dtype=torch.long)
        where[qi[qv]] = torch.arange(qi.numel()).view_as(qi)[qv]  # flat (tile * t + slot) per position
        tile_a, slot_a = where // ts[a], where % ts[a]
        shape = [1] * rank
        shape[a] = geom.grid[a]
        pos = tile_a * math.prod(nts[a + 1 :]) * t_len + slot_a * math.prod(ts[a + 1 :])
        out_index = out_index + pos.view(shape)
    return TilePlan(
        num_tiles=n_tiles,
        tile_len=t_len,
        region_len=r_len,
        q_index=torch.as_tensor(q_index).expand(*nts, *ts).reshape(-1).to(device),
        k_index=torch.as_tensor(k_index).expand(*nts, *rs).reshape(-1).to(device),
        allowed=torch.as_tensor(allowed).expand(*nts, *ts, *rs).reshape(n_tiles, t_len, r_len).to(device),
        out_index=torch.as_tensor(out_index).expand(geom.grid).reshape(-1).to(device),
    )


class _TableLookup(torch.autograd.Function):
    """``table[:, index]`` whose backward is one ``scatter_add_`` (autograd's ``index_put_`` is ~8x slower on CPU)."""

    @staticmethod
    def forward(ctx, table: Tensor, index: Tensor) -> Tensor:  # table (H, V), index (...) -> (H, ...)
        ctx.save_for_backward(index)
        ctx.num_values = table.shape[1]
        return table[:, index]

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        (index,) = ctx.saved_tensors
        h = grad.shape[0]
        flat = grad.reshape(h, -1)  # (H, numel(index))
        out = flat.new_zeros(h, ctx.num_values).scatter_add_(1, index.reshape(1, -1).expand(h, -1), flat)
        return out, None


@functools.lru_cache(maxsize=16)
def _additive_mask(plan: TilePlan, dtype: torch.dtype) -> Tensor:
    """The window mask as an additive ``(1, nT, T, R)`` float mask (SDPA would convert a bool one every call)."""
    zero = torch.zeros((), dtype=dtype, device=plan.allowed.device)
    return torch.where(plan.allowed, zero, torch.full((), float("-inf"), dtype=dtype, device=zero.device))[None]


def _rows(index: Tensor, groups: int, n: int) -> Tensor:
    """Row indices into a ``(groups * n, C)`` matrix: ``index`` repeated for every group."""
    offsets = torch.arange(groups, device=index.device) * n  # (G,)
    return (offsets[:, None] + index[None, :]).reshape(-1)  # (G * len(index),)


def _gather_rows(x: Tensor, index: Tensor, groups: int, n: int) -> Tensor:
    """``x (G, N, C)``-shaped tensor viewed as rows, gathered per group: returns ``(G, len(index), C)``."""
    c = x.shape[-1]
    rows = x.reshape(groups * n, c).index_select(0, _rows(index, groups, n))  # (G * len, C)
    return rows.view(groups, index.numel(), c)


def _to_bh(t: Tensor, b: int, h: int) -> Tensor:
    """``(b?, h?, nT, T, R)`` with ``b?`` in ``{1, B}``, ``h?`` in ``{1, H}`` -> 4-D ``(B*H or 1, nT, T, R)``."""
    if t.shape[0] == 1 and t.shape[1] == 1:
        return t[0]  # (1, nT, T, R)
    return t.expand(b, h, *t.shape[2:]).reshape(b * h, *t.shape[2:])


def default_strided_tile(geom: Geometry) -> tuple[int, ...]:
    """Query tile of the ``"strided"`` layout (rank 1 or 2), tuned on a 2-core CPU, fp32, D=64."""
    if geom.rank == 1:
        return (min(64, max(32, geom.kernel[0] // 4)),)  # no region copies in 1-D: smaller tiles, less waste
    return (2, 8)  # k=7 and k=13 on 64x64: 1.3-1.5x faster than 8x8 / 8x16 in this layout


def _runs(starts: list[int]) -> list[tuple[int, int, int, int]]:
    """Cut a sequence of region starts into arithmetic runs ``(i0, i1, start of i0, step)``."""
    out = []
    i = 0
    while i < len(starts):
        j = i + 1
        step = starts[j] - starts[i] if j < len(starts) else 0
        while j < len(starts) and starts[j] - starts[j - 1] == step:
            j += 1
        out.append((i, j, starts[i], step))
        i = j
    return out


@dataclass(frozen=True, eq=False)
class _StridedPlan:
    """The ``"strided"`` layout of one tiling: axis 0 (``y``) regions as views, axis 1 (``x``) copied.

    Attributes:
        tiles: ``(nty, ty, ntx, tx)``; ``regions``: ``(ry, rx)``.
        y_runs: arithmetic runs of the axis-0 region starts (:func:`_runs`).
        x_starts: axis-1 region start of each x tile.
        y_index, x_index: query position of every tile slot per axis (padding slots repeat a query),
            ``None`` where the axis needs no padding.
        mask: additive ``(ntx, nty, T, R)`` window mask, region slots ordered ``(ry, rx)``.
    """

    tiles: tuple[int, int, int, int]
    regions: tuple[int, int]
    y_runs: list[tuple[int, int, int, int]]
    x_starts: list[int]
    y_index: Tensor | None
    x_index: Tensor | None
    mask: Tensor


@functools.lru_cache(maxsize=16)
def _strided_plan(geom: Geometry, tile: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> _StridedPlan:
    axes = _axes(geom, tile)  # per axis (q (nt, t), q_valid, keys (nt, r), allowed (nt, t, r), rel, slot)
    ones = (torch.zeros(1, 1, dtype=torch.long), None, torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1, 1, dtype=torch.bool))
    ay, ax = (axes[0], axes[1]) if geom.rank == 2 else (axes[0], ones)  # 1-D: a trivial x axis
    (nty, ty), (ntx, tx) = ay[0].shape, ax[0].shape
    ry, rx = ay[2].shape[1], ax[2].shape[1]
    allowed = ay[3][None, :, :, None, :, None] & ax[3][:, None, None, :, None, :]  # (ntx, nty, ty, tx, ry, rx)
    mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, float("-inf"))
    ny, nx = geom.grid[0], (geom.grid[1] if geom.rank == 2 else 1)
    return _StridedPlan(
        tiles=(nty, ty, ntx, tx),
        regions=(ry, rx),
        y_runs=_runs(ay[2][:, 0].tolist()),
        x_starts=ax[2][:, 0].tolist(),
        y_index=None if nty * ty == ny else ay[0].reshape(-1).to(device),
        x_index=None if ntx * tx == nx else ax[0].reshape(-1).to(device),
        mask=mask.reshape(ntx, nty, ty * tx, ry * rx).to(device),
    )


def _strided_ok(geom: Geometry, q: Tensor, *others: Tensor | None) -> bool:
    """Whether the ``"strided"`` layout applies (see :class:`TiledOptions`)."""
    return geom.rank <= 2 and all(d == 1 for d in geom.dilation) and _plain_eager(q, *others)


def _strided_forward(
    q: Tensor, k: Tensor, v: Tensor, geom: Geometry, scale: float, tile: tuple[int, ...], workers: int, options: TiledOptions
) -> Tensor:
    """No-grad forward with key regions as overlapping strided views instead of gathered copies.

    Along axis 0 the region of a tile is ``ry`` whole grid rows, a contiguous block of a tensor
    whose rows are ``rx`` keys wide, and region starts of consecutive tiles form a few arithmetic
    runs (constant at the shifted borders, step ``ty`` inside): each run is one
    ``torch.as_strided`` view ``(BH, tiles, ry * rx, D)`` that SDPA reads in place. Along axis 1
    the ``ntx`` regions are copied once (``rx / tx`` copies of K and V instead of ``R / T``); a
    1-D grid needs no copy at all. Results are written straight into the output grid.
    Shapes as :func:`tiled_neighborhood`; returns ``out (B, H, *grid, Dv)``.
    """
    plan = _strided_plan(geom, tile, q.device, q.dtype)
    b, h = q.shape[:2]
    bh, d, dv = b * h, q.shape[-1], v.shape[-1]
    nty, ty, ntx, tx = plan.tiles
    ry, rx = plan.regions
    ny, nx = geom.grid[0], (geom.grid[1] if geom.rank == 2 else 1)
    t_len, r_len = ty * tx, ry * rx

    def regions(x: Tensor) -> Tensor:  # (ntx, BH, ny, rx, C), contiguous
        x = x.reshape(bh, ny, nx, -1)
        if ntx == 1 and rx == nx:
            return x.contiguous()[None]  # as_strided below assumes contiguous rows
        xt = x.new_empty(ntx, bh, ny, rx, x.shape[-1])
        for i, s in enumerate(plan.x_starts):
            xt[i].copy_(x[:, :, s : s + rx])
        return xt

    kt, vt = regions(k), regions(v)
    qq = q.reshape(bh, ny, nx, d)
    if plan.y_index is not None:
        qq = qq.index_select(1, plan.y_index)
    if plan.x_index is not None:
        qq = qq.index_select(2, plan.x_index)
    if ty == 1:  # (ntx, BH, nty, tx, D) views, no copy
        q_tiles = [qq[:, :, i * tx : (i + 1) * tx] for i in range(ntx)]
    else:
        qt = qq.reshape(bh, nty, ty, ntx, tx, d).permute(3, 0, 1, 2, 4, 5).contiguous()
        q_tiles = list(qt.view(ntx, bh, nty, t_len, d).unbind(0))
    out = q.new_empty(bh, nty, ty, ntx, tx, dv)

    def view(xt: Tensor, i: int, y0: int, step: int, count: int) -> Tensor:  # (BH, count, R, C)
        c = xt.shape[-1]
        base = xt[i]
        return base.as_strided((bh, count, r_len, c), (ny * rx * c, step * rx * c, c, 1), base.storage_offset() + y0 * rx * c)

    inference = torch.is_inference_mode_enabled()  # thread-local: pool workers must match the caller's tensors

    def item(job: tuple[int, int, int, int, int]) -> None:
        i, t0, t1, y0, step = job
        with torch.inference_mode() if inference else torch.no_grad():  # inference_mode(False) would enable grad
            res = F.scaled_dot_product_attention(
                q_tiles[i][:, t0:t1], view(kt, i, y0, step, t1 - t0), view(vt, i, y0, step, t1 - t0),
                attn_mask=plan.mask[i, t0:t1][None], scale=scale,
            )  # (BH, t1 - t0, T, Dv)
            out[:, t0:t1, :, i].copy_(res.view(bh, t1 - t0, ty, tx, dv))

    jobs = []
    pieces = max(1, -(-workers * max(1, options.chunks_per_worker) // (ntx * len(plan.y_runs)))) if workers > 1 else 1
    for i in range(ntx):
        for i0, i1, s0, step in plan.y_runs:
            m = min(pieces, i1 - i0)
            cuts = [i0 + round(j * (i1 - i0) / m) for j in range(m + 1)]
            jobs += [(i, a, c, s0 + (a - i0) * step, step) for a, c in itertools.pairwise(cuts) if c > a]
    if workers > 1 and len(jobs) > 1 and bh * nty * ntx * t_len * r_len * d >= options.min_pool_work:
        list(_pool(workers).map(item, jobs))
    else:
        for job in jobs:
            item(job)
    out = out.view(bh, nty * ty, ntx * tx, dv)
    if nty * ty != ny or ntx * tx != nx:
        out = out[:, :ny, :nx].contiguous()
    return out.view(b, h, *geom.grid, dv)


@dataclass(frozen=True, eq=False)
class TiledOptions:
    """Per-call knobs of the tiled backend (``backend_options`` style; the defaults are what ``"auto"`` uses).

    Attributes:
        tile: query tile extent per axis in group positions (default :func:`default_tile`; rounded
            up to whole stride groups).
        workers: ``"auto"`` or an int. Without gradients, the tiles are cut into chunks that
            ``workers`` pool threads (each running single-threaded ATen ops) take one at a time, so a
            worker that the OS deschedules on a busy machine delays only its chunk, not every op (one
            OpenMP barrier per op otherwise). ``"auto"`` = ``torch.get_num_threads()`` of the caller;
            1 (and any call that records gradients, or runs under ``torch.compile``) uses the
            caller's intra-op threads directly.
        chunks_per_worker: chunks per worker (more = finer dynamic balancing, smaller matmuls).
        min_pool_work: smallest call (score multiply-adds, ``B*H*nT*T*R*D``) that uses the pool;
            below it the hand-off costs more than it saves.
        layout: how key regions reach SDPA. ``"gather"``: one row ``index_select`` copy per region
            (every call can use it). ``"strided"``: regions as overlapping strided views (see
            :func:`_strided_forward`; 1-D and 2-D grids without dilation, no ``mask`` / ``bias`` /
            ``rpb`` / log-sum-exp / gradients, eager CPU tensors). ``"auto"`` takes ``"strided"``
            wherever it applies (then ``tile`` defaults to :func:`default_strided_tile`).
    """

    tile: tuple[int, ...] | None = None
    workers: int | str = "auto"
    layout: str = "auto"
    chunks_per_worker: int = 4
    min_pool_work: int = 1 << 24


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _forget_pools_after_fork() -> None:
    global _POOL_LOCK
    _POOLS.clear()  # a forked child (e.g. a DataLoader worker) has none of the parent's threads
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


def _single_thread() -> None:
    torch.set_num_threads(1)  # this worker's own OpenMP / MKL thread count (thread-local in ATen)


def _pool(workers: int) -> ThreadPoolExecutor:
    """A persistent pool of ``workers`` threads whose ATen ops run single-threaded.

    ``torch.set_num_threads`` in a worker also stores 1 as the count new threads start with, so once
    every worker has started the caller's count is stored back; the caller's own count never changes.
    """
    with _POOL_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            caller_threads = torch.get_num_threads()
            pool = ThreadPoolExecutor(workers, thread_name_prefix="attnfuse-na", initializer=_single_thread)
            barrier = threading.Barrier(workers)
            list(pool.map(lambda _: barrier.wait(), range(workers)))  # start every worker now
            torch.set_num_threads(caller_threads)
            _POOLS[workers] = pool
        return pool


def _plain_eager(*tensors: Tensor | None) -> bool:
    """Whether the call runs eagerly on plain CPU tensors, with no tracing or dispatch mode that pool threads would miss."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    if any(x is not None and (type(x) is not Tensor or x.device.type != "cpu") for x in tensors):
        return False  # fake / functional / subclass tensors (export, make_fx) or another device
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is None


def _resolve_workers(options: TiledOptions, grad: bool, *tensors: Tensor | None) -> int:
    if grad or not _plain_eager(*tensors):
        return 1
    if options.workers == "auto":
        return torch.get_num_threads()
    return max(1, int(options.workers))


def tiled_neighborhood(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    geom: Geometry,
    *,
    scale: float,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    rpb: Tensor | None = None,
    need_lse: bool = False,
    tile: tuple[int, ...] | None = None,
    options: TiledOptions | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Neighborhood attention over query tiles; inputs are assumed validated.

    Args:
        q, k, v: see the module shapes.
        geom: the validated window geometry.
        scale: score scale.
        mask: bool key validity ``(Bm, Hm, N)``, ``Bm`` in ``{1, B}``, ``Hm`` in ``{1, H}``.
        bias: additive window-slot bias ``(Bb, Hb, N, K)``.
        rpb: relative-position bias ``(H, 2k_0 - 1, ...)``.
        need_lse: also return the log-sum-exp (uses explicit matmuls instead of SDPA).
        tile: query tile extent per axis (overrides ``options.tile``).
        options: :class:`TiledOptions` (tile, pool workers).

    Returns:
        ``(out (B, H, *grid, Dv), lse (B, H, *grid) or None)``.
    """
    options = options or TiledOptions()
    grad = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (q, k, v, bias, rpb))
    if options.layout not in ("auto", "gather", "strided"):
        raise ValueError(f"options.layout must be 'auto', 'gather' or 'strided', got {options.layout!r}")
    if (
        options.layout != "gather" and mask is None and bias is None and rpb is None and not need_lse and not grad
        and _strided_ok(geom, q, k, v)
    ):
        strided_tile = tuple(tile or options.tile or default_strided_tile(geom))
        workers = _resolve_workers(options, grad, q, k, v)
        return _strided_forward(q, k, v, geom, scale, strided_tile, workers, options), None
    b, h = q.shape[:2]
    n, dv = geom.num_tokens, v.shape[-1]
    tile = tuple(tile or options.tile or default_tile(geom))
    plan = tile_plan(geom, tile, q.device)
    nt, t, r = plan.num_tiles, plan.tile_len, plan.region_len
    bh = b * h

    allowed = plan.allowed[None, None]  # (1, 1, nT, T, R)
    if mask is not None:
        bm, hm = mask.shape[:2]
        key_ok = _gather_rows(mask.reshape(bm * hm, n, 1), plan.k_index, bm * hm, n)  # (Bm*Hm, nT*R, 1)
        allowed = allowed & key_ok.view(bm, hm, nt, 1, r)  # (Bm, Hm, nT, T, R)
    score_bias = None
    if rpb is not None:
        score_bias = _TableLookup.apply(rpb.reshape(h, -1), plan_rel(geom, tile, q.device))[None]  # (1, H, nT, T, R)
    if bias is not None:
        bb, hb = bias.shape[:2]
        per_query = _gather_rows(bias.reshape(bb * hb, n, -1), plan.q_index, bb * hb, n)  # (Bb*Hb, nT*T, K)
        per_query = per_query.view(bb, hb, nt, t, -1)
        slot = plan_slot(geom, tile, q.device).expand(bb, hb, nt, t, r)
        region_bias = per_query.gather(-1, slot)  # (Bb, Hb, nT, T, R)
        score_bias = region_bias if score_bias is None else score_bias + region_bias

    row_ok = None
    if mask is not None:  # a query whose window keys are all masked: give it every key, zero it after
        row_ok = allowed.any(dim=-1, keepdim=True)  # (Bm, Hm, nT, T, 1)
        allowed = allowed | ~row_ok

    def tiles(t0: int, t1: int) -> tuple[Tensor, Tensor | None]:
        """Tiles ``[t0, t1)``: ``(out (BH, nTc, T, Dv), lse (BH, nTc, T) or None)``."""
        c = t1 - t0
        q_t = _gather_rows(q, plan.q_index[t0 * t : t1 * t], bh, n).view(bh, c, t, -1)  # (BH, nTc, T, D)
        k_t = _gather_rows(k, plan.k_index[t0 * r : t1 * r], bh, n).view(bh, c, r, -1)  # (BH, nTc, R, D)
        v_t = _gather_rows(v, plan.k_index[t0 * r : t1 * r], bh, n).view(bh, c, r, dv)  # (BH, nTc, R, Dv)
        allowed_c = allowed[:, :, t0:t1]
        bias_c = None if score_bias is None else score_bias[:, :, t0:t1]
        if need_lse:
            compute = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
            s = torch.matmul(q_t.to(compute) * scale, k_t.to(compute).transpose(-1, -2))  # (BH, nTc, T, R)
            if bias_c is not None:
                s = s + _to_bh(bias_c.to(compute), b, h)
            s = s.masked_fill(~_to_bh(allowed_c, b, h), float("-inf"))
            weights, lse_c = masked_softmax(s)
            out_c = torch.matmul(weights, v_t.to(compute)).to(q.dtype)  # (BH, nTc, T, Dv)
            lse_c = lse_c.to(q.dtype)  # (BH, nTc, T)
        else:
            if bias_c is None and mask is None:
                attn_mask = _additive_mask(plan, q.dtype)[:, t0:t1]  # (1, nTc, T, R)
            elif bias_c is None:
                attn_mask = _to_bh(allowed_c, b, h)  # bool (BH or 1, nTc, T, R)
            else:
                attn_mask = _to_bh(bias_c.to(q.dtype).masked_fill(~allowed_c, float("-inf")), b, h)
            out_c = F.scaled_dot_product_attention(q_t, k_t, v_t, attn_mask=attn_mask, scale=scale)  # (BH, nTc, T, Dv)
            lse_c = None
        if row_ok is not None:
            ok = _to_bh(row_ok[:, :, t0:t1], b, h)  # (BH or 1, nTc, T, 1)
            out_c = torch.where(ok, out_c, torch.zeros((), dtype=out_c.dtype, device=out_c.device))
            if lse_c is not None:
                lse_c = torch.where(ok[..., 0], lse_c, torch.full((), float("-inf"), dtype=lse_c.dtype, device=lse_c.device))
        return out_c, lse_c

    workers = _resolve_workers(options, grad, q, k, v, mask, bias, rpb)
    chunks = min(nt, workers * max(1, options.chunks_per_worker))
    if workers <= 1 or chunks <= 1 or bh * nt * t * r * q.shape[-1] < options.min_pool_work:
        out, lse = tiles(0, nt)
    else:
        bounds = [round(i * nt / chunks) for i in range(chunks + 1)]

        def chunk(i: int) -> tuple[Tensor, Tensor | None]:
            with torch.no_grad():  # grad mode is per thread: the caller's does not reach the workers
                return tiles(bounds[i], bounds[i + 1])

        parts = list(_pool(workers).map(chunk, range(chunks)))
        out = torch.cat([o for o, _ in parts], dim=1)  # (BH, nT, T, Dv)
        lse = torch.cat([x for _, x in parts], dim=1) if need_lse else None
    out = _gather_rows(out.reshape(bh, nt * t, dv), plan.out_index, bh, nt * t)  # (BH, N, Dv)
    out = out.view(b, h, *geom.grid, dv)
    if lse is not None:
        lse = _gather_rows(lse.reshape(bh, nt * t, 1), plan.out_index, bh, nt * t).view(b, h, *geom.grid)
    return out, lse

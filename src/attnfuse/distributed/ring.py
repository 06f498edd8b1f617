"""Ring attention: exact softmax attention over a sequence sharded across a process group.

Paper: Liu, Zaharia, Abbeel, "Ring Attention with Blockwise Transformers for Near-Infinite Context"
(https://arxiv.org/abs/2310.01889); striped layout: Brandon et al. (https://arxiv.org/abs/2311.09431);
zig-zag layout as in ``zhuzilin/ring-flash-attention``. Spec: ``docs/distributed.md``.
Status: exact (tested against single-process :func:`attnfuse.ops.dense_attention` on the gathered
sequence, forward and gradients, 2 and 4 gloo ranks, every layout, causal or not, key masks, uneven shards).

Each of the ``W`` ranks holds its shard of queries, keys and values (positions: :mod:`.layouts`). The
key/value block (with its key mask) travels once around the ring with ``torch.distributed`` point-to-point
(``batch_isend_irecv``): the transfer of the next block is posted before the current block is computed, so
the two overlap where the backend allows. Each block's partial attention comes from
``dense_attention(..., return_lse=True)`` and the partial results are merged exactly by their log-sum-exp
(:func:`attnfuse.ops.merge_attention`), in float32 for half dtypes. The backward pass
(``torch.autograd.Function``, nothing differentiated through communication) recomputes each block's
probabilities from the saved global log-sum-exp, ``P = exp(scale * q k^T - lse)``, and sends the key/value
block around the ring again together with the gradients ``dk, dv`` accumulated for it, so after ``W`` hops
every rank holds the gradients of its own shard::

    D = rowsum(dO * O) - dlse;  for each block: dV += P^T dO;  dS = P * (dO V^T - D);
    dQ += scale * dS K;  dK += scale * dS^T Q

Under a causal mask the blocks another rank's keys contribute are planned from global positions: a block
is skipped when no pair is allowed, computed without a mask when all are, and with ``is_causal`` (or an
explicit pair mask) on the sub-rectangle that has allowed pairs otherwise (zig-zag: half the queries or
half the keys; striped: the causal diagonal, strict for keys of higher ranks).

Deviations from the released code: shards may have different lengths (contiguous layout; lengths are
exchanged once per call), the key mask travels with the keys, gradients are returned in the input dtype.
Every rank of the group must call it (and its backward) the same number of times, as with any collective.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from attnfuse.distributed.layouts import check_layout, global_positions, group_rank_world, shard_sizes
from attnfuse.ops import dense_attention, merge_attention
from attnfuse.ops._checks import check_key_mask, check_qkv

__all__ = ["causal_work", "ring_attention"]


@dataclass(frozen=True)
class _Block:
    """The part of a (query shard, key shard) block that has allowed pairs.

    Rows ``r0:`` of the queries attend keys ``:nk``; ``kind`` is ``"full"`` (every pair), ``"causal"``
    (top-left causal on that rectangle) or ``"mask"`` (``pairs``, ``(Lq - r0, nk)`` bool).
    """

    r0: int
    nk: int
    kind: str
    pairs: Tensor | None = None

    def work(self, lq: int, count: str = "computed") -> int:
        """Score pairs of this block (``lq`` query rows in the shard): the rectangle computed, or the pairs allowed."""
        rows = lq - self.r0
        if count == "computed" or self.kind == "full":
            return rows * self.nk
        if self.kind == "causal":
            return rows * (rows + 1) // 2
        return int(self.pairs.sum())


def _plan(pos_q: Tensor | None, pos_k: Tensor | None, lq: int, lk: int) -> _Block | None:
    """Which part of the block to compute; ``pos_*`` are increasing global positions (None = not causal)."""
    if lq == 0 or lk == 0:
        return None
    if pos_q is None:
        return _Block(0, lk, "full")
    counts = torch.searchsorted(pos_k, pos_q, right=True)  # (Lq,) keys with position <= the query's
    nonzero = torch.nonzero(counts).flatten()
    if nonzero.numel() == 0:
        return None
    r0 = int(nonzero[0])  # counts is non-decreasing: rows before r0 see no key
    c = counts[r0:]
    nk = int(c[-1])
    if bool((c == nk).all()):
        return _Block(r0, nk, "full")
    steps = torch.arange(1, c.numel() + 1)
    if c.numel() == nk and bool((c == steps).all()):
        return _Block(r0, nk, "causal")
    return _Block(r0, nk, "mask", torch.arange(nk).unsqueeze(0) < c.unsqueeze(1))  # (Lq - r0, nk)


def _positions(lengths: list[int], world: int, layout: str) -> list[Tensor]:
    """Global positions of every rank's shard, from the shard lengths."""
    total = sum(lengths)
    if layout == "contiguous":
        starts = [sum(lengths[:r]) for r in range(world)]
        return [torch.arange(s, s + n) for s, n in zip(starts, lengths)]
    div = 2 * world if layout == "zigzag" else world
    if len(set(lengths)) > 1 or total % div:
        raise ValueError(f"layout {layout!r} needs equal shards of a sequence divisible by {div}, got shard lengths {lengths}")
    return [global_positions(total, world, r, layout) for r in range(world)]


def causal_work(length: int, world: int, layout: str = "contiguous", count: str = "computed") -> list[int]:
    """Score pairs per rank in causal ring attention over ``length`` tokens (the load balance of a layout).

    Args:
        length, world, layout: the sequence, the ranks, the layout.
        count: ``"computed"``: the block rectangles this implementation evaluates (a causal block costs its
            full rectangle with a dense block kernel); ``"allowed"``: the causal pairs only (the cost with a
            kernel that skips masked tiles).

    Example:
        >>> causal_work(4096, 4, "contiguous", "allowed")
        [524800, 1573376, 2621952, 3670528]
        >>> causal_work(4096, 4, "zigzag", "allowed")
        [2097664, 2097664, 2097664, 2097664]
    """
    if count not in ("computed", "allowed"):
        raise ValueError(f"count must be 'computed' or 'allowed', got count={count!r}")
    lengths = shard_sizes(length, world, layout)
    pos = _positions(lengths, world, layout)
    work = []
    for r in range(world):
        total = 0
        for s in range(world):
            block = _plan(pos[r], pos[s], lengths[r], lengths[s])
            total += 0 if block is None else block.work(lengths[r], count)
        work.append(total)
    return work


@dataclass
class _Ring:
    """Everything fixed for one call: group, ranks, sizes, plans per step."""

    group: dist.ProcessGroup | None
    rank: int
    world: int
    lq: list[int]
    lk: list[int]
    shape: tuple[int, int, int, int]  # B, H, D, Dv
    mask_heads: int  # 0 = no key mask anywhere; else the mask's head extent (1 or H)
    scale: float
    plans: list[_Block | None]  # per step t: block of source rank (rank - t) % world

    def peer(self, offset: int) -> int:
        r = (self.rank + offset) % self.world
        if self.group is None or self.group is dist.group.WORLD:
            return r
        return dist.get_global_rank(self.group, r)

    def kv_shapes(self, src: int) -> list[tuple[int, ...]]:
        """Shapes of the key/value message of rank ``src``'s block: k, v and (if any rank has one) the key mask."""
        b, h, d, dv = self.shape
        n = self.lk[src]
        return [(b, h, n, d), (b, h, n, dv)] + ([(b, self.mask_heads, n)] if self.mask_heads else [])

    def grad_shapes(self, src: int) -> list[tuple[int, ...]]:
        """Shapes of the gradient message (dk, dv) of rank ``src``'s block."""
        b, h, d, dv = self.shape
        return [(b, h, self.lk[src], d), (b, h, self.lk[src], dv)]

    def kv_message(self, k: Tensor, v: Tensor, key_mask: Tensor | None) -> list[Tensor]:
        """The tensors sent for a key/value block (no copy of contiguous ``k``, ``v``)."""
        mask = [key_mask.to(k.dtype).contiguous()] if self.mask_heads else []  # (B, H', S) as 0 / 1
        return [k.contiguous(), v.contiguous(), *mask]

    @staticmethod
    def split_kv(message: list[Tensor]) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(k (B, H, S, D), v (B, H, S, Dv), key mask (B, H', S) or None)`` of a message."""
        return message[0], message[1], (message[2] > 0.5 if len(message) > 2 else None)

    def exchange(self, send: list[Tensor], recv_shapes: list[tuple[int, ...]]) -> tuple[list[Tensor], list]:
        """Post ``send`` -> rank + 1 and receives <- rank - 1 of ``recv_shapes``; returns (receive buffers, requests).

        Both sides know every shape (exchanged once per call), so empty tensors are skipped on both.
        """
        ref = send[0]
        recv = [torch.empty(shape, dtype=ref.dtype, device=ref.device) for shape in recv_shapes]
        ops = [dist.P2POp(dist.isend, t, self.peer(1), self.group) for t in send if t.numel()]
        ops += [dist.P2POp(dist.irecv, t, self.peer(-1), self.group) for t in recv if t.numel()]
        return recv, (dist.batch_isend_irecv(ops) if ops else [])


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _block_forward(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, block: _Block, scale: float) -> tuple[Tensor, Tensor]:
    """Partial attention of rows ``block.r0:`` over keys ``:block.nk``: ``(out (B, H, Lb, Dv), lse (B, H, Lb))``."""
    q_sub = q[:, :, block.r0:]  # (B, H, Lb, D)
    k_sub, v_sub = k[:, :, : block.nk], v[:, :, : block.nk]  # (B, H, nk, D), (B, H, nk, Dv)
    km = None if key_mask is None else key_mask[..., : block.nk]  # (B, H', nk)
    pairs = None if block.pairs is None else block.pairs.to(q.device)  # (Lb, nk), planned on the CPU
    return dense_attention(q_sub, k_sub, v_sub, key_mask=km, mask=pairs, scale=scale,
                           is_causal=block.kind == "causal", return_lse=True)


#: Score elements (B * H * rows * keys) per backward tile: bounds the backward's memory per rank.
TILE_ELEMENTS = 1 << 16


def _tile_allowed(block: _Block, key_mask: Tensor | None, a: int, b: int, nk: int, device: torch.device) -> Tensor | None:
    """Allowed pairs of rows ``a:b`` (relative to ``block.r0``) x keys ``:nk``, broadcastable to ``(B, H, b-a, nk)``."""
    allowed = None
    if block.kind == "causal":  # row i sees keys j <= i
        allowed = torch.arange(nk, device=device).unsqueeze(0) <= torch.arange(a, b, device=device).unsqueeze(1)  # (b-a, nk)
    elif block.kind == "mask":
        allowed = block.pairs[a:b, :nk].to(device)  # (b-a, nk)
    if key_mask is not None:
        km = key_mask[..., :nk].unsqueeze(-2)  # (B, H', 1, nk)
        allowed = km if allowed is None else allowed & km
    return allowed


def _block_backward(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, block: _Block, scale: float,
                    dout: Tensor, lse: Tensor, delta: Tensor, dq: Tensor, dk: Tensor, dv: Tensor) -> None:
    """Add one block's gradients into ``dq (B, H, L_r, D)``, ``dk (B, H, S_src, D)``, ``dv (B, H, S_src, Dv)``.

    The probabilities are recomputed from the global log-sum-exp, ``P = exp(scale q k^T - lse)``, in tiles of
    query rows (at most :data:`TILE_ELEMENTS` scores each), so memory stays linear in the shard length.
    """
    b_, h = q.shape[:2]
    zero = torch.zeros((), dtype=q.dtype, device=q.device)
    k_blk, v_blk = k[:, :, : block.nk], v[:, :, : block.nk]  # (B, H, nk, D), (B, H, nk, Dv)
    if key_mask is not None:  # masked keys (NaN there included) never reach a matmul
        keep = key_mask[..., : block.nk].unsqueeze(-1)  # (B, H', nk, 1)
        k_blk, v_blk = torch.where(keep, k_blk, zero), torch.where(keep, v_blk, zero)
    rows = q.shape[2] - block.r0
    tile = max(1, TILE_ELEMENTS // max(1, b_ * h * block.nk))
    for a in range(0, rows, tile):
        b = min(rows, a + tile)
        nk = min(block.nk, b) if block.kind == "causal" else block.nk  # causal rows a:b see keys < b only
        sl = slice(block.r0 + a, block.r0 + b)
        q_t, do_t = q[:, :, sl], dout[:, :, sl]  # (B, H, T, D), (B, H, T, Dv)
        lse_t, delta_t = lse[:, :, sl], delta[:, :, sl]  # (B, H, T)
        k_t, v_t = k_blk[:, :, :nk], v_blk[:, :, :nk]  # (B, H, nk, D), (B, H, nk, Dv)
        allowed = _tile_allowed(block, key_mask, a, b, nk, q.device)
        has_key = torch.isfinite(lse_t).unsqueeze(-1)  # (B, H, T, 1)
        allowed = has_key if allowed is None else allowed & has_key
        safe_lse = torch.where(has_key.squeeze(-1), lse_t, zero)
        s = torch.matmul(q_t, k_t.transpose(-1, -2)) * scale  # (B, H, T, nk)
        p = torch.where(allowed, torch.exp(s - safe_lse.unsqueeze(-1)), zero)  # (B, H, T, nk)
        dv[:, :, :nk] += torch.matmul(p.transpose(-1, -2), do_t)  # (B, H, nk, Dv)
        ds = p * (torch.matmul(do_t, v_t.transpose(-1, -2)) - delta_t.unsqueeze(-1))  # (B, H, T, nk)
        dq[:, :, sl] += torch.matmul(ds, k_t) * scale  # (B, H, T, D)
        dk[:, :, :nk] += torch.matmul(ds.transpose(-1, -2), q_t) * scale  # (B, H, nk, D)


class _RingFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor | None, ring: _Ring) -> tuple[Tensor, Tensor]:
        cd = _compute_dtype(q.dtype)
        b, h, _, dv = ring.shape
        lq = q.shape[2]
        out = torch.zeros(b, h, lq, dv, dtype=cd, device=q.device)  # (B, H, L_r, Dv)
        lse = torch.full((b, h, lq), float("-inf"), dtype=cd, device=q.device)  # (B, H, L_r)
        cur = ring.kv_message(k, v, key_mask)
        for t in range(ring.world):
            reqs = []
            if t < ring.world - 1:  # post the next block's transfer before computing this one
                nxt, reqs = ring.exchange(cur, ring.kv_shapes((ring.rank - t - 1) % ring.world))
            block = ring.plans[t]
            if block is not None:
                kb, vb, mb = ring.split_kv(cur)
                o_b, l_b = _block_forward(q, kb, vb, mb, block, ring.scale)
                rows = slice(block.r0, None)
                o_m, l_m = merge_attention([out[:, :, rows], o_b.to(cd)], [lse[:, :, rows], l_b.to(cd)])
                out[:, :, rows], lse[:, :, rows] = o_m, l_m
            for req in reqs:
                req.wait()
            if t < ring.world - 1:
                cur = nxt
        ctx.ring = ring
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(q, k, v, key_mask, out, lse)
        return out.to(q.dtype), lse.to(q.dtype)

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlse: Tensor | None):
        q, k, v, key_mask, out, lse = ctx.saved_tensors
        ring: _Ring = ctx.ring
        cd = out.dtype
        qc = q.to(cd)
        dout = torch.zeros_like(out) if dout is None else dout.to(cd)
        delta = (dout * out).sum(dim=-1)  # (B, H, L_r)
        if dlse is not None:
            delta = delta - torch.where(torch.isfinite(lse), dlse.to(cd), torch.zeros((), dtype=cd))
        dq = torch.zeros_like(qc)  # (B, H, L_r, D)
        cur = ring.kv_message(k.to(cd), v.to(cd), key_mask)
        grads = [torch.zeros(shape, dtype=cd, device=q.device) for shape in ring.grad_shapes(ring.rank)]  # dk, dv of the block held
        for t in range(ring.world):
            reqs = []
            if t < ring.world - 1:
                nxt, reqs = ring.exchange(cur, ring.kv_shapes((ring.rank - t - 1) % ring.world))
            block = ring.plans[t]
            if block is not None:
                kb, vb, mb = ring.split_kv(cur)
                _block_backward(qc, kb, vb, mb, block, ring.scale, dout, lse, delta, dq, grads[0], grads[1])
            # the gradients of this block go to the next rank, which holds this block at step t + 1
            sent, (grads, greqs) = grads, ring.exchange(grads, ring.grad_shapes((ring.rank - t - 1) % ring.world))
            for req in [*reqs, *greqs]:
                req.wait()
            del sent
            if t < ring.world - 1:
                cur = nxt
        dk, dvv = grads  # after W hops: this shard's own gradients
        return dq.to(q.dtype), dk.to(k.dtype), dvv.to(v.dtype), None, None


def _exchange_meta(ring_group, world: int, values: list[int]) -> list[list[int]]:
    mine = torch.tensor(values, dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=ring_group)
    return [t.tolist() for t in every]


def ring_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    return_lse: bool = False,
    group: dist.ProcessGroup | None = None,
    layout: str = "contiguous",
) -> Tensor | tuple[Tensor, Tensor]:
    """Softmax attention over the whole sequence, each rank of ``group`` holding its shard.

    Equal to :func:`attnfuse.ops.dense_attention` on the gathered sequence (same arguments), returned
    as this rank's shard of the output. With no initialised process group, or a group of one rank, it
    *is* ``dense_attention`` (no communication).

    Args:
        q: this rank's queries ``(B, H, L_r, D)``.
        k: this rank's keys ``(B, H, S_r, D)``.
        v: this rank's values ``(B, H, S_r, Dv)``.
        key_mask: bool, ``True`` = the key exists, for this rank's keys: ``(B, S_r)`` or ``(B, H, S_r)``
            (B, H may be 1); it travels with the keys. Ranks without one count as all True.
        is_causal: query at global position ``i`` sees keys at global positions ``j <= i``; needs the
            query and key shards to have the same lengths (self-attention).
        scale: score scale, ``1/sqrt(D)`` when None.
        return_lse: also return the log-sum-exp ``(B, H, L_r)`` over all keys (``-inf``: no allowed key).
        group: the process group (default: the world).
        layout: which global positions each rank holds, ``"contiguous"`` (any lengths), ``"zigzag"``,
            ``"striped"`` (see :mod:`attnfuse.distributed.layouts`); matters only when ``is_causal``.

    Returns:
        ``out (B, H, L_r, Dv)``, or ``(out, lse)``.

    Raises:
        TypeError, ValueError: as ``dense_attention``; ``B, H, D, Dv`` or dtype differ between ranks (every
            rank raises); unknown ``layout``; shard lengths that do not form the layout.

    Shapes:
        See :mod:`attnfuse.ops`; ``L_r`` / ``S_r`` are this rank's shard lengths. Takes a key mask,
        ``is_causal`` and the log-sum-exp; no pair mask, bias or weights.

    Example:
        >>> # torchrun --nproc-per-node 2 ...; every rank:
        >>> q_r = shard_sequence(q, layout="zigzag")  # doctest: +SKIP
        >>> out_r = ring_attention(q_r, k_r, v_r, is_causal=True, layout="zigzag")  # doctest: +SKIP
        >>> gather_sequence(out_r, layout="zigzag")  # == dense_attention(q, k, v, is_causal=True)  # doctest: +SKIP
    """
    check_layout(layout)
    check_qkv(q, k, v)
    rank, world = group_rank_world(group)
    if world == 1:
        return dense_attention(q, k, v, key_mask=key_mask, is_causal=is_causal, scale=scale, return_lse=return_lse)
    b, h, lq, d = q.shape
    lk, dv = k.shape[2], v.shape[-1]
    km = check_key_mask("ring", key_mask, b, h, (lk,))  # (B', H', S_r) or None
    dtypes = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    code = dtypes.index(q.dtype) if q.dtype in dtypes else -1
    meta = _exchange_meta(group, world, [b, h, d, dv, code, lq, lk, -1 if km is None else km.shape[1]])
    for r, m in enumerate(meta):
        if m[:5] != meta[0][:5]:
            raise ValueError(f"ring_attention: (B, H, D, Dv, dtype) must agree on every rank, rank 0 has {meta[0][:5]}, "
                             f"rank {r} has {m[:5]} (dtype codes index {[str(t) for t in dtypes]})")
    lqs, lks = [m[5] for m in meta], [m[6] for m in meta]
    mask_heads = max(m[7] for m in meta)
    mask_heads = 0 if mask_heads < 0 else mask_heads
    if mask_heads:
        full = torch.ones(b, mask_heads, lk, dtype=torch.bool, device=q.device)
        km = full if km is None else (full & km)  # (B, H', S_r), the same H' on every rank
    if is_causal:
        if lqs != lks:
            raise ValueError(f"ring_attention: is_causal needs query and key shards of equal lengths, got query lengths {lqs}, "
                             f"key lengths {lks}")
        pos = _positions(lks, world, layout)
        plans = [_plan(pos[rank], pos[(rank - t) % world], lq, lks[(rank - t) % world]) for t in range(world)]
    else:
        plans = [_plan(None, None, lq, lks[(rank - t) % world]) for t in range(world)]
    ring = _Ring(group, rank, world, lqs, lks, (b, h, d, dv), mask_heads, 1.0 / math.sqrt(d) if scale is None else scale, plans)
    out, lse = _RingFunction.apply(q, k, v, km, ring)
    return (out, lse) if return_lse else out

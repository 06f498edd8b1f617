"""All-to-all (DeepSpeed-Ulysses) sequence parallelism: any registered operator over a sharded sequence.

Paper: Jacobs et al., "DeepSpeed Ulysses: System Optimizations for Enabling Training of Extreme Long
Sequence Transformer Models" (https://arxiv.org/abs/2309.14509); reference code ``microsoft/DeepSpeed``
``deepspeed/sequence/layer.py`` (``_SeqAllToAll``, ``DistributedAttention``). Spec: ``docs/distributed.md``.
Status: exact (the local operator sees the whole sequence for ``H / W`` heads, so the result is the
single-process operator's, per head).

Each of the ``W`` ranks holds a shard of the sequence for all ``H`` heads. One ``all_to_all_single``
scatters the heads and gathers the sequence, ``(B, H, L_r, D) -> (B, H/W, L, D)``; the operator runs on
the whole sequence for its ``H / W`` heads; a second all-to-all scatters the sequence back and gathers the
heads, ``(B, H/W, L, Dv) -> (B, H, L_r, Dv)``. The backward of each all-to-all is the other one
(``torch.autograd.Function``). Shards of a non-contiguous layout are put back in global order before the
operator runs (so ``is_causal`` and position-dependent operators such as 1-D neighborhood attention see
the true order).

Deviations from DeepSpeed: heads-first layout ``(B, H, L, D)`` instead of sequence-first; shards may have
different lengths (``all_to_all_single`` with split sizes); the key mask is gathered with the keys.
Needs ``H`` divisible by ``W``. Memory per rank is that of the operator on the full sequence for ``H / W``
heads (dense: ``(H/W) * L^2`` scores), unlike the ring.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from attnfuse.distributed.layouts import check_layout, global_positions, group_rank_world
from attnfuse.ops import OpConfig, op_config
from attnfuse.ops._checks import check_key_mask, check_qkv

__all__ = ["ulysses_attention"]


def _seq_to_heads(x: Tensor, lengths: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """``(B, H, L_r, E) -> (B, H/W, L, E)``: scatter heads, gather the sequence (shards in rank order)."""
    world = len(lengths)
    b, h, lr, e = x.shape
    hw = h // world
    send = x.reshape(b, world, hw, lr, e).transpose(0, 1).contiguous()  # (W, B, H/W, L_r, E): chunk w -> rank w
    recv = torch.empty(b * hw * sum(lengths) * e, dtype=x.dtype, device=x.device)
    dist.all_to_all_single(recv, send.reshape(-1), output_split_sizes=[b * hw * n * e for n in lengths],
                           input_split_sizes=[b * hw * lr * e] * world, group=group)
    parts = recv.split([b * hw * n * e for n in lengths])
    return torch.cat([p.view(b, hw, n, e) for p, n in zip(parts, lengths)], dim=2)  # (B, H/W, L, E)


def _heads_to_seq(y: Tensor, lengths: list[int], rank: int, group: dist.ProcessGroup | None) -> Tensor:
    """``(B, H/W, L, E) -> (B, H, L_r, E)``: scatter the sequence, gather heads (inverse of :func:`_seq_to_heads`)."""
    world = len(lengths)
    b, hw, _, e = y.shape
    lr = lengths[rank]
    send = torch.cat([p.reshape(-1) for p in y.split(lengths, dim=2)])  # chunk w: (B, H/W, L_w, E)
    recv = torch.empty(world * b * hw * lr * e, dtype=y.dtype, device=y.device)
    dist.all_to_all_single(recv, send, output_split_sizes=[b * hw * lr * e] * world,
                           input_split_sizes=[b * hw * n * e for n in lengths], group=group)
    return recv.view(world, b, hw, lr, e).transpose(0, 1).reshape(b, world * hw, lr, e)  # (B, H, L_r, E)


class _SeqToHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, lengths: list[int], rank: int, group) -> Tensor:
        ctx.lengths, ctx.rank, ctx.group = lengths, rank, group
        return _seq_to_heads(x, lengths, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _heads_to_seq(grad.contiguous(), ctx.lengths, ctx.rank, ctx.group), None, None, None


class _HeadsToSeq(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y: Tensor, lengths: list[int], rank: int, group) -> Tensor:
        ctx.lengths, ctx.group = lengths, group
        return _heads_to_seq(y, lengths, rank, group)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _seq_to_heads(grad.contiguous(), ctx.lengths, ctx.group), None, None, None


def _lengths(n_q: int, n_k: int, masked: bool, group, world: int) -> tuple[list[int], list[int], bool]:
    """Query and key shard lengths of every rank, and whether any rank has a key mask (one all-gather)."""
    mine = torch.tensor([n_q, n_k, int(masked)], dtype=torch.int64)
    every = [torch.zeros_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    return [int(t[0]) for t in every], [int(t[1]) for t in every], any(bool(t[2]) for t in every)


def _global_order(lengths: list[int], world: int, layout: str) -> Tensor | None:
    """Permutation taking the rank-ordered concatenation of shards to global order; None if it is already."""
    if layout == "contiguous":
        return None
    total = sum(lengths)
    div = 2 * world if layout == "zigzag" else world
    if len(set(lengths)) > 1 or total % div:
        raise ValueError(f"layout {layout!r} needs equal shards of a sequence divisible by {div}, got shard lengths {lengths}")
    where = torch.cat([global_positions(total, world, r, layout) for r in range(world)])  # global position of row i
    return torch.argsort(where)


def ulysses_attention(
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
    op: str | OpConfig = "dense",
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention over the whole sequence by all-to-all head/sequence re-partition, any operator inside.

    Equal to ``op`` on the gathered sequence, returned as this rank's shard. With no initialised process
    group, or a group of one rank, it *is* ``op`` (no communication).

    Args:
        q: this rank's queries ``(B, H, L_r, D)``; ``H`` divisible by the world size.
        k: this rank's keys ``(B, H, S_r, D)``.
        v: this rank's values ``(B, H, S_r, Dv)``.
        key_mask: bool, ``True`` = the key exists, for this rank's keys: ``(B, S_r)`` or ``(B, H, S_r)``.
        is_causal: causal over global positions (the operator must take ``is_causal``).
        scale: score scale (overrides the operator's option when given).
        return_lse: also return the log-sum-exp ``(B, H, L_r)`` (the operator must return one).
        group: the process group (default: the world).
        layout: the shards' layout (``"contiguous"``, ``"zigzag"``, ``"striped"``); the operator sees
            global order.
        op: a registered sequence operator (name or typed options, e.g. ``"dense"`` or
            ``attnfuse.ops.configs.Neighborhood(kernel_size=7)`` for 1-D sequences).

    Returns:
        ``out (B, H, L_r, Dv)``, or ``(out, lse)``.

    Raises:
        ValueError: ``H`` not divisible by the world size (naming both); unknown ``layout``; bad shapes.
        TypeError: an argument the operator does not take (as the operator raises it).

    Shapes:
        See :mod:`attnfuse.ops`; ``L_r`` / ``S_r`` are this rank's shard lengths.
    """
    check_layout(layout)
    check_qkv(q, k, v)
    cfg = op_config(op)
    call = cfg.options()
    if is_causal:
        call["is_causal"] = True
    if scale is not None:
        call["scale"] = scale
    if return_lse:
        call["return_lse"] = True
    rank, world = group_rank_world(group)
    if world == 1:
        if key_mask is not None:
            call["key_mask"] = key_mask
        return cfg.spec.fn(q, k, v, **call)
    b, h, lq, _ = q.shape
    if h % world:
        raise ValueError(f"ulysses_attention needs the number of heads divisible by the world size, got H={h}, world={world}")
    km = check_key_mask("ulysses", key_mask, b, h, (k.shape[2],))  # (B', H', S_r)
    lqs, lks, any_mask = _lengths(lq, k.shape[2], km is not None, group, world)
    q_all = _SeqToHeads.apply(q, lqs, rank, group)  # (B, H/W, L, D)
    k_all = _SeqToHeads.apply(k, lks, rank, group)  # (B, H/W, S, D)
    v_all = _SeqToHeads.apply(v, lks, rank, group)  # (B, H/W, S, Dv)
    if any_mask:  # a mask on any rank: every rank sends one
        full = torch.ones(b, h, k.shape[2], dtype=torch.bool, device=k.device)
        km = full if km is None else full & km  # (B, H, S_r): heads explicit, so they scatter like k
        km_all = _seq_to_heads(km.to(torch.uint8).unsqueeze(-1), lks, group).squeeze(-1) > 0  # (B, H/W, S)
    else:
        km_all = None
    order_q, order_k = _global_order(lqs, world, layout), _global_order(lks, world, layout)
    if order_q is not None:
        q_all = q_all.index_select(2, order_q)
    if order_k is not None:
        k_all, v_all = k_all.index_select(2, order_k), v_all.index_select(2, order_k)
        km_all = None if km_all is None else km_all.index_select(2, order_k)
    if km_all is not None:
        call["key_mask"] = km_all
    result = cfg.spec.fn(q_all, k_all, v_all, **call)
    out, lse = (result if return_lse else (result, None))
    if order_q is not None:
        back = torch.argsort(order_q)
        out = out.index_select(2, back)
        lse = None if lse is None else lse.index_select(2, back)
    out = _HeadsToSeq.apply(out.contiguous(), lqs, rank, group)  # (B, H, L_r, Dv)
    if lse is None:
        return out
    return out, _HeadsToSeq.apply(lse.unsqueeze(-1).contiguous(), lqs, rank, group).squeeze(-1)  # (B, H, L_r)

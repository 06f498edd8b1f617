"""Sequence layouts over a process group: which global positions each rank holds, shard and gather.

Three layouts, named as in ring attention's literature (``docs/distributed.md``):

* ``"contiguous"``: rank ``r`` holds the ``r``-th run of ``c = ceil(L / W)`` tokens; the last shards
  may be shorter (or empty), so any ``L`` works. Under a causal mask rank ``r`` has ``r + 1`` non-empty
  blocks: the last rank does ``2W - 1`` times the work of the first.
* ``"zigzag"`` (``zhuzilin/ring-flash-attention``): the sequence is cut into ``2W`` chunks and rank
  ``r`` holds chunks ``r`` and ``2W - 1 - r``; needs ``L % 2W == 0``. Causal work is equal per rank.
* ``"striped"`` (Brandon et al., arXiv 2311.09431): rank ``r`` holds tokens ``r, r + W, r + 2W, ...``;
  needs ``L % W == 0``. Causal work is equal per rank (up to one diagonal).

Every layout keeps a rank's positions increasing, so local order is global order within a shard.
Rotary embeddings, causal masks and labels must use :func:`global_positions`, never local indices.

Example (``L = 8``, ``W = 2``)::

    contiguous  rank 0: 0 1 2 3      rank 1: 4 5 6 7
    zigzag      rank 0: 0 1 6 7      rank 1: 2 3 4 5
    striped     rank 0: 0 2 4 6      rank 1: 1 3 5 7
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["LAYOUTS", "Layout", "gather_sequence", "global_positions", "group_rank_world", "shard_sequence", "shard_sizes"]

Layout = Literal["contiguous", "zigzag", "striped"]
LAYOUTS: tuple[str, ...] = ("contiguous", "zigzag", "striped")


def check_layout(layout: str) -> None:
    """Raise ``ValueError`` unless ``layout`` is one of :data:`LAYOUTS`."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {list(LAYOUTS)}, got layout={layout!r}")


def group_rank_world(group: dist.ProcessGroup | None = None) -> tuple[int, int]:
    """``(rank, world size)`` of this process in ``group``; ``(0, 1)`` when no process group is initialised.

    Raises:
        ValueError: a ``group`` is given but ``torch.distributed`` is not initialised.
    """
    if not (dist.is_available() and dist.is_initialized()):
        if group is not None:
            raise ValueError("group= was given but torch.distributed is not initialised (call init_process_group first)")
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sizes(length: int, world: int, layout: str = "contiguous") -> list[int]:
    """Tokens per rank for a sequence of ``length`` tokens over ``world`` ranks.

    Raises:
        ValueError: unknown layout, or ``length`` not divisible by ``2 * world`` (zigzag) / ``world`` (striped).
    """
    check_layout(layout)
    if world < 1 or length < 0:
        raise ValueError(f"need world >= 1 and length >= 0, got world={world}, length={length}")
    if layout == "contiguous":
        c = math.ceil(length / world) if length else 0
        return [max(0, min(c, length - r * c)) for r in range(world)]
    div = 2 * world if layout == "zigzag" else world
    if length % div:
        raise ValueError(f"layout {layout!r} needs the sequence length divisible by {div} "
                         f"({'2 * world' if layout == 'zigzag' else 'world'}), got length={length}, world={world}; "
                         "pad the sequence (with a key mask) or use layout='contiguous'")
    return [length // world] * world


def global_positions(length: int, world: int, rank: int, layout: str = "contiguous", *,
                     device: torch.device | str | None = None) -> Tensor:
    """Global positions (``int64``, increasing) of the tokens rank ``rank`` holds.

    Args:
        length: global sequence length ``L``.
        world: number of ranks ``W``.
        rank: this rank, ``0 <= rank < W``.
        layout: ``"contiguous"``, ``"zigzag"`` or ``"striped"``.
        device: of the result.

    Raises:
        ValueError: see :func:`shard_sizes`; ``rank`` out of range.
    """
    sizes = shard_sizes(length, world, layout)
    if not 0 <= rank < world:
        raise ValueError(f"rank must be in [0, {world}), got rank={rank}")
    if layout == "contiguous":
        start = sum(sizes[:rank])
        return torch.arange(start, start + sizes[rank], device=device)
    if layout == "striped":
        return torch.arange(rank, length, world, device=device)
    c = length // (2 * world)
    first = torch.arange(rank * c, (rank + 1) * c, device=device)
    second = torch.arange((2 * world - 1 - rank) * c, (2 * world - rank) * c, device=device)
    return torch.cat([first, second])


def shard_sequence(x: Tensor, *, group: dist.ProcessGroup | None = None, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The part of the full sequence ``x`` that this rank holds (every rank passes the same ``x``).

    Args:
        x: the full tensor, sequence on axis ``dim`` (``(B, H, L, D)`` -> ``dim=2``; tokens ``(B, L, C)`` -> ``dim=1``).
        group: process group (default: the world); no initialised group = one rank (``x`` itself).
        layout: see the module docstring.
        dim: the sequence axis.

    Returns:
        ``x`` restricted to :func:`global_positions` of this rank along ``dim``.

    Raises:
        ValueError: see :func:`shard_sizes`.
    """
    rank, world = group_rank_world(group)
    pos = global_positions(x.shape[dim], world, rank, layout, device=x.device)
    if layout == "contiguous":
        start = int(pos[0]) if pos.numel() else 0
        return x.narrow(dim, start, pos.numel())
    return x.index_select(dim, pos)


def _all_lengths(n: int, group: dist.ProcessGroup | None, world: int) -> list[int]:
    mine = torch.tensor([n], dtype=torch.int64)
    every = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    return [int(t) for t in every]


def gather_sequence(x: Tensor, *, group: dist.ProcessGroup | None = None, layout: str = "contiguous", dim: int = 2) -> Tensor:
    """The full sequence from every rank's shard, in global order (the inverse of :func:`shard_sequence`).

    Shards may have different lengths in the contiguous layout (an uneven last shard). The result is
    not differentiable (use it for outputs, metrics and tests).

    Args:
        x: this rank's shard, sequence on axis ``dim``; same shape on every rank except along ``dim``.
        group, layout, dim: as in :func:`shard_sequence`.

    Returns:
        The full tensor, ``sum of shard lengths`` along ``dim``.

    Raises:
        ValueError: the shard lengths do not form the layout (see :func:`shard_sizes`).
    """
    check_layout(layout)
    _, world = group_rank_world(group)
    if world == 1:
        return x.detach()
    dim = dim % x.dim()
    lengths = _all_lengths(x.shape[dim], group, world)
    total = sum(lengths)
    if layout != "contiguous" and lengths != shard_sizes(total, world, layout):
        raise ValueError(f"layout {layout!r} needs equal shards, got lengths {lengths} over {world} ranks")
    longest = max(lengths)
    x = x.detach().movedim(dim, 0).contiguous()  # (L_r, ...)
    pad = torch.zeros((longest - x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
    buf = torch.cat([x, pad])  # (max L_r, ...)
    parts = [torch.empty_like(buf) for _ in range(world)]
    dist.all_gather(parts, buf, group=group)
    seq = torch.cat([p[:n] for p, n in zip(parts, lengths)])  # (L, ...) in rank order
    if layout != "contiguous":
        order = torch.cat([global_positions(total, world, r, layout) for r in range(world)])  # position of each row
        seq = seq[torch.argsort(order).to(seq.device)]
    return seq.movedim(0, dim)

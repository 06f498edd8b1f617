"""Bi-level routing attention (BiFormer): route each query region to its top-k key regions, then attend to their tokens.

Paper: Zhu, Wang, Ke, Li, Lau, "BiFormer: Vision Transformer with Bi-Level Routing Attention"
(CVPR 2023, https://arxiv.org/abs/2303.08810); official code ``rayleizhu/BiFormer``
(``ops/bra_legacy.py``, ``ops/bra_nchw.py``, ``ops/torch/rrsda.py``), read, not copied.
Status: exact for any grid size (pad + mask); backends ``"gather"`` (regions gathered with one
``index_select`` per tensor, whose backward is an ``index_add``; one batched SDPA call) and
``"reference"`` (dense attention under the explicit routed key sets).

Semantics, as the official implementation (``diff_routing=False``, ``soft_routing=False``):

1. The grid is cut into ``regions`` regions per axis, each of ``ceil(G / regions)`` positions
   (the grid is padded at the end; padding is never pooled and never attended).
2. Region descriptors are the means of the (detached) queries and keys over a region's valid
   positions, with all heads concatenated: the affinity of query region ``i`` and key region ``j``
   is ``sum_h qbar[h, i] . kbar[h, j]`` (no scale: top-k does not depend on it). Routing is
   therefore **per batch element and shared by all heads**, and its indices carry no gradient
   (as in the paper: gradients reach q and k only through the token-level attention).
3. Query region ``i`` keeps the ``topk`` regions of highest affinity (``torch.topk``; key regions with
   no valid key rank last), and each of its queries attends to every valid token of those regions.

Scale. The official module scales the token scores by ``qk_dim ** -0.5``, ``qk_dim`` the width of
**all** heads (``H * D`` here), not ``D ** -0.5`` per head. This operator keeps the operator-wide default
``scale = D ** -0.5`` when ``scale`` is None (every operator in :mod:`attnfuse.ops` does); the BiFormer
module :class:`attnfuse.nn.RoutingAttention` passes the official ``(H * D) ** -0.5`` by default.

Grids not divisible by ``regions``. The official ``bra_legacy.py`` zero-pads the *input* before the
q / k / v projection, so its padded tokens carry the projection biases, are pooled into the region
means and are attended; here the padding is added after the projection and masked (never pooled,
never attended). Both agree on divisible grids (``ops/torch/bra.py`` asserts divisibility).

Masked keys (``key_mask`` False) are excluded from the key means and from attention; masked
positions are also left out of the query means (for self-attention the mask marks invalid tokens).

Tiny materialised example, 1-D grid of 4 tokens, ``regions = 2`` (``{0, 1}``, ``{2, 3}``),
``topk = 1``, region 0 routed to region 1 and region 1 to itself (row = query, 1 = attended)::

    q0  0 0 1 1
    q1  0 0 1 1
    q2  0 0 1 1
    q3  0 0 1 1

Equivalent dense formulation (backend ``"reference"``)::

    allowed[b, i, j] = region(j) in topk_regions[b, region(i)] and key_mask[j]
    out = softmax(scale * q @ k^T, over allowed) @ v
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
)
from attnfuse.ops._checks import check_key_mask
from attnfuse.ops._guards import drop_masked, drop_masked_keys, empty_like_result, is_empty
from attnfuse.ops._registry import operator
from attnfuse.ops.backends import Backend, Call

__all__ = ["route_regions", "routing_attention"]


def _layout(grid: Sequence[int], regions: Sequence[int]) -> tuple[tuple[int, ...], list[tuple[int, int]]]:
    size = tuple(ceil_div(g, n) for g, n in zip(grid, regions))
    pads = [(0, n * s - g) for g, n, s in zip(grid, regions, size)]
    return size, pads


def route_regions(q: Tensor, k: Tensor, regions: Sequence[int], topk: int, mask: Tensor | None = None) -> Tensor:
    """Top-k key regions of every query region (no gradient).

    Args:
        q, k: ``(B, H, *grid, D)``.
        regions: regions per grid axis.
        topk: regions kept per query region.
        mask: bool key mask ``(B or 1, H or 1, *grid)``.

    Returns:
        ``(B, R, topk)`` long indices of key regions (row-major region numbering), best first.
    """
    grid = q.shape[2:-1]
    size, pads = _layout(grid, regions)
    with torch.no_grad():
        if q.dtype in (torch.float16, torch.bfloat16):  # rank regions in float32, as the reference computes
            q, k = q.float(), k.float()
        valid = blockify(valid_keys(mask, grid, pads, q.device), size)  # (B', H', R, T)
        count = valid.sum(-1, keepdim=True).to(q.dtype)  # (B', H', R, 1)
        # masked positions are left out with where (not a 0 weight), so NaN there cannot reach the means
        q_reg = drop_masked(blockify(pad_grid(q, pads), size), valid).sum(-2) / count.clamp(min=1)  # (B, H, R, D)
        k_reg = drop_masked(blockify(pad_grid(k, pads), size), valid).sum(-2) / count.clamp(min=1)  # (B, H, R, D)
        affinity = torch.einsum("bhid,bhjd->bij", q_reg, k_reg)  # (B, R, R), summed over heads
        has_key = (count.squeeze(-1) > 0).any(dim=1)  # (B', R)
        affinity = affinity.masked_fill(~has_key.unsqueeze(1), float("-inf"))
        return torch.topk(affinity, topk, dim=-1).indices  # (B, R, topk)


def _reference(q, k, v, *, regions, idx, mask, scale, need_weights):
    grid = q.shape[2:-1]
    n = q[0, 0, ..., 0].numel()
    size = tuple(ceil_div(g, r) for g, r in zip(grid, regions))
    c = axis_coords(grid, q.device)  # (N, k)
    region = torch.zeros(n, dtype=torch.long, device=q.device)
    for a in range(len(grid)):  # row-major region number of every position
        region = region * regions[a] + c[:, a] // size[a]
    routed = idx[:, region]  # (B, N, topk) key regions of each query's region
    allowed = (routed.unsqueeze(2) == region.view(1, 1, n, 1)).any(-1).unsqueeze(1)  # (B, 1, N, N): key j's region is routed
    return grid_reference(q, k, v, allowed, mask=mask, scale=scale, need_weights=need_weights)


def _gather(x: Tensor, idx: Tensor) -> Tensor:
    """Rows of the routed regions: ``x (B, H, R, T, C)``, ``idx (B, R, k)`` -> ``(B, H, R, k*T, C)``.

    One ``index_select`` on the flattened ``(B*H*R)`` region axis: its backward is a single
    ``index_add`` of contiguous ``T*C`` rows (``torch.gather`` on an expanded view, as in the
    official code, scatters element by element and is several times slower backwards).
    """
    b, h, r, t, c = x.shape
    base = (torch.arange(b, device=x.device).view(b, 1, 1, 1) * h + torch.arange(h, device=x.device).view(1, h, 1, 1)) * r
    rows = base + idx.unsqueeze(1)  # (B, H, R, k)
    out = x.reshape(b * h * r, t * c).index_select(0, rows.reshape(-1))  # (B*H*R*k, T*C)
    return out.reshape(b, h, r, idx.shape[-1] * t, c)  # (B, H, R, k*T, C)


def _gathered(q, k, v, *, regions, idx, mask, scale, need_weights):
    b, grid = q.shape[0], q.shape[2:-1]
    size, pads = _layout(grid, regions)
    q_reg = blockify(pad_grid(q, pads), size)  # (B, H, R, T, D)
    r, t = q_reg.shape[2], q_reg.shape[3]
    k_sel = _gather(blockify(pad_grid(k, pads), size), idx)  # (B, H, R, k*T, D)
    v_sel = _gather(blockify(pad_grid(v, pads), size), idx)  # (B, H, R, k*T, Dv)
    key_mask = None
    if mask is not None or any(p != (0, 0) for p in pads):
        valid = blockify(valid_keys(mask, grid, pads, q.device), size)  # (B', H', R, T)
        hv = valid.shape[1]
        key_mask = _gather(valid.expand(b, hv, r, t).unsqueeze(-1), idx).squeeze(-1)  # (B, H', R, k*T)
    out = attend_blocks(q_reg, k_sel, v_sel, key_mask=key_mask, scale=scale)  # (B, H, R, T, Dv)
    return crop_grid(unblockify(out, regions, size), grid), None  # (B, H, *grid, Dv)


@operator("routing", layout="grid", cross=False, backends=(
    Backend("gather", _gathered),
    Backend("reference", _reference, weights=True),
))
def routing_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    regions: int | Sequence[int],
    topk: int,
    *,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    return_weights: bool = False,
    return_routing: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, ...]:
    """Bi-level routing attention (BiFormer) on a 1-, 2- or 3-D grid; see the module docstring.

    Args:
        q: queries ``(B, H, *grid, D)``.
        k: keys ``(B, H, *grid, D)`` (same grid).
        v: values ``(B, H, *grid, Dv)``.
        regions: regions per grid axis (BiFormer's ``n_win``; 7 on ImageNet), an int or one per axis;
            at most the grid extent. Grids need not be divisible (pad + mask).
        topk: key regions routed to each query region, ``1 <= topk <= prod(regions)``
            (BiFormer: 1, 4, 16 and all regions in its four stages).
        key_mask: bool key mask, ``True`` = the key exists: ``(B, *grid)`` or ``(B, H, *grid)`` (B, H may be 1).
        scale: token-attention score scale, ``1/sqrt(D)`` when None; the official BiFormer module uses
            ``(H * D) ** -0.5`` (see the module docstring).
        return_weights: also return dense weights ``(B, H, N, N)`` over the flattened grid (reference path).
        return_routing: also return the routing ``(B, R, topk)`` (key region indices, row-major).
        backend: ``"auto"``, ``"gather"`` or ``"reference"``.

    Returns:
        ``out (B, H, *grid, Dv)``, followed by ``weights`` and / or ``routing`` when asked for.

    Raises:
        TypeError: non-float inputs, mixed dtypes, non-bool key mask, non-int ``regions`` / ``topk``, a pair
            mask (``mask=``) or ``bias=``.
        ValueError: ranks, grids or key-mask shapes that do not match, ``regions`` outside ``[1, extent]``,
            ``topk`` outside ``[1, number of regions]``.

    Shapes:
        See :mod:`attnfuse.ops`; ``R = prod(regions)``. Takes: key mask ``(B, *grid)`` / ``(B, H, *grid)``;
        weights. No pair mask, no bias, no causal flag, no log-sum-exp.

    Example:
        >>> q = k = v = torch.randn(2, 4, 14, 14, 32)
        >>> out, routing = routing_attention(q, k, v, regions=7, topk=4, return_routing=True)
        >>> out.shape, routing.shape
        (torch.Size([2, 4, 14, 14, 32]), torch.Size([2, 49, 4]))
    """
    grid = check_grid_qkv(q, k, v)
    regions = per_axis("regions", regions, len(grid), minimum=1)
    n_tokens = math.prod(grid)
    if n_tokens and any(r > g for r, g in zip(regions, grid)):
        raise ValueError(f"regions must be at most the grid extent on every axis, got regions={regions} for grid {grid}")
    n_regions = math.prod(regions)
    if isinstance(topk, bool) or not isinstance(topk, int):
        raise TypeError(f"topk must be an int, got {topk!r}")
    if not 1 <= topk <= n_regions:
        raise ValueError(f"topk must be in [1, number of regions = {n_regions}], got topk={topk}")
    mask = check_key_mask("routing", key_mask, q.shape[0], q.shape[1], grid, legend="*grid")  # (B', H', *grid)
    call = Call.of(q, k, v, mask=mask, need_weights=return_weights)
    impl = routing_attention.spec.choose_backend(backend, call)
    b, h = q.shape[:2]
    if is_empty(b, h, n_tokens):  # nothing to compute; an empty grid has only empty regions, routed to the first topk
        out, weights, _ = empty_like_result(q, (b, h, *grid, v.shape[-1]), inputs=(q, k, v),
                                            weights_shape=(b, h, n_tokens, n_tokens) if return_weights else None)
        idx = torch.arange(topk, device=q.device).expand(b, n_regions, topk)  # (B, R, topk)
    else:
        k, v = drop_masked_keys(k, v, mask)  # masked keys never reach a matmul (NaN there included)
        idx = route_regions(q, k, regions, topk, mask)  # (B, R, topk)
        out, weights = impl.fn(q, k, v, regions=regions, idx=idx, mask=mask, scale=scale, need_weights=return_weights)
    extra = ([weights] if return_weights else []) + ([idx] if return_routing else [])
    return (out, *extra) if extra else out

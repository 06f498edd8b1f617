"""Neighborhood attention through compiled FlexAttention with a block mask built from the window rule.

The grid is flattened in *tile order* (dilation groups first, then tiles of 8x16 (2-D) or 4x4x8
(3-D) group positions, then positions inside a tile), so that each 128-token block of the flat
sequence is a compact patch and the block mask skips most block pairs. ``mask_mod`` evaluates the
window rule of :mod:`._windows` (any kernel, stride, border) through per-token lookup tables (window bounds, group id); a relative-position
bias and a key mask are a ``score_mod``; extra keys are appended to the key sequence and allowed
for every query, so no merge is needed.

The compiled function and the block masks are created on first use (never at import) and cached
by grid, kernel, dilation, causal flags, number of extra keys and device.

Capabilities (torch 2.13): on CPU compiled FlexAttention is inference-only and returns no
log-sum-exp; on CUDA it has both. The gradient of a ``score_mod``-captured bias table is not
verified here, so ``rpb`` with gradients is declared unsupported. No window-slot ``bias=`` and no
attention weights.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from attnfuse.ops.neighborhood._windows import Geometry, window_bounds
from attnfuse.ops.neighborhood.tiled import _gather_rows

__all__ = ["flex_neighborhood", "flex_plan"]

_PATCH = {1: (128,), 2: (8, 16), 3: (4, 4, 8)}
_MAX_CACHED = 16
_EAGER_PAIRS = 1 << 26
_PLANS: OrderedDict[tuple, FlexPlan] = OrderedDict()
_COMPILED: dict[str, Callable] = {}


@dataclass(frozen=True)
class FlexPlan:
    """Token order and block mask of one geometry.

    Attributes:
        order: ``(N,)`` token index at each position of the flat sequence.
        position: ``(N,)`` position of each token in the flat sequence (inverse of ``order``).
        coords: per axis, ``(N,)`` grid coordinate of each sequence position.
        block_mask: FlexAttention block mask over ``N`` queries and ``N + S`` keys.
    """

    order: Tensor
    position: Tensor
    coords: tuple[Tensor, ...]
    block_mask: object


def _compiled_flex() -> Callable:
    fn = _COMPILED.get("flex")
    if fn is None:
        from torch.nn.attention.flex_attention import flex_attention

        fn = torch.compile(flex_attention, dynamic=False)
        _COMPILED["flex"] = fn
    return fn


def _tile_order(geom: Geometry, device: torch.device) -> Tensor:
    """Token indices sorted by (dilation group, patch, position in patch), mixed-radix per axis."""
    patch = _PATCH[geom.rank]
    coords = torch.meshgrid(*[torch.arange(n, device=device) for n in geom.grid], indexing="ij")
    key = torch.zeros(geom.grid, dtype=torch.long, device=device)
    digits = []  # (value, radix), most significant first
    for c, d in zip(coords, geom.dilation):
        digits.append((c % d, d))
    for c, n, d, t in zip(coords, geom.grid, geom.dilation, patch):
        digits.append(((c // d) // t, math.ceil(math.ceil(n / d) / t)))
    for c, d, t in zip(coords, geom.dilation, patch):
        digits.append(((c // d) % t, t))
    for value, radix in digits:
        key = key * radix + value
    return torch.argsort(key.reshape(-1), stable=True)


def flex_plan(geom: Geometry, num_extra: int, device: torch.device) -> FlexPlan:
    """Build (and cache, bounded) the token order and block mask of ``geom`` with ``num_extra`` extra keys."""
    cache_key = (geom, num_extra, str(device))
    plan = _PLANS.get(cache_key)
    if plan is not None:
        _PLANS.move_to_end(cache_key)
        return plan
    from torch.nn.attention.flex_attention import create_block_mask

    n = geom.num_tokens
    order = _tile_order(geom, device)
    position = torch.empty_like(order)
    position[order] = torch.arange(n, device=device)
    strides = [math.prod(geom.grid[a + 1 :]) for a in range(geom.rank)]
    coords = tuple((order // s) % g for s, g in zip(strides, geom.grid))  # per axis (N,)
    # The kernel evaluates mask_mod on every element of partially masked blocks, so it only looks
    # up tables: the first / last window key of each query per axis (absolute coordinates; along
    # an axis the window is every d-th position between them) and one dilation-group id.
    lo, hi = [], []
    for c, (g, k, d, causal, st, clip) in zip(coords, geom.axes()):
        first, last = window_bounds(c, g, k, d, causal, st, clip)  # group coordinates
        lo.append(first * d + c % d)
        hi.append(last * d + c % d)
    group: Tensor | None = None
    if any(d > 1 for d in geom.dilation):
        group = torch.zeros_like(order)
        for c, d in zip(coords, geom.dilation):
            group = group * d + c % d

    def window_mask(b, h, q_idx, kv_idx):
        kv = kv_idx.clamp(max=n - 1)
        ok = None
        for c, first, last in zip(coords, lo, hi):
            axis_ok = (c[kv] >= first[q_idx]) & (c[kv] <= last[q_idx])
            ok = axis_ok if ok is None else ok & axis_ok
        if group is not None:
            ok = ok & (group[q_idx] == group[kv])
        return ok | (kv_idx >= n) if num_extra else ok

    # the eager builder evaluates mask_mod on all N x (N + S) pairs at once (GBs at N = 16k); past
    # _EAGER_PAIRS the compiled builder works block by block (a few seconds of compilation)
    big = n * (n + num_extra) > _EAGER_PAIRS
    block_mask = create_block_mask(window_mask, None, None, n, n + num_extra, device=device, _compile=big)
    plan = FlexPlan(order, position, coords, block_mask)
    _PLANS[cache_key] = plan
    if len(_PLANS) > _MAX_CACHED:
        _PLANS.popitem(last=False)
    return plan


def flex_neighborhood(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    geom: Geometry,
    *,
    scale: float,
    mask: Tensor | None = None,
    rpb: Tensor | None = None,
    extra_k: Tensor | None = None,
    extra_v: Tensor | None = None,
    need_lse: bool = False,
) -> tuple[Tensor, Tensor | None]:
    """Neighborhood attention with compiled FlexAttention; inputs are assumed validated.

    Args:
        q, k, v: ``(B, H, *grid, D)``, ``(B, H, *grid, D)``, ``(B, H, *grid, Dv)``.
        geom: the validated window geometry.
        scale: score scale.
        mask: bool key validity ``(Bm, Hm, N)``.
        rpb: relative-position bias ``(H, 2k_0 - 1, ...)`` (forward only).
        extra_k, extra_v: extra keys ``(B, H, S, D)`` / values ``(B, H, S, Dv)``.
        need_lse: also return the log-sum-exp (CUDA only).

    Returns:
        ``(out (B, H, *grid, Dv), lse (B, H, *grid) or None)``.
    """
    b, h = q.shape[:2]
    n, d, dv = geom.num_tokens, q.shape[-1], v.shape[-1]
    num_extra = 0 if extra_k is None else extra_k.shape[2]
    plan = flex_plan(geom, num_extra, q.device)
    bh = b * h
    q_s = _gather_rows(q, plan.order, bh, n).view(b, h, n, d)  # (B, H, N, D) in sequence order
    k_s = _gather_rows(k, plan.order, bh, n).view(b, h, n, d)
    v_s = _gather_rows(v, plan.order, bh, n).view(b, h, n, dv)
    if num_extra:
        k_s = torch.cat([k_s, extra_k], dim=2)  # (B, H, N + S, D)
        v_s = torch.cat([v_s, extra_v], dim=2)  # (B, H, N + S, Dv)

    score_mod = None
    if rpb is not None or mask is not None:
        table = None if rpb is None else rpb.reshape(h, -1).to(q.dtype)  # (H, prod(2k - 1))
        key_ok = None
        if mask is not None:
            bm, hm = mask.shape[:2]
            key_ok = _gather_rows(mask.reshape(bm * hm, n, 1), plan.order, bm * hm, n).view(bm, hm, n)
            if num_extra:
                key_ok = torch.cat([key_ok, key_ok.new_ones(bm, hm, num_extra)], dim=-1)  # (Bm, Hm, N + S)
            key_ok = key_ok.expand(b, h, n + num_extra).contiguous()
        coords = plan.coords

        def score_mod(score, bi, hi, q_idx, kv_idx):
            if table is not None:
                kv = kv_idx.clamp(max=n - 1)
                rel = None
                for c, kk, dd, radix in zip(coords, geom.kernel, geom.dilation, geom.rpb_shape):
                    r = (c[kv] // dd - c[q_idx] // dd + kk - 1).clamp(0, 2 * kk - 2)
                    rel = r if rel is None else rel * radix + r
                extra = table[hi, rel]
                if num_extra:
                    extra = torch.where(kv_idx < n, extra, torch.zeros_like(extra))
                score = score + extra
            if key_ok is not None:
                score = torch.where(key_ok[bi, hi, kv_idx], score, -float("inf"))
            return score

    flex = _compiled_flex()
    if need_lse:
        from torch.nn.attention.flex_attention import AuxRequest

        out_s, aux = flex(q_s, k_s, v_s, score_mod=score_mod, block_mask=plan.block_mask, scale=scale, return_aux=AuxRequest(lse=True))
        lse_s = aux.lse  # (B, H, N), natural log
    else:
        out_s = flex(q_s, k_s, v_s, score_mod=score_mod, block_mask=plan.block_mask, scale=scale)
        lse_s = None
    out = _gather_rows(out_s, plan.position, bh, n).view(b, h, *geom.grid, dv)
    lse = None
    if lse_s is not None:
        lse = _gather_rows(lse_s.reshape(b, h, n, 1), plan.position, bh, n).view(b, h, *geom.grid)
    return out, lse

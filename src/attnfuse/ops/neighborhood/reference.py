"""Reference neighborhood attention: gather each query's window keys, then plain softmax attention.

Readable and exact; it materialises ``(B, H, N, K, D)`` gathered keys and values (``K`` window
slots per query), so it is the oracle and the path for attention weights, not a fast path.

Shapes: ``q (B, H, *grid, D)``, ``k (B, H, *grid, D)``, ``v (B, H, *grid, Dv)``; ``N = prod(grid)``,
``K = prod(kernel_size)``, ``S`` extra (global) keys. See :mod:`attnfuse.ops` for the legend.
"""

from __future__ import annotations

import torch
from torch import Tensor

from attnfuse.ops.neighborhood._windows import Geometry, window_indices
from attnfuse.ops.reference import masked_softmax

__all__ = ["reference_neighborhood"]


def reference_neighborhood(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    geom: Geometry,
    *,
    scale: float,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    rpb: Tensor | None = None,
    extra_k: Tensor | None = None,
    extra_v: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Neighborhood attention by explicit window gathering; inputs are assumed validated.

    Equivalent to, for every query ``i``: ``softmax over j in window(i) ∪ extra of
    (scale * q_i·k_j + rpb[rel(i, j)] + bias[i, slot(j)])`` applied to the values, keys with
    ``mask`` False left out, and 0 for a query with no key left.

    Args:
        q, k, v: see the module shapes.
        geom: the validated window geometry.
        scale: score scale.
        mask: bool key validity ``(Bm, Hm, N)`` with ``Bm`` in ``{1, B}``, ``Hm`` in ``{1, H}``.
        bias: additive window-slot bias ``(Bb, Hb, N, K)``.
        rpb: relative-position bias ``(H, 2k_0 - 1, ...)``.
        extra_k, extra_v: extra keys ``(B, H, S, D)`` / values ``(B, H, S, Dv)`` every query sees.

    Returns:
        ``(out (B, H, *grid, Dv), weights (B, H, *grid, K + S), lse (B, H, *grid))``; weights of
        empty causal slots and masked keys are 0.
    """
    b, h = q.shape[:2]
    n, d, dv = geom.num_tokens, q.shape[-1], v.shape[-1]
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    keys, valid, rel = window_indices(geom, q.device)  # (N, K) each
    q_bhnd = q.reshape(b, h, n, d).to(compute)
    k_win = k.reshape(b, h, n, d).to(compute)[:, :, keys]  # (B, H, N, K, D)
    v_win = v.reshape(b, h, n, dv).to(compute)[:, :, keys]  # (B, H, N, K, Dv)
    s = torch.einsum("bhnd,bhnkd->bhnk", q_bhnd, k_win) * scale  # (B, H, N, K)
    if rpb is not None:
        s = s + rpb.reshape(h, -1).to(compute)[:, rel]  # (H, N, K)
    if bias is not None:
        s = s + bias.to(compute)  # (Bb, Hb, N, K)
    allowed = valid if mask is None else valid & mask[:, :, keys]  # (N, K) or (Bm, Hm, N, K)
    s = s.masked_fill(~allowed, float("-inf"))
    if extra_k is not None:
        s_extra = torch.einsum("bhnd,bhsd->bhns", q_bhnd, extra_k.to(compute)) * scale  # (B, H, N, S)
        s = torch.cat([s, s_extra], dim=-1)  # (B, H, N, K + S)
    weights, lse = masked_softmax(s)
    win = geom.window_size
    out = torch.einsum("bhnk,bhnkv->bhnv", weights[..., :win], v_win)  # (B, H, N, Dv)
    if extra_k is not None:
        out = out + torch.matmul(weights[..., win:], extra_v.to(compute))  # (B, H, N, Dv)
    grid = geom.grid
    return (
        out.to(dtype).reshape(b, h, *grid, dv),
        weights.to(dtype).reshape(b, h, *grid, weights.shape[-1]),
        lse.to(dtype).reshape(b, h, *grid),
    )

"""Plain, readable attention: scores -> mask -> softmax -> weighted sum.

This is the test oracle and the CPU fallback of every operator. It runs in any floating dtype
(half-precision inputs are computed in float32 and cast back). Its primitive steps are public
because routing and mixture-of-heads variants reuse them.

Shapes: see :mod:`attnfuse.ops`.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["aggregate", "apply_mask", "causal_mask", "masked_softmax", "reference_attention", "scores"]


def scores(q: Tensor, k: Tensor, scale: float | None = None) -> Tensor:
    """Scaled dot-product scores.

    Args:
        q: queries ``(B, H, L, D)``.
        k: keys ``(B, H, S, D)``.
        scale: score scale, ``1/sqrt(D)`` when None.

    Returns:
        ``(B, H, L, S)`` scores ``scale * q @ k^T``.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    return torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, L, S)


def causal_mask(lq: int, lk: int, device: torch.device | None = None) -> Tensor:
    """Top-left aligned causal mask ``(L, S)``: query ``i`` sees keys ``j <= i`` (as SDPA's ``is_causal``)."""
    return torch.ones(lq, lk, dtype=torch.bool, device=device).tril()


def apply_mask(s: Tensor, mask: Tensor | None = None, bias: Tensor | None = None) -> Tensor:
    """Add ``bias`` and set disallowed scores to ``-inf``.

    Args:
        s: scores ``(B, H, L, S)``.
        mask: bool, True = key takes part, broadcastable to ``s``.
        bias: additive bias broadcastable to ``s``.
    """
    if bias is not None:
        s = s + bias
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return s


def masked_softmax(s: Tensor) -> tuple[Tensor, Tensor]:
    """Softmax over the last axis that returns zero rows (not NaN) where every score is ``-inf``.

    Args:
        s: scores ``(..., S)`` with disallowed entries at ``-inf``.

    Returns:
        ``(weights, lse)``: weights ``(..., S)`` summing to 1 on rows with an allowed key and 0
        elsewhere; ``lse (...)`` the log-sum-exp of each row, ``-inf`` for empty rows. Gradients are
        finite everywhere.
    """
    if s.shape[-1] == 0:  # no keys at all: every row is empty (amax cannot reduce an empty axis)
        return s, s.new_full(s.shape[:-1], float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True).detach()  # (..., 1)
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    e = torch.exp(s - row_max)  # masked entries are exp(-inf) = 0
    denom = e.sum(dim=-1, keepdim=True)
    nonempty = denom > 0
    safe = torch.where(nonempty, denom, torch.ones_like(denom))
    weights = e / safe
    lse = torch.where(nonempty, row_max + torch.log(safe), torch.full_like(denom, float("-inf")))
    return weights, lse.squeeze(-1)


def aggregate(weights: Tensor, v: Tensor) -> Tensor:
    """Weighted sum of values: ``weights (B, H, L, S) @ v (B, H, S, Dv) -> (B, H, L, Dv)``."""
    return torch.matmul(weights, v)


def reference_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Explicit dense attention; inputs are assumed validated.

    Equivalent to ``softmax(scale * q @ k^T + bias, masked) @ v`` with empty rows set to zero.

    Returns:
        ``(out (B, H, L, Dv), weights (B, H, L, S), lse (B, H, L))`` in the input dtype.
    """
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    if is_causal:
        causal = causal_mask(q.shape[-2], k.shape[-2], device=q.device)  # (L, S)
        mask = causal if mask is None else mask & causal
    s = apply_mask(scores(q, k, scale), mask, None if bias is None else bias.to(compute))
    weights, lse = masked_softmax(s)
    out = aggregate(weights, v)
    return out.to(dtype), weights.to(dtype), lse.to(dtype)

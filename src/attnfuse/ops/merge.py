"""Exact merge of attention results computed over disjoint key sets.

If ``out_i, lse_i`` are attention over key set ``K_i`` (softmax normalised within ``K_i``), then
attention over the union is ``sum_i exp(lse_i - lse) * out_i`` with ``lse = logsumexp_i lse_i``.
Used by ring (sequence-parallel) attention, neighborhood attention with extra keys and Combiner.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from attnfuse.ops.reference import masked_softmax

__all__ = ["merge_attention"]


def merge_attention(outputs: Sequence[Tensor], lses: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Combine partial attention results from their log-sum-exps.

    Args:
        outputs: ``n`` tensors ``(B, H, L, Dv)``, each attention over one key subset.
        lses: ``n`` tensors ``(B, H, L)``, their log-sum-exps (``-inf`` where a subset had no
            allowed key for that query).

    Returns:
        ``(out (B, H, L, Dv), lse (B, H, L))`` equal to attention over the union of the key sets;
        a query with no allowed key in any subset gets 0 and ``lse = -inf``.

    Raises:
        ValueError: if the lists are empty, of different lengths, or shapes disagree.
    """
    if len(outputs) == 0 or len(outputs) != len(lses):
        raise ValueError(f"merge_attention needs equally many outputs and lses (>= 1), got {len(outputs)} and {len(lses)}")
    shape = outputs[0].shape
    for i, (o, s) in enumerate(zip(outputs, lses)):
        if o.shape != shape:
            raise ValueError(f"outputs[{i}].shape={tuple(o.shape)} differs from outputs[0].shape={tuple(shape)}")
        if s.shape != shape[:-1]:
            raise ValueError(f"lses[{i}] must have shape {tuple(shape[:-1])} (B, H, L), got {tuple(s.shape)}")
    dtype = outputs[0].dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    lse_bhln = torch.stack([s.to(compute) for s in lses], dim=-1)  # (B, H, L, n): small, one value per query
    weights, lse = masked_softmax(lse_bhln)  # (B, H, L, n), (B, H, L)
    # sum_i w_i * out_i without stacking the outputs: one fused multiply-add pass per part
    out = outputs[0].to(compute) * weights[..., 0:1]  # (B, H, L, Dv)
    for i in range(1, len(outputs)):
        out = torch.addcmul(out, outputs[i].to(compute), weights[..., i : i + 1])
    return out.to(dtype), lse.to(dtype)

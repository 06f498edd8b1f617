"""Dense (softmax dot-product) attention with masks, bias, causal flag, weights and log-sum-exp.

Paper: Vaswani et al., "Attention Is All You Need" (https://arxiv.org/abs/1706.03762).
Status: exact; backends ``"sdpa"`` (torch's fused kernels) and ``"reference"``.
Takes both mask kinds: a key mask (``key_mask=``) and a pair mask (``mask=``), and a ``(B, H, L, S)`` bias.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfuse.ops._checks import check_bias, check_key_mask, check_mask, check_qkv, key_mask_to_pairs
from attnfuse.ops._guards import drop_masked_keys, empty_like_result, is_empty
from attnfuse.ops._registry import operator
from attnfuse.ops._sdpa_lse import fused_lse_supported, sdpa_with_lse
from attnfuse.ops.backends import Backend, Call
from attnfuse.ops.reference import causal_mask, reference_attention

__all__ = ["dense_attention"]


def _reference(q, k, v, *, mask, bias, scale, is_causal, need_weights, need_lse):
    out, weights, lse = reference_attention(q, k, v, mask=mask, bias=bias, scale=scale, is_causal=is_causal)
    return out, weights, lse


def _at_least_2d(t: Tensor | None) -> Tensor | None:
    """SDPA needs a mask / bias of rank >= 2 ``(L, S)``; a ``(S,)`` or scalar one is legal here."""
    if t is None or t.dim() >= 2:
        return t
    return t.reshape((1,) * (2 - t.dim()) + tuple(t.shape))  # (1, S) or (1, 1)


def _sdpa(q, k, v, *, mask, bias, scale, is_causal, need_weights, need_lse):
    # SDPA gives no guarantee for rows with no allowed key (NaN on some kernels), so such rows get
    # every key unmasked for the kernel and are zeroed afterwards; their gradient is then exactly 0.
    if need_lse and not _fused_lse_fits(q, bias):
        return _reference(q, k, v, mask=mask, bias=bias, scale=scale, is_causal=is_causal,
                          need_weights=need_weights, need_lse=need_lse)
    row_ok = None
    mask, bias = _at_least_2d(mask), _at_least_2d(bias)
    if is_causal and (mask is not None or bias is not None):
        causal = causal_mask(q.shape[-2], k.shape[-2], device=q.device)  # (L, S)
        mask = causal if mask is None else mask & causal
        is_causal = False
    if mask is not None:
        row_ok = mask.any(dim=-1, keepdim=True)  # (B?, H?, L, 1)
        if q.device.type == "cpu" and not torch.compiler.is_compiling() and bool(row_ok.all()):
            row_ok = None  # every row has a key (checked for free on the CPU): no guard needed
        else:
            mask = mask | ~row_ok
    attn_mask = mask
    if bias is not None:
        bias = bias.to(q.dtype)  # SDPA rejects a float mask of another dtype; the reference casts too
        attn_mask = bias if mask is None else torch.where(mask, bias, float("-inf"))
    lse = None
    if need_lse:
        if attn_mask is not None and attn_mask.dtype == torch.bool:  # the aten kernels take a float mask
            attn_mask = torch.zeros((), dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
        out, lse = sdpa_with_lse(q, k, v, attn_mask=attn_mask, scale=scale, is_causal=is_causal)
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal, scale=scale)
    if row_ok is not None:
        out = torch.where(row_ok, out, torch.zeros((), dtype=out.dtype, device=out.device))
        if lse is not None:
            lse = torch.where(row_ok.squeeze(-1), lse, torch.full((), float("-inf"), dtype=lse.dtype, device=lse.device))
    return out, None, lse


def _fused_lse_fits(q: Tensor, bias: Tensor | None) -> bool:
    """Whether the fused kernels can return the log-sum-exp for this call.

    They need a supported device and dtype, and take no gradient for ``bias``; otherwise the call runs
    on the reference path (exact, O(L S) memory).
    """
    bias_grad = bias is not None and bias.requires_grad and torch.is_grad_enabled()
    return fused_lse_supported(q) and not bias_grad


def _used_keys(mask: Tensor | None, is_causal: bool, lq: int, lk: int, device: torch.device) -> Tensor | None:
    """Keys some query may attend, ``(..., S)`` bool, or None when every key may be attended.

    A key is unused if the pair mask excludes it for every query (a key mask is the pair mask
    ``(B', H', 1, S)``, so this costs nothing there) or, with ``is_causal`` and ``S > L``, if it lies past
    the last query.
    """
    used = None
    if mask is not None:
        used = mask if mask.dim() < 2 else mask.any(dim=-2)  # (B?, H?, S)
    if is_causal and lk > lq:
        before = torch.arange(lk, device=device) < lq  # (S,)
        used = before if used is None else used & before
    return used


@operator("dense", backends=(
    Backend("sdpa", _sdpa, lse=True),
    Backend("reference", _reference, weights=True, lse=True),
))
def dense_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    return_weights: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, ...]:
    """Softmax dot-product attention over all keys.

    ``out = softmax(scale * q @ k^T + bias, over allowed keys) @ v``; a query with no allowed key
    returns exactly 0, and its gradients are 0 (never NaN).

    Args:
        q: queries ``(B, H, L, D)``.
        k: keys ``(B, H, S, D)``.
        v: values ``(B, H, S, Dv)``.
        key_mask: bool key mask, ``True`` = the key exists: ``(B, S)`` or ``(B, H, S)`` (B, H may be 1).
        mask: bool pair mask, ``True`` = query ``i`` may attend key ``j``, broadcastable to
            ``(B, H, L, S)``. With ``key_mask`` a pair takes part only if both allow it.
        bias: additive float score bias broadcastable to ``(B, H, L, S)``; receives gradients.
            Use ``mask`` (not ``-inf`` in ``bias``) to exclude keys.
        scale: score scale, ``1/sqrt(D)`` when None.
        is_causal: query ``i`` only sees keys ``j <= i`` (top-left aligned, as SDPA).
        return_weights: also return the attention weights ``(B, H, L, S)``.
        return_lse: also return the log-sum-exp ``(B, H, L)`` of the masked scores;
            ``-inf`` for a query with no allowed key.
        backend: ``"auto"``, ``"sdpa"`` or ``"reference"``; see :mod:`attnfuse.ops.backends`.

    Returns:
        ``out (B, H, L, Dv)``; or ``(out, weights)``, ``(out, lse)``, ``(out, weights, lse)``
        depending on the flags.

    Raises:
        TypeError: non-float q/k/v, mixed dtypes, non-bool masks, non-float ``bias``.
        ValueError: wrong ranks, mismatched ``(B, H)``, ``D`` or ``S``, masks/biases that do not
            broadcast, unknown ``backend``.

    Shapes:
        See :mod:`attnfuse.ops` (B, H, L, S, D, Dv). Takes: key mask ``(B, S)`` / ``(B, H, S)``; pair
        mask and bias broadcastable to ``(B, H, L, S)``; ``is_causal``; weights; log-sum-exp.

    Example:
        >>> q = k = v = torch.randn(2, 4, 16, 32)
        >>> out = dense_attention(q, k, v, key_mask=torch.rand(2, 16) > 0.5)
        >>> out.shape
        torch.Size([2, 4, 16, 32])
    """
    check_qkv(q, k, v)
    target = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    check_mask(mask, target)
    mask = key_mask_to_pairs(mask, check_key_mask("dense", key_mask, q.shape[0], q.shape[1], (k.shape[2],)))
    check_bias(bias, target, q.dtype)
    call = Call.of(q, k, v, mask=mask, bias=bias, need_weights=return_weights, need_lse=return_lse)
    impl = dense_attention.spec.choose_backend(backend, call)
    b, h, lq, lk = target
    if is_empty(b, h, lq, lk):
        out, weights, lse = empty_like_result(
            q, (b, h, lq, v.shape[-1]), inputs=(q, k, v, bias), weights_shape=target if return_weights else None,
            lse_shape=target[:3] if return_lse else None,
        )
    else:
        used = _used_keys(mask, is_causal, lq, lk, q.device)  # (..., S) or None
        k, v = drop_masked_keys(k, v, used)  # masked keys never reach a matmul (NaN there included)
        out, weights, lse = impl.fn(
            q, k, v, mask=mask, bias=bias, scale=scale, is_causal=is_causal,
            need_weights=return_weights, need_lse=return_lse,
        )
    if not (return_weights or return_lse):
        return out
    extra = ([weights] if return_weights else []) + ([lse] if return_lse else [])
    return (out, *extra)

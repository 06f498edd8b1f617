"""Kernel attention: dense attention with a chosen similarity map and normalisation (softmax and its relaxations).

Papers:
    Xue, Moosavi, Aletras, "Deconstructing Attention: Investigating Design Principles for Effective Language
    Modeling" (https://arxiv.org/abs/2510.11602): the *Approximate* (``"taylor"``) and *Non-approximate*
    (``"self_gated"``) forms; Arora et al., "Simple linear attention language models balance the recall-throughput
    tradeoff" (Based, https://arxiv.org/abs/2402.18668) for the joint normalisation of the Taylor form;
    Katharopoulos et al., "Transformers are RNNs" (https://arxiv.org/abs/2006.16236) for ``"elu"``;
    Hao et al., "ADEM-VL" (https://arxiv.org/abs/2410.17779) for ``"silu"`` (without ADEM-VL's drop, which is
    :func:`attnfuse.ops.silu_kernel_attention`); Fu et al., "What can a Single Attention Layer Learn? A Study
    Through the Random Features Lens" (https://arxiv.org/abs/2307.11353) for ``softmax`` with ``normalize="count"``.
Status: exact quadratic reference (backend ``"reference"``, what ``"auto"`` picks) and a linear-time feature-map
backend ``"feature"`` for ``"taylor"``, ``"linear"`` and ``"elu"`` (requested by name; key masks, causal; no pair mask,
no weights), tested against the reference.

Equivalent dense formulation, per batch, head and query row ``i`` with allowed keys ``J_i`` (key mask, pair mask,
``is_causal``; ``n_i = |J_i|``) and ``s_ij = scale * q_i . k_j`` (``scale = 1/sqrt(D)`` when None)::

    similarity   phi_ij (j in J_i; 0 elsewhere)                         default normalize
    "softmax"    exp(s_ij)                                               "sum"  (= softmax attention)
    "taylor"     1 + s_ij + s_ij**2 / 2          (>= 1/2)                "sum"  (Based / Approximate)
    "self_gated" exp(scale * q_j . k_j)          (ignores the query)     "sum"  (Non-approximate; needs L == S)
    "elu"        c * (elu(q_i) + 1) . (elu(k_j) + 1)                     "sum"  (linear transformer)
    "linear"     s_ij                                                    "none"
    "relu"       relu(s_ij)                                              "none"
    "silu"       c * silu(q_i) . silu(k_j)                               "none" (ADEM-VL, no drop)

    normalize "sum":   w_ij = phi_ij / sum_{j' in J_i} phi_ij'    (0 if that sum is 0)
              "count": w_ij = phi_ij / n_i                        (0 if n_i = 0)
              "none":  w_ij = phi_ij
    out_i = sum_j w_ij v_j

``c`` is ``scale`` where given and 1 when None ("elu" and "silu" are not dot-product scores of the raw q, k).
``return_lse=True`` returns ``log sum_{j in J_i} phi_ij`` (the log of the row's normaliser; ``-inf`` for a row
without allowed key or with a zero sum): for ``"softmax"`` it is the usual log-sum-exp, and for every
non-negative similarity it lets :func:`attnfuse.ops.merge_attention` merge partial results exactly. It needs
``normalize="sum"`` and a non-negative similarity (not ``"linear"`` / ``"silu"``).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfuse.ops._checks import check_key_mask, check_mask, check_qkv, key_mask_to_pairs
from attnfuse.ops._guards import drop_masked, drop_masked_keys, empty_like_result, is_empty
from attnfuse.ops._registry import operator
from attnfuse.ops.backends import Backend, Call
from attnfuse.ops.reference import causal_mask, masked_softmax

__all__ = ["DEFAULT_NORMALIZE", "SIMILARITIES", "kernel_attention", "kernel_weights"]

Similarity = Literal["softmax", "taylor", "self_gated", "elu", "linear", "relu", "silu"]
Normalize = Literal["sum", "count", "none"]

#: similarity -> its default normalisation (``normalize=None``).
DEFAULT_NORMALIZE: dict[str, str] = {
    "softmax": "sum", "taylor": "sum", "self_gated": "sum", "elu": "sum", "linear": "none", "relu": "none", "silu": "none",
}
SIMILARITIES = tuple(DEFAULT_NORMALIZE)
_EXP = frozenset({"softmax", "self_gated"})
_SIGNED = frozenset({"linear", "silu"})


def _check_options(similarity: str, normalize: str | None, lq: int, lk: int, return_lse: bool) -> str:
    if similarity not in DEFAULT_NORMALIZE:
        raise ValueError(f"similarity must be one of {list(SIMILARITIES)}, got {similarity!r}")
    norm = DEFAULT_NORMALIZE[similarity] if normalize is None else normalize
    if norm not in ("sum", "count", "none"):
        raise ValueError(f"normalize must be 'sum', 'count', 'none' or None (the similarity's default), got {normalize!r}")
    if similarity == "self_gated" and lq != lk:
        raise ValueError(f"similarity='self_gated' scores key j with its own query q_j: needs L == S, got L={lq}, S={lk}")
    if return_lse and (norm != "sum" or similarity in _SIGNED):
        raise ValueError(f"return_lse needs normalize='sum' and a non-negative similarity, got similarity={similarity!r}, "
                         f"normalize={norm!r}")
    return norm


def kernel_weights(
    q: Tensor,
    k: Tensor,
    *,
    similarity: Similarity = "softmax",
    normalize: Normalize | None = None,
    mask: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor]:
    """The weight matrix ``w`` of the module docstring and the log normaliser.

    Args:
        q: queries ``(B, H, L, D)``.
        k: keys ``(B, H, S, D)``.
        similarity, normalize, scale, is_causal: as :func:`kernel_attention`.
        mask: bool, ``True`` = the pair takes part, broadcastable to ``(B, H, L, S)``.

    Returns:
        ``(w (B, H, L, S), log_norm (B, H, L))``: ``log_norm = log sum_j phi_ij`` over the allowed keys
        (``-inf`` where that sum is <= 0, and meaningless for signed similarities).
    """
    norm = DEFAULT_NORMALIZE[similarity] if normalize is None else normalize
    lq, lk = q.shape[-2], k.shape[-2]
    dot_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if similarity == "self_gated":
        s = (q * k).sum(-1) * dot_scale  # (B, H, S): key j's score from its own q_j
        s = s.unsqueeze(-2).expand(*s.shape[:-1], lq, lk)  # (B, H, L, S)
    elif similarity == "elu":
        s = torch.matmul(F.elu(q) + 1, (F.elu(k) + 1).transpose(-2, -1)) * (1.0 if scale is None else scale)  # (B, H, L, S)
    elif similarity == "silu":
        s = torch.matmul(F.silu(q), F.silu(k).transpose(-2, -1)) * (1.0 if scale is None else scale)  # (B, H, L, S)
    else:
        s = torch.matmul(q, k.transpose(-2, -1)) * dot_scale  # (B, H, L, S)
    allowed = torch.ones((), dtype=torch.bool, device=q.device) if mask is None else mask
    if is_causal:
        allowed = allowed & causal_mask(lq, lk, device=q.device)  # (L, S)
    allowed = allowed.expand(s.shape)  # (B, H, L, S)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    if similarity in _EXP and norm == "sum":
        return masked_softmax(s.masked_fill(~allowed, float("-inf")))
    if similarity in _EXP:
        phi = torch.where(allowed, s, float("-inf")).exp()  # exp(-inf) = 0 with a zero gradient
    elif similarity == "taylor":
        phi = 1 + s + 0.5 * s * s
    elif similarity == "relu":
        phi = F.relu(s)
    else:  # linear, elu, silu: the score itself
        phi = s
    phi = torch.where(allowed, phi, zero)  # (B, H, L, S)
    total = phi.sum(-1)  # (B, H, L)
    log_norm = torch.where(total > 0, total.clamp_min(torch.finfo(total.dtype).tiny).log(), float("-inf"))
    if norm == "sum":
        nonzero = (total != 0).unsqueeze(-1)  # (B, H, L, 1)
        phi = torch.where(nonzero, phi / torch.where(nonzero, total.unsqueeze(-1), 1.0), zero)
    elif norm == "count":
        n = allowed.sum(-1, keepdim=True).clamp_min(1).to(phi.dtype)  # (B, H, L, 1)
        phi = phi / n
    return phi, log_norm


def _reference(q, k, v, *, mask, similarity, normalize, scale, is_causal, need_weights, need_lse):
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w, log_norm = kernel_weights(q.to(compute), k.to(compute), similarity=similarity, normalize=normalize, mask=mask,
                                 scale=scale, is_causal=is_causal)  # (B, H, L, S), (B, H, L)
    out = torch.matmul(w, v.to(compute))  # (B, H, L, Dv)
    return out.to(dtype), (w.to(dtype) if need_weights else None), (log_norm.to(dtype) if need_lse else None)


#: Similarities with a finite feature map ``phi_ij = f(q_i) . g(k_j)`` (the ``"feature"`` backend).
FEATURE_SIMILARITIES = frozenset({"taylor", "linear", "elu"})


def _feature_maps(q: Tensor, k: Tensor, similarity: str, scale: float | None) -> tuple[Tensor, Tensor]:
    """``(f(q) (B, H, L, F), g(k) (B, H, S, F))`` with ``f(q_i) . g(k_j) = phi_ij``."""
    if similarity == "elu":
        return (F.elu(q) + 1) * (1.0 if scale is None else scale), F.elu(k) + 1
    c = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    if similarity == "linear":
        return q * c, k
    # taylor: [1, sqrt(c) x, c vec(x x^T) / sqrt(2)] . [1, sqrt(c) y, c vec(y y^T) / sqrt(2)] = 1 + c x.y + (c x.y)^2 / 2

    def taylor(x: Tensor) -> Tensor:
        outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)  # (B, H, N, D*D)
        return torch.cat([torch.ones_like(x[..., :1]), x * math.sqrt(abs(c)), outer * (c / math.sqrt(2))], -1)

    fq, fk = taylor(q), taylor(k)
    if c < 0:  # sqrt(|c|) on both sides gives |c| x.y: flip the sign on the query side
        fq = torch.cat([fq[..., :1], -fq[..., 1 : 1 + q.shape[-1]], fq[..., 1 + q.shape[-1]:]], -1)
    return fq, fk


def _feature(q, k, v, *, mask, similarity, normalize, scale, is_causal, need_weights, need_lse):
    """Linear-time form: ``out_i = f(q_i) . sum_{j in J_i} g(k_j) v_j^T`` (prefix sums when causal)."""
    if similarity not in FEATURE_SIMILARITIES:
        raise ValueError(f"backend 'feature' of operator 'kernel' needs similarity in {sorted(FEATURE_SIMILARITIES)}, "
                         f"got {similarity!r}; use backend='reference'")
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    q, k, v = q.to(compute), k.to(compute), v.to(compute)
    lq, lk = q.shape[-2], k.shape[-2]
    fq, fk = _feature_maps(q, k, similarity, scale)  # (B, H, L, F), (B, H, S, F)
    if mask is not None and mask.dim() >= 2 and mask.shape[-2] != 1:
        raise ValueError("backend 'feature' of operator 'kernel' takes key masks only (no pair mask varying over the "
                         f"queries, got mask.shape={tuple(mask.shape)}); use backend='reference'")
    keep = torch.ones((), dtype=compute, device=k.device) if mask is None else mask
    if keep.dim() >= 2:
        keep = keep.squeeze(-2)  # a key mask arrives as the pair mask (B', H', 1, S)
    keep = keep.to(compute).expand(k.shape[:-1])  # (B, H, S)
    fk = fk * keep.unsqueeze(-1)
    kv = fk.unsqueeze(-1) * v.unsqueeze(-2)  # (B, H, S, F, Dv)
    if is_causal:
        idx = torch.arange(lq, device=q.device).clamp(max=lk - 1)  # query i sees keys j <= i
        kv_i = kv.cumsum(-3)[..., idx, :, :]  # (B, H, L, F, Dv)
        z_i = fk.cumsum(-2)[..., idx, :]  # (B, H, L, F)
        n_i = keep.cumsum(-1)[..., idx]  # (B, H, L)
    else:
        kv_i, z_i, n_i = kv.sum(-3).unsqueeze(-3), fk.sum(-2).unsqueeze(-2), keep.sum(-1).unsqueeze(-1)
    num = (fq.unsqueeze(-2) @ kv_i).squeeze(-2)  # (B, H, L, Dv)
    den = (fq * z_i).sum(-1)  # (B, H, L): sum_j phi_ij
    zero = torch.zeros((), dtype=compute, device=q.device)
    if normalize == "sum":
        out = torch.where((den != 0).unsqueeze(-1), num / torch.where(den != 0, den, 1.0).unsqueeze(-1), zero)
    elif normalize == "count":
        out = num / n_i.clamp_min(1).expand(num.shape[:-1]).unsqueeze(-1)
    else:
        out = num
    lse = None
    if need_lse:
        lse = torch.where(den > 0, den.clamp_min(torch.finfo(compute).tiny).log(), float("-inf")).to(dtype)
    return out.to(dtype), None, lse


@operator("kernel", backends=(
    Backend("reference", _reference, weights=True, lse=True),
    Backend("feature", _feature, lse=True, auto_devices=frozenset()),
))
def kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    mask: Tensor | None = None,
    similarity: Similarity = "softmax",
    normalize: Normalize | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    return_weights: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, ...]:
    """Attention with a chosen similarity map ``phi`` and normalisation (see the module docstring for the formulas).

    ``similarity="softmax"`` with the default ``normalize`` is exactly :func:`attnfuse.ops.dense_attention`.
    Masked keys get weight 0 and never reach a matmul; a query with no allowed key returns 0.

    Args:
        q: queries ``(B, H, L, D)``.
        k: keys ``(B, H, S, D)``.
        v: values ``(B, H, S, Dv)``.
        key_mask: bool key mask, ``True`` = the key exists: ``(B, S)`` or ``(B, H, S)`` (B, H may be 1).
        mask: bool pair mask, ``True`` = query ``i`` may use key ``j``, broadcastable to ``(B, H, L, S)``.
        similarity: ``"softmax"``, ``"taylor"``, ``"self_gated"``, ``"elu"``, ``"linear"``, ``"relu"`` or ``"silu"``.
        normalize: ``"sum"`` (divide by the row's total weight), ``"count"`` (by the number of allowed keys),
            ``"none"``, or None for the similarity's default (``"sum"`` for softmax, taylor, self_gated, elu;
            ``"none"`` for linear, relu, silu).
        scale: score scale; None = ``1/sqrt(D)`` for the dot-product similarities, 1 for ``"elu"`` and ``"silu"``.
        is_causal: query ``i`` only uses keys ``j <= i`` (top-left aligned, as SDPA).
        return_weights: also return the weights ``w (B, H, L, S)``.
        return_lse: also return ``log sum_j phi_ij`` ``(B, H, L)`` (needs ``normalize="sum"`` and a non-negative
            similarity); ``-inf`` for a query with no allowed key.
        backend: ``"auto"`` or ``"reference"``.

    Returns:
        ``out (B, H, L, Dv)``; or ``(out, weights)``, ``(out, lse)``, ``(out, weights, lse)``.

    Raises:
        TypeError: non-float q/k/v, mixed dtypes, non-bool masks.
        ValueError: wrong ranks or sizes, unknown ``similarity`` / ``normalize``, ``"self_gated"`` with
            ``L != S``, ``return_lse`` with a signed similarity or another normalisation, unknown ``backend``.

    Shapes:
        See :mod:`attnfuse.ops` (B, H, L, S, D, Dv). Takes: key mask ``(B, S)`` / ``(B, H, S)``; pair mask
        broadcastable to ``(B, H, L, S)``; ``is_causal``; weights; log-sum-exp (log normaliser). No bias.

    Example:
        >>> q = k = v = torch.randn(2, 4, 16, 32)
        >>> out = kernel_attention(q, k, v, similarity="taylor", is_causal=True)
        >>> out.shape
        torch.Size([2, 4, 16, 32])
    """
    check_qkv(q, k, v)
    (b, h, lq, _), lk = q.shape, k.shape[2]
    check_mask(mask, (b, h, lq, lk))
    mask = key_mask_to_pairs(mask, check_key_mask("kernel", key_mask, b, h, (lk,)))
    norm = _check_options(similarity, normalize, lq, lk, return_lse)
    call = Call.of(q, k, v, mask=mask, need_weights=return_weights, need_lse=return_lse)
    impl = kernel_attention.spec.choose_backend(backend, call)
    if is_empty(b, h, lq, lk):
        out, weights, lse = empty_like_result(q, (b, h, lq, v.shape[-1]), inputs=(q, k, v),
                                              weights_shape=(b, h, lq, lk) if return_weights else None,
                                              lse_shape=(b, h, lq) if return_lse else None)
    else:
        used = None if mask is None else (mask if mask.dim() < 2 else mask.any(dim=-2))  # (B?, H?, S)
        if is_causal and lk > lq:
            before = torch.arange(lk, device=q.device) < lq  # (S,): keys past the last query are never used
            used = before if used is None else used & before
        if similarity == "self_gated" and used is not None:  # q_j scores key j: masked keys' queries must not leak
            q_keys = drop_masked(q, used.expand(b, h, lk))
            k, v = drop_masked(k, used), drop_masked(v, used)
            q = q_keys
        else:
            k, v = drop_masked_keys(k, v, used)
        out, weights, lse = impl.fn(q, k, v, mask=mask, similarity=similarity, normalize=norm, scale=scale,
                                    is_causal=is_causal, need_weights=return_weights, need_lse=return_lse)
    if not (return_weights or return_lse):
        return out
    extra = ([weights] if return_weights else []) + ([lse] if return_lse else [])
    return (out, *extra)

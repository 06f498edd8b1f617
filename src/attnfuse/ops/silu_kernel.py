"""Parameter-free SiLU-kernel attention: unnormalised ``SiLU(q) SiLU(k)^T`` scores, lowest scores dropped.

Paper: Hao et al., "ADEM-VL: Adaptive and Embedded Fusion for Efficient Vision-Language Tuning"
(https://arxiv.org/abs/2410.17779), section 3 (parameter-free cross-attention, adaptive fusion).
Status: exact as the released code (``adem/adapter.py``) computes it, with key masks added; backend
``"reference"`` only (the cost is two matmuls and one sort per query row).

Equivalent dense formulation, per batch, head and query row ``i`` (valid keys ``J_i``, ``n_i = |J_i|``)::

    a_ij = silu(q_i) . silu(k_j)                 for j in J_i           # no softmax, no 1/sqrt(D)
    t_i  = sorted(a_i[J_i])[floor(gamma * n_i)]                         # k-th smallest valid score, 0-based
    w_ij = a_ij if (j in J_i and a_ij >= t_i) else 0                    # drop scores strictly below t_i
    out_i = sum_j w_ij v_j

Ties: scores equal to the threshold ``t_i`` are kept (the released code's rule ``x < threshold``),
so exactly ``floor(gamma * n_i)`` keys are dropped when the valid scores of a row are distinct and
fewer when some equal ``t_i``. A row with no valid key returns zeros.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from attnfuse.ops._checks import check_key_mask, check_mask, check_qkv, key_mask_to_pairs
from attnfuse.ops._guards import drop_masked_keys, empty_like_result, is_empty
from attnfuse.ops._registry import operator
from attnfuse.ops.backends import Backend, Call

__all__ = ["silu_kernel_attention", "silu_kernel_weights"]


def silu_kernel_weights(q: Tensor, k: Tensor, *, mask: Tensor | None = None, drop_ratio: float = 0.0) -> Tensor:
    """The masked, dropped SiLU-kernel weight matrix ``w`` of the module docstring.

    Args:
        q: queries ``(B, H, L, D)``.
        k: keys ``(B, H, S, D)``.
        mask: bool, ``True`` = key takes part, broadcastable to ``(B, H, L, S)``.
        drop_ratio: ``gamma`` in ``[0, 1)``: the fraction of each row's valid keys to drop.

    Returns:
        ``(B, H, L, S)`` weights; 0 for masked and dropped keys. Differentiable in ``q`` and ``k``
        (the drop mask is a selection and carries no gradient).
    """
    a = torch.matmul(F.silu(q), F.silu(k).transpose(-2, -1))  # (B, H, L, S)
    allowed = torch.ones_like(a, dtype=torch.bool) if mask is None else mask.expand(a.shape)  # (B, H, L, S)
    if drop_ratio > 0:
        n_valid = allowed.sum(dim=-1, keepdim=True)  # (B, H, L, 1)
        # floor in float64, as the released code's int(gamma * S) does in Python
        kth = torch.floor(n_valid.to(torch.float64) * drop_ratio).to(torch.long)  # (B, H, L, 1)
        ranked = torch.where(allowed, a.detach(), torch.full((), float("inf"), dtype=a.dtype, device=a.device))
        ranked = ranked.sort(dim=-1).values  # (B, H, L, S): valid scores first, ascending
        threshold = ranked.gather(-1, kth.clamp(max=a.shape[-1] - 1))  # (B, H, L, 1)
        allowed = allowed & (a.detach() >= threshold)
    return torch.where(allowed, a, torch.zeros((), dtype=a.dtype, device=a.device))


def _reference(q, k, v, *, mask, drop_ratio, need_weights):
    dtype = q.dtype
    compute = torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype
    w = silu_kernel_weights(q.to(compute), k.to(compute), mask=mask, drop_ratio=drop_ratio)  # (B, H, L, S)
    out = torch.matmul(w, v.to(compute))  # (B, H, L, Dv)
    return out.to(dtype), (w.to(dtype) if need_weights else None)


@operator("silu_kernel", backends=(Backend("reference", _reference, weights=True),))
def silu_kernel_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    key_mask: Tensor | None = None,
    mask: Tensor | None = None,
    drop_ratio: float = 0.0,
    return_weights: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Parameter-free SiLU-kernel attention (ADEM-VL): ``out = (A * M) v`` with ``A = SiLU(q) SiLU(k)^T``.

    There is no softmax and no ``1/sqrt(D)`` scale; per query row the ``floor(drop_ratio * n)``
    lowest of its ``n`` valid scores are dropped (ties at the threshold are kept, see the module
    docstring). Masked keys are excluded from scoring and ranking; a row with no valid key gives 0.

    Args:
        q: queries ``(B, H, L, D)``.
        k: keys ``(B, H, S, D)``.
        v: values ``(B, H, S, Dv)``.
        key_mask: bool key mask, ``True`` = the key exists: ``(B, S)`` or ``(B, H, S)`` (B, H may be 1).
        mask: bool pair mask, ``True`` = query ``i`` may use key ``j``, broadcastable to ``(B, H, L, S)``.
        drop_ratio: ``gamma`` in ``[0, 1)`` (ADEM-VL uses 0.1); 0 keeps every valid key.
        return_weights: also return the weights ``A * M`` ``(B, H, L, S)``.
        backend: ``"auto"`` or ``"reference"``.

    Returns:
        ``out (B, H, L, Dv)`` or ``(out, weights)``.

    Raises:
        TypeError: non-float inputs, mixed dtypes, non-bool masks.
        ValueError: wrong ranks or sizes, ``drop_ratio`` outside ``[0, 1)``, unknown ``backend``.

    Shapes:
        See :mod:`attnfuse.ops` (B, H, L, S, D, Dv). Takes: key mask ``(B, S)`` / ``(B, H, S)``; pair
        mask broadcastable to ``(B, H, L, S)``; weights. No bias, no causal flag, no log-sum-exp
        (there is no softmax).

    Example:
        >>> q, k, v = torch.randn(1, 1, 3, 8), torch.randn(1, 1, 10, 8), torch.randn(1, 1, 10, 8)
        >>> out, w = silu_kernel_attention(q, k, v, drop_ratio=0.2, return_weights=True)
        >>> (w == 0).sum(-1).tolist()  # 2 of 10 keys dropped per query (distinct scores)
        [[[2, 2, 2]]]
    """
    check_qkv(q, k, v)
    check_mask(mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]))
    mask = key_mask_to_pairs(mask, check_key_mask("silu_kernel", key_mask, q.shape[0], q.shape[1], (k.shape[2],)))
    if not isinstance(drop_ratio, (int, float)) or not 0.0 <= drop_ratio < 1.0:
        raise ValueError(f"drop_ratio must be a number in [0, 1), got {drop_ratio!r}")
    call = Call.of(q, k, v, mask=mask, need_weights=return_weights)
    impl = silu_kernel_attention.spec.choose_backend(backend, call)
    (b, h, lq, _), lk = q.shape, k.shape[2]
    if is_empty(b, h, lq, lk):  # nothing to compute (no keys: every row is empty and gives 0)
        out, weights, _ = empty_like_result(q, (b, h, lq, v.shape[-1]), inputs=(q, k, v),
                                            weights_shape=(b, h, lq, lk) if return_weights else None)
        return (out, weights) if return_weights else out
    if mask is not None:  # keys no query may use never reach a matmul (NaN there included)
        used = mask if mask.dim() < 2 else mask.any(dim=-2)  # (B?, H?, S)
        k, v = drop_masked_keys(k, v, used)
    out, weights = impl.fn(q, k, v, mask=mask, drop_ratio=float(drop_ratio), need_weights=return_weights)
    return (out, weights) if return_weights else out

"""Fused dense attention that also returns the log-sum-exp, with gradients through both outputs.

``F.scaled_dot_product_attention`` computes the log-sum-exp internally but does not return it. The
kernels it dispatches to do: on the CPU ``aten._scaled_dot_product_flash_attention_for_cpu`` returns
``(out, lse)``, on CUDA ``aten._scaled_dot_product_efficient_attention(compute_log_sumexp=True)``.
:func:`sdpa_with_lse` calls them directly inside a custom :class:`torch.autograd.Function` whose
backward is the matching aten backward kernel.

Gradient of the log-sum-exp. The aten backward kernels only take ``dO``. With ``P`` the softmax,
``dP = dO V^T`` and ``Δ_i = Σ_d dO_id O_id``, they compute ``dS = P ∘ (dP − Δ)``; a gradient ``g_i``
flowing into ``lse_i = log Σ_j exp(s_ij)`` adds ``g_i P_ij`` (since ``∂lse_i/∂s_ij = P_ij``), i.e.
``dS = P ∘ (dP − (Δ − g))``. The kernels read ``O`` only to form ``Δ`` (checked by a test), so one
extra zero column is appended to ``V`` (and to ``Q``, ``K`` where the kernel needs equal head sizes),
``1`` to ``dO`` and ``−g`` to ``O``: then ``dP`` is unchanged and ``Δ`` becomes ``Δ − g``. One backward
call gives exact ``dQ, dK, dV`` for a loss over ``out`` and ``lse`` together. On the CPU in fp32 / fp64
the extra column (a slower odd head size) is avoided where possible: ``O`` is replaced by
``O − (g / |dO|²) dO`` per row, which gives the same ``Δ − g`` at the original width.

Shapes: ``q (B, H, L, D)``, ``k (B, H, S, D)``, ``v (B, H, S, Dv)``, ``attn_mask`` a float additive
mask broadcastable to ``(B, H, L, S)`` (``-inf`` = excluded) or None; returns ``out (B, H, L, Dv)`` and
``lse (B, H, L)`` in ``q``'s dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["fused_lse_supported", "sdpa_with_lse"]

_CUDA_ALIGN = 8  # head sizes of the memory-efficient CUDA kernel: multiples of 8 (as SDPA pads them)
_CUDA_MASK_ALIGN = 16  # the CUDA kernel wants the bias row stride aligned to 16 elements


def fused_lse_supported(q: Tensor) -> bool:
    """Whether a fused kernel returning the log-sum-exp exists for ``q``'s device and dtype."""
    if q.device.type == "cpu":
        return q.dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16)
    if q.device.type == "cuda":
        return q.dtype in (torch.float32, torch.float16, torch.bfloat16)
    return False


def _pad_last(t: Tensor, size: int, value: float = 0.0) -> Tensor:
    """``t`` with its last axis padded by ``value`` up to ``size`` (``t`` itself if already that size)."""
    extra = size - t.shape[-1]
    return t if extra == 0 else F.pad(t, (0, extra), value=value)


def _round_up(n: int, m: int) -> int:
    return (n + m - 1) // m * m


def _as_4d(mask: Tensor | None) -> Tensor | None:
    if mask is None or mask.dim() == 4:
        return mask
    return mask.reshape((1,) * (4 - mask.dim()) + tuple(mask.shape))  # (1.., L?, S)


# --------------------------------------------------------------------------------------------- CPU
def _cpu_forward(q, k, v, mask, scale, is_causal):
    width = max(q.shape[-1], v.shape[-1])  # the CPU kernel needs one head size for q, k and v
    qp, kp, vp = _pad_last(q, width), _pad_last(k, width), _pad_last(v, width)  # (B, H, *, W)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
        qp, kp, vp, 0.0, is_causal, attn_mask=mask, scale=scale,
    )  # (B, H, L, W), (B, H, L) float32 for half inputs
    return out, lse


def _fold_dlse_into_out(dout: Tensor, dlse: Tensor, out: Tensor) -> Tensor | None:
    """``out' = out - (g / |dO|²) dO`` per row, so that ``Σ dO ∘ out' = Δ - g`` at the kernel's width.

    Exact in exact arithmetic; the rounding error of ``Δ'`` stays ``O(eps (|Δ| + |g|))`` because the
    added terms ``α dO_d²`` share one sign. Returns None (use the extra column instead) where a row
    with ``g ≠ 0`` has ``|dO|² < 1e-20``, in half precision (``α dO`` may overflow), or when compiling
    (the choice depends on the values).
    """
    if out.dtype not in (torch.float32, torch.float64) or torch.compiler.is_compiling():
        return None
    nrm = torch.linalg.vecdot(dout, dout)  # (B, H, L) |dO|² per row
    g = dlse.to(nrm.dtype)
    active = g != 0
    if bool((active & (nrm < 1e-20)).any()):
        return None
    alpha = torch.where(active, g / torch.where(active, nrm, torch.ones_like(nrm)), torch.zeros_like(nrm))
    return torch.addcmul(out, dout, alpha.unsqueeze(-1).neg())  # (B, H, L, W): out - alpha dO, one pass


def _cpu_backward(dout, dlse, q, k, v, out, lse, mask, scale, is_causal):
    dv_width, d_width = v.shape[-1], q.shape[-1]
    width = max(d_width, dv_width)
    dout_p = _pad_last(dout, width).contiguous()  # (B, H, L, W)
    if dlse is not None:
        folded = _fold_dlse_into_out(dout_p, dlse, out)
        if folded is not None:
            out, dlse = folded, None
        else:
            width += 1  # one zero column of V, 1 in dO and -g in O: Δ becomes Δ - g (module docstring)
            dout_p = _pad_last(dout_p, width, value=1.0)
            out = _pad_last(out, width)
            out[..., -1] = -dlse.to(out.dtype)
    qp, kp, vp = _pad_last(q, width), _pad_last(k, width), _pad_last(v, width)  # (B, H, *, W)
    dq, dk, dv = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
        dout_p, qp, kp, vp, out, lse, 0.0, is_causal, attn_mask=mask, scale=scale,
    )
    return dq[..., :d_width], dk[..., :d_width], dv[..., :dv_width]


# -------------------------------------------------------------------------------------------- CUDA
def _cuda_mask(mask: Tensor | None, shape: tuple[int, int, int, int], like: Tensor) -> Tensor:
    """The bias in the layout the memory-efficient kernel reads: last axis stride aligned to 16."""
    s = shape[-1]
    if mask is None:  # the backward op takes a (non-optional) bias: a zero row broadcast by strides costs nothing
        return like.new_zeros(_round_up(s, _CUDA_MASK_ALIGN)).narrow(0, 0, s).expand(shape)
    padded = _round_up(s, _CUDA_MASK_ALIGN)
    full = mask.expand(shape)  # (B, H, L, S) view
    buf = full.new_zeros((*shape[:-1], padded))  # (B, H, L, S') as SDPA's own pad_bias
    buf[..., :s] = full
    return buf[..., :s]


def _cuda_forward(q, k, v, mask, scale, is_causal):
    width_qk = _round_up(q.shape[-1], _CUDA_ALIGN)
    width_v = _round_up(v.shape[-1], _CUDA_ALIGN)
    qp, kp, vp = _pad_last(q, width_qk), _pad_last(k, width_qk), _pad_last(v, width_v)
    bias = _cuda_mask(mask, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), q)
    out, lse, seed, offset = torch.ops.aten._scaled_dot_product_efficient_attention(
        qp, kp, vp, bias, True, 0.0, is_causal, scale=scale,
    )  # (B, H, L, Wv), (B, H, L') with L' >= L (padded by the kernel)
    return out, lse, seed, offset, bias


def _cuda_backward(dout, dlse, q, k, v, out, lse, seed, offset, bias, scale, is_causal):
    d_width, dv_width = q.shape[-1], v.shape[-1]
    width_qk = _round_up(d_width, _CUDA_ALIGN)
    width_v = _round_up(dv_width + (1 if dlse is not None else 0), _CUDA_ALIGN)
    qp, kp, vp = _pad_last(q, width_qk), _pad_last(k, width_qk), _pad_last(v, width_v)
    dout_p, out_p = _pad_last(dout, width_v), _pad_last(out, width_v)
    if dlse is not None:  # the column dv_width of V is zero: 1 in dO, -g in O (module docstring)
        dout_p = dout_p.clone()
        dout_p[..., dv_width] = 1.0
        out_p = out_p.clone()
        out_p[..., dv_width] = -dlse.to(out_p.dtype)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout_p.contiguous(), qp, kp, vp, bias, out_p.contiguous(), lse, seed, offset, 0.0,
        [True, True, True, False], is_causal, scale=scale,
    )
    return dq[..., :d_width], dk[..., :d_width], dv[..., :dv_width]


class _SDPAWithLSE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, scale, is_causal):
        ctx.set_materialize_grads(False)
        ctx.scale, ctx.is_causal, ctx.dv = scale, is_causal, v.shape[-1]
        lq = q.shape[-2]
        if q.device.type == "cuda":
            out, lse, seed, offset, bias = _cuda_forward(q, k, v, mask, scale, is_causal)
            ctx.save_for_backward(q, k, v, out, lse, seed, offset, bias)
        else:
            out, lse = _cpu_forward(q, k, v, mask, scale, is_causal)
            ctx.save_for_backward(q, k, v, out, lse, mask)
        return out[..., : ctx.dv], lse[..., :lq].to(q.dtype)

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v = ctx.saved_tensors[:3]
        if dout is None and dlse is None:
            return None, None, None, None, None, None
        if dout is None:
            dout = torch.zeros((*q.shape[:-1], v.shape[-1]), dtype=q.dtype, device=q.device)
        dout = dout.to(q.dtype)
        if q.device.type == "cuda":
            _, _, _, out, lse, seed, offset, bias = ctx.saved_tensors
            dq, dk, dv = _cuda_backward(dout, dlse, q, k, v, out, lse, seed, offset, bias, ctx.scale, ctx.is_causal)
        else:
            _, _, _, out, lse, mask = ctx.saved_tensors
            dq, dk, dv = _cpu_backward(dout, dlse, q, k, v, out, lse, mask, ctx.scale, ctx.is_causal)
        return dq, dk, dv, None, None, None


def sdpa_with_lse(
    q: Tensor, k: Tensor, v: Tensor, *, attn_mask: Tensor | None, scale: float | None, is_causal: bool,
) -> tuple[Tensor, Tensor]:
    """Fused attention returning ``(out (B, H, L, Dv), lse (B, H, L))``, differentiable in q, k, v.

    ``attn_mask`` is a float additive mask (``-inf`` excluded) broadcastable to ``(B, H, L, S)`` that
    takes no gradient; the caller guarantees every row keeps at least one key (rows with none are
    handled in :mod:`attnfuse.ops.dense`). Only for :func:`fused_lse_supported` inputs.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    mask = _as_4d(attn_mask)
    if mask is not None:
        mask = mask.to(q.dtype).detach()
    return _SDPAWithLSE.apply(q, k, v, mask, scale, is_causal)

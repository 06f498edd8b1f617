"""Axial (factorized) attention: attention along one axis of a token grid, every other axis batched.

Papers: Ho, Kalchbrenner, Weissenborn, Salimans, "Axial Attention in Multidimensional Transformers"
(https://arxiv.org/abs/1912.12180); Nayakanti et al., "Wayformer" (https://arxiv.org/abs/2207.05844),
factorized time / space attention (see :class:`attnfuse.nn.FactorizedEncoder`).
Status: exact; it is :func:`attnfuse.ops.dense_attention` on every 1-D slice of the grid, with its
``"sdpa"`` and ``"reference"`` backends.

For ``q (B, H, X, Y, D)`` and ``axis=1`` (the ``Y`` axis) the query at ``(x, y)`` attends to the keys
``(x, y')`` for every ``y'``: ``out[:, :, x] = dense_attention(q[:, :, x], k[:, :, x], v[:, :, x])``.
Keys may come from another grid (cross-attention) that differs from the query grid on ``axis`` only.

Tiny materialised example, grid ``2 x 2`` flattened row-major (positions ``(0,0), (0,1), (1,0), (1,1)``),
``axis=0`` (1 = attended)::

    (0,0)  1 0 1 0
    (0,1)  0 1 0 1
    (1,0)  1 0 1 0
    (1,1)  0 1 0 1
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnfuse.ops._checks import check_key_mask, check_qkv
from attnfuse.ops._guards import empty_like_result, is_empty
from attnfuse.ops._registry import operator
from attnfuse.ops.backends import Backend, Call
from attnfuse.ops.dense import dense_attention

__all__ = ["axial_attention"]


def _slices(t: Tensor, axis: int) -> Tensor:
    """``(B, H, *grid, C) -> (B * P, H, N, C)``: grid axis ``axis`` last, the other grid axes folded into the batch."""
    t = t.movedim(2 + axis, -2).movedim(1, -3)  # (B, *others, H, N, C)
    return t.reshape(-1, *t.shape[-3:])


def _unslice(t: Tensor, lead: tuple[int, ...], axis: int) -> Tensor:
    """Inverse of :func:`_slices` for ``t (B * P, H, N, C)`` and ``lead = (B, *others)``."""
    t = t.reshape(*lead, *t.shape[1:])  # (B, *others, H, N, C)
    return t.movedim(-3, 1).movedim(-2, 2 + axis)  # (B, H, *grid, C)


def _dense_weights(w: Tensor, b: int, qgrid: tuple[int, ...], kgrid: tuple[int, ...], axis: int) -> Tensor:
    """Per-slice weights ``(B * P, H, Nq, Nk)`` as the dense matrix ``(B, H, prod(qgrid), prod(kgrid))``."""
    h, nq, nk = w.shape[1:]
    p = w.shape[0] // b
    w = w.reshape(b, p, h, nq, nk).movedim(2, 1)  # (B, H, P, Nq, Nk)
    dense = w.new_zeros(b, h, p, nq, p, nk)
    ar = torch.arange(p, device=w.device)
    dense[:, :, ar, :, ar, :] = w.permute(2, 0, 1, 3, 4)  # block diagonal in the slice index
    others = [g for a, g in enumerate(qgrid) if a != axis]
    dense = dense.reshape(b, h, *others, nq, *others, nk)
    k = len(qgrid)
    dense = dense.movedim(2 + k - 1, 2 + axis)  # query axes back in grid order
    dense = dense.movedim(2 + 2 * k - 1, 2 + k + axis)  # key axes back in grid order
    return dense.reshape(b, h, math.prod(qgrid), math.prod(kgrid))


def _run(dense_backend: str):
    def fn(q, k, v, *, axis, mask, scale, is_causal, need_weights):
        b = q.shape[0]
        qgrid, kgrid = tuple(q.shape[2:-1]), tuple(k.shape[2:-1])
        lead = (b, *(g for a, g in enumerate(qgrid) if a != axis))
        slice_mask = None
        if mask is not None:
            m = mask.expand(b, mask.shape[1], *kgrid).unsqueeze(-1)  # (B, H', *grid_k, 1)
            slice_mask = _slices(m, axis)[..., 0]  # (B * P, H', Nk): a key mask per slice
        result = dense_attention(_slices(q, axis), _slices(k, axis), _slices(v, axis), key_mask=slice_mask, scale=scale,
                                 is_causal=is_causal, return_weights=need_weights, backend=dense_backend)
        out, weights = result if need_weights else (result, None)
        out = _unslice(out, lead, axis)  # (B, H, *grid_q, Dv)
        return out, (_dense_weights(weights, b, qgrid, kgrid, axis) if need_weights else None)

    return fn


@operator("axial", layout="grid", cross=True, backends=(
    Backend("sdpa", _run("sdpa")),
    Backend("reference", _run("reference"), weights=True),
))
def axial_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    axis: int,
    *,
    key_mask: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
    return_weights: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention along grid axis ``axis`` only; all other grid axes act as batch axes.

    Args:
        q: queries ``(B, H, *grid, D)`` with a 1-D or larger grid.
        k: keys ``(B, H, *grid_k, D)``; ``grid_k`` equals ``grid`` except possibly on ``axis``.
        v: values ``(B, H, *grid_k, Dv)``.
        axis: grid axis to attend along (0 = first grid axis; negative counts from the last).
        key_mask: bool key mask, ``True`` = the key exists: ``(B, *grid_k)`` or ``(B, H, *grid_k)``
            (B, H may be 1); a slice with no valid key gives zeros.
        scale: score scale, ``1/sqrt(D)`` when None.
        is_causal: along ``axis``, query ``i`` sees keys ``j <= i`` only.
        return_weights: also return dense weights ``(B, H, N, S)`` over the flattened grids (zero
            outside each query's slice; reference path).
        backend: ``"auto"``, ``"sdpa"`` or ``"reference"``.

    Returns:
        ``out (B, H, *grid, Dv)`` or ``(out, weights)``.

    Raises:
        TypeError: non-float inputs, mixed dtypes, non-bool key mask, non-int ``axis``, a pair mask
            (``mask=``) or ``bias=``.
        ValueError: ranks, grids or key-mask shapes that do not match, ``axis`` out of range.

    Shapes:
        See :mod:`attnfuse.ops`. Takes: key mask ``(B, *grid_k)`` / ``(B, H, *grid_k)``; ``is_causal``
        (along ``axis``); weights. No pair mask, no bias, no log-sum-exp.

    Example:
        >>> q = k = v = torch.randn(2, 4, 11, 5, 16)  # (B, H, time, agents, D)
        >>> axial_attention(q, k, v, axis=0).shape  # every agent attends over its own history
        torch.Size([2, 4, 11, 5, 16])
    """
    if not isinstance(q, Tensor) or q.dim() < 4:
        raise ValueError(f"q must be a grid (B, H, *grid, D) with at least one grid axis, got {getattr(q, 'shape', type(q).__name__)}")
    check_qkv(q, k, v, rank=q.dim())
    n_axes = q.dim() - 3
    if isinstance(axis, bool) or not isinstance(axis, int):
        raise TypeError(f"axis must be an int grid axis, got {axis!r}")
    if not -n_axes <= axis < n_axes:
        raise ValueError(f"axis must be in [{-n_axes}, {n_axes}) for a {n_axes}-D grid, got axis={axis}")
    axis %= n_axes
    qgrid, kgrid = q.shape[2:-1], k.shape[2:-1]
    if any(a != axis and gq != gk for a, (gq, gk) in enumerate(zip(qgrid, kgrid))):
        raise ValueError(f"k may differ from q only along axis {axis}, got q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}")
    mask = check_key_mask("axial", key_mask, q.shape[0], q.shape[1], tuple(kgrid), legend="*grid_k")  # (B', H', *grid_k)
    call = Call.of(q, k, v, mask=mask, need_weights=return_weights)
    impl = axial_attention.spec.choose_backend(backend, call)
    b, h, dv = q.shape[0], q.shape[1], v.shape[-1]
    if is_empty(b, h, *qgrid, *kgrid):  # nothing to compute; a query with no key gives 0
        out, weights, _ = empty_like_result(
            q, (b, h, *qgrid, dv), inputs=(q, k, v),
            weights_shape=(b, h, math.prod(qgrid), math.prod(kgrid)) if return_weights else None,
        )
        return (out, weights) if return_weights else out
    out, weights = impl.fn(q, k, v, axis=axis, mask=mask, scale=scale, is_causal=is_causal, need_weights=return_weights)
    return (out, weights) if return_weights else out

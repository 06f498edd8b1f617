"""``neighborhood_attention``: argument checks, backend dispatch and the extra-key merge.

Paper: Hassani et al., "Neighborhood Attention Transformer" (https://arxiv.org/abs/2204.07143);
Hassani et al., "Faster Neighborhood Attention" (https://arxiv.org/abs/2403.04690).
Status: exact against the NATTEN window rule (border shift, dilation groups, causal per axis,
relative-position bias) in every backend; see :mod:`._windows` for the rule.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from attnfuse.ops._checks import check_key_mask, check_qkv
from attnfuse.ops._guards import drop_masked_keys, empty_like_result, is_empty
from attnfuse.ops._registry import operator
from attnfuse.ops.backends import Call
from attnfuse.ops.dense import dense_attention
from attnfuse.ops.merge import merge_attention
from attnfuse.ops.neighborhood._backend import NABackend, NACall
from attnfuse.ops.neighborhood._natten import natten_neighborhood, natten_unavailable
from attnfuse.ops.neighborhood._windows import Geometry, make_geometry
from attnfuse.ops.neighborhood.flex import flex_neighborhood
from attnfuse.ops.neighborhood.reference import reference_neighborhood
from attnfuse.ops.neighborhood.tiled import tiled_neighborhood

__all__ = ["neighborhood_attention"]

_FLOATS = frozenset({torch.float32, torch.float16, torch.bfloat16})


def _reference(q, k, v, geom, *, scale, mask, bias, rpb, extra_k, extra_v, need_weights, need_lse):
    return reference_neighborhood(q, k, v, geom, scale=scale, mask=mask, bias=bias, rpb=rpb, extra_k=extra_k, extra_v=extra_v)


def _tiled(q, k, v, geom, *, scale, mask, bias, rpb, extra_k, extra_v, need_weights, need_lse):
    out, lse = tiled_neighborhood(q, k, v, geom, scale=scale, mask=mask, bias=bias, rpb=rpb, need_lse=need_lse)
    return out, None, lse


def _flex(q, k, v, geom, *, scale, mask, bias, rpb, extra_k, extra_v, need_weights, need_lse):
    out, lse = flex_neighborhood(q, k, v, geom, scale=scale, mask=mask, rpb=rpb, extra_k=extra_k, extra_v=extra_v, need_lse=need_lse)
    return out, None, lse


def _natten(q, k, v, geom, *, scale, mask, bias, rpb, extra_k, extra_v, need_weights, need_lse):
    out, lse = natten_neighborhood(q, k, v, geom, scale=scale, extra_k=extra_k, extra_v=extra_v, need_lse=need_lse)
    return out, None, lse


def _flex_unavailable() -> str | None:
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return f"torch {torch.__version__} has no FlexAttention"
    return None


_CUDA = frozenset({"cuda"})

#: fastest first; "auto" skips natten and flex on CPU (flex compiles per shape and is slower there).
_BACKENDS = (
    NABackend(
        "natten", _natten, dtypes=_FLOATS, lse=True, masks=False, score_bias=False, rpb=False, extra="native",
        grad_devices=_CUDA, auto_devices=_CUDA, unavailable=natten_unavailable, clip=False, unit_kernel=False,
    ),
    NABackend(
        "flex", _flex, dtypes=_FLOATS, lse=True, score_bias=False, rpb_grad=False, extra="native",
        lse_devices=_CUDA, grad_devices=_CUDA, auto_devices=_CUDA, unavailable=_flex_unavailable,
    ),
    NABackend("tiled", _tiled, lse=True, extra="merge"),
    NABackend("reference", _reference, weights=True, lse=True, extra="native"),
)


def _normalize_mask(key_mask: Tensor | None, b: int, h: int, grid: tuple[int, ...]) -> Tensor | None:
    """Key mask ``(B, *grid)`` / ``(B, H, *grid)`` -> ``(Bm, Hm, N)`` bool with ``Bm`` in ``{1, B}``, ``Hm`` in ``{1, H}``."""
    km = check_key_mask("neighborhood", key_mask, b, h, grid, legend="*grid")  # (Bm, Hm, *grid)
    if km is None:
        return None
    return km.reshape(km.shape[0], km.shape[1], math.prod(grid))


def _normalize_bias(bias: Tensor | None, b: int, h: int, geom: Geometry) -> Tensor | None:
    """Window-slot bias -> ``(Bb, Hb, N, K)`` with ``Bb`` in ``{1, B}``, ``Hb`` in ``{1, H}``."""
    if bias is None:
        return None
    if not isinstance(bias, Tensor) or not bias.is_floating_point():
        got = bias.dtype if isinstance(bias, Tensor) else type(bias).__name__
        raise TypeError(f"bias must be a floating-point tensor, got {got}; for a key mask pass key_mask=")
    target = (b, h, *geom.grid, geom.window_size)
    bad = bias.dim() > len(target) or any(have not in (1, want) for have, want in zip(reversed(bias.shape), reversed(target)))
    if bad:
        raise ValueError(
            f"bias must broadcast to (B, H, *grid, prod(kernel_size)) = {target} (one value per window slot; "
            f"use rpb= for a relative-position table); got bias.shape={tuple(bias.shape)}"
        )
    bias = bias.reshape((1,) * (len(target) - bias.dim()) + tuple(bias.shape))
    bb, hb = bias.shape[:2]
    return bias.expand(bb, hb, *target[2:]).reshape(bb, hb, geom.num_tokens, geom.window_size)


def _check_rpb(rpb: Tensor | None, h: int, geom: Geometry) -> None:
    if rpb is None:
        return
    if not isinstance(rpb, Tensor) or not rpb.is_floating_point():
        raise TypeError(f"rpb must be a floating-point tensor, got {type(rpb).__name__ if not isinstance(rpb, Tensor) else rpb.dtype}")
    if any(geom.causal):
        raise ValueError(
            "rpb (relative-position bias) is not supported with is_causal: NATTEN defines it for non-causal "
            f"windows only; got is_causal={geom.causal}"
        )
    want = (h, *geom.rpb_shape)
    if tuple(rpb.shape) != want:
        raise ValueError(f"rpb must have shape (H, 2*kernel_size - 1, ...) = {want}; got rpb.shape={tuple(rpb.shape)}")


def _check_extra(extra_k: Tensor | None, extra_v: Tensor | None, q: Tensor, v: Tensor) -> None:
    if extra_k is None and extra_v is None:
        return
    if extra_k is None or extra_v is None:
        raise ValueError("extra_k and extra_v must be given together")
    b, h, d, dv = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    if extra_k.dim() != 4 or extra_k.shape[:2] != (b, h) or extra_k.shape[-1] != d:
        raise ValueError(f"extra_k must be (B, H, S, D) = ({b}, {h}, S, {d}); got extra_k.shape={tuple(extra_k.shape)}")
    if extra_v.dim() != 4 or extra_v.shape[:3] != extra_k.shape[:3] or extra_v.shape[-1] != dv:
        raise ValueError(f"extra_v must be (B, H, S, Dv) = {(*extra_k.shape[:3], dv)}; got extra_v.shape={tuple(extra_v.shape)}")
    if extra_k.dtype != q.dtype or extra_v.dtype != q.dtype or extra_k.device != q.device or extra_v.device != q.device:
        raise TypeError(f"extra_k / extra_v must match q's dtype {q.dtype} and device {q.device}")


@operator("neighborhood", layout="grid", cross=False, backends=_BACKENDS)
def neighborhood_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kernel_size: int | tuple[int, ...],
    *,
    dilation: int | tuple[int, ...] = 1,
    is_causal: bool | tuple[bool, ...] = False,
    stride: int | tuple[int, ...] = 1,
    border: str = "shift",
    key_mask: Tensor | None = None,
    bias: Tensor | None = None,
    rpb: Tensor | None = None,
    extra_k: Tensor | None = None,
    extra_v: Tensor | None = None,
    scale: float | None = None,
    return_weights: bool = False,
    return_lse: bool = False,
    backend: str = "auto",
) -> Tensor | tuple[Tensor, ...]:
    """Neighborhood attention on a 1-, 2- or 3-D token grid, with NATTEN's window rule.

    Each query attends to the ``kernel_size`` keys per axis around it, in its dilation group;
    near a border the window is shifted to stay inside the grid (never padded), so every query
    sees exactly ``prod(kernel_size)`` keys, except along causal axes, where the window ends at the
    query and is truncated near the start. An even kernel ``2r`` sees ``r`` keys before the centre
    and ``r - 1`` after it (NATTEN >= 0.17.5). With ``stride`` (Generalized Neighborhood Attention,
    NATTEN >= 0.20) the queries of each stride group share the window of their leader; ``stride =
    kernel_size`` is blocked attention. ``border="clip"`` cuts windows at the grid instead of
    shifting them (HaloNet's masked zero padding: ``kernel_size = b + 2h, stride = b`` is
    ``halo_attention(block_size=b, halo_size=h)``). Extra (global) keys are seen by every query and
    merged exactly through the log-sum-exp (neighborhood cross-attention). The exact rule is in
    :mod:`attnfuse.ops.neighborhood._windows`.

    Args:
        q: queries ``(B, H, L, D)``, ``(B, H, X, Y, D)`` or ``(B, H, X, Y, Z, D)``; the rank gives
            the grid dimension.
        k: keys, same shape as ``q``.
        v: values ``(B, H, *grid, Dv)``.
        kernel_size: window size (>= 1, odd or even), one int or one per axis.
        dilation: distance between window keys, one int or one per axis.
        is_causal: causal flag, one bool or one per axis.
        stride: queries per stride group sharing one window (``1 <= stride <= kernel_size``), one
            int or one per axis; 1 is plain neighborhood attention.
        border: ``"shift"`` (NATTEN: border windows shifted inward, always ``kernel_size`` keys) or
            ``"clip"`` (windows centred on the stride-group leader and cut at the grid; the
            ``natten`` backend does not take it). Causal axes ignore it.
        key_mask: bool key mask, ``True`` = the key exists: ``(B, *grid)`` or ``(B, H, *grid)``
            (B, H may be 1; ``nn.Attention`` passes ``(B, *grid)``). It applies to the grid keys, not
            to ``extra_k``. A query whose window keys (and extra keys) are all masked returns 0.
        bias: additive score bias per window slot, broadcastable to ``(B, H, *grid, K)`` with
            ``K = prod(kernel_size)`` (slots row-major over axes); receives gradients.
        rpb: relative-position bias table ``(H, 2k_0 - 1, ...)``, added to the score of key
            ``j`` for query ``i`` at ``rpb[h, p_j - p_i + k - 1, ...]`` (group coordinates);
            receives gradients. Non-causal only, as in NATTEN.
        extra_k: extra keys ``(B, H, S, D)`` attended by every query.
        extra_v: their values ``(B, H, S, Dv)``.
        scale: score scale, ``1/sqrt(D)`` when None.
        return_weights: also return weights ``(B, H, *grid, K + S)`` (window slots, then extra
            keys; empty causal slots are 0) via the reference backend.
        return_lse: also return the log-sum-exp ``(B, H, *grid)`` (``-inf`` for an empty row).
        backend: ``"auto"``, ``"natten"``, ``"flex"``, ``"tiled"`` or ``"reference"``; see
            :mod:`attnfuse.ops.backends`. ``"auto"`` takes ``tiled`` on CPU (reference when
            weights are asked for) and ``natten``/``flex``/``tiled`` in that order on CUDA.

    Returns:
        ``out (B, H, *grid, Dv)``; or ``(out, weights)``, ``(out, lse)``, ``(out, weights, lse)``.

    Raises:
        TypeError: non-float or mixed-dtype inputs, non-bool ``key_mask``, non-float ``bias``/``rpb``,
            wrongly typed ``kernel_size``/``dilation``/``is_causal``, a pair mask (``mask=``).
        ValueError: a rank other than 4, 5 or 6; ``k``/``v`` on another grid; kernel sizes < 1;
            ``stride`` outside ``[1, kernel_size]``; an unknown ``border``;
            ``kernel_size`` or ``kernel_size * dilation`` larger than the grid; per-axis tuples of
            the wrong length; ``rpb`` with ``is_causal`` or of the wrong shape; masks, biases or
            extra keys of the wrong shape; unknown or unsupporting ``backend``.

    Shapes:
        See :mod:`attnfuse.ops` (B, H, D, Dv); ``*grid`` = ``(L,)``, ``(X, Y)`` or ``(X, Y, Z)``,
        ``N = prod(grid)``, ``K = prod(kernel_size)``, ``S`` extra keys. Takes: key mask ``(B, *grid)`` /
        ``(B, H, *grid)``; bias per window slot ``(B, H, *grid, K)`` (and ``rpb``); ``is_causal`` (per
        axis, an option); weights; log-sum-exp. No pair mask.

    Example:
        >>> q = k = v = torch.randn(1, 2, 9, 9, 16)
        >>> neighborhood_attention(q, k, v, kernel_size=3, dilation=2).shape
        torch.Size([1, 2, 9, 9, 16])

        Equivalent dense formulation (``allowed[i, j]``: key ``j`` in the window of query ``i``)::

            dense_attention(q.flatten(2, -2), k.flatten(2, -2), v.flatten(2, -2), mask=allowed, key_mask=key_mask.flatten(-len(grid)))
    """
    if not isinstance(q, Tensor) or q.dim() not in (4, 5, 6):
        got = tuple(q.shape) if isinstance(q, Tensor) else type(q).__name__
        raise ValueError(f"q must be (B, H, L, D), (B, H, X, Y, D) or (B, H, X, Y, Z, D) (1-, 2- or 3-D grid); got q.shape={got}")
    check_qkv(q, k, v, rank=q.dim())
    if k.shape[2:-1] != q.shape[2:-1]:
        raise ValueError(
            f"k and v must be on the query grid {tuple(q.shape[2:-1])} (neighborhood attention is self-attention "
            f"on one grid; use extra_k/extra_v for other keys); got k.shape={tuple(k.shape)}"
        )
    b, h = q.shape[:2]
    geom = make_geometry(q.shape[2:-1], kernel_size, dilation, is_causal, stride, border)
    mask_n = _normalize_mask(key_mask, b, h, geom.grid)
    bias_n = _normalize_bias(bias, b, h, geom)
    _check_rpb(rpb, h, geom)
    _check_extra(extra_k, extra_v, q, v)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)

    base = Call.of(q, k, v, rpb, extra_k, extra_v, mask=mask_n, bias=bias_n, need_weights=return_weights, need_lse=return_lse)
    call = NACall.make(
        base, has_rpb=rpb is not None, has_extra=extra_k is not None, rank=geom.rank, clip=geom.clipped,
        unit_kernel=min(geom.kernel) < 2,
    )
    impl = neighborhood_attention.spec.choose_backend(backend, call)
    if is_empty(b, h, geom.num_tokens):  # nothing to compute
        num_extra = 0 if extra_k is None else extra_k.shape[2]
        out, weights, lse = empty_like_result(
            q, (b, h, *geom.grid, v.shape[-1]), inputs=(q, k, v, bias, rpb, extra_k, extra_v),
            weights_shape=(b, h, *geom.grid, geom.window_size + num_extra) if return_weights else None,
            lse_shape=(b, h, *geom.grid) if return_lse else None,
        )
        return _result(out, weights, lse, return_weights, return_lse)
    if mask_n is not None:  # masked keys never reach a matmul (NaN there included)
        keep = mask_n.reshape(*mask_n.shape[:2], *geom.grid)  # (Bm, Hm, *grid)
        k, v = drop_masked_keys(k, v, keep)
    merge = extra_k is not None and impl.extra == "merge"
    out, weights, lse = impl.fn(
        q, k, v, geom, scale=scale, mask=mask_n, bias=bias_n, rpb=rpb,
        extra_k=None if merge else extra_k, extra_v=None if merge else extra_v,
        need_weights=return_weights, need_lse=return_lse or merge,
    )
    if merge:
        n, dv = geom.num_tokens, v.shape[-1]
        out_e, lse_e = dense_attention(q.reshape(b, h, n, -1), extra_k, extra_v, scale=scale, return_lse=True, backend="reference")
        out_m, lse_m = merge_attention([out.reshape(b, h, n, dv), out_e], [lse.reshape(b, h, n), lse_e])  # (B, H, N, Dv), (B, H, N)
        out, lse = out_m.view(b, h, *geom.grid, dv), lse_m.view(b, h, *geom.grid)
    return _result(out, weights, lse, return_weights, return_lse)


def _result(out: Tensor, weights: Tensor | None, lse: Tensor | None, return_weights: bool, return_lse: bool):
    if not (return_weights or return_lse):
        return out
    extra = ([weights] if return_weights else []) + ([lse] if return_lse else [])
    return (out, *extra)

"""Subjective-logic opinions and the reduced Dempster rule over Dirichlet parameters.

Evidential (Dempster–Shafer) fusion as pure tensor functions, no parameters (STYLE R10). Used by
MEFN (Qi, Lin et al., "Multi-modal Evidential Fusion Network for Trusted PET/CT Tumor
Segmentation", arXiv 2406.18327) and its lineage, TMC (Han et al., "Trusted Multi-View
Classification", ICLR 2021, arXiv 2102.02051).

Status: complete; checked against a literal opinion-space implementation (:func:`dempster_combine_reference`).

Shape legend: the class axis is last. ``(..., K)`` is any leading shape, e.g. ``(B, K)`` per sample
or ``(B, X, Y, K)`` / ``(B, X, Y, Z, K)`` per pixel / voxel.

Opinions (K classes, evidence ``e >= 0``)::

    alpha = e + 1,  S = sum_k alpha_k,  b_k = e_k / S,  u = K / S,  sum_k b_k + u = 1

Reduced Dempster rule for two opinions (TMC / MEFN)::

    C   = sum_{i != j} b1_i b2_j                              # conflict
    b_k = (b1_k b2_k + b1_k u2 + b2_k u1) / (1 - C)
    u   = u1 u2 / (1 - C)
    S = K / u,  e = b S,  alpha = e + 1

Closed form used here. Write ``b_k = e_k / S``, ``u = K / S`` and multiply every numerator by
``S1 S2``: the numerators become ``(e1_k e2_k + K e1_k + K e2_k)`` and ``K^2``, both over
``(1 - C) S1 S2``. Then ``e_k = b_k S = b_k K / u = K (b_k numerator) / (u numerator)``, and the
common factor ``(1 - C) S1 S2`` cancels::

    e_k = e1_k + e2_k + e1_k e2_k / K          alpha = 1 + (e1 + e2) + e1 * e2 / K

So in Dirichlet parameters the rule never divides by ``1 - C``: it is finite for any finite inputs,
including conflict -> 1 (where the opinion-space formula loses all precision). The conflict is a
normaliser of the opinions only. Consequences used by the tests:

* a vacuous opinion (``alpha = 1``, ``e = 0``) is the identity, exactly in floating point while
  ``alpha < 2**p`` (``p`` = mantissa bits + 1: 2**24 in float32, 2**53 in float64; half-precision
  inputs are computed in float32), because ``alpha - 1`` and ``1 + (alpha - 1)`` are then exact;
* commutative bitwise (every operation is symmetric in the two operands), associative in exact
  arithmetic (``1 + e/K`` multiplies: ``(1 + e12/K) = (1 + e1/K)(1 + e2/K)``);
* ``S`` only grows, so the fused uncertainty ``u = K / S`` is at most the smaller input's.

Combining is NOT evidence addition (``e1 + e2``): the product term ``e1 e2 / K`` rewards agreement.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "alpha_from_opinion",
    "conflict",
    "dempster_combine",
    "dempster_combine_many",
    "dempster_combine_reference",
    "opinion_from_alpha",
    "opinion_from_evidence",
]

#: Half-precision inputs are computed in float32 and cast back.
_HALF = (torch.float16, torch.bfloat16)


def _check_class_last(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (..., K), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor (..., K), got {t.dtype=}")
    if t.dim() < 1 or t.shape[-1] < 1:
        raise ValueError(f"{name} must have a non-empty class axis last (..., K), got {name}.shape={tuple(t.shape)}")


def _check_pair(alpha_a: Tensor, alpha_b: Tensor) -> None:
    _check_class_last("alpha_a", alpha_a)
    _check_class_last("alpha_b", alpha_b)
    if alpha_a.shape[-1] != alpha_b.shape[-1]:
        raise ValueError(
            f"alpha_a and alpha_b must have the same number of classes K (last axis), got "
            f"alpha_a.shape={tuple(alpha_a.shape)}, alpha_b.shape={tuple(alpha_b.shape)}"
        )
    try:
        torch.broadcast_shapes(alpha_a.shape, alpha_b.shape)
    except RuntimeError:
        raise ValueError(
            f"alpha_a and alpha_b must broadcast, got alpha_a.shape={tuple(alpha_a.shape)}, alpha_b.shape={tuple(alpha_b.shape)}"
        ) from None
    if alpha_a.dtype != alpha_b.dtype:
        raise TypeError(f"alpha_a and alpha_b must share a dtype, got {alpha_a.dtype=}, {alpha_b.dtype=}")


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in _HALF else dtype


def opinion_from_evidence(evidence: Tensor) -> tuple[Tensor, Tensor]:
    """Subjective-logic opinion of non-negative evidence: ``b = e / S``, ``u = K / S``, ``S = sum(e) + K``.

    Args:
        evidence: non-negative evidence ``(..., K)`` (e.g. ``softplus`` of logits). Values are not
            checked (that would synchronise the device); negative evidence gives meaningless opinions.

    Returns:
        ``(belief (..., K), uncertainty (..., 1))`` with ``belief.sum(-1) + uncertainty[..., 0] == 1``.

    Raises:
        TypeError: if ``evidence`` is not a floating-point tensor.
        ValueError: if it has no class axis.

    Shapes:
        evidence ``(..., K)`` → belief ``(..., K)``, uncertainty ``(..., 1)``.

    Example:
        >>> b, u = opinion_from_evidence(torch.tensor([[2.0, 0.0]]))  # alpha = (3, 1), S = 4
        >>> b.tolist(), u.tolist()
        ([[0.5, 0.0]], [[0.5]])
    """
    _check_class_last("evidence", evidence)
    k = evidence.shape[-1]
    s = evidence.sum(dim=-1, keepdim=True) + k  # (..., 1)
    return evidence / s, k / s


def opinion_from_alpha(alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Opinion of Dirichlet parameters ``alpha >= 1``: :func:`opinion_from_evidence` of ``alpha - 1``.

    Shapes:
        alpha ``(..., K)`` → belief ``(..., K)``, uncertainty ``(..., 1)``.
    """
    _check_class_last("alpha", alpha)
    k = alpha.shape[-1]
    s = alpha.sum(dim=-1, keepdim=True)  # (..., 1)
    return (alpha - 1) / s, k / s


def alpha_from_opinion(belief: Tensor, uncertainty: Tensor) -> Tensor:
    """Dirichlet parameters of an opinion: ``S = K / u``, ``alpha = b S + 1``.

    ``uncertainty`` must be positive (a dogmatic opinion ``u = 0`` has no Dirichlet).

    Shapes:
        belief ``(..., K)``, uncertainty ``(..., 1)`` → alpha ``(..., K)``.
    """
    _check_class_last("belief", belief)
    if uncertainty.shape[-1:] != (1,):
        raise ValueError(f"uncertainty must be (..., 1), got uncertainty.shape={tuple(uncertainty.shape)}")
    k = belief.shape[-1]
    return belief * (k / uncertainty) + 1


def conflict(alpha_a: Tensor, alpha_b: Tensor) -> Tensor:
    """Dempster conflict ``C = sum_{i != j} b_a_i b_b_j`` between two Dirichlet opinions.

    Computed as ``(1 - u_a)(1 - u_b) - sum_k b_a_k b_b_k`` and clamped to ``[0, 1]``. In exact
    arithmetic ``C < 1`` for finite ``alpha`` (both ``u > 0``); in floating point it rounds to 1
    when ``1 - C`` is below the dtype's resolution, which is why :func:`dempster_combine` never
    divides by ``1 - C``.

    Args:
        alpha_a: Dirichlet parameters ``(..., K)``, ``alpha >= 1``.
        alpha_b: Dirichlet parameters broadcastable to ``alpha_a``, same ``K``.

    Returns:
        conflict ``(..., 1)`` in ``[0, 1]``.

    Shapes:
        alpha_a, alpha_b ``(..., K)`` → ``(..., 1)``.
    """
    _check_pair(alpha_a, alpha_b)
    dtype = alpha_a.dtype
    ct = _compute_dtype(dtype)
    b_a, u_a = opinion_from_alpha(alpha_a.to(ct))
    b_b, u_b = opinion_from_alpha(alpha_b.to(ct))
    agree = (b_a * b_b).sum(dim=-1, keepdim=True)  # (..., 1)
    c = (1 - u_a) * (1 - u_b) - agree
    return c.clamp(0.0, 1.0).to(dtype)


def dempster_combine(alpha_a: Tensor, alpha_b: Tensor) -> Tensor:
    """Reduced Dempster rule of two Dirichlet opinions, in closed form (see the module docstring).

    ``alpha = 1 + (e_a + e_b) + e_a * e_b / K`` with ``e = alpha - 1``, which equals the TMC / MEFN
    opinion-space rule (conflict, ``1 - C`` normalisation, back to ``alpha`` via ``S = K / u``)
    without its division by ``1 - C``: finite when the conflict tends to 1. Results beyond the
    dtype's range are clamped to its largest finite value (gradient zero there).

    Args:
        alpha_a: Dirichlet parameters ``(..., K)``, ``alpha >= 1`` (not checked).
        alpha_b: Dirichlet parameters broadcastable to ``alpha_a``, same ``K`` and dtype.

    Returns:
        fused Dirichlet parameters ``(..., K)`` (broadcast shape), in the inputs' dtype.

    Raises:
        TypeError: non-floating inputs or different dtypes.
        ValueError: different ``K`` or shapes that do not broadcast.

    Shapes:
        alpha_a, alpha_b ``(..., K)`` → ``(..., K)``; ``...`` is any leading shape (per sample,
        per pixel, per voxel).

    Example:
        >>> a = torch.tensor([3.0, 1.0])  # e = (2, 0)
        >>> dempster_combine(a, a)        # e = 2 + 2 + 2*2/2 = 6
        tensor([7., 1.])

    Equivalent opinion-space code: :func:`dempster_combine_reference`.
    """
    _check_pair(alpha_a, alpha_b)
    dtype = alpha_a.dtype
    ct = _compute_dtype(dtype)
    k = alpha_a.shape[-1]
    e_a = alpha_a.to(ct) - 1
    e_b = alpha_b.to(ct) - 1
    alpha = 1 + (e_a + e_b) + (e_a * e_b) / k  # (..., K)
    alpha = alpha.clamp(max=torch.finfo(dtype).max)
    return alpha.to(dtype)


def dempster_combine_reference(alpha_a: Tensor, alpha_b: Tensor, *, eps: float | None = None) -> Tensor:
    """The reduced Dempster rule written literally in opinion space (test oracle and documentation).

    ``C = sum_{i != j} b_a_i b_b_j``; ``b = (b_a b_b + b_a u_b + b_b u_a) / (1 - C)``;
    ``u = u_a u_b / (1 - C)``; ``S = K / u``; ``alpha = b S + 1``. The normaliser ``1 - C`` is
    computed as ``u_a + u_b - u_a u_b + sum_k b_a_k b_b_k`` (a sum of non-negative terms, no
    cancellation) and clamped below at ``eps`` (default: the dtype's ``tiny``).

    Loses precision as the conflict tends to 1 (``u -> 0`` and ``S = K / u`` amplifies rounding);
    use :func:`dempster_combine` in models.

    Shapes:
        alpha_a, alpha_b ``(..., K)`` → ``(..., K)``.
    """
    _check_pair(alpha_a, alpha_b)
    k = alpha_a.shape[-1]
    eps = torch.finfo(alpha_a.dtype).tiny if eps is None else eps
    b_a, u_a = opinion_from_alpha(alpha_a)
    b_b, u_b = opinion_from_alpha(alpha_b)
    # 1 - C = 1 - [(1 - u_a)(1 - u_b) - sum_k b_a_k b_b_k], rearranged into non-negative terms
    one_minus_c = (u_a + u_b - u_a * u_b + (b_a * b_b).sum(-1, keepdim=True)).clamp_min(eps)  # (..., 1)
    b = (b_a * b_b + b_a * u_b + b_b * u_a) / one_minus_c
    u = u_a * u_b / one_minus_c
    s = k / u
    return b * s + 1


def dempster_combine_many(alphas: Sequence[Tensor], present_mask: Sequence[Tensor] | Tensor | None = None) -> Tensor:
    """Fold :func:`dempster_combine` over any number of sources, with missing sources.

    A source whose mask is False at a sample / pixel is a vacuous opinion there (``alpha = 1``),
    and it leaves the others unchanged **exactly**: the fold selects the running result instead
    of combining (``torch.where``), so no rounding and no gradient reaches a missing source. A
    position where every source is missing gets the vacuous opinion ``alpha = 1``.

    Args:
        alphas: ``M >= 1`` Dirichlet parameter tensors, each ``(..., K)`` (all broadcastable to
            one shape, same ``K`` and dtype). Order does not matter (the rule is commutative and
            associative) up to rounding.
        present_mask: None (all present), a sequence of ``M`` bool tensors each broadcastable to
            the leading shape ``(...)``, or one bool tensor ``(M, ...)``. True = the source is there.

    Returns:
        fused Dirichlet parameters ``(..., K)``.

    Raises:
        ValueError: no sources, a mask count different from ``M``, or shapes that do not broadcast.
        TypeError: a mask that is not bool.

    Shapes:
        alphas ``M × (..., K)``, present_mask ``M × (...)`` or ``(M, ...)`` → ``(..., K)``.

    Example:
        >>> a, b = torch.tensor([[3.0, 1.0]]), torch.tensor([[1.0, 5.0]])
        >>> fused = dempster_combine_many([a, b], present_mask=[torch.tensor([True]), torch.tensor([False])])
        >>> torch.equal(fused, a)
        True
    """
    alphas = list(alphas)
    if len(alphas) == 0:
        raise ValueError("dempster_combine_many needs at least one source in alphas, got 0")
    for i, a in enumerate(alphas):
        _check_class_last(f"alphas[{i}]", a)
    try:
        shape = torch.broadcast_shapes(*(a.shape for a in alphas))
    except RuntimeError:
        raise ValueError(f"alphas must broadcast to one shape, got {[tuple(a.shape) for a in alphas]}") from None
    k = alphas[0].shape[-1]
    if any(a.shape[-1] != k for a in alphas):
        raise ValueError(f"all alphas must have the same number of classes K (last axis), got {[tuple(a.shape) for a in alphas]}")
    if any(a.dtype != alphas[0].dtype for a in alphas):
        raise TypeError(f"all alphas must share a dtype, got {[a.dtype for a in alphas]}")
    if present_mask is None:
        fused = alphas[0].expand(shape)
        for a in alphas[1:]:
            fused = dempster_combine(fused, a)
        return fused
    masks = list(present_mask)
    if len(masks) != len(alphas):
        raise ValueError(f"present_mask must hold one mask per source ({len(alphas)}), got {len(masks)}")
    lead = shape[:-1]
    for i, m in enumerate(masks):
        if not isinstance(m, Tensor) or m.dtype != torch.bool:
            got = m.dtype if isinstance(m, Tensor) else type(m).__name__
            raise TypeError(f"present_mask[{i}] must be a torch.bool tensor (True = source present), got {got}")
        try:
            if torch.broadcast_shapes(m.shape, lead) != lead:
                raise RuntimeError
        except RuntimeError:
            raise ValueError(f"present_mask[{i}].shape={tuple(m.shape)} must broadcast to the leading shape {tuple(lead)}") from None
    ones = torch.ones((), dtype=alphas[0].dtype, device=alphas[0].device)
    fused = torch.where(masks[0].unsqueeze(-1), alphas[0], ones).expand(shape)  # (..., K)
    seen = masks[0].expand(lead)  # (...): some source already present
    for a, m in zip(alphas[1:], masks[1:]):
        m_k = m.unsqueeze(-1)  # (..., 1)
        combined = torch.where(seen.unsqueeze(-1), dempster_combine(fused, a), a)  # first present source: taken as is
        fused = torch.where(m_k, combined, fused)
        seen = seen | m
    return fused

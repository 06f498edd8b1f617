"""Adaptive-margin triplet loss and VICReg variance / covariance terms (M2FNet extractor pre-training).

Paper: Chudasama et al., "M2FNet: Multi-modal Fusion Network for Emotion Recognition in
Conversation", CVPR Workshops 2022, arXiv 2206.02187. VICReg terms: Bardes, Ponce, LeCun,
"VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning", ICLR 2022.

Status: the triplet form follows third-party ports citing arXiv 2206.02187v1 (there is no official
code); reading the margin's S as a similarity in [0, 1] is a reconstruction (spec ``m2fnet.md``), the
only reading that keeps the margin bounded. Ports that plug Euclidean distances into the margin make
it explode (~2e11); they are not followed. The outer hinge is kept.

::

    L_AT = max(0, D(a, p) - (D(a, n) + D(p, n)) / 2 + m_AM)        D = Euclidean distance
    m_AM = m_sim + m_dis,  m_sim = 1 + 2 exp(-4 S_ap),  m_dis = 1 + 2 exp(4 S_an - 4)
    S    = (1 + cos) / 2 in [0, 1]   =>   m_AM in [2 + 4 e^-4, 6]
    L_var = mean_j relu(1 - sqrt(Var(z_j) + eps))        (per embedding batch z (N, D))
    L_cov = sum_{i != j} Cov(z)_ij^2 / D
    L     = 20 L_AT + 5 L_cov + 1 L_var   (ports' weights; L_var and L_cov summed over z in {a, p, n})
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "ADAPTIVE_MARGIN_BOUNDS",
    "adaptive_margin",
    "adaptive_margin_triplet_loss",
    "cosine_similarity01",
    "vicreg_covariance",
    "vicreg_variance",
]

#: ``(min, max)`` of :func:`adaptive_margin` for similarities in ``[0, 1]``: ``(2 + 4 e^-4, 6)``.
ADAPTIVE_MARGIN_BOUNDS: tuple[float, float] = (2 + 4 * math.exp(-4.0), 6.0)


def _check_embeddings(**tensors: Tensor) -> None:
    shape = None
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (N, D), got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype=}")
        if t.dim() != 2:
            raise ValueError(f"{name} must have shape (N, D), got {name}.shape={tuple(t.shape)}")
        if shape is not None and t.shape != shape:
            raise ValueError(f"embeddings must share one shape (N, D), got {name}.shape={tuple(t.shape)} vs {tuple(shape)}")
        shape = t.shape
    if shape is not None and shape[0] == 0:
        raise ValueError("embeddings must hold at least one sample, got N=0")


def cosine_similarity01(x: Tensor, y: Tensor, eps: float = 1e-8) -> Tensor:
    """Cosine similarity mapped to ``[0, 1]``: ``(1 + cos(x, y)) / 2`` along the last axis.

    Shapes:
        x, y ``(..., D)`` → ``(...)``.
    """
    return (1 + F.cosine_similarity(x, y, dim=-1, eps=eps)) / 2


def adaptive_margin(s_ap: Tensor, s_an: Tensor) -> Tensor:
    """M2FNet's adaptive margin ``(1 + 2 exp(-4 s_ap)) + (1 + 2 exp(4 s_an - 4))``.

    Large when the anchor-positive similarity is low or the anchor-negative similarity is high.
    Decreasing in ``s_ap``, increasing in ``s_an``; for inputs in ``[0, 1]`` it lies in
    :data:`ADAPTIVE_MARGIN_BOUNDS`. Inputs are clamped to ``[0, 1]``.

    Shapes:
        s_ap, s_an ``(...)`` → ``(...)``.
    """
    s_ap = s_ap.clamp(0.0, 1.0)
    s_an = s_an.clamp(0.0, 1.0)
    return (1 + 2 * torch.exp(-4 * s_ap)) + (1 + 2 * torch.exp(4 * s_an - 4))


def _distance(x: Tensor, y: Tensor) -> Tensor:
    # Euclidean distance with a finite gradient at x == y (the gradient there is taken as 0)
    sq = (x - y).pow(2).sum(-1)
    safe = torch.where(sq > 0, sq, torch.ones_like(sq))
    return torch.where(sq > 0, safe.sqrt(), torch.zeros_like(sq))


def adaptive_margin_triplet_loss(
    anchor: Tensor,
    positive: Tensor,
    negative: Tensor,
    *,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """M2FNet adaptive-margin triplet loss with the hinge kept.

    ``max(0, D(a, p) - (D(a, n) + D(p, n)) / 2 + m_AM(S_ap, S_an))`` with Euclidean ``D``,
    ``S = (1 + cos) / 2`` and :func:`adaptive_margin`. The margin depends on the embeddings and
    receives gradients, as in the ports.

    Args:
        anchor, positive, negative: embeddings ``(N, D)``.
        reduction: ``"mean"`` / ``"sum"`` over triplets or ``"none"`` for ``(N,)``.

    Returns:
        scalar (or ``(N,)``), ``>= 0``.

    Raises:
        TypeError / ValueError: non-floating inputs, shapes other than a shared ``(N, D)``, N = 0.

    Shapes:
        anchor, positive, negative ``(N, D)`` → scalar or ``(N,)``.
    """
    _check_embeddings(anchor=anchor, positive=positive, negative=negative)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    d_ap = _distance(anchor, positive)
    d_an = _distance(anchor, negative)
    d_pn = _distance(positive, negative)
    m = adaptive_margin(cosine_similarity01(anchor, positive), cosine_similarity01(anchor, negative))
    loss = F.relu(d_ap - (d_an + d_pn) / 2 + m)  # (N,)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def _check_batch(z: Tensor) -> None:
    _check_embeddings(z=z)
    if z.shape[0] < 2:
        raise ValueError(f"VICReg terms need at least 2 samples to estimate a variance, got z.shape={tuple(z.shape)}")


def vicreg_variance(z: Tensor, *, eps: float = 1e-4, target_std: float = 1.0) -> Tensor:
    """VICReg variance term: ``mean_j relu(target_std - sqrt(Var(z_j) + eps))`` (unbiased variance).

    Zero iff every dimension's standard deviation is at least ``target_std`` (up to ``eps``).

    Shapes:
        z ``(N, D)`` with ``N >= 2`` → scalar.
    """
    _check_batch(z)
    std = torch.sqrt(z.var(dim=0) + eps)  # (D,)
    return F.relu(target_std - std).mean()


def vicreg_covariance(z: Tensor) -> Tensor:
    """VICReg covariance term: ``sum_{i != j} Cov(z)_ij^2 / D`` (unbiased covariance).

    Zero iff the covariance matrix is diagonal.

    Shapes:
        z ``(N, D)`` with ``N >= 2`` → scalar.
    """
    _check_batch(z)
    n, d = z.shape
    zc = z - z.mean(dim=0, keepdim=True)
    cov = zc.T @ zc / (n - 1)  # (D, D)
    off = cov - torch.diag(torch.diagonal(cov))
    return off.pow(2).sum() / d

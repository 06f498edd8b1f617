"""Evidential (Dirichlet) losses: expected cross-entropy, annealed KL on misleading evidence, Dice.

Papers: Qi, Lin et al., "Multi-modal Evidential Fusion Network for Trusted PET/CT Tumor
Segmentation" (MEFN), arXiv 2406.18327; lineage: Sensoy et al., "Evidential Deep Learning to Quantify
Classification Uncertainty", NeurIPS 2018 (arXiv 1806.01768); Han et al., "Trusted Multi-View
Classification" (TMC), ICLR 2021; Zou et al., "TBraTS", MICCAI 2022 (voxel-wise, with Dice).

Status: complete for the CE + KL + Dice terms; MEFN's "uncertainty perceptual loss" is not
specified in the paper text we have and is not implemented.

For a Dirichlet ``Dir(alpha)`` over class probabilities ``p`` with ``S = sum_k alpha_k`` and a
one-hot target ``y``::

    L_ace = E_{p ~ Dir(alpha)}[-log p_y] = sum_k y_k (digamma(S) - digamma(alpha_k))
    L_kl  = KL(Dir(alpha_tilde) || Dir(1)),    alpha_tilde = y + (1 - y) * alpha  (target evidence removed)
          = lgamma(S~) - lgamma(K) - sum_k lgamma(alpha~_k) + sum_k (alpha~_k - 1)(digamma(alpha~_k) - digamma(S~))
    L     = L_ace + lambda_t * L_kl  [+ dice_weight * Dice(alpha / S, y)]

``lambda_t`` is an ordinary number chosen by the caller, e.g. :func:`kl_annealing_coefficient`
``min(1, epoch / anneal_epochs)``: no loss or model reads a global step (STYLE R10; TMC's
``forward(X, y, global_step)`` is what not to do). Apply the loss to each source's ``alpha`` and to
the fused ``alpha`` (MEFN / TMC), then add.

Layout: the class axis is dimension 1, as in :func:`torch.nn.functional.cross_entropy`:
``alpha (N, K)`` or ``(N, K, *spatial)``; pass ``class_dim=-1`` for class-last tensors such as the
output of :func:`attnfuse.ops.dempster_combine`.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "dirichlet_kl_uniform",
    "evidential_ce",
    "evidential_dice_loss",
    "evidential_loss",
    "kl_annealing_coefficient",
]

Reduction = Literal["mean", "sum", "none"]


def kl_annealing_coefficient(epoch: float, anneal_epochs: float) -> float:
    """The lineage's KL annealing ``lambda_t = min(1, epoch / anneal_epochs)`` (0 before training).

    Args:
        epoch: current epoch (or step; any monotone counter), ``>= 0``.
        anneal_epochs: counter value at which the KL weight reaches 1, ``> 0``.
    """
    if not (isinstance(anneal_epochs, (int, float)) and anneal_epochs > 0):
        raise ValueError(f"anneal_epochs must be a positive number, got {anneal_epochs!r}")
    if not (isinstance(epoch, (int, float)) and epoch >= 0):
        raise ValueError(f"epoch must be a non-negative number, got {epoch!r}")
    return float(min(1.0, epoch / anneal_epochs))


def _move_class_last(alpha: Tensor, class_dim: int) -> Tensor:
    return alpha.movedim(class_dim, -1)


def _check_alpha(alpha: Tensor, class_dim: int) -> Tensor:
    if not isinstance(alpha, Tensor):
        raise TypeError(f"alpha must be a torch.Tensor (N, K, *spatial), got {type(alpha).__name__}")
    if not alpha.is_floating_point():
        raise TypeError(f"alpha must be a floating-point tensor, got {alpha.dtype=}")
    if alpha.dim() < 2:
        raise ValueError(f"alpha must be (N, K) or (N, K, *spatial), got alpha.shape={tuple(alpha.shape)}")
    if alpha.numel() == 0:
        raise ValueError(f"alpha must not be empty, got alpha.shape={tuple(alpha.shape)}")
    if not -alpha.dim() <= class_dim < alpha.dim():
        raise ValueError(f"class_dim={class_dim} is out of range for alpha.shape={tuple(alpha.shape)}")
    if class_dim % alpha.dim() == 0:
        raise ValueError("class_dim must not be the batch dimension 0")
    if not bool(torch.isfinite(alpha.detach()).all()) or not bool((alpha.detach() > 0).all()):
        raise ValueError("alpha must be finite and > 0 (Dirichlet parameters; evidence + 1 is >= 1)")
    return _move_class_last(alpha, class_dim)  # (N, *spatial, K)


def _one_hot(target: Tensor, alpha_cl: Tensor, class_dim: int) -> Tensor:
    """Target as a float one-hot tensor in the class-last layout of ``alpha_cl`` ``(N, *spatial, K)``."""
    if not isinstance(target, Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    k = alpha_cl.shape[-1]
    if not target.is_floating_point():
        if target.dtype == torch.bool or target.is_complex():
            raise TypeError(f"target must hold integer class indices or a float one-hot tensor, got {target.dtype=}")
        if tuple(target.shape) != tuple(alpha_cl.shape[:-1]):
            raise ValueError(
                f"integer target must have the shape of alpha without the class axis {tuple(alpha_cl.shape[:-1])}, "
                f"got target.shape={tuple(target.shape)}"
            )
        if target.numel() and (int(target.min()) < 0 or int(target.max()) >= k):
            raise ValueError(f"target class indices must lie in [0, {k - 1}], got min={int(target.min())}, max={int(target.max())}")
        return torch.nn.functional.one_hot(target.long(), k).to(alpha_cl.dtype)
    y = _move_class_last(target, class_dim)
    if tuple(y.shape) != tuple(alpha_cl.shape):
        raise ValueError(f"one-hot target must have alpha's shape, got target.shape={tuple(target.shape)}")
    if not bool(((y == 0) | (y == 1)).all()) or not bool((y.sum(-1) == 1).all()):
        raise ValueError("a floating-point target must be one-hot along the class axis (0 / 1, one 1 per position)")
    return y.to(alpha_cl.dtype)


def _reduce(per_sample: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def evidential_ce(alpha: Tensor, target: Tensor, *, class_dim: int = 1) -> Tensor:
    """Expected cross-entropy under ``Dir(alpha)``, per position: ``digamma(S) - digamma(alpha_y)``.

    Args:
        alpha: Dirichlet parameters ``(N, K)`` or ``(N, K, *spatial)`` (class axis ``class_dim``).
        target: class indices ``(N, *spatial)`` or a one-hot float tensor of ``alpha``'s shape.
        class_dim: position of the class axis in ``alpha`` (and in a one-hot ``target``).

    Returns:
        ``(N, *spatial)`` per-position losses (not reduced).
    """
    a = _check_alpha(alpha, class_dim)
    y = _one_hot(target, a, class_dim)
    s = a.sum(-1, keepdim=True)
    return (y * (torch.digamma(s) - torch.digamma(a))).sum(-1)


def dirichlet_kl_uniform(alpha: Tensor, *, class_dim: int = 1) -> Tensor:
    """``KL(Dir(alpha) || Dir(1, ..., 1))`` in closed form, per position.

    Shapes:
        alpha ``(N, K, *spatial)`` → ``(N, *spatial)``.
    """
    a = _check_alpha(alpha, class_dim)
    return _kl_uniform_class_last(a)


def _kl_uniform_class_last(a: Tensor) -> Tensor:
    k = a.shape[-1]
    s = a.sum(-1)
    return (
        torch.lgamma(s)
        - math.lgamma(k)
        - torch.lgamma(a).sum(-1)
        + ((a - 1) * (torch.digamma(a) - torch.digamma(s).unsqueeze(-1))).sum(-1)
    )


def evidential_dice_loss(alpha: Tensor, target: Tensor, *, class_dim: int = 1, smooth: float = 1e-5) -> Tensor:
    """Soft Dice loss on the expected probabilities ``alpha / S``, per sample (TBraTS lineage).

    ``1 - mean_k (2 sum_x p_k y_k + smooth) / (sum_x p_k + sum_x y_k + smooth)``: the sums run over
    the spatial positions of one sample, the mean over classes. A class absent from both the target
    and the prediction scores 1 (not 0) thanks to ``smooth``.

    Shapes:
        alpha ``(N, K, *spatial)``, target ``(N, *spatial)`` indices or one-hot → ``(N,)``.
    """
    a = _check_alpha(alpha, class_dim)
    y = _one_hot(target, a, class_dim)
    return _dice_class_last(a, y, smooth)


def _dice_class_last(a: Tensor, y: Tensor, smooth: float) -> Tensor:
    p = a / a.sum(-1, keepdim=True)  # (N, *spatial, K) expected probabilities
    dims = tuple(range(1, p.dim() - 1))  # spatial axes
    inter = (p * y).sum(dims) if dims else p * y  # (N, K)
    total = (p + y).sum(dims) if dims else p + y  # (N, K)
    dice = (2 * inter + smooth) / (total + smooth)
    return 1 - dice.mean(-1)  # (N,)


def evidential_loss(
    alpha: Tensor,
    target: Tensor,
    *,
    kl_weight: float = 0.0,
    dice_weight: float = 0.0,
    class_dim: int = 1,
    reduction: Reduction = "mean",
) -> Tensor:
    """Evidential loss: expected CE + ``kl_weight`` × KL on the misleading evidence (+ Dice).

    ``loss_n = mean_x [L_ace + kl_weight * KL(Dir(alpha_tilde) || Dir(1))] + dice_weight * Dice_n``,
    with ``alpha_tilde = y + (1 - y) * alpha``: the KL sees only the evidence for wrong classes, so
    it never shrinks the correct class's evidence (penalising ``alpha`` itself would).

    Args:
        alpha: Dirichlet parameters ``(N, K)`` or ``(N, K, *spatial)``, all ``> 0`` (evidence + 1).
        target: class indices ``(N, *spatial)`` or a one-hot float tensor of ``alpha``'s shape.
        kl_weight: the annealing coefficient ``lambda_t >= 0`` as a number (e.g.
            :func:`kl_annealing_coefficient`); 0 disables the KL term.
        dice_weight: weight ``>= 0`` of :func:`evidential_dice_loss` (segmentation; needs spatial axes
            to be meaningful).
        class_dim: position of the class axis (1 by default; ``-1`` for class-last tensors).
        reduction: ``"mean"`` / ``"sum"`` over samples, or ``"none"`` for the per-sample ``(N,)``
            losses (positions of one sample are averaged first).

    Returns:
        scalar, or ``(N,)`` for ``reduction="none"``.

    Raises:
        TypeError: non-tensor / non-floating ``alpha``, bad target dtype, non-number weights.
        ValueError: shape mismatches, ``alpha <= 0`` or non-finite, class indices out of range,
            negative weights, unknown reduction.

    Shapes:
        alpha ``(N, K, *spatial)``, target ``(N, *spatial)`` or ``(N, K, *spatial)`` → scalar or ``(N,)``.

    Example:
        >>> alpha = torch.tensor([[9.0, 1.0], [1.0, 1.0]])
        >>> evidential_loss(alpha, torch.tensor([0, 1]), kl_weight=0.5, reduction="none")
        tensor([0.1111, 1.0000])
    """
    for name, v in (("kl_weight", kl_weight), ("dice_weight", dice_weight)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise TypeError(f"{name} must be a plain number (compute the annealing outside the model), got {type(v).__name__}")
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{name} must be finite and >= 0, got {v}")
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    a = _check_alpha(alpha, class_dim)  # (N, *spatial, K)
    y = _one_hot(target, a, class_dim)
    s = a.sum(-1, keepdim=True)
    per_pos = (y * (torch.digamma(s) - torch.digamma(a))).sum(-1)  # (N, *spatial)
    if kl_weight > 0:
        a_tilde = y + (1 - y) * a
        per_pos = per_pos + kl_weight * _kl_uniform_class_last(a_tilde)
    per_sample = per_pos.reshape(per_pos.shape[0], -1).mean(-1)  # (N,)
    if dice_weight > 0:
        per_sample = per_sample + dice_weight * _dice_class_last(a, y, 1e-5)
    return _reduce(per_sample, reduction)

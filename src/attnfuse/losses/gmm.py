"""Wayformer's GMM trajectory loss (hard assignment) and trajectory aggregation.

Paper: Nayakanti, Al-Rfou, Zhou, Goel, Refaat, Sapp, "Wayformer: Motion Forecasting via Simple &
Efficient Attention Networks", arXiv 2207.05844 (ICRA 2023). Aggregation follows the paper's
description (after MultiPath++, Varadarajan et al., arXiv 2111.14973).

Status: loss complete. The aggregation is a reconstruction from the paper's prose (no official code):
greedy centroid selection by uncovered probability mass within distance ``D``, then weighted
k-means-style refinement. The trajectory distance used for "within D" is not stated; mean L2 over
time is the default here, endpoint and max-over-time are options.

Loss (per sample; ``M`` modes, ``T`` steps, ``P`` coordinates, diagonal Gaussian, no correlation)::

    i* = argmin_i dist(mu_i, G)                     # hard assignment to the ground truth G
    L  = -log softmax(logits)_{i*} - sum_t sum_p log N(G_tp ; mu_{i* t p}, sigma_{i* t p}^2)

Released re-implementations differ: ``vita-epfl/UniTraj`` uses MTR's 5-parameter bivariate GMM (with
correlation rho) and no aggregation; that is a deviation from the paper and not followed.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["aggregate_trajectories", "closest_mode", "gmm_hard_assignment_nll", "trajectory_distance"]

Distance = Literal["mean_l2", "final_l2", "max_l2"]


def trajectory_distance(a: Tensor, b: Tensor, *, distance: Distance = "mean_l2", step_mask: Tensor | None = None) -> Tensor:
    """Distance between trajectories ``(..., T, P)`` (broadcasting over ``...``).

    ``"mean_l2"``: mean over valid steps of the pointwise L2 distance; ``"final_l2"``: L2 at the last
    valid step; ``"max_l2"``: max over valid steps. ``step_mask (..., T)`` bool marks valid steps
    (None = all); a trajectory without valid steps has distance 0.

    Shapes:
        a, b ``(..., T, P)``, step_mask ``(..., T)`` → ``(...)``.
    """
    pt = (a - b).pow(2).sum(-1)  # (..., T) squared pointwise distance
    pt = torch.where(pt > 0, pt, torch.ones_like(pt)).sqrt() * (pt > 0)  # sqrt with a finite gradient at 0
    if step_mask is None:
        step_mask = torch.ones(pt.shape[-1], dtype=torch.bool, device=pt.device)
    valid = step_mask.expand_as(pt)
    zero = torch.zeros((), dtype=pt.dtype, device=pt.device)
    if distance == "mean_l2":
        return torch.where(valid, pt, zero).sum(-1) / valid.sum(-1).clamp_min(1)
    if distance == "max_l2":
        return torch.where(valid, pt, zero).amax(-1)
    if distance == "final_l2":
        steps = torch.arange(pt.shape[-1], device=pt.device)
        last = torch.where(valid, steps, -1).amax(-1, keepdim=True)  # (..., 1) index of the last valid step
        return torch.where(last >= 0, pt.gather(-1, last.clamp_min(0)), zero).squeeze(-1)
    raise ValueError(f"distance must be 'mean_l2', 'final_l2' or 'max_l2', got {distance!r}")


def closest_mode(mean: Tensor, target: Tensor, *, step_mask: Tensor | None = None, distance: Distance = "mean_l2") -> Tensor:
    """Index of the mixture mode closest to the ground truth (Wayformer's hard assignment).

    Shapes:
        mean ``(B, M, T, P)``, target ``(B, T, P)``, step_mask ``(B, T)`` → ``(B,)`` long.
    """
    mask = None if step_mask is None else step_mask[:, None, :]
    return trajectory_distance(mean, target[:, None], distance=distance, step_mask=mask).detach().argmin(dim=1)


def _check_gmm(logits: Tensor, mean: Tensor, log_std: Tensor, target: Tensor, step_mask: Tensor | None) -> None:
    for name, t in (("logits", logits), ("mean", mean), ("log_std", log_std), ("target", target)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype=}")
    if mean.dim() != 4:
        raise ValueError(f"mean must have shape (B, M, T, P), got mean.shape={tuple(mean.shape)}")
    b, m, t, p = mean.shape
    if b == 0 or m == 0 or t == 0 or p == 0:
        raise ValueError(f"mean must be non-empty (B, M, T, P), got {tuple(mean.shape)}")
    if tuple(logits.shape) != (b, m):
        raise ValueError(f"logits must have shape (B, M) = {(b, m)}, got logits.shape={tuple(logits.shape)}")
    if log_std.shape != mean.shape:
        raise ValueError(f"log_std must have mean's shape {tuple(mean.shape)}, got {tuple(log_std.shape)}")
    if tuple(target.shape) != (b, t, p):
        raise ValueError(f"target must have shape (B, T, P) = {(b, t, p)}, got target.shape={tuple(target.shape)}")
    if step_mask is not None and (not isinstance(step_mask, Tensor) or step_mask.dtype != torch.bool or tuple(step_mask.shape) != (b, t)):
        raise ValueError(f"step_mask must be a bool tensor of shape (B, T) = {(b, t)}")


def gmm_hard_assignment_nll(
    logits: Tensor,
    mean: Tensor,
    log_std: Tensor,
    target: Tensor,
    *,
    step_mask: Tensor | None = None,
    distance: Distance = "mean_l2",
    classification_weight: float = 1.0,
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """Wayformer's loss: CE on the closest mode plus that mode's diagonal-Gaussian NLL.

    Args:
        logits: mixture logits ``(B, M)``.
        mean: per-mode trajectories ``(B, M, T, P)`` (``P = 2`` for x, y).
        log_std: per-mode log standard deviations ``(B, M, T, P)`` (diagonal, no correlation).
        target: ground-truth trajectory ``(B, T, P)``.
        step_mask: ``(B, T)`` bool, True = valid future step; invalid steps are ignored by the
            assignment and the NLL. A sample without valid steps contributes only its CE term.
        distance: trajectory distance of the hard assignment (see :func:`trajectory_distance`).
        classification_weight: weight of the CE term (1 in the paper).
        reduction: ``"mean"`` / ``"sum"`` over samples or ``"none"`` for ``(B,)``.

    Returns:
        scalar or ``(B,)``. The Gaussian NLL is summed over steps and coordinates. It can be
        negative (densities exceed 1 for small sigma).

    Raises:
        TypeError / ValueError: non-floating inputs, shape mismatches, bad options.

    Shapes:
        logits ``(B, M)``, mean / log_std ``(B, M, T, P)``, target ``(B, T, P)``, step_mask ``(B, T)``
        → scalar or ``(B,)``.

    Equivalent:
        ``-Categorical(logits=logits).log_prob(i*) - Independent(Normal(mean[b, i*], exp(log_std[b, i*])), 2).log_prob(target)``.
    """
    _check_gmm(logits, mean, log_std, target, step_mask)
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    b = mean.shape[0]
    idx = closest_mode(mean, target, step_mask=step_mask, distance=distance)  # (B,)
    ce = F.cross_entropy(logits, idx, reduction="none")  # (B,)
    rows = torch.arange(b, device=mean.device)
    mu = mean[rows, idx]  # (B, T, P)
    ls = log_std[rows, idx]  # (B, T, P)
    z = (target - mu) * torch.exp(-ls)
    nll_tp = ls + 0.5 * math.log(2 * math.pi) + 0.5 * z.pow(2)  # (B, T, P)
    if step_mask is not None:
        nll_tp = torch.where(step_mask[..., None], nll_tp, torch.zeros((), dtype=nll_tp.dtype, device=nll_tp.device))
    loss = classification_weight * ce + nll_tp.sum(dim=(1, 2))  # (B,)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


@torch.no_grad()
def aggregate_trajectories(
    probs: Tensor,
    trajectories: Tensor,
    *,
    num_output: int = 6,
    distance_threshold: float = 2.3,
    iterations: int = 3,
    distance: Distance = "mean_l2",
) -> tuple[Tensor, Tensor, Tensor]:
    """Wayformer's trajectory aggregation: greedy centroid selection, then weighted refinement.

    1. Greedy: repeatedly pick, among not-yet-chosen modes, the one whose ``distance_threshold``
       neighbourhood holds the most probability mass of still uncovered modes; mark its neighbours
       covered. Stop after ``num_output`` centroids or when every mode is covered.
    2. Refinement (``iterations`` times): assign every input mode to its nearest centroid; each
       centroid becomes the probability-weighted mean of its members, and its probability the sum
       of their probabilities.

    Args:
        probs: mode probabilities ``(B, M)`` (e.g. softmax of logits, pooled over an ensemble and
            renormalised).
        trajectories: mode means ``(B, M, T, P)``.
        num_output: at most this many output modes ``k`` (6 on WOMD).
        distance_threshold: ``D`` (2.3 on WOMD).
        iterations: refinement iterations (3 on WOMD; 0 keeps the greedy centroids).
        distance: trajectory distance (see :func:`trajectory_distance`).

    Returns:
        ``(probs (B, k), trajectories (B, k, T, P), valid (B, k) bool)``, sorted by probability, with
        ``k = min(num_output, M)``; rows beyond a sample's centroid count are zero and not valid.
        When the greedy step stops because every mode is covered, every input mode lies within
        ``distance_threshold`` of a (greedy) centroid.

    Shapes:
        probs ``(B, M)``, trajectories ``(B, M, T, P)`` → ``(B, k)``, ``(B, k, T, P)``, ``(B, k)``.
    """
    if not isinstance(trajectories, Tensor) or trajectories.dim() != 4:
        raise ValueError(f"trajectories must have shape (B, M, T, P), got {getattr(trajectories, 'shape', None)}")
    b, m, _, _ = trajectories.shape
    if not isinstance(probs, Tensor) or tuple(probs.shape) != (b, m):
        raise ValueError(f"probs must have shape (B, M) = {(b, m)}, got {getattr(probs, 'shape', None)}")
    if not (isinstance(num_output, int) and num_output >= 1):
        raise ValueError(f"num_output must be a positive int, got {num_output!r}")
    if not (distance_threshold >= 0):
        raise ValueError(f"distance_threshold must be >= 0, got {distance_threshold!r}")
    if not (isinstance(iterations, int) and iterations >= 0):
        raise ValueError(f"iterations must be a non-negative int, got {iterations!r}")
    k = min(num_output, m)
    dist = trajectory_distance(trajectories[:, :, None], trajectories[:, None, :], distance=distance)  # (B, M, M)
    near = dist <= distance_threshold  # (B, M, M): near[b, i, j] = mode j within D of mode i
    covered = torch.zeros(b, m, dtype=torch.bool, device=probs.device)
    chosen = torch.zeros(b, m, dtype=torch.bool, device=probs.device)
    centre_idx = torch.zeros(b, k, dtype=torch.long, device=probs.device)
    valid = torch.zeros(b, k, dtype=torch.bool, device=probs.device)
    rows = torch.arange(b, device=probs.device)
    for c in range(k):
        active = ~covered.all(dim=1)  # (B,) samples with uncovered modes left
        gain = (near.to(probs.dtype) * (probs * ~covered)[:, None, :]).sum(-1)  # (B, M) uncovered mass per candidate
        gain = gain.masked_fill(chosen, -1.0)
        pick = gain.argmax(dim=1)  # (B,)
        centre_idx[:, c] = pick
        valid[:, c] = active
        chosen[rows, pick] |= active
        covered |= near[rows, pick] & active[:, None]
    centres = trajectories[rows[:, None], centre_idx]  # (B, k, T, P)
    centre_p = torch.zeros(b, k, dtype=probs.dtype, device=probs.device)
    for _ in range(max(iterations, 1)):
        d = trajectory_distance(trajectories[:, :, None], centres[:, None, :], distance=distance)  # (B, M, k)
        d = d.masked_fill(~valid[:, None, :], float("inf"))
        assign = F.one_hot(d.argmin(dim=2), k).to(probs.dtype)  # (B, M, k)
        weight = assign * probs[:, :, None]  # (B, M, k)
        centre_p = weight.sum(1)  # (B, k)
        if iterations == 0:
            break
        mean = torch.einsum("bmk,bmtp->bktp", weight, trajectories) / centre_p.clamp_min(torch.finfo(probs.dtype).tiny)[..., None, None]
        centres = torch.where((centre_p > 0)[..., None, None], mean, centres)
    centre_p = centre_p * valid
    centres = centres * valid[..., None, None]
    order = torch.argsort(torch.where(valid, centre_p, torch.full_like(centre_p, -1.0)), dim=1, descending=True, stable=True)
    return centre_p.gather(1, order), centres[rows[:, None], order], valid.gather(1, order)

"""Transport maps between the neurons of two layers, and how maps combine at residual joins.

Paper: Imfeld, Graldi, Giordano, Hofmann, Anagnostidis, Singh, "Transformer Fusion with Optimal
Transport" (https://arxiv.org/abs/2310.05719, ICLR 2024); released code ``graldij/transformer-fusion``
(``otfusion/ground_metric.py``, ``otfusion_lib.py::resid_policy``). Spec: ``shared/papers/ot-transformer-fusion.md``.

Status: complete for the released defaults. The OT problems are solved by POT (``ot.emd``,
``ot.sinkhorn(method="sinkhorn_log")``), the optional extra ``attnfuse[merge]``; no solver is written here.

One map per layer output, between the ``n_a`` neurons of parent A and the ``n_b`` of the anchor B::

    feature f_i    = a neuron's activations over S samples (standardised per neuron), or its weight row
    cost M_ij      = ||f_i^A - f_j^B||_2  (Euclidean, not squared), then M <- M / max(M)
    marginals      mu = 1 / n_a, nu = 1 / n_b
    T              = ot.emd(mu, nu, M)  (hard: a permutation when n_a = n_b and no ties)
                   | ot.sinkhorn(mu, nu, M, reg, method="sinkhorn_log")  (soft, entropic)
    returned       n_a * T: rows sum to 1, columns to n_a / n_b

Materialised example (hard OT of a permuted copy): ``feat_b = feat_a[[2, 0, 1]]`` gives
``T = [[0, 1, 0], [0, 0, 1], [1, 0, 0]]`` (neuron 0 of A is neuron 1 of B, ...), i.e. ``feat_b = T.T @ feat_a``.

Deviation: the released code's Sinkhorn is POT's default (``method="sinkhorn"``, which underflows at small
``reg``); here the log-domain method is used (the spec's pitfall), in float64.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import Tensor

from attnfuse.merge._pot import require_pot

__all__ = ["RESIDUAL_POLICIES", "combine_maps", "solve_ot", "standardize_rows", "transport_map", "transport_plan"]

Solver = Literal["emd", "sinkhorn"]
#: residual-join policies of the released code implemented here (``weighted_matrix`` and
#: ``resid_as_identity`` are not)
RESIDUAL_POLICIES = ("mean", "weighted_scalar", "only_resid", "no_resid")


def standardize_rows(f: Tensor) -> Tensor:
    """Each row (a neuron's features over samples) to zero mean and unit standard deviation."""
    mean = f.mean(dim=1, keepdim=True)
    std = f.std(dim=1, keepdim=True, unbiased=False) if f.shape[1] > 1 else torch.ones_like(mean)
    return (f - mean) / std.clamp_min(1e-12)


def transport_plan(
    feat_a: Tensor,
    feat_b: Tensor,
    *,
    solver: Solver = "sinkhorn",
    reg: float = 0.08,
    normalize: Literal["max", "none"] = "max",
    standardize: bool = True,
    num_iter: int = 1_000,
) -> tuple[Tensor, float]:
    """The raw transport plan ``T`` (sums to 1) and its cost ``<T, M>``; see :func:`transport_map`.

    Shapes: feat_a ``(n_a, S)``, feat_b ``(n_b, S)`` -> ``(n_a, n_b)`` float64 and a float.
    """
    if feat_a.dim() != 2 or feat_b.dim() != 2 or feat_a.shape[1] != feat_b.shape[1]:
        raise ValueError(f"feat_a and feat_b must be (n_a, S) and (n_b, S) with the same S, got "
                         f"{tuple(feat_a.shape)} and {tuple(feat_b.shape)}")
    if solver not in ("emd", "sinkhorn"):
        raise ValueError(f"solver must be 'emd' or 'sinkhorn', got {solver!r}")
    if normalize not in ("max", "none"):
        raise ValueError(f"normalize must be 'max' or 'none', got {normalize!r}")
    if solver == "sinkhorn" and not reg > 0:
        raise ValueError(f"reg must be > 0 for Sinkhorn, got {reg=}")
    a, b = feat_a.detach().double().cpu(), feat_b.detach().double().cpu()
    if standardize:
        a, b = standardize_rows(a), standardize_rows(b)
    cost = torch.cdist(a, b)  # (n_a, n_b) Euclidean
    if normalize == "max" and float(cost.max()) > 0:
        cost = cost / cost.max()
    return solve_ot(cost, solver=solver, reg=reg, num_iter=num_iter)


def solve_ot(cost: Tensor, *, solver: Solver = "sinkhorn", reg: float = 0.08, num_iter: int = 1_000) -> tuple[Tensor, float]:
    """Uniform-marginal OT for a given cost matrix with POT: the plan (sums to 1, float64) and ``<T, M>``.

    Shapes: cost ``(n_a, n_b)`` -> ``(n_a, n_b)``.
    """
    if solver not in ("emd", "sinkhorn"):
        raise ValueError(f"solver must be 'emd' or 'sinkhorn', got {solver!r}")
    ot = require_pot()
    cost = cost.detach().double().cpu()
    m = cost.numpy()
    mu = np.full(m.shape[0], 1.0 / m.shape[0])
    nu = np.full(m.shape[1], 1.0 / m.shape[1])
    if solver == "emd":
        plan = ot.emd(mu, nu, m, numItermax=max(100_000, 100 * m.size))
    else:
        plan = ot.sinkhorn(mu, nu, m, reg, method="sinkhorn_log", numItermax=num_iter, stopThr=1e-9)
    plan = torch.as_tensor(np.asarray(plan), dtype=torch.float64)
    return plan, float((plan * cost).sum())


def transport_map(
    feat_a: Tensor,
    feat_b: Tensor,
    *,
    solver: Solver = "sinkhorn",
    reg: float = 0.08,
    normalize: Literal["max", "none"] = "max",
    standardize: bool = True,
) -> Tensor:
    """Transport map from the neurons of A to those of B, scaled so that each row sums to 1.

    Args:
        feat_a, feat_b: one feature row per neuron: activations over the same S samples (acts mode) or
            weight rows (wts mode; pass them normalised to unit length and ``standardize=False``).
        solver: ``"emd"`` (hard, ``ot.emd``) or ``"sinkhorn"`` (soft, log-domain ``ot.sinkhorn``).
        reg: entropic regularisation of Sinkhorn (released default 0.08 for activations).
        normalize: ``"max"`` divides the cost by its maximum (released), ``"none"`` keeps it.
        standardize: standardise each neuron's features over the samples first (released ``std: True``).

    Returns:
        ``n_a * T`` in float64: rows sum to 1, columns to ``n_a / n_b`` (Sinkhorn: within its tolerance).

    Raises:
        ValueError: bad shapes or options. ModuleNotFoundError: POT missing (``pip install "attnfuse[merge]"``).

    Shapes:
        feat_a ``(n_a, S)``, feat_b ``(n_b, S)`` -> ``(n_a, n_b)``.

    Example:
        >>> f = torch.randn(3, 8)
        >>> transport_map(f, f[[2, 0, 1]], solver="emd")
        tensor([[0., 1., 0.],
                [0., 0., 1.],
                [1., 0., 0.]], dtype=torch.float64)
    """
    plan, _ = transport_plan(feat_a, feat_b, solver=solver, reg=reg, normalize=normalize, standardize=standardize)
    return plan * feat_a.shape[0]


def combine_maps(
    t_res: Tensor, t_branch: Tensor, *, policy: str = "mean", weights: tuple[float, float] | None = None
) -> Tensor:
    """The map of the residual stream after ``x + branch(x)``, from the maps of its two summands.

    Args:
        t_res, t_branch: maps ``(n_a, n_b)`` of the residual input and of the branch output.
        policy: ``"mean"`` ``(T_res + T_branch) / 2`` (released default); ``"weighted_scalar"``
            ``(w_r T_res + w_b T_branch) / (w_r + w_b)`` with ``weights = (w_r, w_b)`` (released: the mean
            absolute activations of residual and branch); ``"only_resid"`` ``T_res``; ``"no_resid"`` ``T_branch``.
        weights: for ``"weighted_scalar"`` only.

    Raises:
        ValueError: an unknown policy, mismatched shapes, missing or negative weights.
    """
    if t_res.shape != t_branch.shape:
        raise ValueError(f"t_res and t_branch must have one shape, got {tuple(t_res.shape)} and {tuple(t_branch.shape)}")
    if policy == "mean":
        return (t_res + t_branch) / 2
    if policy == "only_resid":
        return t_res
    if policy == "no_resid":
        return t_branch
    if policy == "weighted_scalar":
        if weights is None or len(weights) != 2 or min(weights) < 0 or sum(weights) <= 0:
            raise ValueError(f"policy 'weighted_scalar' needs weights=(w_res, w_branch) >= 0 with a positive sum, got {weights}")
        w_r, w_b = float(weights[0]), float(weights[1])
        return (w_r * t_res + w_b * t_branch) / (w_r + w_b)
    raise ValueError(f"unknown residual policy {policy!r}; policies: {RESIDUAL_POLICIES} (and 'acts' in ot_fuse)")

"""Weighted Cox partial likelihood (Breslow / Efron ties) and Harrell's concordance index.

Paper: Mondol et al., "BioFusionNet: Deep Learning-Based Survival Risk Stratification in ER+ Breast
Cancer Through Multifeature and Multimodal Data Fusion", IEEE JBHI 2024 (arXiv 2402.10717): an
event-weighted Cox loss, ``w_i = w_event`` for events and 1 for censored samples. Cox, "Regression
models and life-tables", JRSS-B 1972; Breslow 1974; Efron 1977; Harrell et al. 1996 (C-index).

Status: complete. Risk sets are ordered by **time**. The released BioFusionNet loss sorts by the
predicted risk and never reads the times, which is not a partial likelihood; that mode is not offered.

Weighted partial likelihood (spec ``biofusionnet.md``; as lifelines' ``weights_col`` and R's
``coxph(weights=)``), with ``R(t) = {j : t_j >= t}`` and distinct event times ``t_g``, ``D_g`` the
events at ``t_g``, ``d_g = |D_g|``::

    Breslow:  log L = sum_g [ sum_{i in D_g} w_i h_i  -  W_g log sum_{j in R(t_g)} w_j exp(h_j) ]
    Efron:    log L = sum_g [ sum_{i in D_g} w_i h_i  -  (W_g / d_g) sum_{l=0}^{d_g-1} log(R_g - (l / d_g) T_g) ]

    W_g = sum_{i in D_g} w_i,  R_g = sum_{j in R(t_g)} w_j exp(h_j),  T_g = sum_{i in D_g} w_i exp(h_i)

Weights enter twice: each event's term is multiplied by its weight, and every member of a risk set
contributes ``w_j exp(h_j)``. Hence ``w = c`` (constant) shifts the "mean" loss by exactly ``log c``
and leaves its gradient unchanged.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = ["class_balance_weights", "concordance_index", "cox_partial_likelihood"]


def _as_vector(name: str, t: Tensor, n: int | None) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (N,), got {type(t).__name__}")
    if t.dim() == 2 and t.shape[1] == 1:
        t = t[:, 0]
    if t.dim() != 1:
        raise ValueError(f"{name} must have shape (N,) (or (N, 1)), got {name}.shape={tuple(t.shape)}")
    if n is not None and t.shape[0] != n:
        raise ValueError(f"{name} must have N={n} entries like risk, got {name}.shape={tuple(t.shape)}")
    return t


def _check_survival_inputs(risk: Tensor, time: Tensor, event: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    risk = _as_vector("risk", risk, None)
    if not risk.is_floating_point():
        raise TypeError(f"risk must be a floating-point tensor, got {risk.dtype=}")
    n = risk.shape[0]
    if n == 0:
        raise ValueError("risk must have at least one sample, got N=0")
    time = _as_vector("time", time, n)
    event = _as_vector("event", event, n)
    if time.dtype == torch.bool or time.is_complex():
        raise TypeError(f"time must be a real-valued tensor, got {time.dtype=}")
    if not bool(torch.isfinite(time).all()):
        raise ValueError("time must be finite (NaN or inf found)")
    if event.dtype != torch.bool:
        if event.is_complex() or not bool(((event == 0) | (event == 1)).all()):
            raise ValueError("event must be bool or hold only 0 / 1 (1 = event observed, 0 = censored)")
        event = event != 0
    if not bool(torch.isfinite(risk.detach()).all()):
        raise ValueError("risk must be finite (NaN or inf found)")
    return risk, time.to(risk.device), event.to(risk.device)


def class_balance_weights(event: Tensor, event_weight: float = 5.0) -> Tensor:
    """BioFusionNet's per-sample weights: ``event_weight`` for events, 1 for censored samples.

    Args:
        event: ``(N,)`` bool or 0/1.
        event_weight: weight of an observed event (5 in the released code).

    Returns:
        float32 weights ``(N,)``.
    """
    if not (isinstance(event_weight, (int, float)) and event_weight > 0 and math.isfinite(event_weight)):
        raise ValueError(f"event_weight must be a positive finite number, got {event_weight!r}")
    event = _as_vector("event", event, None)
    return torch.where(event.bool(), torch.tensor(float(event_weight)), torch.tensor(1.0)).to(event.device)


def cox_partial_likelihood(
    risk: Tensor,
    time: Tensor,
    event: Tensor,
    weights: Tensor | None = None,
    *,
    ties: Literal["breslow", "efron"] = "breslow",
    reduction: Literal["mean", "sum"] = "mean",
) -> Tensor:
    """Negative (weighted) Cox log partial likelihood, risk sets ordered by time.

    Args:
        risk: predicted log-hazard ``h = f(x)`` ``(N,)`` or ``(N, 1)``; higher = earlier event.
        time: observed times ``(N,)`` (event or censoring), any real dtype.
        event: ``(N,)`` bool or 0/1, True = event observed.
        weights: optional positive per-sample weights ``(N,)`` (see the module docstring for how they
            enter), e.g. :func:`class_balance_weights`. Zero weights are rejected: drop the sample.
        ties: ``"breslow"`` or ``"efron"`` (identical when no two events share a time).
        reduction: ``"sum"``: ``-log L`` (lifelines' ``log_likelihood_`` with the sign flipped);
            ``"mean"``: ``-log L`` divided by the number of events, or by the summed event weights.

    Returns:
        scalar loss in ``risk``'s dtype (float16 / bfloat16 are computed in float32). A batch without events (all censored, or ``N = 1``
        censored) returns 0 with a zero gradient: it carries no partial-likelihood information.
        ``N = 1`` with an event returns ``log w`` ("mean") / ``w log w`` ("sum"), 0 unweighted, gradient 0.

    Raises:
        TypeError: non-tensor inputs, non-floating ``risk`` or ``weights``.
        ValueError: bad shapes, ``N = 0``, non-finite risk / time / weights, non-positive weights,
            event values other than 0 / 1, unknown ``ties`` or ``reduction``.

    Shapes:
        risk, time, event, weights ``(N,)`` → scalar.

    Example:
        >>> risk = torch.tensor([0.5, -0.2, 0.1])
        >>> cox_partial_likelihood(risk, torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1, 0, 1]))
        tensor(0.3867)

    Cost: one sort and cumulative log-sum-exp, ``O(N log N)``.
    """
    if ties not in ("breslow", "efron"):
        raise ValueError(f"ties must be 'breslow' or 'efron', got {ties!r}")
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    risk, time, event = _check_survival_inputs(risk, time, event)
    out_dtype = risk.dtype
    if out_dtype in (torch.float16, torch.bfloat16):  # half precision is computed in float32
        risk = risk.float()
    n = risk.shape[0]
    if weights is None:
        w = torch.ones(n, dtype=risk.dtype, device=risk.device)
    else:
        w = _as_vector("weights", weights, n)
        if not w.is_floating_point():
            raise TypeError(f"weights must be a floating-point tensor, got {w.dtype=}")
        if not bool(torch.isfinite(w).all()) or not bool((w > 0).all()):
            raise ValueError("weights must be finite and > 0 (drop a sample instead of giving it weight 0)")
        w = w.to(device=risk.device, dtype=risk.dtype)

    order = torch.argsort(time, stable=True)  # ascending time
    h, t, d, w = risk[order], time[order], event[order], w[order]
    _, group, counts = torch.unique_consecutive(t, return_inverse=True, return_counts=True)  # tie groups
    n_groups = counts.shape[0]
    first = torch.cumsum(counts, 0) - counts  # (G,) first sorted index of each group

    # log R_g: log of sum_{j: t_j >= t_g} w_j exp(h_j), a reverse cumulative log-sum-exp read at the group start
    log_wexp = h + torch.log(w)  # (N,)
    log_r_all = torch.logcumsumexp(log_wexp.flip(0), 0).flip(0)  # (N,)
    log_r = log_r_all[first][group]  # (N,) risk-set log-sum of each sample's time group

    if ties == "breslow":
        term = w * (h - log_r)  # (N,)
    else:
        # Efron: tied events i in D_g get ranks l_i = 0..d_g-1 and share the mean event weight W_g / d_g
        d_f = d.to(h.dtype)
        d_g = torch.zeros(n_groups, dtype=h.dtype, device=h.device).index_add_(0, group, d_f)  # (G,)
        w_g = torch.zeros(n_groups, dtype=h.dtype, device=h.device).index_add_(0, group, d_f * w)  # (G,)
        rank = torch.cumsum(d.long(), 0) - d.long()  # events before i (all groups)
        rank = rank - rank[first][group]  # events before i within its group: l_i
        # log T_g = log sum_{i in D_g} w_i exp(h_i), shifted by the group max for stability
        neg_inf = torch.full_like(h, float("-inf"))
        ev_log = torch.where(d, log_wexp, neg_inf)
        m_g = torch.full((n_groups,), float("-inf"), dtype=h.dtype, device=h.device).scatter_reduce(
            0, group, ev_log.detach(), reduce="amax", include_self=True
        )
        m_g = torch.where(torch.isfinite(m_g), m_g, torch.zeros_like(m_g))
        shifted = torch.where(d, log_wexp - m_g[group], neg_inf)  # <= 0 for events, -inf otherwise (exp never overflows)
        t_g = torch.zeros(n_groups, dtype=h.dtype, device=h.device).index_add_(0, group, torch.exp(shifted))
        log_t = torch.log(t_g.clamp_min(torch.finfo(h.dtype).tiny)) + m_g  # (G,) (finite; unused where d_g = 0)
        frac = rank.to(h.dtype) / d_g[group].clamp_min(1)  # l_i / d_g, in [0, 1)
        # log(R - frac T) = log R + log1p(-frac T / R); T <= R and frac <= (d-1)/d keep the argument >= 1/d
        ratio = torch.exp((log_t[group] - log_r).clamp_max(0.0))
        log_den = log_r + torch.log1p(-frac * ratio)
        mean_w = w_g[group] / d_g[group].clamp_min(1)
        term = w * h - mean_w * log_den

    zero = torch.zeros((), dtype=h.dtype, device=h.device)
    nll = -torch.where(d, term, zero).sum()
    if reduction == "sum":
        return nll.to(out_dtype)
    denom = torch.where(d, w, zero).sum()
    return (nll / denom.clamp_min(torch.finfo(h.dtype).tiny)).to(out_dtype)


def concordance_index(risk: Tensor, time: Tensor, event: Tensor, *, block_size: int = 1024) -> Tensor:
    """Harrell's concordance index of predicted risks (higher risk = shorter survival).

    Pair ``(i, j)`` is comparable when ``i`` has an observed event and ``t_i < t_j``, or
    ``t_i == t_j`` and ``j`` is censored (lifelines' convention; two tied events are not
    comparable). It is concordant when ``risk_i > risk_j``; a tie in risk counts 0.5. Equals
    ``lifelines.utils.concordance_index(time, -risk, event)``.

    Args:
        risk: predicted risks ``(N,)`` or ``(N, 1)``; not differentiated.
        time: observed times ``(N,)``.
        event: ``(N,)`` bool or 0/1.
        block_size: rows per block of the vectorised ``O(N^2)`` pair count (memory ``block_size × N``).

    Returns:
        0-d float64 tensor in ``[0, 1]``.

    Raises:
        ValueError: bad shapes or values, or no comparable pair (e.g. no events), as lifelines.

    Shapes:
        risk, time, event ``(N,)`` → scalar.
    """
    if isinstance(risk, Tensor) and not risk.is_floating_point() and risk.dtype != torch.bool:
        risk = risk.to(torch.float64)  # integer scores (e.g. ranks) are fine for a rank statistic
    risk, time, event = _check_survival_inputs(risk.detach(), time, event)
    r = risk.to(torch.float64)
    t = time.to(torch.float64)
    n = r.shape[0]
    num = torch.zeros((), dtype=torch.float64, device=r.device)
    pairs = torch.zeros((), dtype=torch.float64, device=r.device)
    for start in range(0, n, block_size):
        stop = min(start + block_size, n)
        t_i, r_i, d_i = t[start:stop, None], r[start:stop, None], event[start:stop, None]  # (b, 1)
        comparable = d_i & ((t_i < t[None, :]) | ((t_i == t[None, :]) & ~event[None, :]))  # (b, N)
        cmp = comparable.to(torch.float64)
        num = num + (cmp * (r_i > r[None, :])).sum() + 0.5 * (cmp * (r_i == r[None, :])).sum()
        pairs = pairs + cmp.sum()
    if pairs.item() == 0:
        raise ValueError("concordance_index: no comparable pairs (needs at least one event before another exit time)")
    return num / pairs

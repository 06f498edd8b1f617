"""Shared oracle and tolerance table for the operator tests.

The oracle is written here, independently of :mod:`attnfuse.ops.reference`: allowed keys are an
explicit boolean matrix, the softmax is ``exp`` / ``sum`` over that matrix (never ``-inf`` filling),
and rows with no allowed key are set to zero by hand. It is exposed as session-scoped fixtures so
that Hypothesis tests can use it and no test module imports another.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

__all__ = ["TOLERANCES", "explicit_attention", "tolerance"]

#: One table of tolerances, keyed by (dtype, pass). "fwd" = outputs, "bwd" = gradients.
TOLERANCES: dict[tuple[torch.dtype, str], dict[str, float]] = {
    (torch.float64, "fwd"): {"atol": 1e-10, "rtol": 1e-9},
    (torch.float64, "bwd"): {"atol": 1e-9, "rtol": 1e-8},
    (torch.float32, "fwd"): {"atol": 2e-5, "rtol": 1e-4},
    (torch.float32, "bwd"): {"atol": 1e-4, "rtol": 1e-3},
    (torch.bfloat16, "fwd"): {"atol": 3e-2, "rtol": 3e-2},
    (torch.bfloat16, "bwd"): {"atol": 1e-1, "rtol": 1e-1},
    (torch.float16, "fwd"): {"atol": 5e-3, "rtol": 5e-3},
    (torch.float16, "bwd"): {"atol": 2e-2, "rtol": 2e-2},
}


def tolerance(dtype: torch.dtype, which: str) -> dict[str, float]:
    """``atol`` / ``rtol`` for ``torch.testing.assert_close`` from :data:`TOLERANCES`."""
    return TOLERANCES[(dtype, which)]


def explicit_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    mask: Tensor | None = None,
    bias: Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Attention written out term by term: returns ``(out, weights, lse)``.

    ``allowed[b, h, i, j]`` says whether key ``j`` takes part for query ``i``; the weights are
    ``exp(s_ij - m_i) * allowed_ij / sum_j(...)`` with ``m_i`` the largest allowed score, and a row
    without allowed keys gets weights 0, out 0 and ``lse = -inf``. Differentiable.

    Shapes:
        q ``(B, H, L, D)``, k ``(B, H, S, D)``, v ``(B, H, S, Dv)``, mask / bias broadcastable to
        ``(B, H, L, S)``; out ``(B, H, L, Dv)``, weights ``(B, H, L, S)``, lse ``(B, H, L)``.
    """
    b, h, lq, d = q.shape
    lk = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else scale
    s = torch.einsum("bhid,bhjd->bhij", q, k) * scale  # (B, H, L, S)
    if bias is not None:
        s = s + bias
    allowed = torch.ones(b, h, lq, lk, dtype=torch.bool, device=q.device)
    if mask is not None:
        allowed = allowed & mask
    if is_causal:
        rows = torch.arange(lq, device=q.device).unsqueeze(1)  # (L, 1)
        cols = torch.arange(lk, device=q.device).unsqueeze(0)  # (1, S)
        allowed = allowed & (cols <= rows)
    zero = torch.zeros((), dtype=s.dtype, device=s.device)
    s_allowed = torch.where(allowed, s, zero)  # disallowed scores never reach exp
    big_neg = torch.full((), -1e300 if s.dtype == torch.float64 else -1e30, dtype=s.dtype, device=s.device)
    m = torch.where(allowed, s_allowed, big_neg).amax(dim=-1, keepdim=True).detach() if lk else s.new_zeros(b, h, lq, 1)
    has_key = allowed.any(dim=-1, keepdim=True)  # (B, H, L, 1)
    m = torch.where(has_key, m, zero)
    e = torch.where(allowed, torch.exp(s_allowed - m), zero)  # (B, H, L, S)
    den = e.sum(dim=-1, keepdim=True)  # (B, H, L, 1)
    den_safe = torch.where(has_key, den, torch.ones_like(den))
    weights = e / den_safe
    out = torch.einsum("bhij,bhjv->bhiv", weights, v)  # (B, H, L, Dv)
    lse = torch.where(has_key, m + torch.log(den_safe), torch.full_like(den, float("-inf"))).squeeze(-1)
    return out, weights, lse


@pytest.fixture(scope="session")
def oracle() -> Callable[..., tuple[Tensor, Tensor, Tensor]]:
    """The explicit attention formula (see :func:`explicit_attention`)."""
    return explicit_attention


@pytest.fixture(scope="session")
def tol() -> Callable[[torch.dtype, str], dict[str, float]]:
    """Tolerance lookup ``tol(dtype, "fwd" | "bwd")``."""
    return tolerance


@pytest.fixture
def backend_spy(monkeypatch):
    """``backend_spy(op)`` wraps every backend of ``op`` so the test can read which ones ran (``.used``)."""
    import dataclasses

    from attnfuse.ops.backends import BACKENDS

    class Spy:
        def __init__(self, op: str) -> None:
            self.used: list[str] = []

            def wrap(b):
                def fn(*args, **kwargs):
                    self.used.append(b.name)
                    return b.fn(*args, **kwargs)

                return dataclasses.replace(b, fn=fn)

            monkeypatch.setitem(BACKENDS, op, tuple(wrap(b) for b in BACKENDS[op]))

    return Spy

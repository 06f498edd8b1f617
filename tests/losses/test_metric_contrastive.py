"""Adaptive-margin triplet, VICReg terms (M2FNet) and InfoNCE / multi-target InfoNCE (ST-Align)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnfuse.losses import (
    ADAPTIVE_MARGIN_BOUNDS,
    ContrastiveTarget,
    adaptive_margin,
    adaptive_margin_triplet_loss,
    info_nce,
    info_nce_logits,
    multi_target_info_nce,
    st_align_weights,
    vicreg_covariance,
    vicreg_variance,
)

# ----------------------------------------------------------------------------- M2FNet


def test_adaptive_margin_bounds_and_monotonicity():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    m = adaptive_margin(s[:, None], s[None, :])  # (s_ap, s_an) grid
    lo, hi = ADAPTIVE_MARGIN_BOUNDS
    assert abs(lo - (2 + 4 * math.exp(-4))) < 1e-15 and hi == 6.0
    assert bool((m >= lo - 1e-12).all()) and bool((m <= hi + 1e-12).all())
    torch.testing.assert_close(m.min(), torch.tensor(lo, dtype=torch.float64))  # s_ap = 1, s_an = 0
    torch.testing.assert_close(m.max(), torch.tensor(hi, dtype=torch.float64))  # s_ap = 0, s_an = 1
    assert bool((m.diff(dim=0) < 0).all())  # decreasing in s_ap
    assert bool((m.diff(dim=1) > 0).all())  # increasing in s_an
    # out-of-range similarities (e.g. distances plugged in by mistake) are clamped, not exploding
    assert adaptive_margin(torch.tensor(-3.0), torch.tensor(40.0)).item() <= hi


def test_triplet_loss_formula_hinge_and_finite_gradients():
    torch.manual_seed(0)
    a, p, n = (torch.randn(16, 8, dtype=torch.float64) for _ in range(3))
    loss = adaptive_margin_triplet_loss(a, p, n, reduction="none")
    d = torch.linalg.vector_norm
    s_ap = (1 + F.cosine_similarity(a, p)) / 2
    s_an = (1 + F.cosine_similarity(a, n)) / 2
    margin = 2 + 2 * torch.exp(-4 * s_ap) + 2 * torch.exp(4 * s_an - 4)
    want = torch.clamp(d(a - p, dim=1) - (d(a - n, dim=1) + d(p - n, dim=1)) / 2 + margin, min=0)
    torch.testing.assert_close(loss, want)
    assert bool((loss >= 0).all())
    # an easy triplet (negative far away) hits the hinge: loss 0 and no push
    easy = adaptive_margin_triplet_loss(torch.zeros(1, 2), torch.zeros(1, 2) + 0.01, torch.tensor([[100.0, -100.0]]))
    assert easy.item() == 0.0
    # anchor == positive: distance 0 must not give NaN gradients
    x = torch.randn(4, 3, requires_grad=True)
    adaptive_margin_triplet_loss(x, x.detach().clone(), torch.randn(4, 3)).backward()
    assert bool(torch.isfinite(x.grad).all())


def test_vicreg_terms():
    torch.manual_seed(1)
    z = torch.randn(4096, 6, dtype=torch.float64) * 3  # std 3 >= 1 in every dimension
    assert vicreg_variance(z).item() == 0.0
    small = torch.randn(256, 6, dtype=torch.float64) * 0.1
    var = vicreg_variance(small)
    want = F.relu(1 - torch.sqrt(small.var(0) + 1e-4)).mean()
    torch.testing.assert_close(var, want)
    assert var.item() > 0.8
    diag = torch.randn(128, 5, dtype=torch.float64)
    diag = (diag - diag.mean(0)) @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(diag.T))).T  # whitened: covariance = I
    assert vicreg_covariance(diag).item() < 1e-20
    corr = torch.randn(128, 1, dtype=torch.float64).repeat(1, 4)  # fully correlated dims
    cov = torch.cov(corr.T)
    torch.testing.assert_close(vicreg_covariance(corr), (cov.pow(2).sum() - cov.diagonal().pow(2).sum()) / 4)
    with pytest.raises(ValueError, match="at least 2 samples"):
        vicreg_variance(torch.randn(1, 4))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        vicreg_covariance(torch.randn(3, 4, 5))


# ----------------------------------------------------------------------------- ST-Align


def test_info_nce_paired_equals_cross_entropy_on_logits():
    torch.manual_seed(2)
    q, k = torch.randn(10, 16, dtype=torch.float64), torch.randn(10, 16, dtype=torch.float64)
    neg = torch.randn(10, 5, 16, dtype=torch.float64)
    loss = info_nce(q, k, negative_keys=neg, temperature=0.1, reduction="none")
    cos = lambda x, y: F.cosine_similarity(x, y, dim=-1)  # noqa: E731
    logits = torch.cat([cos(q, k)[:, None], cos(q[:, None], neg)], dim=1) / 0.1
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.zeros(10, dtype=torch.long), reduction="none"))
    lg, _ = info_nce_logits(q, k, negative_keys=neg, temperature=0.1)
    torch.testing.assert_close(lg, logits)
    # invariant to rescaling query or keys (cosine)
    torch.testing.assert_close(info_nce(3 * q, 0.5 * k, negative_keys=7 * neg, reduction="none"), loss)


def test_info_nce_batch_negatives_equals_cross_entropy():
    torch.manual_seed(3)
    q, k = torch.randn(7, 4, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64)
    logits = (F.normalize(q, dim=1) @ F.normalize(k, dim=1).T) / 0.2
    torch.testing.assert_close(info_nce(q, k, negatives="batch", temperature=0.2), F.cross_entropy(logits, torch.arange(7)))
    dot = info_nce(q, k, negatives="batch", temperature=0.2, similarity="dot")
    torch.testing.assert_close(dot, F.cross_entropy(q @ k.T / 0.2, torch.arange(7)))


def test_info_nce_equal_similarities_and_masked_negatives():
    q = torch.ones(3, 4)
    loss = info_nce(q, q, negative_keys=torch.ones(3, 5, 4), reduction="none")
    torch.testing.assert_close(loss, torch.full((3,), math.log(6.0)))
    mask = torch.tensor([[True] * 5, [True, True, False, False, False], [False] * 5])
    loss = info_nce(q, q, negative_keys=torch.ones(3, 5, 4), negative_mask=mask, reduction="none")
    torch.testing.assert_close(loss, torch.tensor([math.log(6.0), math.log(3.0), 0.0]))
    x = torch.randn(3, 4, requires_grad=True)
    info_nce(x, torch.randn(3, 4), negative_keys=torch.randn(3, 5, 4), negative_mask=mask).backward()
    assert bool(torch.isfinite(x.grad).all())


def test_multi_target_weights_and_reductions():
    torch.manual_seed(4)
    terms = [ContrastiveTarget(torch.randn(6, 8), torch.randn(6, 8), torch.randn(6, 3, 8)) for _ in range(3)]
    single = [info_nce(t.query, t.key, negative_keys=t.negative_keys) for t in terms]
    a, b, c = st_align_weights(0.3, 0.3)
    assert math.isclose(a + b + c, 1.0) and math.isclose(c, 0.4)
    torch.testing.assert_close(multi_target_info_nce(terms, (a, b, c)), a * single[0] + b * single[1] + c * single[2])
    torch.testing.assert_close(multi_target_info_nce(terms, st_align_weights(1.0, 0.0)), single[0])  # spot only
    torch.testing.assert_close(multi_target_info_nce(terms, st_align_weights(0.0, 0.0)), single[2])  # cross-level only
    # tuples are accepted
    torch.testing.assert_close(multi_target_info_nce([tuple(t[:3]) for t in terms], (a, b, c)), multi_target_info_nce(terms, (a, b, c)))
    with pytest.raises(ValueError, match="alpha \\+ beta"):
        st_align_weights(0.7, 0.5)
    with pytest.raises(ValueError, match="one weight per target"):
        multi_target_info_nce(terms, (1.0,))


def test_info_nce_errors_name_the_fix():
    q = torch.randn(4, 8, 16)
    with pytest.raises(ValueError, match="pool or flatten"):
        info_nce(q, q, negatives="batch")
    with pytest.raises(ValueError, match="negative_keys"):
        info_nce(torch.randn(4, 3), torch.randn(4, 3))
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.randn(4, 3), torch.randn(4, 3), negatives="batch", temperature=0.0)
    with pytest.raises(ValueError, match=r"\(N, M, D\)"):
        info_nce(torch.randn(4, 3), torch.randn(4, 3), negative_keys=torch.randn(4, 3))

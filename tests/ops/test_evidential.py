"""Dempster–Shafer algebra over Dirichlet parameters (attnfuse.ops.evidential).

The oracle is the opinion-space rule written out per element in Python floats (``_dempster_scalar``),
independent of both library implementations.
"""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse.ops import (
    alpha_from_opinion,
    conflict,
    dempster_combine,
    dempster_combine_many,
    opinion_from_alpha,
    opinion_from_evidence,
)
from attnfuse.ops.evidential import dempster_combine_reference


def _dempster_scalar(alpha_a: list[float], alpha_b: list[float]) -> list[float]:
    """TMC's reduced Dempster rule, one opinion pair, plain Python."""
    k = len(alpha_a)
    s_a, s_b = sum(alpha_a), sum(alpha_b)
    b_a = [(a - 1) / s_a for a in alpha_a]
    b_b = [(a - 1) / s_b for a in alpha_b]
    u_a, u_b = k / s_a, k / s_b
    c = sum(b_a[i] * b_b[j] for i in range(k) for j in range(k) if i != j)
    b = [(b_a[i] * b_b[i] + b_a[i] * u_b + b_b[i] * u_a) / (1 - c) for i in range(k)]
    u = u_a * u_b / (1 - c)
    s = k / u
    return [bi * s + 1 for bi in b]


def _random_alpha(*shape: int, dtype=torch.float64, scale: float = 5.0) -> torch.Tensor:
    return 1 + scale * torch.rand(*shape, dtype=dtype)


def test_opinion_from_evidence_hand_example_and_normalisation():
    b, u = opinion_from_evidence(torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(b, torch.tensor([[0.5, 0.0], [0.0, 0.0]]))
    torch.testing.assert_close(u, torch.tensor([[0.5], [1.0]]))
    torch.manual_seed(0)
    e = 10 * torch.rand(4, 3, 5, dtype=torch.float64)
    b, u = opinion_from_evidence(e)
    assert b.shape == (4, 3, 5) and u.shape == (4, 3, 1)
    torch.testing.assert_close(b.sum(-1, keepdim=True) + u, torch.ones(4, 3, 1, dtype=torch.float64))
    b2, u2 = opinion_from_alpha(e + 1)
    torch.testing.assert_close(b2, b)
    torch.testing.assert_close(u2, u)
    torch.testing.assert_close(alpha_from_opinion(b, u), e + 1)


def test_hand_computed_example():
    # K = 2; a: e = (2, 0) -> b = (1/2, 0), u = 1/2 ; b: e = (1, 1) -> b = (1/4, 1/4), u = 1/2
    # C = b_a1 b_b2 + b_a2 b_b1 = 1/8;  b_1 = (1/8 + 1/4 + 1/8) / (7/8) = 4/7,  b_2 = (1/8) / (7/8) = 1/7
    # u = (1/4) / (7/8) = 2/7  ->  S = 7,  e = (4, 1),  alpha = (5, 2)
    a = torch.tensor([3.0, 1.0], dtype=torch.float64)
    b = torch.tensor([2.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(conflict(a, b), torch.tensor([1 / 8], dtype=torch.float64))
    torch.testing.assert_close(dempster_combine(a, b), torch.tensor([5.0, 2.0], dtype=torch.float64))
    torch.testing.assert_close(dempster_combine_reference(a, b), torch.tensor([5.0, 2.0], dtype=torch.float64))
    fb, fu = opinion_from_alpha(dempster_combine(a, b))
    torch.testing.assert_close(fb, torch.tensor([4 / 7, 1 / 7], dtype=torch.float64))
    torch.testing.assert_close(fu, torch.tensor([2 / 7], dtype=torch.float64))


def test_closed_form_matches_the_opinion_space_rule():
    torch.manual_seed(1)
    a, b = _random_alpha(64, 4), _random_alpha(64, 4)
    want = torch.tensor([_dempster_scalar(x.tolist(), y.tolist()) for x, y in zip(a, b)], dtype=torch.float64)
    torch.testing.assert_close(dempster_combine(a, b), want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dempster_combine_reference(a, b), want, rtol=1e-12, atol=1e-12)


def test_gradients_match_the_reference():
    torch.manual_seed(2)
    a = _random_alpha(6, 3).requires_grad_()
    b = _random_alpha(6, 3).requires_grad_()
    g = torch.randn(6, 3, dtype=torch.float64)
    ga, gb = torch.autograd.grad((dempster_combine(a, b) * g).sum(), (a, b))
    ra, rb = torch.autograd.grad((dempster_combine_reference(a, b) * g).sum(), (a, b))
    torch.testing.assert_close(ga, ra)
    torch.testing.assert_close(gb, rb)
    assert torch.autograd.gradcheck(dempster_combine, (a, b))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_vacuous_opinion_is_the_identity_exactly(dtype):
    torch.manual_seed(3)
    a = (1 + 100 * torch.rand(8, 5, 5, 3)).to(dtype)
    vac = torch.ones_like(a)
    assert torch.equal(dempster_combine(a, vac), a)
    assert torch.equal(dempster_combine(vac, a), a)
    assert torch.equal(dempster_combine(a, torch.ones(3, dtype=dtype)), a)  # broadcast vacuous


def test_commutative_associative_normalised_and_uncertainty_shrinks():
    torch.manual_seed(4)
    a, b, c = _random_alpha(32, 4), _random_alpha(32, 4), _random_alpha(32, 4)
    assert torch.equal(dempster_combine(a, b), dempster_combine(b, a))  # bitwise
    torch.testing.assert_close(dempster_combine(dempster_combine(a, b), c), dempster_combine(a, dempster_combine(b, c)))
    torch.testing.assert_close(dempster_combine(dempster_combine(a, c), b), dempster_combine(dempster_combine(c, b), a))
    fused = dempster_combine(a, b)
    fb, fu = opinion_from_alpha(fused)
    torch.testing.assert_close(fb.sum(-1, keepdim=True) + fu, torch.ones_like(fu))
    _, u_a = opinion_from_alpha(a)
    _, u_b = opinion_from_alpha(b)
    assert bool((fu <= torch.minimum(u_a, u_b)).all())
    assert bool((fu < torch.minimum(u_a, u_b)).all())  # strictly, since both carry evidence
    # not evidence addition
    assert not torch.allclose(fused - 1, (a - 1) + (b - 1))


def test_conflict_range_and_definition():
    torch.manual_seed(5)
    a, b = _random_alpha(100, 3), _random_alpha(100, 3)
    c = conflict(a, b)
    assert c.shape == (100, 1)
    assert bool((c >= 0).all()) and bool((c < 1).all())
    ba, _ = opinion_from_alpha(a)
    bb, _ = opinion_from_alpha(b)
    explicit = torch.stack([sum(ba[n, i] * bb[n, j] for i in range(3) for j in range(3) if i != j) for n in range(100)])
    torch.testing.assert_close(c.squeeze(-1), explicit)
    assert torch.equal(conflict(a, torch.ones_like(a)), torch.zeros(100, 1, dtype=torch.float64))  # vacuous never conflicts


def test_confidence_grows_when_two_agreeing_opinions_fuse():
    a = torch.tensor([[6.0, 1.0, 1.0]])
    fb, _ = opinion_from_alpha(dempster_combine(a, a))
    b, _ = opinion_from_alpha(a)
    assert fb.max() > b.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("evidence", [1e3, 1e6, 1e9, 1e15])
def test_finite_when_conflict_tends_to_one(dtype, evidence):
    a = torch.tensor([[1 + evidence, 1.0, 1.0]], dtype=dtype, requires_grad=True)
    b = torch.tensor([[1.0, 1 + evidence, 1.0]], dtype=dtype, requires_grad=True)
    fused = dempster_combine(a, b)
    assert bool(torch.isfinite(fused).all())
    # exact answer: e = (E, E, 0) and no product term (disjoint beliefs)
    want = torch.tensor([[1 + evidence, 1 + evidence, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(fused.double(), want, rtol=1e-6, atol=0)
    fb, fu = opinion_from_alpha(fused)
    assert bool(torch.isfinite(fb).all()) and bool(torch.isfinite(fu).all())
    half = evidence / (2 * evidence + 3)  # b = E / S with S = 2E + 3
    torch.testing.assert_close(fb.double(), torch.tensor([[half, half, 0.0]], dtype=torch.float64), rtol=1e-5, atol=1e-12)
    fused.sum().backward()
    assert bool(torch.isfinite(a.grad).all()) and bool(torch.isfinite(b.grad).all())
    c = conflict(a, b)
    assert bool(torch.isfinite(c).all()) and 0.99 <= c.item() <= 1.0
    ref = dempster_combine_reference(a.detach(), b.detach())
    assert bool(torch.isfinite(ref).all())


def test_overflow_is_clamped_to_finite():
    a = torch.tensor([[1e30, 1.0]], dtype=torch.float32)
    fused = dempster_combine(a, a)
    assert bool(torch.isfinite(fused).all())
    assert fused[0, 0] == torch.finfo(torch.float32).max


def test_combine_many_matches_fold_and_any_order():
    torch.manual_seed(6)
    alphas = [_random_alpha(4, 7, 7, 2) for _ in range(4)]
    fused = dempster_combine_many(alphas)
    fold = alphas[0]
    for a in alphas[1:]:
        fold = dempster_combine(fold, a)
    assert torch.equal(fused, fold)
    torch.testing.assert_close(dempster_combine_many(alphas[::-1]), fused)
    assert dempster_combine_many(alphas[:1]) is not None and torch.equal(dempster_combine_many(alphas[:1]), alphas[0])


def test_missing_source_leaves_the_others_unchanged_exactly():
    torch.manual_seed(7)
    # float32 alphas in [2**24, 2**25): there 1 + (alpha - 1) != alpha for half of the values, so
    # combining with a vacuous opinion would round; selecting does not
    alphas = [(2**24 + 2 * torch.randint(0, 2**23, (3, 5, 5, 4))).float() for _ in range(3)]
    assert not torch.equal(dempster_combine(torch.ones_like(alphas[0]), alphas[0]), alphas[0])
    present = torch.rand(3, 3, 5, 5) > 0.4  # (M, B, X, Y): per source, sample and pixel
    present[:, 0, 0, 0] = False  # a pixel with no source at all
    fused = dempster_combine_many(alphas, present_mask=present)
    for bi in range(3):
        for x in range(5):
            for y in range(5):
                here = [alphas[m][bi, x, y] for m in range(3) if present[m, bi, x, y]]
                if not here:
                    assert torch.equal(fused[bi, x, y], torch.ones(4))
                    continue
                want = here[0]
                for a in here[1:]:
                    want = dempster_combine(want, a)
                assert torch.equal(fused[bi, x, y], want), (bi, x, y)


def test_missing_source_gets_no_gradient_and_per_sample_masks_broadcast():
    torch.manual_seed(8)
    a = _random_alpha(4, 3).requires_grad_()
    b = _random_alpha(4, 3).requires_grad_()
    present = [torch.ones(4, dtype=torch.bool), torch.tensor([True, False, True, False])]
    fused = dempster_combine_many([a, b], present_mask=present)
    assert torch.equal(fused[1], a[1]) and torch.equal(fused[3], a[3])
    fused.sum().backward()
    assert torch.equal(b.grad[1], torch.zeros(3, dtype=torch.float64))
    assert bool((b.grad[0] != 0).all())
    # same result with the stacked (M, ...) mask
    assert torch.equal(dempster_combine_many([a, b], present_mask=torch.stack(present)), fused)


def test_per_pixel_shapes_and_broadcasting():
    a = _random_alpha(2, 6, 5, 4, 3)  # (B, X, Y, Z, K)
    b = _random_alpha(2, 1, 1, 1, 3)  # one opinion per sample, broadcast over voxels
    out = dempster_combine(a, b)
    assert out.shape == a.shape
    torch.testing.assert_close(out[1, 3, 2, 1], dempster_combine(a[1, 3, 2, 1], b[1, 0, 0, 0]))
    assert conflict(a, b).shape == (2, 6, 5, 4, 1)


def test_half_precision_is_computed_in_float32():
    a = _random_alpha(5, 3, dtype=torch.float32)
    b = _random_alpha(5, 3, dtype=torch.float32)
    out = dempster_combine(a.half(), b.half())
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), dempster_combine(a.half().float(), b.half().float()), rtol=1e-3, atol=1e-3)


def test_errors_are_clear():
    a = torch.ones(2, 3)
    with pytest.raises(ValueError, match="same number of classes"):
        dempster_combine(a, torch.ones(2, 4))
    with pytest.raises(TypeError, match="floating-point"):
        dempster_combine(a, torch.ones(2, 3, dtype=torch.long))
    with pytest.raises(TypeError, match="share a dtype"):
        dempster_combine(a, torch.ones(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="broadcast"):
        dempster_combine(a, torch.ones(5, 3))
    with pytest.raises(ValueError, match="at least one source"):
        dempster_combine_many([])
    with pytest.raises(ValueError, match="one mask per source"):
        dempster_combine_many([a, a], present_mask=[torch.ones(2, dtype=torch.bool)])
    with pytest.raises(TypeError, match=r"torch\.bool"):
        dempster_combine_many([a, a], present_mask=[torch.ones(2), torch.ones(2)])
    with pytest.raises(ValueError, match="leading shape"):
        dempster_combine_many([a, a], present_mask=[torch.ones(3, dtype=torch.bool)] * 2)
    with pytest.raises(ValueError, match="class axis"):
        opinion_from_evidence(torch.ones(()))


def test_uniform_k_matches_math():
    # two identical opinions with evidence E on one class, K classes: fused e = 2E + E^2 / K
    for k in (2, 3, 10):
        e = 4.0
        a = torch.ones(k, dtype=torch.float64)
        a[0] += e
        fused = dempster_combine(a, a)
        assert math.isclose(fused[0].item(), 1 + 2 * e + e * e / k)
        assert bool((fused[1:] == 1).all())

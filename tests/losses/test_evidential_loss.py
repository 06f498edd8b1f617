"""Evidential CE / KL / Dice (attnfuse.losses.evidential) against torch.distributions and Monte Carlo."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Dirichlet, kl_divergence

from attnfuse.losses import (
    dirichlet_kl_uniform,
    evidential_ce,
    evidential_dice_loss,
    evidential_loss,
    kl_annealing_coefficient,
)
from attnfuse.ops import dempster_combine


def test_expected_ce_equals_monte_carlo_estimate():
    torch.manual_seed(0)
    alpha = torch.tensor([[2.0, 1.0, 5.0, 1.5], [0.7, 3.0, 1.0, 1.0], [20.0, 1.0, 1.0, 1.0]], dtype=torch.float64)
    target = torch.tensor([2, 0, 0])
    closed = evidential_ce(alpha, target)
    n = 200_000
    p = Dirichlet(alpha).sample((n,))  # (n, N, K)
    nll = -torch.log(p.gather(-1, target[None, :, None].expand(n, 3, 1)).squeeze(-1))  # (n, N)
    mc = nll.mean(0)
    se = nll.std(0) / n**0.5
    assert bool(((closed - mc).abs() < 5 * se).all()), (closed, mc, se)
    # and the test is sharp enough to tell classes apart
    assert bool(((evidential_ce(alpha, torch.tensor([1, 1, 1])) - mc).abs() > 20 * se).any())


def test_kl_matches_torch_distributions_and_misleading_evidence():
    torch.manual_seed(1)
    alpha = 0.5 + 5 * torch.rand(6, 4, dtype=torch.float64)
    want = kl_divergence(Dirichlet(alpha), Dirichlet(torch.ones_like(alpha)))
    torch.testing.assert_close(dirichlet_kl_uniform(alpha), want)
    target = torch.randint(0, 4, (6,))
    y = torch.nn.functional.one_hot(target, 4).double()
    a_tilde = y + (1 - y) * alpha
    total = evidential_loss(alpha, target, kl_weight=0.3, reduction="none")
    expected = evidential_ce(alpha, target) + 0.3 * kl_divergence(Dirichlet(a_tilde), Dirichlet(torch.ones_like(alpha)))
    torch.testing.assert_close(total, expected)
    # KL is zero when all evidence is on the target (alpha_tilde = 1), so correct evidence is never penalised
    confident = torch.ones(6, 4, dtype=torch.float64).scatter(1, target[:, None], 50.0)
    torch.testing.assert_close(
        evidential_loss(confident, target, kl_weight=1.0, reduction="none"), evidential_ce(confident, target)
    )


def test_annealing_coefficient():
    assert kl_annealing_coefficient(0, 10) == 0.0
    assert kl_annealing_coefficient(5, 10) == 0.5
    assert kl_annealing_coefficient(10, 10) == 1.0
    assert kl_annealing_coefficient(25, 10) == 1.0
    with pytest.raises(ValueError):
        kl_annealing_coefficient(1, 0)


def test_segmentation_shapes_class_dim_one_hot_and_dice():
    torch.manual_seed(2)
    alpha = 1 + 4 * torch.rand(2, 3, 5, 6, dtype=torch.float64)  # (N, K, H, W)
    target = torch.randint(0, 3, (2, 5, 6))
    per_sample = evidential_loss(alpha, target, kl_weight=0.5, dice_weight=1.0, reduction="none")
    assert per_sample.shape == (2,)
    ce = evidential_ce(alpha, target)
    assert ce.shape == (2, 5, 6)
    # same result class-last and with a one-hot target
    alpha_cl = alpha.movedim(1, -1)
    one_hot = torch.nn.functional.one_hot(target, 3).double()
    kw = {"kl_weight": 0.5, "dice_weight": 1.0, "reduction": "none"}
    torch.testing.assert_close(evidential_loss(alpha_cl, one_hot, class_dim=-1, **kw), per_sample)
    torch.testing.assert_close(evidential_loss(alpha, one_hot.movedim(-1, 1), kl_weight=0.5, dice_weight=1.0, reduction="none"), per_sample)
    # dice by hand on the expected probabilities
    p = alpha / alpha.sum(1, keepdim=True)
    y = one_hot.movedim(-1, 1)
    inter = (p * y).sum((2, 3))
    dice = 1 - ((2 * inter + 1e-5) / (p.sum((2, 3)) + y.sum((2, 3)) + 1e-5)).mean(1)
    torch.testing.assert_close(evidential_dice_loss(alpha, target), dice)
    torch.testing.assert_close(per_sample - evidential_loss(alpha, target, kl_weight=0.5, reduction="none"), dice)
    assert torch.isclose(evidential_loss(alpha, target, reduction="sum"), evidential_loss(alpha, target, reduction="none").sum())


def test_works_on_fused_dempster_output_and_gradients_are_finite():
    torch.manual_seed(3)
    logits = torch.randn(2, 8, 8, 2, 2, requires_grad=True)  # two sources per pixel, class-last
    alpha = torch.nn.functional.softplus(logits) + 1
    fused = dempster_combine(alpha[..., 0, :], alpha[..., 1, :])  # (2, 8, 8, 2)
    target = torch.randint(0, 2, (2, 8, 8))
    loss = evidential_loss(fused, target, kl_weight=1.0, dice_weight=1.0, class_dim=-1)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(logits.grad).all())


def test_degenerate_inputs_are_finite():
    # vacuous alpha, huge alpha, single sample
    for alpha in (torch.ones(1, 3), torch.full((1, 3), 1e6), torch.tensor([[1e6, 1.0, 1.0]])):
        a = alpha.clone().requires_grad_()
        loss = evidential_loss(a, torch.tensor([1]), kl_weight=1.0, dice_weight=1.0)
        loss.backward()
        assert torch.isfinite(loss) and bool(torch.isfinite(a.grad).all())


def test_errors_are_clear():
    a = torch.ones(2, 3)
    with pytest.raises(ValueError, match="> 0"):
        evidential_loss(torch.zeros(2, 3), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        evidential_loss(a, torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="shape"):
        evidential_loss(a, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="one-hot"):
        evidential_loss(a, torch.full((2, 3), 0.5))
    with pytest.raises(TypeError, match="plain number"):
        evidential_loss(a, torch.tensor([0, 1]), kl_weight=torch.tensor(0.5))
    with pytest.raises(ValueError, match=">= 0"):
        evidential_loss(a, torch.tensor([0, 1]), kl_weight=-1.0)
    with pytest.raises(ValueError, match="reduction"):
        evidential_loss(a, torch.tensor([0, 1]), reduction="avg")
    with pytest.raises(ValueError, match="N, K"):
        evidential_loss(torch.ones(3), torch.tensor(0))

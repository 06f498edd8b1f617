"""Wayformer GMM loss / aggregation and the MoH load-balance loss."""

from __future__ import annotations

import pytest
import torch
from torch.distributions import Categorical, Independent, Normal

from attnfuse.losses import (
    aggregate_trajectories,
    closest_mode,
    gmm_hard_assignment_nll,
    moh_load_balance_loss,
    trajectory_distance,
)

# ----------------------------------------------------------------------------- Wayformer loss


def _gmm_batch(b=5, m=4, t=6, p=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, m, generator=g, dtype=torch.float64)
    mean = torch.randn(b, m, t, p, generator=g, dtype=torch.float64) * 3
    log_std = 0.3 * torch.randn(b, m, t, p, generator=g, dtype=torch.float64)
    target = torch.randn(b, t, p, generator=g, dtype=torch.float64) * 3
    return logits, mean, log_std, target


def test_gmm_loss_equals_torch_distributions():
    logits, mean, log_std, target = _gmm_batch()
    loss = gmm_hard_assignment_nll(logits, mean, log_std, target, reduction="none")
    dist = (mean - target[:, None]).pow(2).sum(-1).sqrt().mean(-1)  # (B, M) mean L2 over time
    idx = dist.argmin(1)
    rows = torch.arange(5)
    want = -Categorical(logits=logits).log_prob(idx) - Independent(
        Normal(mean[rows, idx], log_std[rows, idx].exp()), 2
    ).log_prob(target)
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(gmm_hard_assignment_nll(logits, mean, log_std, target), want.mean())
    assert torch.equal(closest_mode(mean, target), idx)


def test_gmm_loss_picks_the_mode_closest_to_the_truth_not_the_likeliest():
    logits, mean, log_std, target = _gmm_batch(b=1, m=3)
    mean[0, 2] = target[0] + 0.01  # mode 2 is the truth
    logits[0] = torch.tensor([10.0, 0.0, -10.0], dtype=torch.float64)
    assert closest_mode(mean, target).item() == 2
    loss = gmm_hard_assignment_nll(logits, mean, log_std, target)
    assert loss.item() > 19  # CE on the unlikely mode dominates


def test_gmm_step_mask_ignores_steps_and_gradients_are_finite():
    logits, mean, log_std, target = _gmm_batch()
    mask = torch.ones(5, 6, dtype=torch.bool)
    mask[:, 4:] = False
    masked = gmm_hard_assignment_nll(logits, mean, log_std, target, step_mask=mask, reduction="none")
    cropped = gmm_hard_assignment_nll(logits, mean[:, :, :4], log_std[:, :, :4], target[:, :4], reduction="none")
    torch.testing.assert_close(masked, cropped)
    mask[0] = False  # a sample with no valid step: only its CE term
    lg, mn, ls = (x.clone().requires_grad_() for x in (logits, mean, log_std))
    out = gmm_hard_assignment_nll(lg, mn, ls, target, step_mask=mask, reduction="none")
    out.sum().backward()
    assert torch.isfinite(out).all() and all(bool(torch.isfinite(x.grad).all()) for x in (lg, mn, ls))
    # prediction exactly on the truth: distance 0 must not give NaN
    mn2 = mean.clone()
    mn2[:, 0] = target
    mn2.requires_grad_()
    gmm_hard_assignment_nll(logits, mn2, log_std, target).backward()
    assert bool(torch.isfinite(mn2.grad).all())


def test_gmm_errors():
    logits, mean, log_std, target = _gmm_batch()
    with pytest.raises(ValueError, match="logits"):
        gmm_hard_assignment_nll(logits[:, :3], mean, log_std, target)
    with pytest.raises(ValueError, match="target"):
        gmm_hard_assignment_nll(logits, mean, log_std, target[:, :3])
    with pytest.raises(ValueError, match="log_std"):
        gmm_hard_assignment_nll(logits, mean, log_std[..., :1], target)
    with pytest.raises(ValueError, match=r"\(B, M, T, P\)"):
        gmm_hard_assignment_nll(logits, mean[0], log_std, target)


def test_trajectory_distances():
    a = torch.zeros(1, 4, 2)
    b = torch.tensor([[[0.0, 1.0], [0.0, 2.0], [0.0, 3.0], [0.0, 4.0]]])
    assert trajectory_distance(a, b).item() == 2.5
    assert trajectory_distance(a, b, distance="final_l2").item() == 4.0
    assert trajectory_distance(a, b, distance="max_l2").item() == 4.0
    m = torch.tensor([[True, True, False, False]])
    assert trajectory_distance(a, b, distance="final_l2", step_mask=m).item() == 2.0
    assert trajectory_distance(a, b, step_mask=m).item() == 1.5


# ----------------------------------------------------------------------------- aggregation


def test_aggregation_covers_every_mode_and_returns_at_most_k():
    torch.manual_seed(5)
    b, m, t = 3, 64, 8
    trajs = torch.randn(b, m, t, 2) * 4
    probs = torch.softmax(torch.randn(b, m), dim=1)
    p, c, valid = aggregate_trajectories(probs, trajs, num_output=m, distance_threshold=2.3, iterations=0)
    assert p.shape == (b, m) and c.shape == (b, m, t, 2) and valid.shape == (b, m)
    for i in range(b):
        centres = c[i, valid[i]]
        d = trajectory_distance(trajs[i][:, None], centres[None])  # (M, n_centres)
        assert bool((d.min(1).values <= 2.3 + 1e-6).all())  # every input mode within D of a greedy centroid
    torch.testing.assert_close(p.sum(1), torch.ones(b))  # probability mass is conserved
    p6, c6, _ = aggregate_trajectories(probs, trajs, num_output=6, distance_threshold=2.3, iterations=3)
    assert p6.shape == (b, 6) and c6.shape == (b, 6, t, 2)
    assert bool((p6[:, :-1] >= p6[:, 1:]).all())  # sorted
    torch.testing.assert_close(p6.sum(1), torch.ones(b))


def test_aggregation_merges_clusters():
    # two tight clusters of modes: two output modes at the clusters' weighted means
    base = torch.zeros(1, 4, 3, 2)
    base[0, :2] = 0.0
    base[0, 2:] = 10.0
    base[0, 1] += 0.2
    probs = torch.tensor([[0.3, 0.1, 0.4, 0.2]])
    p, c, valid = aggregate_trajectories(probs, base, num_output=3, distance_threshold=1.0, iterations=2)
    assert valid.tolist() == [[True, True, False]]
    torch.testing.assert_close(p, torch.tensor([[0.6, 0.4, 0.0]]))
    torch.testing.assert_close(c[0, 0], torch.full((3, 2), 10.0))
    torch.testing.assert_close(c[0, 1], torch.full((3, 2), 0.2 * 0.1 / 0.4))


# ----------------------------------------------------------------------------- MoH load balance


def test_moh_balance_formula_against_a_loop_and_the_official_normalisation():
    torch.manual_seed(6)
    e, k = 6, 2
    logits = torch.randn(2, 10, e, dtype=torch.float64)
    probs = torch.softmax(logits, -1)
    top = probs.topk(k, dim=-1).indices  # (B, L, k)
    flat_p, flat_top = probs.reshape(-1, e), top.reshape(-1, k)
    n = flat_p.shape[0]
    want = 0.0
    for i in range(e):
        f_i = sum(1.0 for row in flat_top.tolist() if i in row) / n
        p_i = flat_p[:, i].sum().item() / n
        want += f_i * p_i
    got = moh_load_balance_loss(probs, top)
    assert abs(got.item() - want) < 1e-12
    mask = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, top, True)
    torch.testing.assert_close(moh_load_balance_loss(probs, mask), got)
    # MoH-ViT's released value: mean(me * ce) * E * E = E * sum_i f_i P_i
    me, ce = flat_p.mean(0), mask.reshape(-1, e).double().mean(0)
    torch.testing.assert_close(moh_load_balance_loss(probs, top, normalization="code"), torch.mean(me * ce) * e * e)


def test_moh_balance_balanced_vs_collapsed_mask_and_gradient():
    e, k, n = 4, 2, 8
    uniform = torch.full((n, e), 1 / e)
    balanced = torch.tensor([[0, 1], [2, 3]] * (n // 2))
    assert abs(moh_load_balance_loss(uniform, balanced).item() - k / e) < 1e-7
    collapsed_p = torch.tensor([[0.5, 0.5, 0.0, 0.0]]).repeat(n, 1)
    collapsed = torch.tensor([[0, 1]]).repeat(n, 1)
    assert moh_load_balance_loss(collapsed_p, collapsed).item() > moh_load_balance_loss(uniform, balanced).item()
    # padding tokens are left out
    pad = torch.ones(n + 3, dtype=torch.bool)
    pad[n:] = False
    p_pad = torch.cat([uniform, torch.tensor([[1.0, 0, 0, 0]] * 3)])
    s_pad = torch.cat([balanced, torch.tensor([[0, 1]] * 3)])
    torch.testing.assert_close(moh_load_balance_loss(p_pad, s_pad, token_mask=pad), moh_load_balance_loss(uniform, balanced))
    assert moh_load_balance_loss(p_pad, s_pad, token_mask=torch.zeros(n + 3, dtype=torch.bool)).item() == 0.0
    # gradients reach the router probabilities only
    logits = torch.randn(n, e, requires_grad=True)
    probs = torch.softmax(logits, -1)
    moh_load_balance_loss(probs, probs.topk(k, -1).indices).backward()
    assert bool(torch.isfinite(logits.grad).all()) and logits.grad.abs().sum() > 0


def test_moh_balance_errors():
    p = torch.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        moh_load_balance_loss(p, torch.tensor([[0], [1], [2], [3]]))
    with pytest.raises(ValueError, match="shape"):
        moh_load_balance_loss(p, torch.ones(4, 2, dtype=torch.bool))
    with pytest.raises(TypeError):
        moh_load_balance_loss(p, torch.ones(4, 3))
    with pytest.raises(ValueError, match="normalization"):
        moh_load_balance_loss(p, torch.ones(4, 3, dtype=torch.bool), normalization="x")

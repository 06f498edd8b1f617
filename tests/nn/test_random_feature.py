"""RandomFeatureAttention (spec random-feature-attention.md, invariants 1, 2, 4-7)."""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse.nn import RandomFeatureAttention

F64 = torch.float64
D, M, N = 4, 6, 5


def _sphere(*shape, d=D, seed=0):
    x = torch.randn(*shape, d, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return x / x.norm(dim=-1, keepdim=True) * math.sqrt(d)


def _rfa(**kw):
    rfa = RandomFeatureAttention(D, M, seed=0, dtype=F64, **kw)
    with torch.no_grad():
        rfa.values.normal_(generator=torch.Generator().manual_seed(1))
    return rfa


def test_matches_the_explicit_formula():
    rfa = _rfa(qk_mean=2.0)
    x0, xs = _sphere(3), _sphere(3, N, seed=1)
    s = torch.stack([torch.stack([torch.stack([x0[b] @ rfa.W[m] @ xs[b, i] / D for i in range(N)]) for m in range(M)])
                     for b in range(3)])  # (B, M, N)
    torch.testing.assert_close(rfa.scores(x0, xs), s)
    vt = torch.cat([xs, torch.ones(3, N, 1, dtype=F64)], -1)  # (B, N, d + 1)
    want = torch.einsum("bmn,bnc,mc->b", torch.exp(s), vt, rfa.values) / N
    torch.testing.assert_close(rfa(x0, xs), want)
    soft = RandomFeatureAttention(D, M, seed=0, dtype=F64, qk_mean=2.0, normalize="sum")
    soft.values.data.copy_(rfa.values)
    torch.testing.assert_close(soft(x0, xs), torch.einsum("bmn,bnc,mc->b", torch.softmax(s, -1), vt, rfa.values))


def test_key_permutation_duplication_and_masking():
    rfa = _rfa(qk_mean=1.0)
    x0, xs = _sphere(3), _sphere(3, N, seed=1)
    f = rfa(x0, xs)
    torch.testing.assert_close(rfa(x0, xs[:, torch.randperm(N)]), f)
    torch.testing.assert_close(rfa(x0, torch.cat([xs, xs], 1)), f)  # count normalisation: duplicates change nothing
    extra = _sphere(3, 2, seed=2) * 5
    mask = torch.ones(3, N + 2, dtype=torch.bool)
    mask[:, N:] = False
    torch.testing.assert_close(rfa(x0, torch.cat([xs, extra], 1), mask), f)  # masked keys = deleted keys
    assert not torch.allclose(rfa(x0, torch.cat([xs, extra], 1)), f)


def test_only_the_values_train_and_qk_stays_bit_identical():
    rfa = _rfa()
    assert [n for n, p in rfa.named_parameters() if p.requires_grad] == ["values"]
    assert not rfa.W.requires_grad and "W" in rfa.state_dict()
    w = rfa.W.clone()
    opt = torch.optim.Adam(rfa.parameters(), lr=0.1)
    x0, xs = _sphere(8), _sphere(8, N, seed=1)
    before = rfa.values.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        rfa(x0, xs).square().mean().backward()
        assert rfa.W.grad is None
        opt.step()
    assert torch.equal(rfa.W, w) and not torch.equal(rfa.values, before)
    torch.testing.assert_close(RandomFeatureAttention(D, M, seed=0, dtype=F64).W, w, rtol=0, atol=0)  # same seed, same W
    assert not torch.equal(RandomFeatureAttention(D, M, seed=1, dtype=F64).W, w)


def test_linear_in_values_and_gradient_zero_at_the_ridge_solution():
    rfa = _rfa(qk_mean=2.0)
    x0, xs = _sphere(40), _sphere(40, N, seed=1)
    v1, v2 = torch.randn(2, *rfa.values.shape, dtype=F64)

    def f(v):
        rfa.values.data.copy_(v)
        return rfa(x0, xs)

    torch.testing.assert_close(f(v1 + v2), f(v1) + f(v2))
    assert torch.equal(f(torch.zeros_like(v1)), torch.zeros(40, dtype=F64))
    # the ridge solution of the feature matrix is a stationary point of the module's own loss
    y = torch.randn(40, dtype=F64)
    phi, lam = rfa.features(x0, xs).detach(), 1e-2
    w = torch.linalg.solve(phi.T @ phi / 40 + lam * torch.eye(phi.shape[1], dtype=F64), phi.T @ y / 40)
    rfa.values.data.copy_(w.view_as(rfa.values))
    rfa.values.grad = None
    ((rfa(x0, xs) - y).square().mean() / 2 + lam / 2 * rfa.values.square().sum()).backward()
    assert rfa.values.grad.abs().max() < 1e-9


@pytest.mark.parametrize("c", [0.0, 2.0])
def test_kernel_mean_and_score_scale_over_many_heads(c):
    d = 8
    rfa = RandomFeatureAttention(d, 20_000, qk_mean=c, seed=3, dtype=F64)
    x0, xs = _sphere(50, d=d, seed=4), _sphere(50, 1, d=d, seed=5)
    s = rfa.scores(x0, xs)[:, :, 0]  # (50 pairs, M)
    cos = (x0 * xs[:, 0]).sum(-1) / d
    rel = (torch.exp(s).mean(1) / torch.exp(c * cos + 0.5) - 1).abs()
    assert rel.max() < 0.03
    assert (s.mean(1) - c * cos).abs().max() < 0.05 and (s.var(1) - 1).abs().max() < 0.06


def test_bad_inputs_raise():
    rfa = _rfa()
    with pytest.raises(ValueError, match=r"x0 must be \(B, d=4\)"):
        rfa(torch.randn(2, 3, dtype=F64), torch.randn(2, N, D, dtype=F64))
    with pytest.raises(ValueError, match="key_mask must be bool"):
        rfa(torch.randn(2, D, dtype=F64), torch.randn(2, N, D, dtype=F64), torch.ones(2, N))
    with pytest.raises(ValueError, match="activation must be one of"):
        RandomFeatureAttention(D, M, activation="tanh")

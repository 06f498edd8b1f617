"""BudgetRouter (VISOR): configurations and costs, monotone cost, random / fixed / policy modes, pseudo-labels, run_where."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnfuse.fusion import BudgetRouter, TokenSet, run_where

D = 8


def special(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"special": TokenSet(torch.randn(batch, 3, D, generator=g))}


def router(**kw):
    torch.manual_seed(0)
    return BudgetRouter("special", D, num_sites=3, site_costs=[2.0, 3.0, 5.0], base_cost=1.0, **kw)


def test_configs_sorted_by_cost_with_site_masks():
    r = router()
    assert len(r.configs) == 8 and r.configs[0] == () and r.configs[-1] == (0, 1, 2)
    assert torch.all(r.costs[1:] >= r.costs[:-1])
    for row, c in enumerate(r.configs):
        assert r.site_masks[row].nonzero().flatten().tolist() == list(c)
        assert r.costs[row].item() == 1.0 + sum([2.0, 3.0, 5.0][i] for i in c)
    custom = BudgetRouter("special", D, num_sites=4, configs=[(0, 1, 2, 3), (), (3,)])
    assert custom.configs == ((), (3,), (0, 1, 2, 3))
    with pytest.raises(ValueError, match="distinct"):
        BudgetRouter("special", D, num_sites=2, configs=[(0,), (0,)])
    with pytest.raises(ValueError, match="indices"):
        BudgetRouter("special", D, num_sites=2, configs=[(2,)])


def test_fixed_mode_cost_is_monotone_in_budget_and_within_it():
    r = router()
    budgets = torch.linspace(0.0, 13.0, 60)
    costs = [r({"special": special()["special"]}, mode="fixed", budget=float(b)).cost[0].item() for b in budgets]
    assert all(b >= a for a, b in itertools.pairwise(costs))
    assert all(c <= b or c == 1.0 for c, b in zip(costs, budgets.tolist()))  # the cheapest config always runs
    per_sample = r(special(), mode="fixed", budget=torch.tensor([0.0, 3.5, 6.0, 100.0]))
    assert per_sample.cost.tolist() == [1.0, 3.0, 6.0, 11.0]


def test_random_mode_respects_budget_and_is_reproducible():
    r = router()
    inp = special(batch=400)
    d1 = r(inp, mode="random", budget=6.0, generator=torch.Generator().manual_seed(1))
    d2 = r(inp, mode="random", budget=6.0, generator=torch.Generator().manual_seed(1))
    assert torch.equal(d1.config, d2.config) and (d1.cost <= 6.0).all()
    affordable = {i for i, c in enumerate(r.costs.tolist()) if c <= 6.0}
    assert set(d1.config.tolist()) == affordable  # every affordable configuration is drawn
    assert torch.equal(d1.site_mask, r.site_masks[d1.config])


def test_policy_is_discrete_deterministic_budgeted_and_token_order_invariant():
    r = router()
    inp = special()
    d = r(inp)
    assert d.logits.shape == (4, 8) and set(d.config.tolist()) <= set(range(8))
    assert torch.equal(r(inp).config, d.config)
    capped = r(inp, budget=4.0)
    assert (capped.cost <= 4.0).all()
    perm = torch.tensor([2, 0, 1])
    shuffled = {"special": TokenSet(inp["special"].x[:, perm])}
    torch.testing.assert_close(r.policy_logits(shuffled), d.logits, rtol=1e-5, atol=1e-6)
    empty = r({"special": inp["special"].with_mask(torch.zeros(4, 3, dtype=torch.bool))})
    assert torch.isfinite(empty.logits).all()


def test_pseudo_labels_and_policy_training():
    r = router()
    correct = torch.tensor([[False, True, True, False, True, True, True, True],
                            [False] * 8,
                            [True] * 8])
    assert r.pseudo_labels(correct).tolist() == [1, 7, 0]
    assert r.pseudo_labels(correct, fallback="ignore").tolist() == [1, -100, 0]
    with pytest.raises(ValueError, match="correct"):
        r.pseudo_labels(correct[:, :5])
    # a few steps of cross-entropy on pseudo-labels fit a separable toy problem
    inp = special(batch=32, seed=2)
    labels = (inp["special"].x.mean(1)[:, 0] > 0).long() * 3
    opt = torch.optim.Adam(r.parameters(), lr=0.05)
    losses = []
    for _ in range(30):
        loss = F.cross_entropy(r.policy_logits(inp), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert (r(inp).config == labels).float().mean() > 0.9


def test_run_where_and_universal_model_equals_static_model():
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Sequential(nn.Linear(D, D), nn.Tanh()) for _ in range(3))
    calls = []

    def make_fn(layer):
        def fn(x):
            calls.append(x.shape[0])
            return x + layer(x)
        return fn

    x = torch.randn(4, 5, D)
    r = router()
    decision = r.decision(torch.tensor([0, 3, 5, 7]))
    h = x
    for k, layer in enumerate(layers):
        h = run_where(make_fn(layer), h, decision.site_mask[:, k])
    for b, config in enumerate(decision.config.tolist()):
        static = x[b : b + 1]
        for k in r.configs[config]:
            static = static + layers[k](static)
        torch.testing.assert_close(h[b : b + 1], static)
    assert calls == [int(decision.site_mask[:, k].sum()) for k in range(3) if decision.site_mask[:, k].any()]
    full = run_where(make_fn(layers[0]), x, decision.site_mask[:, 0], skip=False)
    torch.testing.assert_close(full, run_where(make_fn(layers[0]), x, decision.site_mask[:, 0]))
    with pytest.raises(ValueError, match="run"):
        run_where(make_fn(layers[0]), x, torch.ones(3, dtype=torch.bool))


def test_export_policy_decision():
    r = router().eval()

    class Wrapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.r = r

        def forward(self, x):
            d = self.r({"special": TokenSet(x)}, budget=6.0)
            return d.config, d.cost

    inp = special()["special"].x
    exported = torch.export.export(Wrapped(), (inp,))
    other = special(seed=7)["special"].x
    for got, want in zip(exported.module()(other), Wrapped()(other)):
        torch.testing.assert_close(got, want)

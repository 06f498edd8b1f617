"""Cox partial likelihood and Harrell's C against lifelines, scikit-survival and a slow Python oracle."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnfuse.losses import class_balance_weights, concordance_index, cox_partial_likelihood


def _lifelines():
    return pytest.importorskip("lifelines")


def _slow_nll(h, t, d, w=None, ties="breslow"):
    """-log partial likelihood written as a loop over distinct event times (plain Python floats)."""
    n = len(h)
    w = [1.0] * n if w is None else list(w)
    total = 0.0
    for tg in sorted({t[i] for i in range(n) if d[i]}):
        events = [i for i in range(n) if d[i] and t[i] == tg]
        at_risk = [j for j in range(n) if t[j] >= tg]
        r = sum(w[j] * math.exp(h[j]) for j in at_risk)
        tt = sum(w[i] * math.exp(h[i]) for i in events)
        wg = sum(w[i] for i in events)
        total += sum(w[i] * h[i] for i in events)
        if ties == "breslow":
            total -= wg * math.log(r)
        else:
            dg = len(events)
            total -= wg / dg * sum(math.log(r - j / dg * tt) for j in range(dg))
    return -total


def _tied_data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, generator=g, dtype=torch.float64)
    t = torch.randint(0, 8, (n,), generator=g).double()  # many ties
    d = torch.rand(n, generator=g) < 0.6
    w = 0.5 + 4 * torch.rand(n, generator=g, dtype=torch.float64)
    return h, t, d, w


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("weighted", [False, True])
def test_matches_slow_reference_with_ties_and_weights(ties, weighted):
    h, t, d, w = _tied_data()
    w = w if weighted else None
    got = cox_partial_likelihood(h, t, d, w, ties=ties, reduction="sum")
    want = _slow_nll(h.tolist(), t.tolist(), d.tolist(), None if w is None else w.tolist(), ties)
    assert abs(got.item() - want) < 1e-10 * max(1.0, abs(want))
    mean = cox_partial_likelihood(h, t, d, w, ties=ties, reduction="mean")
    denom = d.sum().item() if w is None else w[d].sum().item()
    assert abs(mean.item() - want / denom) < 1e-12 * max(1.0, abs(want))


def _rossi():
    load_rossi = _lifelines().datasets.load_rossi

    df = load_rossi()
    x = df.drop(columns=["week", "arrest"]).to_numpy(dtype=np.float64)
    return df, x, df["week"].to_numpy(np.float64), df["arrest"].to_numpy().astype(bool)


def _gbsg2():
    sksurv_data = pytest.importorskip("sksurv.datasets")
    x, y = sksurv_data.load_gbsg2()
    x = x.assign(
        horTh=(x["horTh"] == "yes").astype(float),
        menostat=(x["menostat"] == "Post").astype(float),
        tgrade=x["tgrade"].cat.codes.astype(float),
    )
    return x.to_numpy(np.float64), y["time"].astype(np.float64), y["cens"].astype(bool)


def _breast_cancer():
    sksurv_data = pytest.importorskip("sksurv.datasets")
    x, y = sksurv_data.load_breast_cancer()
    x = x.select_dtypes("number").iloc[:, :12]  # a few gene probes + clinical numerics
    return x.to_numpy(np.float64), y["t.tdm"].astype(np.float64), y["e.tdm"].astype(bool)


def test_efron_equals_lifelines_fitted_log_likelihood_on_rossi():
    df, x, t, d = _rossi()
    cph = _lifelines().CoxPHFitter().fit(df, duration_col="week", event_col="arrest")
    risk = torch.from_numpy(x @ cph.params_.to_numpy())
    got = cox_partial_likelihood(risk, torch.from_numpy(t), torch.from_numpy(d), ties="efron", reduction="sum")
    assert abs(got.item() + cph.log_likelihood_) < 1e-8
    # Breslow differs on rossi (tied weeks), so the test can tell the two apart
    bres = cox_partial_likelihood(risk, torch.from_numpy(t), torch.from_numpy(d), ties="breslow", reduction="sum")
    assert abs(bres.item() + cph.log_likelihood_) > 1e-3


def test_weighted_efron_equals_lifelines_weights_col_on_rossi():
    df, x, t, d = _rossi()
    w = np.where(d, 5.0, 1.0)  # BioFusionNet's class-imbalance weights
    cph = _lifelines().CoxPHFitter().fit(df.assign(w=w), duration_col="week", event_col="arrest", weights_col="w")
    risk = torch.from_numpy(x @ cph.params_.to_numpy())
    weights = class_balance_weights(torch.from_numpy(d), 5.0).double()
    torch.testing.assert_close(weights, torch.from_numpy(w))
    got = cox_partial_likelihood(risk, torch.from_numpy(t), torch.from_numpy(d), weights, ties="efron", reduction="sum")
    assert abs(got.item() + cph.log_likelihood_) < 1e-8


@pytest.mark.parametrize("loader", [_rossi, _gbsg2, _breast_cancer], ids=["rossi", "gbsg2", "breast_cancer"])
def test_equals_lifelines_efron_at_fixed_coefficients(loader):
    out = loader()
    x, t, d = out[-3:]
    order = np.argsort(t, kind="stable")
    x, t, d = x[order], t[order], d[order]
    beta = np.random.default_rng(0).normal(scale=0.5 / np.maximum(x.std(0), 1e-12))  # a fixed, non-fitted beta
    import pandas as pd

    _lifelines()
    from lifelines.fitters.coxph_fitter import SemiParametricPHFitter

    # lifelines' own Efron log-likelihood routine (the one CoxPHFitter's Newton steps call), at our beta
    _, _, log_lik = SemiParametricPHFitter()._get_efron_values_single(
        pd.DataFrame(x), pd.Series(t), pd.Series(d), pd.Series(np.ones(len(t))), None, beta
    )
    risk = torch.from_numpy(x @ beta)
    got = cox_partial_likelihood(risk, torch.from_numpy(t), torch.from_numpy(d), ties="efron", reduction="sum")
    assert abs(got.item() + log_lik) < 1e-8 * max(1.0, abs(log_lik))


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("loader", [_rossi, _gbsg2, _breast_cancer], ids=["rossi", "gbsg2", "breast_cancer"])
def test_equals_scikit_survival_at_fixed_coefficients(loader, ties):
    coxph = pytest.importorskip("sksurv.linear_model.coxph")
    x, t, d = loader()[-3:]
    beta = np.random.default_rng(1).normal(scale=0.5 / np.maximum(x.std(0), 1e-12))
    opt = coxph.CoxPHOptimizer(x, d, t, np.zeros(x.shape[1]), ties)
    want = opt.nlog_likelihood(beta) * len(t)  # scikit-survival divides by the number of samples
    risk = torch.from_numpy(x @ beta)
    got = cox_partial_likelihood(risk, torch.from_numpy(t), torch.from_numpy(d), ties=ties, reduction="sum")
    assert abs(got.item() - want) < 1e-8 * max(1.0, abs(want))


def test_gradcheck_float64():
    h, t, d, w = _tied_data(n=12, seed=3)
    for ties in ("breslow", "efron"):
        for weights in (None, w):

            def f(r, ties=ties, weights=weights):
                return cox_partial_likelihood(r, t, d, weights, ties=ties)

            assert torch.autograd.gradcheck(f, (h.clone().requires_grad_(),))


def test_invariances_shift_permutation_uniform_weights_and_no_ties():
    h, t, d, _ = _tied_data(n=30, seed=4)
    for ties in ("breslow", "efron"):
        base = cox_partial_likelihood(h, t, d, ties=ties)
        torch.testing.assert_close(cox_partial_likelihood(h + 3.7, t, d, ties=ties), base)
        perm = torch.randperm(30, generator=torch.Generator().manual_seed(0))
        torch.testing.assert_close(cox_partial_likelihood(h[perm], t[perm], d[perm], ties=ties), base)
        # w = c: loss + log c, same gradient
        hg = h.clone().requires_grad_()
        (g1,) = torch.autograd.grad(cox_partial_likelihood(hg, t, d, ties=ties), hg)
        c = torch.full_like(h, 5.0)
        lc = cox_partial_likelihood(hg, t, d, c, ties=ties)
        (g2,) = torch.autograd.grad(lc, hg)
        torch.testing.assert_close(lc, base + math.log(5.0))
        torch.testing.assert_close(g1, g2)
    # without tied times Breslow == Efron
    t_unique = torch.arange(30, dtype=torch.float64)
    torch.testing.assert_close(
        cox_partial_likelihood(h, t_unique, d, ties="breslow"), cox_partial_likelihood(h, t_unique, d, ties="efron")
    )


def test_orders_by_time_not_by_risk():
    # BioFusionNet's released loss sorts by predicted risk: it would give the same value for any times
    h = torch.tensor([2.0, 0.0, 1.0], dtype=torch.float64)
    d = torch.tensor([True, True, True])
    a = cox_partial_likelihood(h, torch.tensor([1.0, 2.0, 3.0]), d, reduction="sum")
    b = cox_partial_likelihood(h, torch.tensor([3.0, 2.0, 1.0]), d, reduction="sum")
    assert abs(a.item() - _slow_nll(h.tolist(), [1, 2, 3], [1, 1, 1])) < 1e-12
    assert abs(a.item() - b.item()) > 0.1


@pytest.mark.parametrize("ties", ["breslow", "efron"])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_degenerate_batches_are_defined(ties, reduction):
    h = torch.randn(5, dtype=torch.float64, requires_grad=True)
    loss = cox_partial_likelihood(h, torch.arange(5.0), torch.zeros(5, dtype=torch.bool), ties=ties, reduction=reduction)
    assert loss.item() == 0.0
    (g,) = torch.autograd.grad(loss, h)
    assert torch.equal(g, torch.zeros(5, dtype=torch.float64))
    for event in (True, False):
        one = torch.tensor([0.7], requires_grad=True)
        loss = cox_partial_likelihood(one, torch.tensor([3.0]), torch.tensor([event]), ties=ties, reduction=reduction)
        assert loss.item() == 0.0 and torch.isfinite(loss)
        (g,) = torch.autograd.grad(loss, one)
        assert g.item() == 0.0
    # all events at one time (Efron's largest correction) and extreme risks stay finite
    big = torch.tensor([80.0, -80.0, 60.0, 0.0], requires_grad=True)
    loss = cox_partial_likelihood(big, torch.ones(4), torch.ones(4, dtype=torch.bool), ties=ties, reduction=reduction)
    (g,) = torch.autograd.grad(loss, big)
    assert torch.isfinite(loss) and bool(torch.isfinite(g).all())


def test_float32_and_column_risk():
    h, t, d, w = _tied_data(n=50, seed=5)
    want = cox_partial_likelihood(h, t, d, w, ties="efron")
    got = cox_partial_likelihood(h.float()[:, None], t, d.long(), w.float(), ties="efron")
    assert got.dtype == torch.float32
    assert abs(got.item() - want.item()) < 1e-5


def test_input_errors_are_clear():
    h = torch.zeros(3)
    t = torch.arange(3.0)
    d = torch.ones(3, dtype=torch.bool)
    with pytest.raises(ValueError, match="ties"):
        cox_partial_likelihood(h, t, d, ties="exact")
    with pytest.raises(ValueError, match="reduction"):
        cox_partial_likelihood(h, t, d, reduction="none")
    with pytest.raises(ValueError, match=r"time must have N=3"):
        cox_partial_likelihood(h, t[:2], d)
    with pytest.raises(ValueError, match="shape"):
        cox_partial_likelihood(torch.zeros(3, 2), t, d)
    with pytest.raises(ValueError, match="0 / 1"):
        cox_partial_likelihood(h, t, torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="> 0"):
        cox_partial_likelihood(h, t, d, torch.tensor([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="finite"):
        cox_partial_likelihood(torch.tensor([0.0, float("nan"), 0.0]), t, d)
    with pytest.raises(ValueError, match="finite"):
        cox_partial_likelihood(h, torch.tensor([0.0, float("inf"), 1.0]), d)
    with pytest.raises(ValueError, match="N=0"):
        cox_partial_likelihood(torch.zeros(0), torch.zeros(0), torch.zeros(0, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating-point"):
        cox_partial_likelihood(torch.zeros(3, dtype=torch.long), t, d)


def test_concordance_matches_lifelines_with_ties():
    lifelines_c = _lifelines().utils.concordance_index

    _, x, t, d = _rossi()
    g = torch.Generator().manual_seed(0)
    risk = torch.randint(0, 6, (len(t),), generator=g).double()  # many tied risks
    risk = risk + torch.from_numpy(x[:, 0])  # and some signal
    got = concordance_index(risk, torch.from_numpy(t), torch.from_numpy(d), block_size=100)
    want = lifelines_c(t, -risk.numpy(), d)
    assert abs(got.item() - want) < 1e-12
    # perfect and reversed rankings
    tt = torch.arange(10.0)
    dd = torch.ones(10, dtype=torch.bool)
    assert concordance_index(-tt, tt, dd).item() == 1.0
    assert concordance_index(tt, tt, dd).item() == 0.0
    assert concordance_index(torch.zeros(10), tt, dd).item() == 0.5


def test_concordance_tied_times_convention():
    lifelines_c = _lifelines().utils.concordance_index

    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        t = torch.randint(0, 4, (25,), generator=g).double()
        d = torch.rand(25, generator=g) < 0.5
        d[0] = True
        t[1] = t[0]
        d[1] = False  # an event and a censoring at the same time: comparable
        r = torch.randint(0, 3, (25,), generator=g).double()
        got = concordance_index(r, t, d)
        assert abs(got.item() - lifelines_c(t.numpy(), -r.numpy(), d.numpy())) < 1e-12


def test_concordance_without_pairs_raises():
    with pytest.raises(ValueError, match="no comparable pairs"):
        concordance_index(torch.randn(4), torch.arange(4.0), torch.zeros(4, dtype=torch.bool))

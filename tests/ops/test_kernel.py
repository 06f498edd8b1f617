"""kernel_attention: every similarity / normalisation against its explicit formula, masks, causality, lse, errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from attnfuse import ops
from attnfuse.ops.kernel import DEFAULT_NORMALIZE, SIMILARITIES, kernel_attention

F64 = torch.float64
B, H, L, S, D, DV = 2, 3, 5, 6, 4, 3


def _qkv(lq=L, lk=S, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, d, generator=g, dtype=F64, requires_grad=True) for n, d in ((lq, D), (lk, D), (lk, DV)))


def _explicit(q, k, v, similarity, normalize, allowed):
    """Loop-free but literal formula of the module docstring, written independently of kernel_weights."""
    c = 1 / math.sqrt(D)
    if similarity == "self_gated":
        s = torch.einsum("bhjd,bhjd->bhj", q, k)[:, :, None, :] * c * torch.ones(1, 1, q.shape[2], 1, dtype=F64)
    else:
        s = torch.einsum("bhid,bhjd->bhij", q, k) * c
    phi = {
        "softmax": lambda: torch.exp(s), "self_gated": lambda: torch.exp(s), "taylor": lambda: 1 + s + s**2 / 2,
        "linear": lambda: s, "relu": lambda: s.clamp_min(0),
        "elu": lambda: torch.einsum("bhid,bhjd->bhij", F.elu(q) + 1, F.elu(k) + 1),
        "silu": lambda: torch.einsum("bhid,bhjd->bhij", F.silu(q), F.silu(k)),
    }[similarity]() * allowed
    if normalize == "sum":
        total = phi.sum(-1, keepdim=True)
        w = phi / torch.where(total == 0, 1.0, total)
    elif normalize == "count":
        w = phi / allowed.sum(-1, keepdim=True).clamp_min(1)
    else:
        w = phi
    return w @ v, w


def _allowed(lq, lk, key_mask=None, pair=None, causal=False):
    a = torch.ones(B, H, lq, lk, dtype=F64)
    if key_mask is not None:
        a = a * key_mask[:, None, None, :]
    if pair is not None:
        a = a * pair
    if causal:
        a = a * torch.ones(lq, lk, dtype=F64).tril()
    return a


@pytest.mark.parametrize("similarity", SIMILARITIES)
@pytest.mark.parametrize("normalize", [None, "sum", "count", "none"])
def test_matches_the_explicit_formula_with_masks(similarity, normalize):
    lq = S if similarity == "self_gated" else L
    q, k, v = _qkv(lq=lq)
    g = torch.Generator().manual_seed(1)
    key_mask = torch.rand(B, S, generator=g) < 0.7
    key_mask[:, 0] = True
    pair = torch.rand(B, H, lq, S, generator=g) < 0.8
    for kw, allowed in (
        ({}, _allowed(lq, S)),
        ({"key_mask": key_mask}, _allowed(lq, S, key_mask)),
        ({"key_mask": key_mask, "mask": pair, "is_causal": True}, _allowed(lq, S, key_mask, pair, True)),
    ):
        norm = DEFAULT_NORMALIZE[similarity] if normalize is None else normalize
        out, w = kernel_attention(q, k, v, similarity=similarity, normalize=normalize, return_weights=True, **kw)
        want, want_w = _explicit(q, k, v, similarity, norm, allowed)
        torch.testing.assert_close(out, want)
        torch.testing.assert_close(w, want_w)
        assert torch.equal(w[allowed == 0], torch.zeros_like(w[allowed == 0]))
        gq, gk, gv = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q, k, v))
        assert all(torch.isfinite(t).all() for t in (gq, gk, gv))


def test_softmax_is_dense_attention_with_lse_and_causal():
    q, k, v = _qkv()
    km = torch.rand(B, S) < 0.6
    km[0] = False  # an empty sample
    for kw in ({}, {"key_mask": km}, {"is_causal": True, "key_mask": km}):
        got = kernel_attention(q, k, v, return_lse=True, return_weights=True, **kw)
        want = ops.dense_attention(q, k, v, return_lse=True, return_weights=True, backend="reference", **kw)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b)


def test_count_normalised_softmax_is_the_random_feature_form_and_duplication_invariant():
    q, k, v = _qkv()
    out = kernel_attention(q, k, v, normalize="count", scale=0.3)
    want = (torch.exp(0.3 * q @ k.transpose(-2, -1)) @ v) / S
    torch.testing.assert_close(out, want)
    dup = kernel_attention(q, torch.cat([k, k], 2), torch.cat([v, v], 2), normalize="count", scale=0.3)
    torch.testing.assert_close(dup, out)
    assert not torch.allclose(kernel_attention(q, torch.cat([k, k], 2), torch.cat([v, v], 2), normalize="none", scale=0.3),
                              kernel_attention(q, k, v, normalize="none", scale=0.3))


@pytest.mark.parametrize("similarity", [s for s in SIMILARITIES if s not in ("linear", "silu")])
def test_lse_merges_partial_results_exactly(similarity):
    lq = S if similarity == "self_gated" else L
    q, k, v = _qkv(lq=lq)
    part = torch.zeros(S, dtype=torch.bool)
    part[: S // 2] = True
    outs, lses = [], []
    for keep in (part, ~part):
        o, lse = kernel_attention(q, k, v, similarity=similarity, normalize="sum", key_mask=keep[None].expand(B, S),
                                  return_lse=True)
        outs.append(o)
        lses.append(lse)
    merged, lse = ops.merge_attention(outs, lses)
    full, full_lse = kernel_attention(q, k, v, similarity=similarity, normalize="sum", return_lse=True)
    torch.testing.assert_close(merged, full)
    torch.testing.assert_close(lse, full_lse)


def test_taylor_is_positive_normalised_and_approximates_softmax_to_third_order():
    q, k, v = _qkv()
    _, w = kernel_attention(q, k, v, similarity="taylor", is_causal=True, return_weights=True)
    allowed = torch.ones(L, S).tril().bool().expand_as(w)
    assert (w[allowed] > 0).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(B, H, L, dtype=F64))
    errs = []
    for t in (1e-1, 1e-2):
        a = kernel_attention(q, k, v, similarity="taylor", scale=t)
        b = kernel_attention(q, k, v, similarity="softmax", scale=t)
        errs.append((a - b).abs().max().item())
    assert errs[1] < errs[0] * 1e-2 * 0.2  # O(t^3): a factor ~1e-3 for t / 10


def test_self_gated_rows_share_one_ranking_and_first_row_is_one_hot():
    q, k, v = _qkv(lq=S)
    _, w = kernel_attention(q, k, v, similarity="self_gated", is_causal=True, return_weights=True)
    torch.testing.assert_close(w[..., 0, :], F.one_hot(torch.zeros(B, H, dtype=torch.long), S).to(F64))
    # A[i', j] / A[i', j'] = A[i, j] / A[i, j'] for j, j' <= i < i'
    i, i2, j, j2 = 2, 4, 0, 2
    torch.testing.assert_close(w[..., i2, j] / w[..., i2, j2], w[..., i, j] / w[..., i, j2])
    # the query does not matter: only q_j at key positions
    q2 = q.detach().clone()
    out = kernel_attention(q2, k, v, similarity="self_gated", is_causal=True)
    q2[..., -1, :] += 5.0  # the last position's q only scores key S-1, seen by the last query alone
    out2 = kernel_attention(q2, k, v, similarity="self_gated", is_causal=True)
    torch.testing.assert_close(out2[..., :-1, :], out[..., :-1, :])
    # very negative scores: no NaN
    big = kernel_attention(q * 1e3, k, v, similarity="self_gated", is_causal=True)
    assert torch.isfinite(big).all()


@pytest.mark.parametrize("similarity", SIMILARITIES)
def test_causal_outputs_ignore_future_keys(similarity):
    q, k, v = _qkv(lq=S)
    out = kernel_attention(q, k, v, similarity=similarity, is_causal=True)
    k2, v2, q2 = k.detach().clone(), v.detach().clone(), q.detach().clone()
    k2[..., 3:, :] += 1.0
    v2[..., 3:, :] -= 2.0
    q2[..., 3:, :] *= 3.0
    out2 = kernel_attention(q2, k2, v2, similarity=similarity, is_causal=True)
    torch.testing.assert_close(out2[..., :3, :], out[..., :3, :])
    assert not torch.allclose(out2[..., 3:, :], out[..., 3:, :])


def test_nan_at_masked_keys_and_empty_rows():
    q, k, v = _qkv(lq=S)
    km = torch.ones(B, S, dtype=torch.bool)
    km[:, 2] = False
    km[1] = False
    for sim in SIMILARITIES:
        base = kernel_attention(q, k, v, similarity=sim, key_mask=km)
        qn, kn, vn = (t.detach().clone() for t in (q, k, v))
        kn[:, :, 2] = float("nan")
        vn[:, :, 2] = float("inf")
        if sim == "self_gated":
            qn[:, :, 2] = float("nan")
        got = kernel_attention(qn, kn, vn, similarity=sim, key_mask=km)
        torch.testing.assert_close(got, base, msg=sim)
        assert torch.equal(base[1], torch.zeros_like(base[1]))


def test_through_attention_module_and_config():
    from attnfuse.nn import Attention
    from attnfuse.ops.configs import Kernel

    attn = Attention(8, 2, op=Kernel(similarity="relu", normalize="count"))
    x = torch.randn(2, 5, 8)
    out = attn(x, is_causal=True)
    assert out.shape == x.shape
    x2 = x.clone()
    x2[:, 3:] += 1
    torch.testing.assert_close(attn(x2, is_causal=True)[:, :3], out[:, :3])


def test_errors_name_the_argument():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="similarity must be one of"):
        kernel_attention(q, k, v, similarity="cosine")
    with pytest.raises(ValueError, match="normalize must be"):
        kernel_attention(q, k, v, normalize="mean")
    with pytest.raises(ValueError, match="needs L == S"):
        kernel_attention(q, k, v, similarity="self_gated")
    with pytest.raises(ValueError, match="return_lse needs normalize='sum'"):
        kernel_attention(q, k, v, similarity="linear", return_lse=True)
    with pytest.raises(ValueError, match="return_lse needs normalize='sum'"):
        kernel_attention(q, k, v, normalize="count", return_lse=True)
    with pytest.raises(TypeError, match="does not take a score bias"):
        kernel_attention(q, k, v, bias=torch.zeros(B, H, L, S, dtype=F64))


@pytest.mark.parametrize("similarity", ["taylor", "linear", "elu"])
@pytest.mark.parametrize("normalize", ["sum", "count", "none"])
@pytest.mark.parametrize("causal", [False, True])
def test_linear_time_feature_backend_equals_the_reference(similarity, normalize, causal):
    """Spec (Deconstructing) invariant 4: the quadratic reference equals the linear-time (causal prefix-sum) form."""
    for lq in (L, S + 2):  # fewer and more queries than keys
        q, k, v = _qkv(lq=lq)
        km = torch.rand(B, S, generator=torch.Generator().manual_seed(2)) < 0.7
        km[1] = False
        for scale in (None, -0.3):
            kw = {"similarity": similarity, "normalize": normalize, "is_causal": causal, "key_mask": km, "scale": scale}
            want = kernel_attention(q, k, v, backend="reference", **kw)
            got = kernel_attention(q, k, v, backend="feature", **kw)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
            g_want = torch.autograd.grad(want.sum(), (q, k, v))
            g_got = torch.autograd.grad(got.sum(), (q, k, v))
            for a, b in zip(g_got, g_want):
                torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
            if normalize == "sum" and similarity != "linear":
                _, lse = kernel_attention(q, k, v, backend="feature", return_lse=True, **kw)
                torch.testing.assert_close(lse, kernel_attention(q, k, v, backend="reference", return_lse=True, **kw)[1])


def test_feature_backend_refuses_what_it_cannot_do():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="backend 'feature' of operator 'kernel' needs similarity"):
        kernel_attention(q, k, v, backend="feature")
    with pytest.raises(ValueError, match="takes key masks only"):
        kernel_attention(q, k, v, similarity="taylor", backend="feature", mask=torch.rand(B, H, L, S) < 0.5)
    with pytest.raises(ValueError, match="cannot run this call: cannot return attention weights"):
        kernel_attention(q, k, v, similarity="taylor", backend="feature", return_weights=True)
    assert kernel_attention.spec.choose_backend("auto", ops.backends.Call.of(q, k, v)).name == "reference"

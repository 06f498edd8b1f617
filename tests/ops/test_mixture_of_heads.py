"""attnfuse.ops.moh: MoH gates (both scalings, binary), the query-norm router, gated heads dense vs sparse."""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse.ops import dense_attention, masked_softmax, mixture_of_heads, moh_route, query_norm_logits, scores
from attnfuse.ops.reference import apply_mask, causal_mask

F64 = torch.float64


def _qkv(b=2, h=4, lq=9, lk=None, d=8, dtype=F64, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    lk = lq if lk is None else lk
    q = torch.randn(b, h, lq, d, generator=g, dtype=dtype)
    k = torch.randn(b, h, lk, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, lk, d + 1, generator=g, dtype=dtype)
    return tuple(t.requires_grad_(grad) for t in (q, k, v))


def _gates(b, lq, h, shared, top_k, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    r = moh_route(torch.randn(b, lq, h - shared, generator=g, dtype=dtype), top_k, shared=shared,
                  mix_logits=torch.randn(b, lq, 2, generator=g, dtype=dtype) if shared else None)
    return r.gates


# ---------------------------------------------------------------- gates (invariants 1 and 3)

@pytest.mark.parametrize(("shared", "e", "top_k"), [(0, 4, 2), (1, 3, 2), (2, 6, 2), (2, 6, 4), (3, 5, 1)])
def test_zero_router_code_gates_are_binary_with_h_s_plus_k_ones(shared, e, top_k):
    lead = (2, 5)
    r = moh_route(torch.zeros(*lead, e), top_k, shared=shared,
                  shared_logits=torch.zeros(*lead, shared) if shared > 1 else None,
                  mix_logits=torch.zeros(*lead, 2) if shared else None)
    assert r.gates.shape == (*lead, shared + e)
    assert set(r.gates.unique().tolist()) <= {0.0, 1.0}
    assert ((r.gates != 0).sum(-1) == shared + top_k).all()
    assert (r.gates[..., :shared] == 1).all()
    assert r.selected.shape == (*lead, top_k) and r.selected.dtype == torch.long
    torch.testing.assert_close(r.probs, torch.full((*lead, e), 1.0 / e))
    torch.testing.assert_close(r.active_fraction(), torch.full(lead, (shared + top_k) / (shared + e)))


@pytest.mark.parametrize(("shared", "e", "top_k"), [(2, 6, 2), (3, 5, 3), (1, 4, 2)])
def test_code_gate_sums_follow_the_two_stage_mix(shared, e, top_k):
    g = torch.Generator().manual_seed(1)
    lead = (3, 7)
    routed, mix = torch.randn(*lead, e, generator=g, dtype=F64), torch.randn(*lead, 2, generator=g, dtype=F64)
    shared_logits = torch.randn(*lead, shared, generator=g, dtype=F64) if shared > 1 else None
    r = moh_route(routed, top_k, shared=shared, shared_logits=shared_logits, mix_logits=mix)
    a = 2 * torch.softmax(mix, -1)  # (a_s, a_r), a_s + a_r = 2
    torch.testing.assert_close(a.sum(-1), torch.full(lead, 2.0, dtype=F64))
    torch.testing.assert_close(r.gates[..., shared:].sum(-1), a[..., 1] * top_k)
    torch.testing.assert_close(r.gates[..., :shared].sum(-1), a[..., 0] * shared)
    assert ((r.gates != 0).sum(-1) == shared + top_k).all()
    # the routed gates are the renormalised top-k probabilities: the chosen heads are the largest p
    chosen = torch.zeros_like(routed, dtype=torch.bool).scatter(-1, r.selected, True)
    assert (r.gates[..., shared:][~chosen] == 0).all()
    top = torch.topk(torch.softmax(routed, -1), top_k).values
    torch.testing.assert_close(r.gates[..., shared:].sort(-1, descending=True).values[..., :top_k],
                               a[..., 1:] * top_k * top / top.sum(-1, keepdim=True))


def test_paper_gates_sum_to_at_most_one_and_binary_gates():
    g = torch.Generator().manual_seed(2)
    routed, mix, sh = (torch.randn(4, 6, n, generator=g) for n in (6, 2, 2))
    paper = moh_route(routed, 2, shared=2, shared_logits=sh, mix_logits=mix, gate_scale="paper")
    assert (paper.gates.sum(-1) <= 1 + 1e-6).all() and (paper.gates >= 0).all()
    alpha = torch.softmax(mix, -1)
    torch.testing.assert_close(paper.gates[..., :2], alpha[..., :1] * torch.softmax(sh, -1))
    binary = moh_route(routed, 2, shared=2, gate_scale="binary")
    assert set(binary.gates.unique().tolist()) == {0.0, 1.0} and ((binary.gates == 1).sum(-1) == 4).all()
    assert (binary.gates[..., :2] == 1).all()


def test_only_shared_heads_is_a_dense_weighted_sum():
    logits = torch.randn(2, 3, 4)
    r = moh_route(None, 0, shared=4, shared_logits=logits)
    torch.testing.assert_close(r.gates, 4 * torch.softmax(logits, -1))
    assert r.probs.shape == (2, 3, 0) and r.selected.shape == (2, 3, 0)
    assert r.balance_loss().item() == 0.0


@pytest.mark.parametrize(("kwargs", "err"), [
    ({"top_k": 5}, ValueError), ({"top_k": 0}, ValueError), ({"gate_scale": "x"}, ValueError),
    ({"shared": -1}, ValueError), ({"mix_logits": torch.zeros(2, 3, 3)}, ValueError),
    ({"token_mask": torch.ones(2, 3)}, ValueError),
])
def test_route_errors(kwargs, err):
    args = {"top_k": 2, "shared": 1, **kwargs}
    with pytest.raises(err):
        moh_route(torch.zeros(2, 3, 4), args.pop("top_k"), **args)


# ---------------------------------------------------------------- query-norm router (invariant 8)

def test_query_norm_logits_scale_invariant_and_ignore_shared_heads():
    q = _qkv(b=2, h=6, lq=5)[0]
    logits = query_norm_logits(q, shared=2)
    assert logits.shape == (2, 5, 4)
    norms = q[:, 2:].norm(dim=-1).transpose(1, 2)
    torch.testing.assert_close(logits, norms / norms.std(-1, keepdim=True))
    c = torch.rand(2, 1, 5, 1, dtype=F64) * 10 + 0.1  # one c > 0 per token
    scaled = q.clone()
    scaled[:, 2:] = scaled[:, 2:] * c
    scaled[:, :2] = torch.randn_like(scaled[:, :2])  # shared heads play no part
    torch.testing.assert_close(query_norm_logits(scaled, shared=2), logits)
    same = torch.ones(1, 4, 3, 2)  # equal norms: std 0 -> zero logits, no NaN
    assert (query_norm_logits(same, shared=1) == 0).all()
    with pytest.raises(ValueError, match="at least 2 routed"):
        query_norm_logits(q, shared=5)


# ---------------------------------------------------------------- gated heads: dense reference

def _explicit(q, k, v, gates, key_mask=None, pair=None, causal=False):
    m = None
    if key_mask is not None:
        m = key_mask.reshape(key_mask.shape[0], -1, 1, key_mask.shape[-1])
    if pair is not None:
        m = pair if m is None else m & pair
    if causal:
        c = causal_mask(q.shape[2], k.shape[2])
        m = c if m is None else m & c
    w, _ = masked_softmax(apply_mask(scores(q, k), m))
    return (w @ v) * gates.transpose(1, 2).unsqueeze(-1)


@pytest.mark.parametrize("causal", [False, True])
def test_dense_path_is_gates_times_head_outputs(causal):
    q, k, v = _qkv()
    gates = _gates(2, 9, 4, 1, 2)
    km = torch.rand(2, 9, generator=torch.Generator().manual_seed(3)) > 0.3
    got = mixture_of_heads(q, k, v, gates, key_mask=km, is_causal=causal)
    torch.testing.assert_close(got, _explicit(q, k, v, gates, key_mask=km, causal=causal), rtol=1e-12, atol=1e-12)
    out, w = mixture_of_heads(q, k, v, gates, key_mask=km, is_causal=causal, return_weights=True)
    torch.testing.assert_close(w @ v, out, rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------- sparse == dense-gated

MASKS = ["none", "key", "key_per_head", "pair", "all_masked_row"]


def _mask_kwargs(kind, b, h, lq, lk, seed=4):
    g = torch.Generator().manual_seed(seed)
    if kind == "key":
        km = torch.rand(b, lk, generator=g) > 0.3
        km[:, 0] = True
        return {"key_mask": km}
    if kind == "key_per_head":
        return {"key_mask": torch.rand(b, h, lk, generator=g) > 0.3}
    if kind == "pair":
        return {"mask": torch.rand(b, 1, lq, lk, generator=g) > 0.4}
    if kind == "all_masked_row":  # batch row 1 has no key at all: zeros, no NaN
        km = torch.ones(b, lk, dtype=torch.bool)
        km[1] = False
        return {"key_mask": km}
    return {}


CASES = [(causal, kind, 9, 1, 2) for causal in (False, True) for kind in MASKS]
CASES += [(causal, kind, 300, 2, 2) for causal in (False, True) for kind in ("none", "key")]  # long: causal chunks


@pytest.mark.parametrize(("causal", "kind", "lq", "shared", "top_k"), CASES)
def test_sparse_equals_dense_forward_and_gradients(causal, kind, lq, shared, top_k):
    b, h = 2, 5
    q, k, v = _qkv(b=b, h=h, lq=lq, d=4, grad=True, seed=lq)
    gates = _gates(b, lq, h, shared, top_k, seed=lq).requires_grad_(True)
    kw = _mask_kwargs(kind, b, h, lq, lq)
    dense = mixture_of_heads(q, k, v, gates, is_causal=causal, **kw)
    sparse = mixture_of_heads(q, k, v, gates, is_causal=causal, compute="sparse", **kw)
    assert torch.isfinite(sparse).all()
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    go = torch.randn_like(dense)
    gd = torch.autograd.grad(dense, (q, k, v, gates), go)
    gs = torch.autograd.grad(sparse, (q, k, v, gates), go)
    for a, c in zip(gd[:3], gs[:3]):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)
    on = gates.detach() != 0  # gate gradients agree where the gate is non-zero; 0 in sparse where skipped
    torch.testing.assert_close(gs[3][on], gd[3][on], rtol=1e-10, atol=1e-12)
    assert (gs[3][~on] == 0).all()


def test_sparse_skips_unselected_pairs_and_heads():
    """A NaN query at a skipped (token, head) never reaches the result (padding rows are dropped with where)."""
    q, k, v = _qkv(b=2, h=4, lq=12)
    gates = _gates(2, 12, 4, 1, 1).clone()
    gates[:, :, 3] = 0.0  # head 3 unused by every token
    skipped = (gates == 0).transpose(1, 2)  # (B, H, L)
    q = torch.where(skipped.unsqueeze(-1), torch.full_like(q, float("nan")), q)
    out = mixture_of_heads(q, k, v, gates, compute="sparse")
    assert torch.isfinite(out).all()
    assert (out[:, 3] == 0).all() and (out.transpose(1, 2)[gates == 0] == 0).all()


@pytest.mark.parametrize("compute", ["dense", "sparse"])
def test_causal_future_token_changes_no_earlier_output(compute):
    q, k, v = _qkv(b=1, h=4, lq=20)
    gates = _gates(1, 20, 4, 1, 2)
    t = 13
    base = mixture_of_heads(q, k, v, gates, is_causal=True, compute=compute)
    q2, k2, v2 = (x.clone() for x in (q, k, v))
    for x in (q2, k2, v2):
        x[:, :, t] += 5.0
    moved = mixture_of_heads(q2, k2, v2, gates, is_causal=True, compute=compute)
    torch.testing.assert_close(moved[:, :, :t], base[:, :, :t], rtol=0, atol=0)
    assert not torch.allclose(moved[:, :, t:], base[:, :, t:])


def test_empty_inputs_and_cross_lengths():
    q, k, v = _qkv(b=0, h=3, lq=4)
    assert mixture_of_heads(q, k, v, torch.ones(0, 4, 3, dtype=F64), compute="sparse").shape == (0, 3, 4, 9)
    q, k, v = _qkv(b=2, h=3, lq=0, lk=5)
    assert mixture_of_heads(q, k, v, torch.ones(2, 0, 3, dtype=F64), compute="sparse").shape == (2, 3, 0, 9)
    q, k, v = _qkv(b=2, h=3, lq=6, lk=11)  # cross lengths (L != S) also work
    gates = _gates(2, 6, 3, 1, 1)
    torch.testing.assert_close(mixture_of_heads(q, k, v, gates, compute="sparse"), mixture_of_heads(q, k, v, gates))


def test_float32_matches_dense_attention_when_all_gates_are_one():
    q, k, v = _qkv(dtype=torch.float32)
    ones = torch.ones(2, 9, 4)
    torch.testing.assert_close(mixture_of_heads(q, k, v, ones, compute="sparse"), dense_attention(q, k, v))


@pytest.mark.parametrize(("kwargs", "err", "match"), [
    ({"gates": torch.ones(2, 9, 3)}, ValueError, "gates must be"),
    ({"gates": torch.ones(2, 9, 4, dtype=torch.long)}, TypeError, "floating"),
    ({"compute": "fast"}, ValueError, "compute"),
    ({"compute": "sparse", "return_weights": True}, ValueError, "dense"),
    ({"key_mask": torch.ones(2, 8, dtype=torch.bool)}, ValueError, "key_mask"),
])
def test_errors_name_the_argument(kwargs, err, match):
    q, k, v = _qkv(dtype=torch.float32)
    args = {"gates": torch.ones(2, 9, 4), **kwargs}
    with pytest.raises(err, match=match):
        mixture_of_heads(q, k, v, args.pop("gates"), **args)


def test_active_fraction_and_head_load():
    r = moh_route(torch.randn(3, 8, 6), 2, shared=2, mix_logits=torch.randn(3, 8, 2))
    torch.testing.assert_close(r.active_fraction(), torch.full((3, 8), 0.5))
    assert math.isclose(r.head_load().sum().item(), 2.0, rel_tol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
def test_sparse_imbalanced_routing_runs_heads_one_by_one(causal):
    """Heads used by very different numbers of tokens take the per-head path (no batching to the largest)."""
    b, h, lq = 2, 4, 40
    q, k, v = _qkv(b=b, h=h, lq=lq, grad=True)
    g = torch.Generator().manual_seed(7)
    gates = torch.zeros(b, lq, h, dtype=F64)
    gates[..., 0] = 1.0  # shared
    gates[..., 1] = (torch.rand(b, lq, generator=g) < 0.9).to(F64) * 1.5  # ~90 % of the tokens
    gates[..., 2] = (torch.rand(b, lq, generator=g) < 0.1).to(F64) * 0.5  # ~10 %
    gates.requires_grad_(True)
    km = torch.ones(b, lq, dtype=torch.bool)
    km[1, :3] = False
    dense = mixture_of_heads(q, k, v, gates, key_mask=km, is_causal=causal)
    sparse = mixture_of_heads(q, k, v, gates, key_mask=km, is_causal=causal, compute="sparse")
    torch.testing.assert_close(sparse, dense, rtol=1e-10, atol=1e-12)
    gd = torch.autograd.grad(dense.sum(), (q, k, v))
    gs = torch.autograd.grad(sparse.sum(), (q, k, v))
    for a, c in zip(gd, gs):
        torch.testing.assert_close(c, a, rtol=1e-10, atol=1e-12)

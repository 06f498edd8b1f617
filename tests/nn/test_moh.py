"""attnfuse.nn.MixtureOfHeadAttention: invariants 1-9 of the MoH spec, conversion, sparse == dense, balance loss."""

from __future__ import annotations

import warnings

import pytest
import torch

from attnfuse.losses import moh_load_balance_loss, moh_load_balance_total
from attnfuse.nn import Attention, Encoder, MixtureOfHeadAttention, collect_routing, convert_to_moh
from attnfuse.ops import dense_attention, moh_route

F64 = torch.float64


def _mha(dim=16, heads=4, seed=0):
    torch.manual_seed(seed)
    return Attention(dim, heads, head_dim=4).to(F64)


def _x(b=2, n=7, dim=16, seed=1):
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _heads_zeroed(attn: Attention, x: torch.Tensor, keep: torch.Tensor, mask=None, causal=False):
    """MHA with head outputs multiplied by ``keep (B, N, H)`` before the output projection."""
    b, n, _ = x.shape

    def split(t):
        return t.reshape(b, n, attn.heads, attn.head_dim).transpose(1, 2)

    o = dense_attention(split(attn.to_q(x)), split(attn.to_k(x)), split(attn.to_v(x)), key_mask=mask, is_causal=causal)
    o = o * keep.transpose(1, 2).unsqueeze(-1).to(o.dtype)
    return attn.proj(o.transpose(1, 2).reshape(b, n, -1))


# ---------------------------------------------------------------- invariants 1 and 2

@pytest.mark.parametrize("shared", [0, 1, 2, 3])
@pytest.mark.parametrize("compute", ["dense", "sparse"])
def test_all_heads_active_is_exactly_mha(shared, compute):
    attn = _mha(heads=4)
    moh = MixtureOfHeadAttention.from_attention(attn, shared=shared, top_k=4 - shared, compute=compute)
    x = _x()
    torch.testing.assert_close(moh(x), attn(x), rtol=0, atol=1e-13)


@pytest.mark.parametrize(("shared", "top_k"), [(1, 1), (1, 2), (0, 2), (2, 1)])
def test_zero_router_is_mha_with_unselected_heads_zeroed(shared, top_k):
    attn = _mha(heads=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        moh = MixtureOfHeadAttention.from_attention(attn, shared=shared, top_k=top_k)
    x = _x()
    out, routing = moh(x, return_routing=True)
    assert set(routing.gates.unique().tolist()) <= {0.0, 1.0}
    assert ((routing.gates != 0).sum(-1) == shared + top_k).all()
    torch.testing.assert_close(out, _heads_zeroed(attn, x, routing.gates != 0), rtol=0, atol=1e-13)


def test_shared_heads_choice_permutes_heads_without_changing_mha():
    attn = _mha(heads=4)
    x = _x()
    moh = MixtureOfHeadAttention.from_attention(attn, shared=2, top_k=2, shared_heads=[3, 1])
    torch.testing.assert_close(moh(x), attn(x), rtol=0, atol=1e-13)
    part = MixtureOfHeadAttention.from_attention(attn, shared=2, top_k=1, shared_heads=[3, 1], router="query_norm")
    out, r = part(x, return_routing=True)
    original = torch.tensor([3, 1, 0, 2])  # new head j is original head original[j]
    keep = torch.zeros(2, 7, 4, dtype=torch.bool)
    keep[..., original] = r.gates != 0
    torch.testing.assert_close(out, _heads_zeroed(attn, x, keep), rtol=0, atol=1e-13)
    with pytest.raises(ValueError, match="shared_heads"):
        MixtureOfHeadAttention.from_attention(attn, shared=2, top_k=1, shared_heads=[1, 1])


def test_from_attention_refuses_other_operators_and_paper_has_no_identity():
    with pytest.raises(ValueError, match="dense"):
        MixtureOfHeadAttention.from_attention(Attention(16, 4, op="silu_kernel"), shared=1, top_k=2)
    with pytest.raises(TypeError):
        MixtureOfHeadAttention.from_attention(torch.nn.Linear(2, 2), shared=1, top_k=2)
    # gate_scale="paper" at a zero router: gates 1/2 * 1/E, far from the identity (why "code" is the default)
    moh = MixtureOfHeadAttention(16, 4, shared=1, top_k=3, gate_scale="paper").to(F64)
    _, r = moh(_x(), return_routing=True)
    torch.testing.assert_close(r.gates.sum(-1), torch.full((2, 7), 0.5 + 0.5, dtype=F64))
    assert (r.gates < 1).all()


# ---------------------------------------------------------------- invariant 3 (module level)

def test_module_gate_sums_and_active_fraction():
    moh = MixtureOfHeadAttention(16, 8, shared=2, top_k=2, router_init="default").to(F64)
    _, r = moh(_x(), return_routing=True)
    a = 2 * torch.softmax(moh.w_mix(_x()), -1)
    torch.testing.assert_close(r.gates[..., 2:].sum(-1), 2 * a[..., 1])
    torch.testing.assert_close(r.gates[..., :2].sum(-1), 2 * a[..., 0])
    assert ((r.gates != 0).sum(-1) == 4).all()
    torch.testing.assert_close(r.active_fraction(), torch.full((2, 7), 0.5, dtype=F64))
    assert moh.active_fraction == 0.5


# ---------------------------------------------------------------- invariant 4: router gradient, top-1 pitfall

def test_router_gets_task_gradient_at_zero_init_with_k_at_least_2():
    moh = MixtureOfHeadAttention(16, 6, head_dim=4, shared=2, top_k=2).to(F64)
    moh(_x()).pow(2).sum().backward()
    for w in (moh.w_routed, moh.w_shared, moh.w_mix):
        assert w.weight.grad is not None and w.weight.grad.abs().max() > 1e-6


def test_top1_pitfall_no_task_gradient_to_w_routed_only_balance_loss():
    with pytest.warns(UserWarning, match="no gradient"):
        moh = MixtureOfHeadAttention(16, 5, head_dim=4, shared=1, top_k=1, router_init="default").to(F64)
    out, r = moh(_x(), return_routing=True)
    (g_task,) = torch.autograd.grad(out.pow(2).sum(), moh.w_routed.weight, retain_graph=True)
    assert g_task.abs().max() < 1e-12
    (g_bal,) = torch.autograd.grad(r.balance_loss(), moh.w_routed.weight)
    assert g_bal.abs().max() > 1e-6


# ---------------------------------------------------------------- invariants 5-7: load-balance loss

@pytest.mark.parametrize(("e", "k"), [(4, 1), (6, 2), (5, 3)])
def test_balance_values_at_uniform_p_whatever_the_assignment(e, k):
    g = torch.Generator().manual_seed(e)
    p = torch.full((3, 10, e), 1.0 / e, dtype=F64)
    for _ in range(3):
        sel = torch.rand(3, 10, e, generator=g).argsort(-1)[..., :k]  # any hard assignment
        paper = moh_load_balance_loss(p, sel, normalization="paper")
        code = moh_load_balance_loss(p, sel, normalization="code")
        assert paper.item() == pytest.approx(k / e) and code.item() == pytest.approx(k)
        assert code.item() == pytest.approx(e * paper.item())


def test_uniform_is_not_the_minimum():
    p = torch.tensor([[0.51, 0.49]] * 3 + [[0.0, 1.0]], dtype=F64)
    sel = p.argmax(-1, keepdim=True)  # top-1: head 0, 0, 0, 1
    got = moh_load_balance_loss(p, sel, normalization="paper").item()
    assert got == pytest.approx(0.75 * (1.53 / 4) + 0.25 * (2.47 / 4)) and got < 0.5  # 0.441 < k/E


def test_routing_record_loss_matches_the_loss_function_and_selection_is_detached():
    moh = MixtureOfHeadAttention(16, 6, head_dim=4, shared=2, top_k=2, router_init="default").to(F64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    _, r = moh(_x(), mask, return_routing=True)
    for norm in ("paper", "code"):
        want = moh_load_balance_loss(r.probs, r.selected, token_mask=mask, normalization=norm)
        torch.testing.assert_close(r.balance_loss(norm), want)
    # invariant 6: d L / d p_{t,i} = f_i / T (paper), the selection carries no gradient
    p = r.probs.detach().requires_grad_(True)
    (grad,) = torch.autograd.grad(moh_load_balance_loss(p, r.selected, normalization="paper"), p)
    torch.testing.assert_close(grad, (r.head_load() * 0 + _f(r.selected, 4)).expand_as(grad) / 14)


def _f(selected, e):
    return torch.zeros(*selected.shape[:-1], e, dtype=F64).scatter(-1, selected, 1.0).reshape(-1, e).mean(0)


def test_padding_is_left_out_of_the_balance_loss():
    moh = MixtureOfHeadAttention(16, 6, head_dim=4, shared=2, top_k=2, router_init="default").to(F64)
    x, mask = _x(), torch.ones(2, 7, dtype=torch.bool)
    mask[0, 5:] = False
    _, r1 = moh(x, mask, return_routing=True)
    x2 = x.clone()
    x2[0, 5:] = 100 * torch.randn(2, 16, dtype=F64)  # padding content changes
    out2, r2 = moh(x2, mask, return_routing=True)
    torch.testing.assert_close(r2.balance_loss(), r1.balance_loss())
    out1 = moh(x, mask)
    torch.testing.assert_close(out2[mask], out1[mask])  # padding never reaches a real token
    _, r0 = moh(x, torch.zeros(2, 7, dtype=torch.bool), return_routing=True)
    assert r0.balance_loss().item() == 0.0
    assert moh_load_balance_loss(r0.probs, r0.selected, token_mask=r0.token_mask).item() == 0.0


def test_total_over_layers_mean_and_sum():
    rs = [moh_route(torch.randn(2, 5, 4), 2, shared=1) for _ in range(3)]
    each = torch.stack([r.balance_loss("code") for r in rs])
    torch.testing.assert_close(moh_load_balance_total(rs), 0.01 * each.mean())
    torch.testing.assert_close(moh_load_balance_total(rs, beta=1.0, reduction="sum", normalization="paper"),
                               each.sum() / 4)
    assert moh_load_balance_total([]).item() == 0.0
    with pytest.raises(ValueError, match="reduction"):
        moh_load_balance_total(rs, reduction="max")


# ---------------------------------------------------------------- invariant 8: query-norm router

def test_query_norm_router_is_binary_and_keeps_shared_heads():
    moh = MixtureOfHeadAttention(16, 6, head_dim=4, shared=2, top_k=2, router="query_norm").to(F64)
    assert moh.w_routed is None and moh.w_shared is None and moh.w_mix is None
    _, r = moh(_x(), return_routing=True)
    assert (r.gates[..., :2] == 1).all() and ((r.gates == 1).sum(-1) == 4).all()
    assert set(r.gates.unique().tolist()) == {0.0, 1.0}
    # the chosen routed heads are those with the largest query norms
    b, n = 2, 7
    q = moh.to_q(_x()).reshape(b, n, 6, -1)[..., 2:, :].norm(dim=-1)  # (B, N, E)
    torch.testing.assert_close(r.selected.sort(-1).values, q.topk(2, -1).indices.sort(-1).values)
    with pytest.raises(ValueError, match="binary"):
        MixtureOfHeadAttention(16, 6, head_dim=4, shared=2, top_k=2, router="query_norm", gate_scale="paper")


# ---------------------------------------------------------------- invariant 9: equivariance

def test_token_permutation_commutes_and_head_permutation_needs_all_blocks():
    moh = MixtureOfHeadAttention(16, 4, shared=1, top_k=2, router_init="default").to(F64)
    x = _x()
    perm = torch.randperm(7, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(moh(x[:, perm]), moh(x)[:, perm], rtol=1e-12, atol=1e-12)
    # swap routed heads 1 and 3 together with their q/k/v blocks, proj columns and W_r rows: same function
    swapped = MixtureOfHeadAttention(16, 4, shared=1, top_k=2).to(F64)
    swapped.load_state_dict(moh.state_dict())
    order = torch.tensor([0, 3, 2, 1])
    rows = (order.unsqueeze(1) * 4 + torch.arange(4)).reshape(-1)
    with torch.no_grad():
        for name in ("to_q", "to_k", "to_v"):
            getattr(swapped, name).weight.copy_(getattr(moh, name).weight[rows])
            getattr(swapped, name).bias.copy_(getattr(moh, name).bias[rows])
        swapped.proj.weight.copy_(moh.proj.weight[:, rows])
        swapped.w_routed.weight.copy_(moh.w_routed.weight[torch.tensor([2, 1, 0])])
    torch.testing.assert_close(swapped(x), moh(x), rtol=1e-12, atol=1e-12)
    with torch.no_grad():  # the head blocks alone, without the router rows: a different layer
        swapped.w_routed.weight.copy_(moh.w_routed.weight)
    assert not torch.allclose(swapped(x), moh(x))


# ---------------------------------------------------------------- sparse == dense, causality, masks

@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("router", ["linear", "query_norm"])
def test_sparse_module_equals_dense_module_with_gradients(causal, router):
    torch.manual_seed(0)
    dense = MixtureOfHeadAttention(16, 6, head_dim=4, shared=2, top_k=2, router=router, router_init="default").to(F64)
    sparse = MixtureOfHeadAttention(16, 6, head_dim=4, shared=2, top_k=2, router=router, compute="sparse").to(F64)
    sparse.load_state_dict(dense.state_dict())
    x, mask = _x(n=11), torch.ones(2, 11, dtype=torch.bool)
    mask[1, 8:] = False
    a, b = dense(x, mask, is_causal=causal), sparse(x, mask, is_causal=causal)
    torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    go = torch.randn_like(a)
    for (name, p), q in zip(dense.named_parameters(), sparse.parameters()):
        (ga,) = torch.autograd.grad(a, p, go, retain_graph=True)
        (gb,) = torch.autograd.grad(b, q, go, retain_graph=True)
        torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("compute", ["dense", "sparse"])
def test_causal_layer_perturbing_a_future_token_changes_no_earlier_output(compute):
    moh = MixtureOfHeadAttention(16, 6, head_dim=4, shared=2, top_k=2, router_init="default", compute=compute).to(F64)
    x = _x(n=12)
    base = moh(x, is_causal=True)
    x2 = x.clone()
    x2[:, 8] += 3.0
    moved = moh(x2, is_causal=True)
    torch.testing.assert_close(moved[:, :8], base[:, :8], rtol=0, atol=0)
    assert not torch.allclose(moved[:, 8:], base[:, 8:])


def test_weights_are_gated_and_reproduce_the_output():
    moh = MixtureOfHeadAttention(16, 4, shared=1, top_k=2, router_init="default", compute="sparse").to(F64)
    x = _x()
    out, w, r = moh(x, return_weights=True, return_routing=True)
    torch.testing.assert_close(w.sum(-1), r.gates.transpose(1, 2))
    v = moh.to_v(x).reshape(2, 7, 4, 4).transpose(1, 2)
    torch.testing.assert_close(moh.proj((w @ v).transpose(1, 2).reshape(2, 7, 16)), out)
    torch.testing.assert_close(out, moh(x), rtol=1e-12, atol=1e-12)


def test_query_with_no_key_gets_zero_update():
    moh = MixtureOfHeadAttention(16, 4, shared=1, top_k=2, router_init="default").to(F64)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1] = False
    out = moh(_x(), mask)
    assert torch.isfinite(out).all() and (out[1] == 0).all()
    lead = torch.ones(1, 5, dtype=torch.bool)
    lead[0, :2] = False  # causal: the first two queries see only padding
    out = moh(_x(b=1, n=5), lead, is_causal=True)
    assert (out[0, :2] == 0).all() and (out[0, 2:] != 0).any()


# ---------------------------------------------------------------- blocks, conversion, collection

def test_convert_encoder_and_collect_routing():
    torch.manual_seed(0)
    enc = Encoder(16, depth=2, heads=4).to(F64).eval()
    x = _x()
    want = enc(x)
    layers = convert_to_moh(enc, shared=1, top_k=3)  # all heads: the same function
    assert len(layers) == 2 and all(isinstance(b.attn, MixtureOfHeadAttention) for b in enc.blocks)
    with collect_routing() as records:
        got = enc(x, mask=torch.ones(2, 7, dtype=torch.bool))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    assert len(records) == 2 and records[0].gates.shape == (2, 7, 4)
    assert moh_load_balance_total(records).item() == pytest.approx(0.01 * 3)  # uniform P at a zero router: k
    enc(x)  # outside the block nothing is recorded
    assert len(records) == 2
    with pytest.raises(ValueError, match=r"no nn\.Attention"):
        convert_to_moh(torch.nn.Linear(2, 2), shared=1, top_k=1)


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"shared": 5, "top_k": 1}, "shared"), ({"shared": 1, "top_k": 0}, "top_k"), ({"shared": 1, "top_k": 4}, "top_k"),
    ({"shared": 1, "top_k": 2, "router": "x"}, "router"), ({"shared": 3, "top_k": 1, "router": "query_norm"}, "2 routed"),
    ({"shared": 1, "top_k": 2, "compute": "x"}, "compute"), ({"shared": 1, "top_k": 2, "router_init": "x"}, "router_init"),
])
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixtureOfHeadAttention(16, 4, **kwargs)


def test_only_shared_heads_layer():
    moh = MixtureOfHeadAttention(16, 4, shared=4, top_k=0, router_init="default").to(F64)
    out, r = moh(_x(), return_routing=True)
    torch.testing.assert_close(r.gates.sum(-1), torch.full((2, 7), 4.0, dtype=F64))
    assert r.balance_loss().item() == 0.0 and out.shape == (2, 7, 16)
    one = MixtureOfHeadAttention(16, 4, shared=1, top_k=3).to(F64)  # h_s = 1: constant shared gate, no W_s
    assert one.w_shared is None and one.w_mix is not None


@pytest.mark.slow
@pytest.mark.parametrize("router", ["linear", "query_norm"])
def test_compile_and_export(router):
    moh = MixtureOfHeadAttention(16, 6, head_dim=4, shared=2, top_k=2, router=router, router_init="default").eval()
    x = torch.randn(2, 5, 16)
    want = moh(x, is_causal=True)
    torch._dynamo.reset()
    got = torch.compile(moh, backend="aot_eager")(x, is_causal=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    exported = torch.export.export(moh, (x,), strict=False)
    torch.testing.assert_close(exported.module()(x), moh(x), rtol=1e-5, atol=1e-5)

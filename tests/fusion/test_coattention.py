"""CoAttention (ST-Align ABFN, BioFusionNet co-attention): formula, swap symmetry, masks, export."""

import pytest
import torch
import torch.nn.functional as F

from attnfuse.fusion import FUSIONS, CoAttention, TensorFusion, TokenSet
from attnfuse.ops.configs import Dense

D = 16


def make(batch=3, na=4, nb=4, seed=0, pad=True):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, n in (("img", na), ("gene", nb)):
        mask = torch.rand(batch, n, generator=g) > 0.3 if pad else torch.ones(batch, n, dtype=torch.bool)
        mask[:, 0] = True
        out[name] = TokenSet(torch.randn(batch, n, D, generator=g), mask)
    return out


def valid(ts, s):
    return ts.x[s][ts.valid()[s]]


def manual_cross(attn, norm_q, norm_kv, x, ctx):
    """ST-Align's CrossAttention written out: LN, projections, scaled softmax per head, output projection."""
    b, n, _ = x.shape
    h, dh = attn.heads, attn.head_dim
    q = attn.to_q(norm_q(x)).reshape(b, n, h, dh).transpose(1, 2)
    k = attn.to_k(norm_kv(ctx)).reshape(b, -1, h, dh).transpose(1, 2)
    v = attn.to_v(norm_kv(ctx)).reshape(b, -1, h, dh).transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / dh**0.5, dim=-1)
    return attn.proj((w @ v).transpose(1, 2).reshape(b, n, h * dh))


def test_abfn_matches_written_out_formula():
    torch.manual_seed(0)
    abfn = CoAttention(["img", "gene"], D, heads=2, head_dim=4, qkv_bias=False, merge="concat_ffn").eval()
    inputs = make(pad=False)
    img, gene = inputs["img"].x, inputs["gene"].x
    f1 = manual_cross(abfn.cross_a, abfn.norm_q_a, abfn.norm_kv_a, img, gene)
    f2 = manual_cross(abfn.cross_b, abfn.norm_q_b, abfn.norm_kv_b, gene, img)
    ref = F.layer_norm(torch.cat([abfn.ffn_a(f1), abfn.ffn_b(f2)], -1), (D,), abfn.norm_out.weight, abfn.norm_out.bias)
    out = abfn(inputs, return_weights=True)
    torch.testing.assert_close(out.fused.x, ref)
    assert out.fused.x.shape == (3, 4, D) and out.weights["cross.img"].shape == (3, 2, 4, 4)
    assert abfn.ffn_a[0].out_features == D // 8 and abfn.ffn_a[2].out_features == D // 2
    assert FUSIONS["coattention"] is CoAttention and CoAttention.symmetry == "equivariant"


def swapped_state(state):
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        head = parts[0]
        if head.endswith("_a"):
            head = head[:-2] + "_b"
        elif head.endswith("_b"):
            head = head[:-2] + "_a"
        out[".".join([head, *parts[1:]])] = value
    return out


@pytest.mark.parametrize("merge", ["concat_ffn", "concat"])
def test_modality_swap_with_parameter_sets_swaps_the_halves(merge):
    torch.manual_seed(0)
    ab = CoAttention(["img", "gene"], D, heads=2, merge=merge).eval()
    ba = CoAttention(["gene", "img"], D, heads=2, merge=merge).eval()
    ba.load_state_dict(swapped_state(ab.state_dict()))
    inputs = make()
    x_ab, x_ba = ab(inputs).fused.x, ba(inputs).fused.x
    half = x_ab.shape[-1] // 2
    torch.testing.assert_close(x_ba, torch.cat([x_ab[..., half:], x_ab[..., :half]], -1))


def test_token_symmetries():
    torch.manual_seed(0)
    co = CoAttention(["img", "gene"], D, heads=2).eval()  # merge="tokens" is the default
    inputs = make(na=5, nb=4)
    perm = torch.tensor([3, 0, 4, 1, 2])
    out = co(inputs)
    out_p = co(dict(inputs, img=TokenSet(inputs["img"].x[:, perm], inputs["img"].mask[:, perm])))
    # queries equivariant, keys/values invariant
    torch.testing.assert_close(out_p.per_source["img"].x, out.per_source["img"].x[:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_p.per_source["gene"].x, out.per_source["gene"].x, rtol=1e-5, atol=1e-5)
    # channel merge: a joint permutation of both sources permutes the fused tokens
    abfn = CoAttention(["img", "gene"], D, heads=2, merge="concat_ffn").eval()
    both = make()
    p4 = torch.tensor([2, 0, 3, 1])
    permuted = {n: TokenSet(t.x[:, p4], t.mask[:, p4]) for n, t in both.items()}
    torch.testing.assert_close(abfn(permuted).fused.x, abfn(both).fused.x[:, p4], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge", ["concat_ffn", "concat", "tokens"])
def test_absent_equals_all_false_and_batch_consistency(merge):
    torch.manual_seed(0)
    co = CoAttention(["img", "gene"], D, heads=2, merge=merge).eval()
    inputs = make()
    masked = dict(inputs, gene=inputs["gene"].with_mask(torch.zeros(3, 4, dtype=torch.bool)))
    absent = {"img": inputs["img"]}
    out_m, out_a = co(masked), co(absent)
    for s in range(3):
        torch.testing.assert_close(valid(out_m.fused, s), valid(out_a.fused, s))
    assert not torch.allclose(co(inputs).per_source["img"].x, out_a.per_source["img"].x)
    # one sample alone (its padding deleted where the merge allows) equals the same sample in the batch
    full = co(inputs)
    if merge == "tokens":
        alone = {n: TokenSet(t.x[1:2][:, t.mask[1]]) for n, t in inputs.items()}
    else:
        alone = {n: TokenSet(t.x[1:2], t.mask[1:2]) for n, t in inputs.items()}
    torch.testing.assert_close(valid(co(alone).fused, 0), valid(full.fused, 1), rtol=1e-5, atol=1e-5)


def test_no_residual_zero_projections_make_output_input_independent():
    co = CoAttention(["img", "gene"], D, heads=2, merge="concat_ffn")
    with torch.no_grad():
        for attn in (co.cross_a, co.cross_b):
            attn.proj.weight.zero_()
            attn.proj.bias.zero_()
    a, b = co(make(seed=1, pad=False)).fused.x, co(make(seed=2, pad=False)).fused.x
    torch.testing.assert_close(a, b)
    residual = CoAttention(["img", "gene"], D, heads=2, merge="concat_ffn", residual=True)
    residual.load_state_dict(co.state_dict())
    assert not torch.allclose(residual(make(seed=1, pad=False)).fused.x, residual(make(seed=2, pad=False)).fused.x)


def test_fully_masked_inputs_finite_gradients_and_errors():
    co = CoAttention(["img", "gene"], D, heads=2, merge="concat_ffn")
    inputs = {n: TokenSet(t.x.requires_grad_(), t.mask) for n, t in make().items()}
    out = co(inputs)
    out.fused.x.square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in co.parameters())
    assert inputs["img"].x.grad.abs().sum() > 0 and inputs["gene"].x.grad.abs().sum() > 0
    empty = {n: t.with_mask(torch.zeros_like(t.mask)) for n, t in make().items()}
    out = co(empty)
    assert torch.count_nonzero(out.fused.x) == 0 and not out.fused.valid().any()
    with pytest.raises(ValueError, match="equal token counts"):
        co(make(na=4, nb=3))
    with pytest.raises(ValueError, match="merge"):
        CoAttention(["a", "b"], D, heads=2, merge="sum")
    with pytest.raises(ValueError, match="two different"):
        CoAttention(["a", "b"], D, heads=2, a="a", b="a")
    with pytest.raises(ValueError, match="at least two"):
        CoAttention(["a"], D)
    with pytest.raises(ValueError, match="take no part"):
        CoAttention(["a", "b", "c"], D, a="a", b="b")
    with pytest.raises(ValueError, match="single b source"):
        CoAttention(["a", "b", "c"], D, merge="concat")


def test_bio_fusion_net_unscaled_bias_free_co_attention_options():
    co = CoAttention(["img", "gene"], D, heads=1, scale=1.0, qkv_bias=False, pre_norm=False, merge="tokens")
    assert co.cross_a.to_q.bias is None and co.cross_a.op == Dense(scale=1.0)
    # single key: the output does not depend on the query (BioFusionNet's batch-of-one pitfall, regression test)
    g = torch.Generator().manual_seed(0)
    gene = TokenSet(torch.randn(2, 1, D, generator=g))
    out1 = co({"img": TokenSet(torch.randn(2, 3, D, generator=g)), "gene": gene}).per_source["img"].x
    out2 = co({"img": TokenSet(torch.randn(2, 3, D, generator=g)), "gene": gene}).per_source["img"].x
    torch.testing.assert_close(out1, out2)


def test_export_round_trip():
    torch.manual_seed(0)
    model = TensorFusion(CoAttention(["img", "gene"], D, heads=2, merge="concat_ffn"), ["img", "gene"]).eval()
    inputs = make()
    args = tuple(t for n in ("img", "gene") for t in (inputs[n].x, inputs[n].mask))
    exported = torch.export.export(model, args)
    other = make(seed=5)
    other_args = [other["img"].x, other["img"].mask, other["gene"].x, torch.zeros_like(other["gene"].mask)]
    for got, want in zip(exported.module()(*other_args), model(*other_args)):
        torch.testing.assert_close(got, want)


def test_several_b_sources_are_one_key_value_set_and_separate_queries():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(7)
    inputs = {n: TokenSet(torch.randn(2, k, D, generator=g), torch.rand(2, k, generator=g) > 0.2)
              for n, k in (("age", 3), ("labs", 5), ("notes", 4))}
    inputs = {n: t.with_mask(t.mask.index_fill(1, torch.tensor([0]), True)) for n, t in inputs.items()}
    three = CoAttention(["age", "labs", "notes"], D, heads=2).eval()  # a = "age", b = labs + notes
    assert three.a == "age" and three.b == ("labs", "notes") and three.out_dim == D
    out = three(inputs, return_weights=True)
    assert out.fused.x.shape == (2, 12, D) and out.layout == {"age": (0, 3), "labs": (3, 8), "notes": (8, 12)}
    assert out.weights["cross.age"].shape == (2, 2, 3, 9) and out.weights["cross.notes"].shape == (2, 2, 4, 3)
    # each b source's queries see only a: the same as a two-source module with the same weights
    two = CoAttention(["age", "labs"], D, heads=2).eval()
    two.load_state_dict(three.state_dict())
    torch.testing.assert_close(out.per_source["labs"].x, two({n: inputs[n] for n in ("age", "labs")}).per_source["labs"].x)
    # a's keys are every b token (masked): not the same as labs alone
    assert not torch.allclose(out.per_source["age"].x, two({n: inputs[n] for n in ("age", "labs")}).per_source["age"].x)
    # a written-out reference for a over the concatenated keys
    kv = torch.cat([inputs["labs"].x, inputs["notes"].x], 1)
    kv_mask = torch.cat([inputs["labs"].mask, inputs["notes"].mask], 1)
    ref = three.cross_a(three.norm_q_a(inputs["age"].x * inputs["age"].mask[..., None]),
                        context=three.norm_kv_a(kv * kv_mask[..., None]), context_mask=kv_mask)
    torch.testing.assert_close(out.per_source["age"].x, ref * inputs["age"].mask[..., None])

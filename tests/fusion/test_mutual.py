"""MutualAttention (GL-DMNet PMF/CMF reconstruction, MEFN DFC): identity at init, formula, symmetries, masks, gate."""

import pytest
import torch

from attnfuse.fusion import MutualAttention, TensorFusion, TokenSet, feature_map, feature_map_tokens

C = 16


def maps(batch=2, h=3, w=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {n: feature_map_tokens(torch.randn(batch, C, h, w, generator=g)) for n in ("rgb", "depth")}


def module(**kw):
    """GL-DMNet's setting: two maps on one grid, affinity swap, summed."""
    torch.manual_seed(0)
    kw.setdefault("form", "affinity_swap")
    kw.setdefault("merge", "sum")
    m = MutualAttention(["rgb", "depth"], C, reduction=4, **kw).eval()
    with torch.no_grad():
        m.gamma.copy_(torch.tensor([0.7, -0.4]))
        m.beta.copy_(torch.tensor([0.3, 0.5]))
    return m


def test_zero_init_is_identity_and_shapes():
    fuse = MutualAttention(["rgb", "depth"], C, reduction=4, form="affinity_swap", merge="sum")
    inputs = maps()
    out = fuse(inputs, return_weights=True)
    for n in ("rgb", "depth"):
        assert torch.equal(out.per_source[n].x, inputs[n].x)
    assert out.weights["position.rgb"].shape == (2, 1, 12, 12) and out.weights["channel.rgb"].shape == (2, 1, C, C)
    torch.testing.assert_close(out.weights["position.rgb"].sum(-1), torch.ones(2, 1, 12))
    torch.testing.assert_close(out.weights["channel.depth"].sum(-1), torch.ones(2, 1, C))
    assert feature_map(out.fused).shape == (2, C, 3, 4)
    torch.testing.assert_close(out.fused.x, inputs["rgb"].x + inputs["depth"].x)


@pytest.mark.parametrize("form", ["affinity_swap", "cross"])
def test_matches_written_out_equations(form):
    fuse = module(form=form)
    inputs = maps()
    x = {n: inputs[n].x.reshape(2, 12, C) for n in ("rgb", "depth")}
    out = fuse(inputs)
    for r, (n, o) in enumerate((("rgb", "depth"), ("depth", "rgb"))):
        own, oth = "ab"[r], "ab"[1 - r]
        if form == "affinity_swap":
            q, k, v = fuse.to_q[oth](x[o]), fuse.to_k[oth](x[o]), fuse.to_v[own](x[n])
        else:
            q, k, v = fuse.to_q[own](x[n]), fuse.to_k[oth](x[o]), fuse.to_v[oth](x[o])
        p = torch.softmax(q @ k.transpose(1, 2), -1) @ v  # scale 1.0 (DANet)
        x1 = x[n] + fuse.gamma[r] * p
        b = torch.softmax(x[o].transpose(1, 2) @ x[o], -1)  # (C, C) from the other map
        x2 = x1 + fuse.beta[r] * (x1 @ b.transpose(1, 2))
        torch.testing.assert_close(out.per_source[n].x.reshape(2, 12, C), x2)


def test_swap_with_parameter_sets_swaps_outputs_and_self_consistency():
    fuse = module()
    swapped = MutualAttention(["depth", "rgb"], C, reduction=4, form="affinity_swap", merge="sum").eval()
    state = {}
    for key, value in fuse.state_dict().items():
        parts = key.split(".")
        if parts[0] in ("to_q", "to_k", "to_v"):
            parts[1] = {"a": "b", "b": "a"}[parts[1]]
        elif parts[0] in ("gamma", "beta"):
            value = value.flip(0)
        state[".".join(parts)] = value
    swapped.load_state_dict(state)
    inputs = maps()
    out, out_s = fuse(inputs), swapped(inputs)
    for n in ("rgb", "depth"):
        torch.testing.assert_close(out.per_source[n].x, out_s.per_source[n].x)
    # identical maps and shared parameters give identical streams
    shared = MutualAttention(["rgb", "depth"], C, reduction=4, form="affinity_swap")
    with torch.no_grad():
        for lin in (shared.to_q, shared.to_k, shared.to_v):
            lin["b"].load_state_dict(lin["a"].state_dict())
        shared.gamma.fill_(0.5)
        shared.beta.fill_(0.5)
    same = maps()["rgb"]
    o = shared({"rgb": same, "depth": same})
    torch.testing.assert_close(o.per_source["rgb"].x, o.per_source["depth"].x)


def test_spatial_and_channel_permutation_equivariance():
    fuse = module()
    g = torch.Generator().manual_seed(3)
    seq = {n: TokenSet(torch.randn(2, 7, C, generator=g)) for n in ("rgb", "depth")}
    perm = torch.randperm(7, generator=g)
    out, out_p = fuse(seq), fuse({n: TokenSet(t.x[:, perm]) for n, t in seq.items()})
    torch.testing.assert_close(out_p.per_source["rgb"].x, out.per_source["rgb"].x[:, perm], rtol=1e-5, atol=1e-5)
    cmf = MutualAttention(["rgb", "depth"], C, position=False).eval()
    with torch.no_grad():
        cmf.beta.fill_(0.5)
    cperm = torch.randperm(C, generator=g)
    o, o_p = cmf(seq), cmf({n: TokenSet(t.x[..., cperm]) for n, t in seq.items()})
    torch.testing.assert_close(o_p.per_source["depth"].x, o.per_source["depth"].x[..., cperm], rtol=1e-5, atol=1e-5)


def test_absent_equals_all_false_gate_zero_and_padding():
    fuse = module()
    inputs = maps()
    out_absent = fuse({"rgb": inputs["rgb"]})
    out_masked = fuse(dict(inputs, depth=inputs["depth"].with_mask(torch.zeros(2, 3, 4, dtype=torch.bool))))
    torch.testing.assert_close(out_absent.per_source["rgb"].x, inputs["rgb"].x)
    torch.testing.assert_close(out_masked.per_source["rgb"].x, inputs["rgb"].x)
    torch.testing.assert_close(out_masked.fused.x, out_absent.fused.x)
    # a zero gate on depth's messages is the same as no depth for rgb; a gate of 1 changes nothing
    gated = fuse(inputs, gates={"depth": torch.zeros(2, 3, 4)})
    torch.testing.assert_close(gated.per_source["rgb"].x, inputs["rgb"].x)
    torch.testing.assert_close(fuse(inputs, gates={"depth": torch.ones(2, 1)}).per_source["rgb"].x, fuse(inputs).per_source["rgb"].x)
    # padded positions (1-axis tokens) equal deleted ones, and a sample alone equals it in the batch
    g = torch.Generator().manual_seed(4)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, 4:] = False
    seq = {n: TokenSet(torch.randn(2, 6, C, generator=g), mask) for n in ("rgb", "depth")}
    full = fuse(seq)
    alone = fuse({n: TokenSet(t.x[1:2, :4]) for n, t in seq.items()})
    torch.testing.assert_close(full.per_source["rgb"].x[1, :4], alone.per_source["rgb"].x[0], rtol=1e-5, atol=1e-5)
    assert torch.count_nonzero(full.per_source["rgb"].x[1, 4:]) == 0


def test_callable_uncertainty_gate_hook():
    seen = []

    def gate(x, mask):
        seen.append((x.shape, mask.shape))
        return torch.zeros(x.shape[:-1])  # fully uncertain: no messages

    fuse = module(gate=gate)
    inputs = maps()
    out = fuse(inputs)
    assert seen == [((2, 3, 4, C), (2, 3, 4))] * 2
    torch.testing.assert_close(out.per_source["depth"].x, inputs["depth"].x)
    with pytest.raises(ValueError, match="broadcast"):
        fuse(inputs, gates={"rgb": torch.ones(2, 5)})


def test_gradients_fully_masked_and_errors():
    fuse = module()
    inputs = {n: TokenSet(t.x.clone().requires_grad_(), t.mask, t.axes) for n, t in maps().items()}
    fuse(inputs).fused.x.square().sum().backward()
    assert all(torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0 for p in fuse.parameters())
    assert inputs["depth"].x.grad.abs().sum() > 0
    empty = {n: t.with_mask(torch.zeros(2, 3, 4, dtype=torch.bool)) for n, t in maps().items()}
    out = fuse(empty)
    assert torch.count_nonzero(out.fused.x) == 0 and torch.isfinite(out.fused.x).all()
    with pytest.raises(ValueError, match="one grid"):
        fuse({"rgb": maps()["rgb"], "depth": feature_map_tokens(torch.randn(2, C, 2, 4))})
    with pytest.raises(ValueError, match="form"):
        MutualAttention(["a", "b"], C, form="self")
    with pytest.raises(ValueError, match="merge"):
        MutualAttention(["a", "b"], C, merge="mean")
    with pytest.raises(ValueError, match="single b source"):
        MutualAttention(["a", "b", "c"], C, gate=lambda x, m: torch.ones(x.shape[:-1]))
    with pytest.raises(ValueError, match="form='cross'"):
        MutualAttention(["a", "b", "c"], C, form="affinity_swap")({n: TokenSet(torch.randn(2, 3, C)) for n in "abc"})


def test_export_round_trip():
    fuse = module()
    model = TensorFusion(fuse, ["rgb", "depth"]).eval()
    g = torch.Generator().manual_seed(0)
    args = [torch.randn(2, 6, C, generator=g), torch.ones(2, 6, dtype=torch.bool), torch.randn(2, 6, C, generator=g),
            torch.ones(2, 6, dtype=torch.bool)]
    exported = torch.export.export(model, tuple(args))
    other = [torch.randn(2, 6, C, generator=g), torch.rand(2, 6, generator=g) > 0.3,
             torch.randn(2, 6, C, generator=g), torch.zeros(2, 6, dtype=torch.bool)]
    for got, want in zip(exported.module()(*other), model(*other)):
        torch.testing.assert_close(got, want)


def test_defaults_fuse_any_number_of_sources_with_any_token_counts():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    inputs = {n: TokenSet(torch.randn(2, k, C, generator=g)) for n, k in (("a", 3), ("b", 5), ("c", 4))}
    three = MutualAttention(["a", "b", "c"], C).eval()  # a = "a", b = b + c, form="cross", merge="tokens"
    assert three.b == ("b", "c") and three.form == "cross" and three.merge == "tokens" and three.out_dim == C
    with torch.no_grad():
        three.gamma.copy_(torch.tensor([0.7, -0.4]))
        three.beta.copy_(torch.tensor([0.3, 0.5]))
    out = three(inputs, return_weights=True)
    assert out.fused.x.shape == (2, 12, C) and out.layout == {"a": (0, 3), "b": (3, 8), "c": (8, 12)}
    assert out.weights["position.a"].shape == (2, 1, 3, 9) and out.weights["position.c"].shape == (2, 1, 4, 3)
    # each b source receives messages from a only: as in a two-source module with the same weights
    two = MutualAttention(["a", "b"], C).eval()
    two.load_state_dict(three.state_dict())
    torch.testing.assert_close(out.per_source["b"].x, two({"a": inputs["a"], "b": inputs["b"]}).per_source["b"].x)
    # a reads every b token: written out for the cross form
    xb = torch.cat([inputs["b"].x, inputs["c"].x], 1)
    xa = inputs["a"].x
    p = torch.softmax(three.to_q["a"](xa) @ three.to_k["b"](xb).transpose(1, 2), -1) @ three.to_v["b"](xb)
    x1 = xa + 0.7 * p
    ref = x1 + 0.3 * (x1 @ torch.softmax(xb.transpose(1, 2) @ xb, -1).transpose(1, 2))
    torch.testing.assert_close(out.per_source["a"].x, ref)
    with pytest.raises(ValueError, match="single b source"):
        three(inputs, gates={"b": torch.ones(2)})
    with pytest.raises(ValueError, match="one grid"):
        MutualAttention(["a", "b"], C, merge="sum")({"a": inputs["a"], "b": inputs["b"]})

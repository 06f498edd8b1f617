"""AxisAttention (attention along a named axis) and LayerAttention (HISTOGRAPH): formulas, symmetries, masks, guard, export."""

import math

import pytest
import torch
from torch import nn

from attnfuse.fusion import AxisAttention, LayerAttention, TokenSet

D = 8


def scene(batch=2, t=5, a=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(batch, t, a, generator=g) > 0.25
    mask[:, 0] = True
    return TokenSet(torch.randn(batch, t, a, D, generator=g), mask, ("time", "agent"))


def axis_module(**kw):
    torch.manual_seed(0)
    return AxisAttention(["scene", "map"], D, axis="time", heads=2, depth=2, mlp_ratio=2.0, **kw).eval()


def test_axis_attention_equals_encoder_per_slice_and_keeps_slices_apart():
    fuse = axis_module()
    ts = scene()
    out = fuse({"scene": ts}, return_weights=True)
    assert out.per_source["scene"].x.shape == (2, 5, 3, D) and out.weights["scene.0"].shape == (6, 2, 5, 5)
    for agent in range(3):
        x, m = ts.x[:, :, agent], ts.mask[:, :, agent]
        ref = fuse.encoder(torch.where(m[..., None], x, 0.0), mask=m)
        torch.testing.assert_close(out.per_source["scene"].x[:, :, agent][m], ref[m])
    changed = TokenSet(ts.x.clone(), ts.mask, ts.axes)
    changed.x[:, :, 1] += 1.0
    torch.testing.assert_close(fuse({"scene": changed}).per_source["scene"].x[:, :, 0], out.per_source["scene"].x[:, :, 0])


def test_axis_attention_equivariance_padding_and_absent_source():
    fuse = axis_module()
    ts = scene()
    out = fuse({"scene": ts}).per_source["scene"].x
    perm = torch.tensor([4, 2, 0, 3, 1])
    out_p = fuse({"scene": TokenSet(ts.x[:, perm], ts.mask[:, perm], ts.axes)}).per_source["scene"].x
    torch.testing.assert_close(out_p, out[:, perm], rtol=1e-5, atol=1e-5)
    # padded time steps of agent 2 in sample 1 equal deleted ones
    keep = ts.mask[1, :, 2]
    alone = fuse({"scene": TokenSet(ts.x[1:2, keep][:, :, 2:3], None, ts.axes)}).per_source["scene"].x
    torch.testing.assert_close(out[1, keep, 2], alone[0, :, 0], rtol=1e-5, atol=1e-5)
    # a fully masked second source changes nothing for the first, gives zeros, no NaN
    other = scene(seed=1)
    both = fuse({"scene": ts, "map": other.with_mask(torch.zeros_like(other.mask))})
    torch.testing.assert_close(both.per_source["scene"].x, out)
    assert torch.count_nonzero(both.per_source["map"].x) == 0
    torch.testing.assert_close(both.fused.x[both.fused.mask], fuse({"scene": ts}).fused.x[fuse({"scene": ts}).fused.mask])
    with pytest.raises(ValueError, match="axis 'time'"):
        fuse({"scene": TokenSet(torch.randn(2, 4, D))})


def test_axis_attention_plain_unscaled_block_and_sum_readout_doubles_with_duplicates():
    torch.manual_seed(0)
    patch = AxisAttention(["wsi"], D, axis="token", heads=1, block="attention", scale=1.0).eval()
    x = torch.randn(2, 4, D)
    out = patch({"wsi": TokenSet(x)}).per_source["wsi"].x
    a = patch.attn
    w = torch.softmax(a.to_q(x) @ a.to_k(x).transpose(1, 2), -1)  # no 1/sqrt(d)
    torch.testing.assert_close(out, a.proj(w @ a.to_v(x)))
    dup = patch({"wsi": TokenSet(torch.cat([x, x], 1))}).per_source["wsi"].x
    torch.testing.assert_close(dup.sum(1), 2 * out.sum(1), rtol=1e-5, atol=1e-5)


def graphs(batch=3, n=6, layers=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(batch, n, layers, dtype=torch.bool)
    mask[1, 4:] = False  # graph 1 has 4 nodes
    return TokenSet(torch.randn(batch, n, layers, D, generator=g), mask, ("node", "layer"))


def layer_module(**kw):
    torch.manual_seed(0)
    kw.setdefault("num_layers", 4)
    return LayerAttention(["acts"], D, heads=2, mlp_ratio=2.0, **kw).eval()


def test_layer_attention_matches_written_out_equations():
    hist = layer_module()
    ts = graphs()
    out = hist({"acts": ts}, return_weights=True)
    x = torch.einsum("bnld,lde->bnle", ts.x, hist.proj_weight) + hist.proj_bias + hist.pe
    q, k = hist.to_q(x[:, :, -1]), hist.to_k(x)
    c = []
    for b in range(3):
        nodes = ts.mask[b, :, 0]
        c.append((torch.einsum("nd,nld->nl", q[b], k[b]) / math.sqrt(D))[nodes].mean(0))
    c = torch.stack(c)
    alpha = c / c.sum(-1, keepdim=True)
    torch.testing.assert_close(out.weights["layer"], alpha)
    torch.testing.assert_close(alpha.sum(-1), torch.ones(3))
    h = torch.einsum("bl,bnld->bnd", alpha, x)
    node_mask = ts.mask[..., 0]
    z = hist.encoder(torch.where(node_mask[..., None], h, 0.0), mask=node_mask)
    torch.testing.assert_close(out.per_source["acts"].x[node_mask], z[node_mask], rtol=1e-5, atol=1e-5)
    g = torch.stack([z[b][node_mask[b]].mean(0) for b in range(3)]).unsqueeze(1)
    torch.testing.assert_close(out.fused.x, g, rtol=1e-5, atol=1e-5)


def test_layer_attention_negative_weights_guard_and_softmax_ablation():
    hist = layer_module()
    alpha = hist.layer_weights(torch.tensor([[2.0, -1.0, 0.5, -0.5]]))
    assert (alpha < 0).any() and torch.allclose(alpha.sum(), torch.tensor(1.0))
    guarded = hist.layer_weights(torch.tensor([[1.0, -1.0, 1e-9, 0.0]]))
    assert torch.isfinite(guarded).all() and torch.allclose(guarded, torch.tensor([[1.0, -1.0, 1e-9, 0.0]]) / 1e-6)
    with torch.no_grad():
        hist.to_q.weight.zero_()
        hist.to_q.bias.zero_()  # every score is 0: sum c = 0
    x = graphs().x.clone().requires_grad_()
    out = hist({"acts": TokenSet(x, graphs().mask, ("node", "layer"))})
    out.fused.x.sum().backward()
    assert torch.isfinite(out.fused.x).all() and torch.isfinite(x.grad).all()
    soft = layer_module(normalize="softmax")
    w = soft({"acts": graphs()}, return_weights=True).weights["layer"]
    assert (w > 0).all() and torch.allclose(w.sum(-1), torch.ones(3))


def test_layer_attention_node_permutation_batching_and_axis_order():
    hist = layer_module()
    ts = graphs()
    out = hist({"acts": ts})
    perm = torch.randperm(6, generator=torch.Generator().manual_seed(5))
    out_p = hist({"acts": TokenSet(ts.x[:, perm], ts.mask[:, perm], ts.axes)})
    torch.testing.assert_close(out_p.fused.x, out.fused.x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_p.per_source["acts"].x, out.per_source["acts"].x[:, perm], rtol=1e-5, atol=1e-5)
    alone = hist({"acts": TokenSet(ts.x[1:2, :4], None, ts.axes)})
    torch.testing.assert_close(alone.fused.x[0], out.fused.x[1], rtol=1e-5, atol=1e-5)
    swapped = hist({"acts": TokenSet(ts.x.transpose(1, 2), ts.mask.transpose(1, 2), ("layer", "node"))})
    torch.testing.assert_close(swapped.fused.x, out.fused.x)
    nodes = layer_module(readout=None)
    assert nodes.symmetry == "equivariant" and LayerAttention.symmetry == "invariant"
    assert nodes({"acts": ts}).fused.x.shape == (3, 6, D)
    with pytest.raises(ValueError, match="expected 4 layers"):
        hist({"acts": graphs(layers=3)})


def test_layer_attention_single_layer_and_fully_masked_graph():
    hist = layer_module(num_layers=1, layer_proj=False, layer_pe=None, node_depth=0, readout=None)
    ts = graphs(layers=1)
    out = hist({"acts": ts}, return_weights=True)
    torch.testing.assert_close(out.weights["layer"], torch.ones(3, 1))
    torch.testing.assert_close(out.fused.x, ts.x[:, :, 0] * ts.mask[:, :, :1])
    full = layer_module()
    empty = full({"acts": graphs().with_mask(torch.zeros(3, 6, 4, dtype=torch.bool))})
    assert torch.count_nonzero(empty.fused.x) == 0 and not empty.fused.valid().any()


def per_layer(ts, names=("l0", "l1", "l2", "l3")):
    """A (node, layer) history as one plain (B, N, D) source per layer."""
    return {n: TokenSet(ts.x[:, :, i], ts.mask[:, :, i]) for i, n in enumerate(names)}


def test_layer_attention_one_source_per_layer_equals_the_history_source():
    torch.manual_seed(0)
    names = ("l0", "l1", "l2", "l3")
    hist = layer_module()
    stacked = LayerAttention(list(names), D, heads=2, mlp_ratio=2.0, nodes="tokens").eval()
    assert stacked.num_layers == 4
    stacked.load_state_dict(hist.state_dict())
    ts = graphs()
    out, out_s = hist({"acts": ts}, return_weights=True), stacked(per_layer(ts, names), return_weights=True)
    torch.testing.assert_close(out_s.fused.x, out.fused.x)
    torch.testing.assert_close(out_s.weights["layer"], out.weights["layer"])
    torch.testing.assert_close(out_s.per_source["l3"].x, out.per_source["acts"].x)
    # the order given is the layer order: the last source asks
    reordered = LayerAttention(list(reversed(names)), D, heads=2, mlp_ratio=2.0, nodes="tokens").eval()
    reordered.load_state_dict(hist.state_dict())
    assert not torch.allclose(reordered(per_layer(ts, names)).fused.x, out.fused.x)
    # an absent layer equals an all-False one
    layers = per_layer(ts, names)
    absent = stacked({n: t for n, t in layers.items() if n != "l1"}).fused.x
    masked = stacked(dict(layers, l1=layers["l1"].with_mask(torch.zeros(3, 6, dtype=torch.bool)))).fused.x
    torch.testing.assert_close(absent, masked)


def test_layer_attention_pooled_nodes_take_any_sources():
    torch.manual_seed(0)
    hist = LayerAttention(["l0", "l1", "l2"], D, heads=2, mlp_ratio=2.0).eval()  # nodes="pooled" (default)
    g = torch.Generator().manual_seed(2)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    inputs = {"l0": TokenSet(torch.randn(2, 3, D, generator=g), mask), "l1": TokenSet(torch.randn(2, 5, D, generator=g)),
              "l2": TokenSet(torch.randn(2, 1, D, generator=g))}
    out = hist(inputs, return_weights=True)
    assert out.fused.x.shape == (2, 1, D) and out.weights["layer"].shape == (2, 3)
    means = [(t.x * t.valid()[..., None]).sum(1, keepdim=True) / t.valid().sum(1)[:, None, None] for t in inputs.values()]
    history = TokenSet(torch.stack(means, dim=2), axes=("node", "layer"))  # (B, 1, 3, D): one node, three layers
    single = LayerAttention(["h"], D, num_layers=3, heads=2, mlp_ratio=2.0).eval()
    single.load_state_dict(hist.state_dict())
    torch.testing.assert_close(out.fused.x, single({"h": history}).fused.x)


def test_layer_attention_argument_errors():
    with pytest.raises(ValueError, match="num_layers must be len"):
        LayerAttention(["a", "b"], D, num_layers=3)
    with pytest.raises(ValueError, match="sequence of names"):
        LayerAttention("acts", D, num_layers=4)
    with pytest.raises(ValueError, match="nodes"):
        LayerAttention(["a", "b"], D, nodes="graph")
    stacked = LayerAttention(["a", "b"], D, heads=2, nodes="tokens")
    with pytest.raises(ValueError, match="same token count"):
        stacked({"a": TokenSet(torch.randn(2, 4, D)), "b": TokenSet(torch.randn(2, 5, D))})
    with pytest.raises(ValueError, match="pass num_layers"):
        LayerAttention(["acts"], D, heads=2)({"acts": graphs()})  # one source with 4 layers needs num_layers=4


def test_axis_attention_defaults_attend_along_plain_tokens():
    fuse = AxisAttention(["a", "b"], D, heads=2).eval()
    assert fuse.axis == "token" and fuse.out_dim == D
    g = torch.Generator().manual_seed(0)
    a, b = TokenSet(torch.randn(2, 4, D, generator=g)), TokenSet(torch.randn(2, 7, D, generator=g))
    out = fuse({"a": a, "b": b})
    assert out.fused.x.shape == (2, 11, D)
    torch.testing.assert_close(out.per_source["a"].x, fuse({"a": a}).per_source["a"].x)  # sources stay apart


class _Export(nn.Module):
    """Tensor-in wrapper for multi-axis sources (TensorFusion builds single-axis TokenSets)."""

    def __init__(self, fusion, axes):
        super().__init__()
        self.fusion, self.axes = fusion, axes

    def forward(self, *tensors):
        names = self.fusion.sources
        inputs = {n: TokenSet(tensors[2 * i], tensors[2 * i + 1], self.axes) for i, n in enumerate(names)}
        return self.fusion(inputs).fused.x


def test_export_round_trips():
    model = _Export(layer_module(), ("node", "layer")).eval()
    ts = graphs()
    exported = torch.export.export(model, (ts.x, ts.mask))
    other = graphs(seed=3)
    other_mask = other.mask.clone()
    other_mask[0, 2:] = False
    torch.testing.assert_close(exported.module()(other.x, other_mask), model(other.x, other_mask))
    axis = _Export(axis_module(), ("time", "agent")).eval()  # sources in sorted order: map, scene
    a, b = scene(), scene(seed=2)
    ex = torch.export.export(axis, (a.x, a.mask, b.x, b.mask))
    c, d = scene(seed=4), scene(seed=5)
    args = (c.x, torch.zeros_like(c.mask), d.x, d.mask)
    torch.testing.assert_close(ex.module()(*args), axis(*args))

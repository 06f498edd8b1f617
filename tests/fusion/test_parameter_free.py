"""ParameterFreeCrossAttention (ADEM-VL) and the multiscale bank: zero parameters, formula, masks, symmetry, export."""

import pytest
import torch
import torch.nn.functional as F

from attnfuse.fusion import FUSIONS, ParameterFreeCrossAttention, TensorFusion, TokenSet, multiscale_bank

D = 8


def inputs(batch=2, lq=4, s=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"text": TokenSet(torch.randn(batch, lq, D, generator=g)), "visual": TokenSet(torch.randn(batch, s, D, generator=g))}


def released_formula(x, xv, e1, e2, gamma):
    """ADEM-VL's Adapter.forward (vis_weight branch) in our words: sort, threshold at int(gamma * S), keep >= threshold."""
    a = F.silu(x) @ F.silu(xv + e1).transpose(1, 2)
    if gamma > 0:
        thr = a.sort(dim=2).values[:, :, int(gamma * a.shape[2])].unsqueeze(2)
        a = a * (a >= thr)
    return a @ (xv + e2)


def test_zero_parameters_declared_and_true():
    fuse = ParameterFreeCrossAttention(["text", "visual"], D)
    assert FUSIONS["parameter_free"].has_parameters is False
    assert sum(p.numel() for p in fuse.parameters()) == 0 and len(fuse.state_dict()) == 0


@pytest.mark.parametrize("gamma", [0.0, 0.1, 0.25])
def test_matches_released_formula_with_offsets(gamma):
    fuse = ParameterFreeCrossAttention(["text", "visual"], D, drop_ratio=gamma)
    inp = inputs()
    g = torch.Generator().manual_seed(1)
    e1, e2 = 0.02 * torch.randn(1, 20, D, generator=g), 0.1 * torch.randn(1, 20, D, generator=g)
    out = fuse(inp, key_offset=e1, value_offset=e2, return_weights=True)
    ref = released_formula(inp["text"].x, inp["visual"].x, e1, e2, gamma)
    torch.testing.assert_close(out.fused.x, ref, rtol=1e-5, atol=1e-5)
    assert (out.weights["cross"] == 0).sum(-1).flatten().tolist() == [int(gamma * 20)] * 8


def test_identity_at_init_when_values_are_zero():
    fuse = ParameterFreeCrossAttention(["text", "visual"], D)
    inp = inputs()
    zero_visual = TokenSet(torch.zeros(2, 20, D))
    out = fuse(dict(inp, visual=zero_visual), key_offset=0.02 * torch.randn(1, 20, D), value_offset=torch.zeros(1, 20, D))
    assert torch.count_nonzero(out.fused.x) == 0


def test_visual_token_order_invariant_only_without_offsets():
    fuse = ParameterFreeCrossAttention(["text", "visual"], D, drop_ratio=0.1)
    inp = inputs()
    perm = torch.randperm(20, generator=torch.Generator().manual_seed(2))
    shuffled = dict(inp, visual=TokenSet(inp["visual"].x[:, perm]))
    torch.testing.assert_close(fuse(shuffled).fused.x, fuse(inp).fused.x, rtol=1e-5, atol=1e-5)
    e1 = torch.randn(1, 20, D)
    assert not torch.allclose(fuse(shuffled, key_offset=e1).fused.x, fuse(inp, key_offset=e1).fused.x, atol=1e-4)
    # query tokens: equivariant
    qperm = torch.tensor([2, 0, 3, 1])
    q_shuffled = dict(inp, text=TokenSet(inp["text"].x[:, qperm]))
    torch.testing.assert_close(fuse(q_shuffled).fused.x, fuse(inp).fused.x[:, qperm], rtol=1e-5, atol=1e-5)


def test_masks_absent_context_and_padding():
    fuse = ParameterFreeCrossAttention(["text", "visual"], D, drop_ratio=0.2)
    inp = inputs()
    absent = fuse({"text": inp["text"]}).fused.x
    masked = fuse(dict(inp, visual=inp["visual"].with_mask(torch.zeros(2, 20, dtype=torch.bool)))).fused.x
    assert torch.count_nonzero(absent) == 0 and torch.equal(absent, masked)
    keep = torch.rand(2, 20, generator=torch.Generator().manual_seed(3)) > 0.4
    out = fuse(dict(inp, visual=inp["visual"].with_mask(keep))).fused.x
    for b in range(2):
        alone = fuse({"text": TokenSet(inp["text"].x[b : b + 1]), "visual": TokenSet(inp["visual"].x[b : b + 1, keep[b]])}).fused.x
        torch.testing.assert_close(out[b], alone[0], rtol=1e-5, atol=1e-5)
    qmask = torch.tensor([[True, True, False, True], [False] * 4])
    out_q = fuse(dict(inp, text=inp["text"].with_mask(qmask))).fused
    assert torch.count_nonzero(out_q.x[~qmask]) == 0 and torch.equal(out_q.mask, qmask)


def test_gradients_heads_softmax_ablation_and_errors():
    fuse = ParameterFreeCrossAttention(["text", "visual"], D, drop_ratio=0.1, heads=2)
    inp = {n: TokenSet(t.x.clone().requires_grad_()) for n, t in inputs().items()}
    e2 = torch.zeros(1, 20, D, requires_grad=True)
    fuse(inp, value_offset=e2).fused.x.square().sum().backward()
    assert all(t.x.grad.abs().sum() > 0 for t in inp.values()) and e2.grad.abs().sum() > 0
    softmax = ParameterFreeCrossAttention(["text", "visual"], D, drop_ratio=0.0, op="dense")
    w = softmax(inputs(), return_weights=True).weights["cross"]
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 1, 4))
    with pytest.raises(ValueError, match="drop_ratio"):
        ParameterFreeCrossAttention(["text", "visual"], D, drop_ratio=0.1, op="dense")
    no_query = fuse({"visual": inputs()["visual"]}).fused  # no output positions, like a fully masked query
    assert no_query.x.shape == (2, 0, D) and no_query.valid().shape == (2, 0)
    with pytest.raises(ValueError, match="divide"):
        ParameterFreeCrossAttention(["text", "visual"], D, heads=3)
    with pytest.raises(ValueError, match="take no part"):
        ParameterFreeCrossAttention(["text", "visual", "z"], D, context="visual")
    with pytest.raises(ValueError, match="different sources"):
        ParameterFreeCrossAttention(["text", "visual"], D, query="text", context="text")
    with pytest.raises(ValueError, match="key_offset"):
        fuse(inputs(), key_offset=torch.zeros(1, 7, D))


def test_defaults_query_the_first_source_over_every_other_one():
    fuse = ParameterFreeCrossAttention(["text", "v1", "v2"], D)
    assert fuse.query == "text" and fuse.context == ("v1", "v2") and fuse.out_dim == D
    inp = inputs()
    split = {"text": inp["text"], "v1": TokenSet(inp["visual"].x[:, :12]), "v2": TokenSet(inp["visual"].x[:, 12:])}
    two = ParameterFreeCrossAttention(["text", "visual"], D)
    torch.testing.assert_close(fuse(split).fused.x, two(inp).fused.x, rtol=1e-5, atol=1e-5)


def test_multiscale_bank_pools_block_means_and_respects_masks():
    g = torch.Generator().manual_seed(0)
    grid = TokenSet(torch.randn(2, 16, 16, D, generator=g), axes=("h", "w"))
    bank = multiscale_bank(grid)
    assert bank.x.shape == (2, 320, D) and bank.mask.all()
    torch.testing.assert_close(bank.x[:, :256], grid.x.reshape(2, 256, D))
    blocks = grid.x.reshape(2, 8, 2, 8, 2, D).mean(dim=(2, 4)).reshape(2, 64, D)
    torch.testing.assert_close(bank.x[:, 256:], blocks)
    mask = torch.ones(2, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = False
    mask[0, 2:, 2:] = False
    small = TokenSet(torch.randn(2, 4, 4, D, generator=g), mask, ("h", "w"))
    pooled = multiscale_bank(small, sizes=[(2, 2)])
    torch.testing.assert_close(pooled.x[0, 0], small.x[0, :2, :2].reshape(4, D)[1:].mean(0))
    assert pooled.mask[0].tolist() == [True, True, True, False] and torch.count_nonzero(pooled.x[0, 3]) == 0
    with pytest.raises(ValueError, match="grid"):
        multiscale_bank(TokenSet(torch.randn(2, 5, D)))


def test_export_round_trip():
    model = TensorFusion(ParameterFreeCrossAttention(["text", "visual"], D, drop_ratio=0.1), ["text", "visual"]).eval()
    inp = inputs()
    args = (inp["text"].x, torch.ones(2, 4, dtype=torch.bool), inp["visual"].x, torch.ones(2, 20, dtype=torch.bool))
    exported = torch.export.export(model, args)
    other = inputs(seed=9)
    other_args = (other["text"].x, torch.ones(2, 4, dtype=torch.bool), other["visual"].x, torch.rand(2, 20) > 0.5)
    for got, want in zip(exported.module()(*other_args), model(*other_args)):
        torch.testing.assert_close(got, want)

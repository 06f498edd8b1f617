"""DempsterFusion (the rule over raw evidence: MEFN DTF, per pixel) and EvidentialFusion (the registered fusion with its own
evidence heads, TMC): Dempster fold, exact missing-source identity, opinions, conflict, export."""

import pytest
import torch
import torch.nn.functional as F

import attnfuse.fusion as fusion_pkg
from attnfuse.fusion import BLOCKS, FUSIONS, DempsterFusion, EvidentialFusion, EvidentialOutput, TensorFusion, TokenSet
from attnfuse.ops import evidential as ev

K = 3


def heads(batch=2, grid=(4, 5), names=("ct", "pet", "mri"), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    axes = ("h", "w")[: len(grid)] if len(grid) <= 2 else ("x", "y", "z")
    return {n: TokenSet(2 * torch.randn(batch, *grid, K, generator=g, dtype=dtype), None, axes) for n in names}


def test_zero_parameters_and_public_helpers():
    fuse = DempsterFusion(["ct", "pet"], num_classes=K)
    assert DempsterFusion.has_parameters is False and BLOCKS["dempster"] is DempsterFusion
    assert sum(p.numel() for p in fuse.parameters()) == 0
    assert fusion_pkg.dempster_combine is ev.dempster_combine and fusion_pkg.opinion_from_evidence is ev.opinion_from_evidence


def test_equals_fold_of_the_opinion_space_rule():
    fuse = DempsterFusion(["ct", "mri", "pet"], num_classes=K)
    inputs = heads()
    out = fuse(inputs)
    alphas = [F.softplus(inputs[n].x) + 1 for n in ("ct", "mri", "pet")]
    ref = ev.dempster_combine_reference(ev.dempster_combine_reference(alphas[0], alphas[1]), alphas[2])
    torch.testing.assert_close(out.fused.x, ref, rtol=1e-10, atol=1e-10)
    assert out.fused.x.shape == (2, 4, 5, K) and out.fused.axes == ("h", "w")
    torch.testing.assert_close(out.per_source["pet"].x, alphas[2])


def test_hand_computed_two_class_example():
    fuse = DempsterFusion(["a", "b"], num_classes=2, evidence="identity")
    e = {"a": TokenSet(torch.tensor([[[2.0, 0.0]]])), "b": TokenSet(torch.tensor([[[2.0, 0.0]]]))}
    out = fuse(e, return_weights=True)
    # b = (0.5, 0), u = 0.5 each; C = 0; b_fused = (0.25 + 0.25 + 0.25) / 1 = 0.75, u = 0.25 -> S = 8, alpha = (7, 1)
    torch.testing.assert_close(out.fused.x, torch.tensor([[[7.0, 1.0]]]))
    torch.testing.assert_close(out.weights["belief"], torch.tensor([[[0.75, 0.0]]]))
    torch.testing.assert_close(out.weights["uncertainty"], torch.tensor([[[0.25]]]))
    assert out.weights["conflict"].item() == 0.0


def test_missing_source_is_vacuous_and_leaves_others_exactly_unchanged():
    fuse = DempsterFusion(["ct", "mri", "pet"], num_classes=K)
    inputs = heads()
    two = fuse({n: inputs[n] for n in ("ct", "pet")}).fused.x
    masked = fuse(dict(inputs, mri=inputs["mri"].with_mask(torch.zeros(2, 4, 5, dtype=torch.bool)))).fused.x
    assert torch.equal(two, masked)
    one = fuse({"ct": inputs["ct"]}).fused.x
    assert torch.equal(one, F.softplus(inputs["ct"].x) + 1)
    # per pixel: mri missing at some pixels only
    m = torch.rand(2, 4, 5, generator=torch.Generator().manual_seed(1)) > 0.5
    mixed = fuse(dict(inputs, mri=inputs["mri"].with_mask(m))).fused.x
    full = fuse(inputs).fused.x
    assert torch.equal(mixed[~m], two[~m]) and torch.equal(mixed[m], full[m])
    # nothing present: vacuous alpha = 1, invalid, finite
    none = fuse({n: t.with_mask(torch.zeros(2, 4, 5, dtype=torch.bool)) for n, t in inputs.items()}, return_weights=True)
    assert torch.equal(none.fused.x, torch.ones_like(none.fused.x)) and not none.fused.valid().any()
    assert torch.equal(none.weights["uncertainty"], torch.ones(2, 4, 5, 1))


def test_order_invariance_opinion_algebra_and_conflict():
    inputs = heads(seed=3)
    a = DempsterFusion(["ct", "mri", "pet"], num_classes=K)
    renamed = {"z": inputs["ct"], "y": inputs["mri"], "x": inputs["pet"]}  # folded in the reverse order
    b = DempsterFusion(["x", "y", "z"], num_classes=K)
    out_a, out_b = a(inputs, return_weights=True), b(renamed, return_weights=True)
    torch.testing.assert_close(out_a.fused.x, out_b.fused.x, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out_a.weights["conflict"], out_b.weights["conflict"], rtol=1e-9, atol=1e-12)
    w = out_a.weights
    torch.testing.assert_close(w["belief"].sum(-1, keepdim=True) + w["uncertainty"], torch.ones(2, 4, 5, 1, dtype=torch.float64))
    u_min = torch.minimum(torch.minimum(w["uncertainty.ct"], w["uncertainty.mri"]), w["uncertainty.pet"])
    assert (w["uncertainty"] <= u_min + 1e-12).all()
    assert ((w["conflict"] >= 0) & (w["conflict"] < 1)).all() and (w["conflict"] > 0).any()
    single = a({"ct": inputs["ct"]}, return_weights=True).weights["conflict"]
    assert torch.count_nonzero(single) == 0


def test_per_voxel_equals_per_sample_and_extreme_conflict_is_finite():
    fuse = DempsterFusion(["ct", "pet"], num_classes=K)
    vox = heads(grid=(2, 3, 2), names=("ct", "pet"))
    out = fuse(vox).fused.x
    flat = fuse({n: TokenSet(t.x.reshape(-1, 1, K)) for n, t in vox.items()}).fused.x
    torch.testing.assert_close(out.reshape(-1, K), flat.reshape(-1, K))
    big = torch.tensor([[[1e4, -60.0, -60.0]]])
    res = fuse({"ct": TokenSet(big), "pet": TokenSet(big.flip(-1))}, return_weights=True)
    assert torch.isfinite(res.fused.x).all() and torch.isfinite(res.weights["conflict"]).all()
    assert res.weights["conflict"].item() > 0.99


def test_gradients_and_errors():
    fuse = DempsterFusion(["ct", "pet"], num_classes=K)
    inputs = {n: TokenSet(t.x.clone().requires_grad_(), None, t.axes) for n, t in heads(names=("ct", "pet")).items()}
    fuse(inputs, return_weights=True).weights["uncertainty"].sum().backward()
    assert all(torch.isfinite(t.x.grad).all() and t.x.grad.abs().sum() > 0 for t in inputs.values())
    with pytest.raises(ValueError, match="one token grid"):
        fuse({"ct": TokenSet(torch.randn(2, 4, K)), "pet": TokenSet(torch.randn(2, 5, K))})
    with pytest.raises(ValueError, match="width"):
        fuse({"ct": TokenSet(torch.randn(2, 4, K + 1))})
    with pytest.raises(ValueError, match="evidence"):
        DempsterFusion(["a"], num_classes=K, evidence="sigmoid")


def test_export_round_trip():
    model = TensorFusion(DempsterFusion(["ct", "pet"], num_classes=K), ["ct", "pet"]).eval()
    g = torch.Generator().manual_seed(0)
    args = (torch.randn(2, 6, K, generator=g), torch.ones(2, 6, dtype=torch.bool), torch.randn(2, 6, K, generator=g),
            torch.ones(2, 6, dtype=torch.bool))
    exported = torch.export.export(model, args)
    other = (torch.randn(2, 6, K, generator=g), torch.rand(2, 6, generator=g) > 0.5, torch.randn(2, 6, K, generator=g),
             torch.zeros(2, 6, dtype=torch.bool))
    for got, want in zip(exported.module()(*other), model(*other)):
        torch.testing.assert_close(got, want)


def tokens(names=("ct", "pet"), batch=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, n in enumerate(names):
        mask = torch.rand(batch, 4 + i, generator=g) > 0.3
        mask[:, 0] = True
        out[n] = TokenSet(torch.randn(batch, 4 + i, d, generator=g, dtype=torch.float64), mask)
    return out


def test_evidential_fusion_is_pooled_heads_then_the_rule():
    torch.manual_seed(0)
    fuse = EvidentialFusion(["pet", "ct"], 8, num_classes=K, dtype=torch.float64)
    assert FUSIONS["evidential"] is EvidentialFusion and fuse.output == "dirichlet" and fuse.out_dim == K
    inputs = tokens()
    out = fuse(inputs, return_weights=True)
    assert isinstance(out, EvidentialOutput) and out.fused.x.shape == (3, 1, K) and out.fused.valid().all()
    raw = {}
    for n, t in inputs.items():
        pooled = (t.x * t.mask[..., None]).sum(1, keepdim=True) / t.mask.sum(1)[:, None, None]
        raw[n] = TokenSet(fuse.heads[n](pooled))
    ref = DempsterFusion(["ct", "pet"], num_classes=K)(raw, return_weights=True)
    torch.testing.assert_close(out.fused.x, ref.fused.x)
    torch.testing.assert_close(out.weights["uncertainty"], ref.weights["uncertainty"])
    torch.testing.assert_close(out.per_source["pet"].x, F.softplus(raw["pet"].x) + 1)
    assert [a.shape for a in out.per_source_alpha] == [(3, K), (3, K)]  # sorted: ct, pet
    torch.testing.assert_close(out.per_source_alpha[0], out.per_source["ct"].x[:, 0])


def test_evidential_fusion_missing_sources_give_vacuous_opinions_for_the_loss_too():
    fuse = EvidentialFusion(["ct", "pet"], 8, num_classes=K, dtype=torch.float64)
    inputs = tokens()
    masked = fuse(dict(inputs, pet=inputs["pet"].with_mask(torch.zeros_like(inputs["pet"].mask))))
    absent = fuse({"ct": inputs["ct"]})
    assert torch.equal(masked.fused.x, absent.fused.x)
    for a, b in zip(masked.per_source_alpha, absent.per_source_alpha):
        assert torch.equal(a, b)
    assert torch.equal(absent.per_source_alpha[1], torch.ones(3, K, dtype=torch.float64))
    nothing = fuse({n: t.with_mask(torch.zeros_like(t.mask)) for n, t in inputs.items()})
    assert torch.equal(nothing.fused.x, torch.ones(3, 1, K, dtype=torch.float64)) and not nothing.fused.valid().any()


def test_evidential_fusion_needs_num_classes_and_exports():
    with pytest.raises(ValueError, match="num_classes"):
        EvidentialFusion(["ct", "pet"], 8)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        EvidentialFusion(["ct", "pet"], 8, num_classes=1)
    model = TensorFusion(EvidentialFusion(["ct", "pet"], 8, num_classes=K, dtype=torch.float64)).eval()
    inputs = tokens()
    args = tuple(t for n in ("ct", "pet") for t in (inputs[n].x, inputs[n].mask))
    exported = torch.export.export(model, args)
    other = tokens(seed=2)
    other_args = (other["ct"].x, torch.zeros_like(other["ct"].mask), other["pet"].x, other["pet"].mask)
    for got, want in zip(exported.module()(*other_args), model(*other_args)):
        torch.testing.assert_close(got, want)

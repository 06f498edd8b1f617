"""The fusion protocol, checked for every entry of ``FUSIONS`` (parametrized over ``list_fusions()``).

A new fusion is picked up here by its ``@register_fusion`` decorator alone. Every entry is built with
its defaults only (``cls(sources, dim)``; a ``num_classes=None`` parameter is filled as a model builder
fills it from the data) and must keep: the constructor / forward signature, its declarations, the
output width ``out_dim``, gradients, absent source == all-False mask, a sample's missing source ==
dropping it for that sample, batch consistency, independence of the input dict's order, its declared
token-order symmetry, and a ``torch.export`` round trip through :class:`TensorFusion`.
"""

import inspect

import pytest
import torch

from attnfuse.fusion import (
    FUSIONS,
    OUTPUTS,
    SYMMETRIES,
    FusionOutput,
    TensorFusion,
    TokenSet,
    get_fusion,
    list_fusions,
)

D = 16
K = 3  # classes given to a constructor whose num_classes defaults to None (a model builder fills it from the data)
NAMES = ("a", "b", "c")
DTYPE = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-9}


def fill_from_data(cls) -> dict:
    """What a model builder fills in: ``num_classes`` when the constructor has it and it defaults to None."""
    params = inspect.signature(cls).parameters
    return {"num_classes": K} if "num_classes" in params and params["num_classes"].default is None else {}


def build(name, sources=NAMES):
    """The fusion with default options; every parameter nudged so that zero-initialised ones (gates,
    residual scales) do not make the module an identity that passes every check trivially."""
    cls = get_fusion(name)
    torch.manual_seed(0)
    fusion = cls(list(sources), D, dtype=DTYPE, **fill_from_data(cls)).eval()
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return fusion


def make_inputs(sources=NAMES, batch=3, counts=None, seed=0):
    """Plain ``(B, N, D)`` token sets; token 0 always valid, the rest random (equal counts by default)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for i, name in enumerate(sources):
        n = 5 if counts is None else counts[i]
        mask = torch.rand(batch, n, generator=g) > 0.3
        mask[:, 0] = True
        out[name] = TokenSet(torch.randn(batch, n, D, generator=g, dtype=DTYPE), mask)
    return out


def valid(out: FusionOutput, sample: int) -> torch.Tensor:
    fused = out.fused
    return fused.x[sample][fused.valid()[sample]]


def pooled(out: FusionOutput) -> torch.Tensor:
    m = out.fused.valid().unsqueeze(-1).to(out.fused.x.dtype)
    return (out.fused.x * m).sum(1) / m.sum(1).clamp_min(1.0)


def assert_same(a: FusionOutput, b: FusionOutput, samples=range(3), b_samples=None):
    for s, t in zip(samples, b_samples or samples):
        torch.testing.assert_close(valid(a, s), valid(b, t), **TOL)


FUSION_NAMES = list_fusions()


def test_registry_is_not_empty_and_lists_fusions_only():
    assert len(FUSION_NAMES) >= 10 and "inject" not in FUSIONS and "router" not in FUSIONS


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_constructor_and_forward_signatures(name):
    cls = get_fusion(name)
    params = list(inspect.signature(cls).parameters.values())
    assert [p.name for p in params[:2]] == ["sources", "dim"]
    assert all(p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty for p in params[:2])
    for p in params[2:]:
        assert p.kind is p.KEYWORD_ONLY, f"{name}: option {p.name} must be keyword-only"
        assert p.default is not p.empty, f"{name}: option {p.name} needs a default"
    assert {"device", "dtype"} <= {p.name for p in params}
    fwd = list(inspect.signature(cls.forward).parameters.values())
    assert fwd[1].name == "inputs" and fwd[1].kind is fwd[1].POSITIONAL_OR_KEYWORD
    extra = fwd[2:]
    assert all(p.kind is p.KEYWORD_ONLY and p.default is not p.empty for p in extra), f"{name}: forward options need defaults"
    assert any(p.name == "return_weights" and p.default is False for p in extra)


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_declarations_match_the_instance(name):
    cls = get_fusion(name)
    fusion = build(name)
    assert cls.symmetry in SYMMETRIES and fusion.symmetry in SYMMETRIES
    assert cls.output in OUTPUTS and isinstance(cls.has_parameters, bool)
    trainable = sum(p.numel() for p in fusion.parameters() if p.requires_grad)
    assert (trainable > 0) == cls.has_parameters
    assert isinstance(fusion.out_dim, int) and fusion.out_dim >= 1
    assert tuple(fusion.sources) == tuple(sorted(NAMES))
    if hasattr(fusion, "fusion_token_attends"):
        assert isinstance(fusion.fusion_token_attends, bool)
    if cls.output == "dirichlet":
        assert fusion.out_dim == K


@pytest.mark.parametrize("name", [n for n in FUSION_NAMES if fill_from_data(get_fusion(n))])
def test_num_classes_left_unset_is_a_clear_error(name):
    with pytest.raises(ValueError, match="num_classes"):
        get_fusion(name)(list(NAMES), D)


@pytest.mark.parametrize("num_sources", [2, 3])
@pytest.mark.parametrize("name", FUSION_NAMES)
def test_defaults_forward_backward_and_width(name, num_sources):
    sources = NAMES[:num_sources]
    fusion = build(name, sources).train()
    inputs = {n: TokenSet(t.x.clone().requires_grad_(), t.mask) for n, t in make_inputs(sources).items()}
    out = fusion(inputs)
    assert isinstance(out, FusionOutput) and isinstance(out.fused, TokenSet)
    assert out.fused.x.shape[0] == 3 and out.fused.x.shape[-1] == fusion.out_dim
    assert out.fused.valid().shape == out.fused.x.shape[:-1] and out.weights == {}
    assert torch.isfinite(out.fused.x).all()
    if fusion.output == "dirichlet":
        assert out.fused.x.shape == (3, 1, K) and (out.fused.x >= 1).all()
    loss = (out.fused.x * out.fused.valid().unsqueeze(-1)).square().sum()
    loss.backward()
    grads = [p.grad for p in fusion.parameters() if p.grad is not None]
    assert all(torch.isfinite(g).all() for g in grads)
    if fusion.has_parameters:
        assert any(g.abs().sum() > 0 for g in grads)
    assert all(t.x.grad is None or torch.isfinite(t.x.grad).all() for t in inputs.values())
    with_maps = fusion(inputs, return_weights=True)
    assert all(isinstance(w, torch.Tensor) for w in with_maps.weights.values())


@pytest.mark.parametrize("dropped", NAMES)
@pytest.mark.parametrize("name", FUSION_NAMES)
def test_absent_source_equals_all_false_mask(name, dropped):
    fusion = build(name)
    inputs = make_inputs()
    masked = dict(inputs, **{dropped: inputs[dropped].with_mask(torch.zeros_like(inputs[dropped].mask))})
    absent = {k: v for k, v in inputs.items() if k != dropped}
    out_masked, out_absent = fusion(masked), fusion(absent)
    assert_same(out_masked, out_absent)
    torch.testing.assert_close(pooled(out_masked), pooled(out_absent), **TOL)


@pytest.mark.parametrize("dropped", NAMES)
@pytest.mark.parametrize("name", FUSION_NAMES)
def test_per_sample_missing_equals_dropping_the_source_for_that_sample(name, dropped):
    fusion = build(name)
    inputs = make_inputs()
    mask = inputs[dropped].mask.clone()
    mask[1] = False  # missing for sample 1 only
    out = fusion(dict(inputs, **{dropped: inputs[dropped].with_mask(mask)}))
    alone = fusion({k: TokenSet(v.x[1:2], v.mask[1:2]) for k, v in inputs.items() if k != dropped})
    assert_same(out, alone, [1], [0])


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_batch_consistency(name):
    fusion = build(name)
    inputs = make_inputs()
    out = fusion(inputs)
    for s in range(3):
        alone = fusion({k: TokenSet(v.x[s : s + 1], v.mask[s : s + 1]) for k, v in inputs.items()})
        assert_same(out, alone, [s], [0])


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_input_dict_order_does_not_matter(name):
    fusion = build(name)
    inputs = make_inputs()
    for order in (("c", "a", "b"), ("b", "c", "a")):
        shuffled = fusion({k: inputs[k] for k in order})
        ref = fusion(inputs)
        torch.testing.assert_close(shuffled.fused.x, ref.fused.x, rtol=0, atol=0)
        assert torch.equal(shuffled.fused.valid(), ref.fused.valid())


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_declared_token_order_symmetry(name):
    """One permutation applied to every source's tokens (so aligned sources stay aligned)."""
    fusion = build(name)
    inputs = make_inputs()
    perm = torch.tensor([3, 0, 4, 2, 1])
    out = fusion(inputs)
    out_p = fusion({k: TokenSet(v.x[:, perm], v.mask[:, perm]) for k, v in inputs.items()})
    if fusion.symmetry == "invariant":
        torch.testing.assert_close(out_p.fused.x, out.fused.x, **TOL)
    elif fusion.symmetry == "equivariant":  # the same valid output tokens, permuted
        probe = torch.randn(fusion.out_dim, generator=torch.Generator().manual_seed(1), dtype=DTYPE)
        for s in range(3):
            a, b = valid(out, s), valid(out_p, s)
            torch.testing.assert_close(a[torch.argsort(a @ probe)], b[torch.argsort(b @ probe)], **TOL)
    else:  # "ordered": token order may change the output; nothing to promise beyond finiteness
        assert torch.isfinite(out_p.fused.x).all()


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_every_source_missing_gives_finite_output_and_gradients(name):
    fusion = build(name)
    inputs = {k: TokenSet(v.x.clone().requires_grad_(), torch.zeros_like(v.mask)) for k, v in make_inputs().items()}
    out = fusion(inputs)
    assert torch.isfinite(out.fused.x).all()
    (out.fused.x.sum() + pooled(out).sum()).backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in fusion.parameters())
    assert all(t.x.grad is None or torch.isfinite(t.x.grad).all() for t in inputs.values())


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_defaults_work_on_sources_of_different_lengths(name):
    """Tables give sources of different token counts (one token per feature): the defaults must take them."""
    fusion = build(name)
    out = fusion(make_inputs(counts=(4, 6, 3)))
    assert out.fused.x.shape[-1] == fusion.out_dim and torch.isfinite(out.fused.x).all()


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_export_round_trip_through_tensor_fusion(name):
    model = TensorFusion(build(name)).eval()
    inputs = make_inputs()
    args = tuple(t for n in model.sources for t in (inputs[n].x, inputs[n].mask))
    exported = torch.export.export(model, args)
    other = make_inputs(seed=5)
    other_args = [t for n in model.sources for t in (other[n].x, other[n].mask)]
    other_args[3] = torch.zeros_like(other_args[3])  # source "b" missing for every sample
    for got, want in zip(exported.module()(*other_args), model(*other_args)):
        torch.testing.assert_close(got, want, **TOL)

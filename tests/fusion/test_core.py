"""Fusion core: TokenSet, SourceEmbedding, early / late / hierarchical / latent / cross-attention fusion."""

import pytest
import torch

from attnfuse.fusion import (
    CrossAttentionFusion,
    EarlyFusion,
    HierarchicalFusion,
    LateFusion,
    LatentBottleneck,
    TensorFusion,
    TokenSet,
)
from attnfuse.heads import ClassificationHead, mean_pool
from attnfuse.nn import Encoder

D = 16
SOURCES = ("a", "b", "c")


def make_inputs(batch=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    lens = {"a": 4, "b": 5, "c": 3}
    out = {}
    for name, n in lens.items():
        x = torch.randn(batch, n, D, generator=g, dtype=dtype)
        mask = torch.rand(batch, n, generator=g) > 0.3
        mask[:, 0] = True
        out[name] = TokenSet(x, mask)
    return out


def builders():
    common = {"heads": 2, "mlp_ratio": 2.0}
    return {
        "early": lambda **kw: EarlyFusion(SOURCES, D, depth=2, **common, **kw),
        "late": lambda **kw: LateFusion(SOURCES, D, depth=2, **common, **kw),
        "hierarchical": lambda **kw: HierarchicalFusion(SOURCES, D, per_source_depth=1, cross_depth=1, **common, **kw),
        "latent": lambda **kw: LatentBottleneck(SOURCES, D, num_latents=3, depth=1, **common, **kw),
        "cross": lambda **kw: CrossAttentionFusion(SOURCES, D, query="a", key=("b", "c"), depth=2, decoder=True, **common, **kw),
    }


def valid_tokens(out, sample):
    fused = out.fused
    return fused.x[sample][fused.valid()[sample]]


@pytest.mark.parametrize("name", list(builders()))
@pytest.mark.parametrize("missing_token", [False, True])
def test_absent_source_equals_all_false_mask(name, missing_token):
    torch.manual_seed(0)
    fusion = builders()[name](missing_token=missing_token).eval()
    inputs = make_inputs()
    masked = dict(inputs, b=inputs["b"].with_mask(torch.zeros_like(inputs["b"].mask)))
    absent = {k: v for k, v in inputs.items() if k != "b"}
    out_masked, out_absent = fusion(masked), fusion(absent)
    for s in range(3):
        torch.testing.assert_close(valid_tokens(out_masked, s), valid_tokens(out_absent, s), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        mean_pool(out_masked.fused.x, out_masked.fused.mask), mean_pool(out_absent.fused.x, out_absent.fused.mask),
        rtol=1e-5, atol=1e-5,
    )
    # and the source does matter when present
    full = fusion(inputs)
    assert not torch.allclose(mean_pool(full.fused.x, full.fused.mask), mean_pool(out_absent.fused.x, out_absent.fused.mask))


@pytest.mark.parametrize("name", list(builders()))
def test_per_sample_missing_equals_dropping_for_that_sample(name):
    torch.manual_seed(0)
    fusion = builders()[name]().eval()
    inputs = make_inputs()
    mask_b = inputs["b"].mask.clone()
    mask_b[1] = False  # b missing for sample 1 only
    out = fusion(dict(inputs, b=inputs["b"].with_mask(mask_b)))
    alone = fusion({k: TokenSet(v.x[1:2], v.mask[1:2]) for k, v in inputs.items() if k != "b"})
    torch.testing.assert_close(valid_tokens(out, 1), valid_tokens(alone, 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(builders()))
def test_batch_consistency_and_padding_equals_deletion(name):
    torch.manual_seed(0)
    fusion = builders()[name]().eval()
    inputs = make_inputs()
    out = fusion(inputs)
    # sample 2 alone, with its padded tokens deleted
    alone = {k: TokenSet(v.x[2:3][:, v.mask[2]], None) for k, v in inputs.items()}
    torch.testing.assert_close(valid_tokens(out, 2), valid_tokens(fusion(alone), 0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", list(builders()))
def test_every_source_missing_still_gives_finite_output(name):
    fusion = builders()[name]()
    inputs = {k: v.with_mask(torch.zeros_like(v.mask)) for k, v in make_inputs().items()}
    out = fusion(inputs)
    assert out.fused.valid().any(dim=1).all(), "fusion tokens / latents are always present"
    head = ClassificationHead(D, 4, pooling="mean")
    logits = head(out.fused)
    logits.sum().backward()
    assert torch.isfinite(logits).all()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in fusion.parameters())


def test_hierarchical_reduces_to_late_and_early_with_same_weights():
    torch.manual_seed(0)
    inputs = make_inputs()
    hier_late = HierarchicalFusion(SOURCES, D, heads=2, per_source_depth=2, cross_depth=0).eval()
    late = LateFusion(SOURCES, D, heads=2, depth=2).eval()
    late.load_state_dict(hier_late.state_dict())  # strict: identical parameter sets
    torch.testing.assert_close(late(inputs).fused.x, hier_late(inputs).fused.x)
    hier_early = HierarchicalFusion(SOURCES, D, heads=2, per_source_depth=0, cross_depth=2).eval()
    early = EarlyFusion(SOURCES, D, heads=2, depth=2).eval()
    early.load_state_dict(hier_early.state_dict())
    torch.testing.assert_close(early(inputs).fused.x, hier_early(inputs).fused.x)


def test_early_fusion_equals_encoder_on_concatenation():
    torch.manual_seed(0)
    inputs = make_inputs()
    fusion = EarlyFusion(SOURCES, D, heads=2, depth=2).eval()
    emb = fusion.embed.type_embedding
    xs = [fusion.fusion_tokens.expand(3, -1, -1)] + [
        torch.where(inputs[n].mask[..., None], inputs[n].x, 0.0) + emb[i] for i, n in enumerate(SOURCES)
    ]
    masks = [torch.ones(3, 1, dtype=torch.bool)] + [inputs[n].mask for n in SOURCES]
    ref = fusion.encoder(torch.cat(xs, 1), mask=torch.cat(masks, 1))
    torch.testing.assert_close(fusion(inputs).fused.x, ref)


def test_late_fusion_equals_separate_encoders_and_has_no_cross_gradient():
    torch.manual_seed(0)
    inputs = make_inputs()
    inputs = {k: TokenSet(v.x.requires_grad_(), v.mask) for k, v in inputs.items()}
    fusion = LateFusion(SOURCES, D, heads=2, depth=2).eval()
    out = fusion(inputs)
    emb = fusion.embed.type_embedding
    a = inputs["a"]
    ref_a = fusion.source_encoders["a"](torch.where(a.mask[..., None], a.x, 0.0) + emb[0], mask=a.mask)
    torch.testing.assert_close(out.per_source["a"].x, ref_a)
    (grad_b,) = torch.autograd.grad(out.per_source["a"].x.sum(), inputs["b"].x, allow_unused=True)
    assert grad_b is None or torch.count_nonzero(grad_b) == 0
    (grad_a,) = torch.autograd.grad(out.per_source["a"].x.sum(), inputs["a"].x)
    assert torch.count_nonzero(grad_a) > 0


def test_early_fusion_is_token_permutation_equivariant_without_positions():
    torch.manual_seed(0)
    inputs = make_inputs()
    fusion = EarlyFusion(SOURCES, D, heads=2, depth=2).eval()
    perm = torch.tensor([2, 0, 4, 1, 3])
    permuted = dict(inputs, b=TokenSet(inputs["b"].x[:, perm], inputs["b"].mask[:, perm]))
    out, out_p = fusion(inputs), fusion(permuted)
    torch.testing.assert_close(out_p.per_source["b"].x, out.per_source["b"].x[:, perm], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_p.per_source["a"].x, out.per_source["a"].x, rtol=1e-5, atol=1e-5)
    # with positions the order matters
    pos = torch.randn(1, 5, D)
    with_pos = fusion(dict(inputs, b=TokenSet(inputs["b"].x, inputs["b"].mask, pos=pos)))
    with_pos_p = fusion(dict(inputs, b=TokenSet(inputs["b"].x[:, perm], inputs["b"].mask[:, perm], pos=pos)))
    assert not torch.allclose(with_pos_p.per_source["b"].x, with_pos.per_source["b"].x[:, perm], atol=1e-4)


def test_source_order_in_dict_does_not_matter():
    fusion = EarlyFusion(SOURCES, D, heads=2, depth=1).eval()
    inputs = make_inputs()
    reordered = {k: inputs[k] for k in ("c", "a", "b")}
    torch.testing.assert_close(fusion(inputs).fused.x, fusion(reordered).fused.x)


def test_latent_bottleneck_is_invariant_to_token_order():
    torch.manual_seed(0)
    inputs = make_inputs()
    fusion = LatentBottleneck(SOURCES, D, heads=2, num_latents=4, depth=2).eval()
    perms = {n: torch.randperm(v.x.shape[1]) for n, v in inputs.items()}
    shuffled = {n: TokenSet(v.x[:, perms[n]], v.mask[:, perms[n]]) for n, v in inputs.items()}
    torch.testing.assert_close(fusion(inputs).fused.x, fusion(shuffled).fused.x, rtol=1e-5, atol=1e-5)
    assert LatentBottleneck(SOURCES, D, heads=2, latent_ratio=0.25, num_tokens=12).latents.shape[0] == 3
    assert LatentBottleneck(SOURCES, D).latents.shape[0] == 8  # the default
    with pytest.raises(ValueError, match="at most one"):
        LatentBottleneck(SOURCES, D, heads=2, num_latents=2, latent_ratio=0.5, num_tokens=4)


def test_cross_attention_keys_and_values_from_different_sources():
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    text = TokenSet(torch.randn(2, 4, D, generator=g))
    audio = TokenSet(torch.randn(2, 4, D, generator=g))  # aligned with text (same utterances)
    fusion = CrossAttentionFusion(["audio", "text"], D, heads=2, query="text", key="audio", value="text",
                                  type_embedding=None).eval()
    out = fusion({"text": text, "audio": audio}, return_weights=True)
    assert out.weights["cross.0"].shape == (2, 2, 5, 4)
    layer = fusion.layers[0]
    q_in = torch.cat([fusion.fusion_tokens.expand(2, -1, -1), text.x], 1)
    ref = layer(q_in, context=audio.x, value=text.x)
    torch.testing.assert_close(out.fused.x, ref)
    # a value source with a different layout is an error
    with pytest.raises(ValueError, match="tokens"):
        fusion({"text": text, "audio": TokenSet(torch.randn(2, 3, D))})
    with pytest.raises(ValueError, match="cannot also be a key"):
        CrossAttentionFusion(["a", "b"], D, heads=2, query="a", key="a")
    with pytest.raises(ValueError, match="not among sources"):
        CrossAttentionFusion(["a", "b"], D, heads=2, query="a", key="z")


def test_cross_attention_without_any_key_gives_zero_attention_update():
    fusion = CrossAttentionFusion(["q", "k"], D, heads=2, query="q", key="k").eval()
    q = TokenSet(torch.randn(2, 3, D))
    only_q = fusion({"q": q})
    masked_k = fusion({"q": q, "k": TokenSet(torch.randn(2, 5, D), torch.zeros(2, 5, dtype=torch.bool))})
    torch.testing.assert_close(only_q.fused.x, masked_k.fused.x)


def test_modality_dropout_only_in_training():
    torch.manual_seed(0)
    fusion = EarlyFusion(SOURCES, D, heads=2, depth=1, modality_dropout=0.5)
    inputs = make_inputs(batch=64)
    fusion.train()
    prepared = fusion.embed(inputs)
    dropped = sum((~p.mask.any(1)).sum().item() for p in prepared)
    assert 30 < dropped < 170  # ~96 expected of 192 (source, sample) pairs
    fusion.eval()
    assert all(torch.equal(p.mask, inputs[p.name].mask) for p in fusion.embed(inputs))
    with pytest.raises(ValueError, match="modality_dropout"):
        EarlyFusion(SOURCES, D, heads=2, depth=1, modality_dropout=1.0)


def test_missing_token_represents_missing_source():
    fusion = EarlyFusion(SOURCES, D, heads=2, depth=1, missing_token=True).eval()
    inputs = make_inputs()
    prepared = {p.name: p for p in fusion.embed({"a": inputs["a"]})}
    assert set(prepared) == set(SOURCES)
    assert prepared["b"].x.shape == (3, 1, D) and prepared["b"].mask.all()
    out_absent = fusion({"a": inputs["a"]})
    out_present = fusion(inputs)
    assert not torch.allclose(out_absent.fused.x[:, 0], out_present.fused.x[:, 0])


def test_zero_init_type_embedding_and_no_type_embedding():
    assert torch.count_nonzero(EarlyFusion(SOURCES, D, heads=2, depth=1, type_embedding="zeros").embed.type_embedding) == 0
    assert EarlyFusion(SOURCES, D, heads=2, depth=1, type_embedding=None).embed.type_embedding is None
    with pytest.raises(ValueError, match="type_embedding"):
        EarlyFusion(SOURCES, D, heads=2, depth=1, type_embedding="sinusoid")


def test_fusion_input_errors():
    fusion = EarlyFusion(SOURCES, D, heads=2, depth=1)
    inputs = make_inputs()
    with pytest.raises(KeyError, match="built for"):
        fusion(dict(inputs, z=inputs["a"]))
    with pytest.raises(ValueError, match="width D=8"):
        fusion(dict(inputs, a=TokenSet(torch.randn(3, 4, 8))))
    with pytest.raises(ValueError, match="batch size"):
        fusion(dict(inputs, a=TokenSet(torch.randn(2, 4, D))))
    with pytest.raises(TypeError, match="TokenSet"):
        fusion(dict(inputs, a=torch.randn(3, 4, D)))
    with pytest.raises(ValueError, match="at least one input"):
        fusion({})
    with pytest.raises(ValueError, match="distinct"):
        EarlyFusion(["a", "a"], D, heads=2, depth=1)
    with pytest.raises(ValueError, match="num_fusion_tokens"):
        EarlyFusion(SOURCES, D, heads=2, depth=1, num_fusion_tokens=0)


def test_tokenset_validation_and_helpers():
    x = torch.randn(2, 3, 4, D)
    ts = TokenSet(x, torch.ones(2, 3, 4, dtype=torch.bool), axes=("time", "agent"))
    flat = ts.flatten()
    assert flat.x.shape == (2, 12, D) and flat.mask.shape == (2, 12) and ts.num_tokens == 12
    assert ts.present().tolist() == [True, True]
    with pytest.raises(ValueError, match="axes"):
        TokenSet(x)
    with pytest.raises(TypeError, match="bool"):
        TokenSet(torch.randn(2, 3, D), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"\(2, 3\)"):
        TokenSet(torch.randn(2, 3, D), torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match="floating"):
        TokenSet(torch.ones(2, 3, D, dtype=torch.long))
    with pytest.raises(ValueError, match="at least one token axis"):
        TokenSet(torch.randn(2, D))
    with pytest.raises(ValueError, match="pos"):
        TokenSet(torch.randn(2, 3, D), pos=torch.randn(4, D))


def test_weights_are_returned_with_layout():
    fusion = HierarchicalFusion(SOURCES, D, heads=2, per_source_depth=1, cross_depth=2)
    out = fusion(make_inputs(), return_weights=True)
    assert set(out.weights) == {"a.0", "b.0", "c.0", "cross.0", "cross.1"}
    n = out.fused.x.shape[1]
    assert out.weights["cross.1"].shape == (3, 2, n, n)
    assert out.layout == {"fusion": (0, 1), "a": (1, 5), "b": (5, 10), "c": (10, 13)}
    torch.testing.assert_close(out.weights["cross.0"].sum(-1), torch.ones(3, 2, n))
    assert fusion(make_inputs()).weights == {}


@pytest.mark.slow
def test_export_early_fusion_with_masks_round_trips():
    torch.manual_seed(0)
    fusion = EarlyFusion(SOURCES, D, heads=2, depth=2)
    model = TensorFusion(fusion, SOURCES, head=ClassificationHead(D, 5, pooling="fusion")).eval()
    inputs = make_inputs()
    args = tuple(t for n in SOURCES for t in (inputs[n].x, inputs[n].mask))
    exported = torch.export.export(model, args)
    # different values (and a fully masked source) through the exported program
    other = make_inputs(seed=3)
    other_args = [t for n in SOURCES for t in (other[n].x, other[n].mask)]
    other_args[3] = torch.zeros_like(other_args[3])
    torch.testing.assert_close(exported.module()(*other_args), model(*other_args))
    torch.testing.assert_close(exported.module()(*args), model(*args))


def test_registry_declarations():
    from attnfuse.fusion import FUSIONS, SYMMETRIES, get_fusion, register_fusion

    for name in ("early", "late", "hierarchical", "latent", "cross"):
        cls = get_fusion(name)
        assert cls.symmetry in SYMMETRIES and cls.has_parameters is True
    assert FUSIONS["latent"].symmetry == "invariant"
    with pytest.raises(KeyError, match="registered fusions"):
        get_fusion("nope")
    with pytest.raises(ValueError, match="already registered"):
        register_fusion("early")(EarlyFusion)
    with pytest.raises(ValueError, match="symmetry"):
        register_fusion("bad")(type("Bad", (), {}))


def test_encoder_used_inside_fusion_is_standard():
    assert isinstance(EarlyFusion(SOURCES, D, heads=2, depth=1).encoder, Encoder)


def test_reserved_source_names_are_rejected():
    for bad in ("fusion", "cross", "latent", "self"):
        with pytest.raises(ValueError, match="reserved"):
            EarlyFusion([bad, "b"], D, heads=2, depth=1)


def test_zero_token_source_with_missing_token_equals_absent():
    fusion = EarlyFusion(SOURCES, D, heads=2, depth=1, missing_token=True).eval()
    inputs = make_inputs()
    empty = dict(inputs, b=TokenSet(torch.randn(3, 0, D)))
    absent = {k: v for k, v in inputs.items() if k != "b"}
    torch.testing.assert_close(fusion(empty).fused.x, fusion(absent).fused.x)


def test_cross_attention_rejects_missing_token_with_split_key_value_sources():
    with pytest.raises(ValueError, match="missing_token"):
        CrossAttentionFusion(["q", "k", "v"], D, heads=2, query="q", key="k", value="v", missing_token=True)


def test_fusion_token_attends_flags():
    assert EarlyFusion(SOURCES, D, heads=2, depth=1).fusion_token_attends
    assert not LateFusion(SOURCES, D, heads=2, depth=1).fusion_token_attends
    assert LatentBottleneck.fusion_token_attends and CrossAttentionFusion.fusion_token_attends


def test_defaults_of_the_core_fusions():
    early, late, hier = EarlyFusion(SOURCES, D), LateFusion(SOURCES, D), HierarchicalFusion(SOURCES, D)
    assert early.encoder.depth == 2 and all(e.depth == 0 for e in early.source_encoders.values())
    assert late.encoder.depth == 0 and all(e.depth == 2 for e in late.source_encoders.values())
    assert hier.encoder.depth == 1 and all(e.depth == 1 for e in hier.source_encoders.values())
    assert early.out_dim == late.out_dim == hier.out_dim == D
    cross = CrossAttentionFusion(["text", "audio", "video"], D)
    assert cross.query == "text" and cross.keys == ("audio", "video") and cross.values == cross.keys
    assert CrossAttentionFusion(["q"], D).keys == ()  # nothing to attend: a zero attention update
    with pytest.raises(ValueError, match="one source"):
        CrossAttentionFusion(SOURCES, D, query=["a", "b"])
    with pytest.raises(ValueError, match="sequence of names"):
        EarlyFusion("ab", D)

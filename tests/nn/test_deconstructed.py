"""Deconstructed attention variants (spec deconstructing-attention.md, invariants 1-3, 6-8) and Encoder(pattern=)."""

from __future__ import annotations

import pytest
import torch

from attnfuse.nn import DeconstructedEncoder, DecoupledAttention, Encoder, GatedMLPMixer
from attnfuse.nn.deconstructed import STREAM_VARIANTS, VARIANTS, standard_layers
from attnfuse.ops.configs import Dense, Kernel

D, HEADS, T = 16, 2, 7


def _enc(variant, layout="uniform", depth=2, seed=0):
    torch.manual_seed(seed)
    return DeconstructedEncoder(D, depth=depth, heads=HEADS, variant=variant, layout=layout, context=T + 3).double()


def _stream(variant):
    return torch.randn(1, T, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5)) if variant == "fixed_seq_qk" else None


@pytest.mark.parametrize("layout", ["uniform", "hybrid_odd"])
@pytest.mark.parametrize("variant", VARIANTS)
def test_causality_perturbing_a_future_token_changes_no_earlier_output(variant, layout):
    enc = _enc(variant, layout)
    x = torch.randn(2, T, D, dtype=torch.float64)
    out = enc(x, is_causal=True, stream=_stream(variant))
    for pos in (2, T - 1):
        x2 = x.clone()
        x2[:, pos] += torch.randn(D, dtype=torch.float64)
        out2 = enc(x2, is_causal=True, stream=_stream(variant))
        torch.testing.assert_close(out2[:, :pos], out[:, :pos], rtol=0, atol=1e-12)
        assert not torch.allclose(out2[:, pos], out[:, pos])
    if variant != "mlp":  # without the causal flag the future does leak (the test can fail)
        x2 = x.clone()
        x2[:, -1] += torch.randn(D, dtype=torch.float64)  # (not a constant: LayerNorm removes that)
        assert not torch.allclose(enc(x2, stream=_stream(variant))[:, 0], enc(x, stream=_stream(variant))[:, 0])


def test_mlp_variant_mixes_no_tokens():
    enc = _enc("mlp", depth=3)
    x = torch.randn(2, T, D, dtype=torch.float64)
    out = enc(x)
    x2 = x.clone()
    x2[:, [0, 3, 6]] += torch.randn(3, D, dtype=torch.float64)
    keep = [1, 2, 4, 5]
    torch.testing.assert_close(enc(x2)[:, keep], out[:, keep], rtol=0, atol=1e-12)


@pytest.mark.parametrize("dim", [48, 64, 96])
def test_every_mixer_is_parameter_matched_to_attention(dim):
    attn = 4 * dim * dim
    for variant in VARIANTS:
        block = DeconstructedEncoder(dim, depth=1, heads=4, variant=variant, context=4).blocks[0]
        n = sum(p.numel() for p in block.mixer.parameters())
        assert abs(n - attn) <= 0.01 * attn, (variant, n, attn)
    assert sum(p.numel() for p in GatedMLPMixer(48).parameters()) == 4 * 48 * 48  # m = 64 exactly


def test_random_stream_is_frozen_input_independent_and_reproducible():
    enc = _enc("rnd_emb_qk")
    assert "eps" in dict(enc.named_buffers()) and all(n != "eps" for n, _ in enc.named_parameters())
    eps = enc.eps.clone()
    torch.testing.assert_close(_enc("rnd_emb_qk").eps, eps)  # same seed, same eps
    opt = torch.optim.SGD(enc.parameters(), lr=0.1)
    enc(torch.randn(2, T, D, dtype=torch.float64), is_causal=True).square().sum().backward()
    opt.step()
    assert torch.equal(enc.eps, eps)
    # the maps' source (the stream states) is the same for any input; grads reach the blocks through it too
    states = enc.stream_states(enc.eps[:T].unsqueeze(0), is_causal=True)
    assert all(s.shape == (1, T, D) for s in states)
    assert torch.equal(states[0], enc.eps[:T].unsqueeze(0))


def _captured_qk(enc, layer, x):
    seen = {}

    def hook(module, args, kwargs):
        seen["qk"] = kwargs.get("qk")

    handle = enc.blocks[layer].mixer.register_forward_pre_hook(hook, with_kwargs=True)
    enc(x, is_causal=True)
    handle.remove()
    return seen["qk"]


def test_static_emb_qk_maps_do_not_depend_on_earlier_blocks():
    x = torch.randn(2, T, D, dtype=torch.float64)
    for variant, same in (("static_emb_qk", True), ("standard", False)):
        enc = _enc(variant)
        before = _captured_qk(enc, 1, x)
        if variant == "standard":
            before = enc.blocks[1].norm_mix(enc.blocks[0](x, is_causal=True))
        with torch.no_grad():
            for p in enc.blocks[0].parameters():
                p.add_(0.3)
        after = _captured_qk(enc, 1, x)
        if variant == "standard":
            after = enc.blocks[1].norm_mix(enc.blocks[0](x, is_causal=True))
        assert torch.allclose(before, after) == same


def test_hybrid_standard_equals_uniform_standard_and_skip_equals_zeroed_mixer():
    x = torch.randn(2, T, D, dtype=torch.float64)
    a, b = _enc("standard", "uniform", depth=4), _enc("standard", "hybrid_odd", depth=4)
    torch.testing.assert_close(a(x, is_causal=True), b(x, is_causal=True), rtol=0, atol=0)
    enc = _enc("mlp", "hybrid_odd", depth=4)
    assert enc.layer_variants == ("mlp", "standard", "mlp", "standard")
    want_handles = [enc.blocks[i].mixer.register_forward_hook(lambda m, a, o: torch.zeros_like(o)) for i in (0, 2)]
    want = enc(x, is_causal=True)
    for h in want_handles:
        h.remove()
    enc.skip = (1, 3)
    torch.testing.assert_close(enc(x, is_causal=True), want)
    enc.skip = ()
    assert not torch.allclose(enc(x, is_causal=True), want)


def test_layouts_and_errors():
    assert standard_layers(6, "hybrid_odd") == {2, 4, 6}
    assert standard_layers(6, "uniform") == frozenset()
    assert standard_layers(6, (1, 6)) == {1, 6}
    enc = DeconstructedEncoder(D, depth=3, heads=HEADS, variant="approximate", layout=(2,))
    assert enc.layer_variants == ("approximate", "standard", "approximate")
    with pytest.raises(ValueError, match=r"layout ids must lie in 1\.\.3"):
        standard_layers(3, (0, 2))
    with pytest.raises(ValueError, match="layout must be"):
        standard_layers(3, "hybrid_even")
    with pytest.raises(ValueError, match="variant must be one of"):
        DeconstructedEncoder(D, depth=1, heads=HEADS, variant="nope")
    with pytest.raises(ValueError, match="needs context="):
        DeconstructedEncoder(D, depth=1, heads=HEADS, variant="rnd_emb_qk")
    with pytest.raises(ValueError, match="needs stream="):
        DeconstructedEncoder(D, depth=1, heads=HEADS, variant="fixed_seq_qk")(torch.randn(1, T, D))
    with pytest.raises(ValueError, match="exceeds the random stream's context"):
        DeconstructedEncoder(D, depth=1, heads=HEADS, variant="rnd_emb_qk", context=3)(torch.randn(1, T, D))


@pytest.mark.parametrize("variant", sorted(set(VARIANTS) - STREAM_VARIANTS - {"mlp"}))
def test_key_mask_excludes_padded_tokens(variant):
    enc = _enc(variant)
    x = torch.randn(2, T, D, dtype=torch.float64)
    mask = torch.ones(2, T, dtype=torch.bool)
    mask[:, -2:] = False
    out = enc(x, mask=mask)
    x2 = x.clone()
    x2[:, -2:] += 3.0 * torch.randn(2, D, dtype=torch.float64)
    torch.testing.assert_close(enc(x2, mask=mask)[:, :-2], out[:, :-2])


def test_non_approximate_is_the_self_gated_running_softmax_and_finite():
    torch.manual_seed(0)
    attn = DecoupledAttention(D, HEADS, op=Kernel(similarity="self_gated"), query_act="silu").double()
    assert torch.isfinite(attn(torch.randn(1, T, D, dtype=torch.float64) * 1e4, is_causal=True)).all()
    x = torch.randn(1, T, D, dtype=torch.float64)
    out = attn(x, is_causal=True)
    # explicit: q = silu(x Wq), s_j = q_j . k_j / sqrt(dh), o_i = sum_{j<=i} e^{s_j} v_j / sum_{j<=i} e^{s_j}
    dh = D // HEADS
    q = torch.nn.functional.silu(attn.to_q(x)).view(1, T, HEADS, dh)
    k, v = attn.to_k(x).view(1, T, HEADS, dh), attn.to_v(x).view(1, T, HEADS, dh)
    s = (q * k).sum(-1) / dh**0.5  # (1, T, H)
    w = torch.exp(s - s.max()) * torch.ones(T, T, dtype=torch.float64).tril()[:, :, None]  # (T, T, H) [i, j, h]
    w = w / w.sum(1, keepdim=True)
    o = torch.einsum("ijh,jhd->ihd", w, v[0]).reshape(1, T, D)
    torch.testing.assert_close(out, attn.proj(o))


def test_encoder_layer_pattern_builds_hybrid_stacks():
    torch.manual_seed(0)
    plain = Encoder(D, depth=2, heads=HEADS)
    torch.manual_seed(0)
    same = Encoder(D, depth=2, heads=HEADS, pattern=["dense", Dense()])
    x = torch.randn(2, T, D)
    torch.testing.assert_close(same(x, is_causal=True), plain(x, is_causal=True), rtol=0, atol=0)
    hybrid = Encoder(D, depth=2, heads=HEADS, pattern=[Kernel(similarity="taylor"), "dense"])
    assert [b.attn.op.name for b in hybrid.blocks] == ["kernel", "dense"]
    out = hybrid(x, is_causal=True)
    x2 = x.clone()
    x2[:, 4:] += torch.randn(3, D)
    torch.testing.assert_close(hybrid(x2, is_causal=True)[:, :4], out[:, :4])
    with pytest.raises(ValueError, match="pattern must be a sequence of 2 operators"):
        Encoder(D, depth=2, heads=HEADS, pattern=["dense"])

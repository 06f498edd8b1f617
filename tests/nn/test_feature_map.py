"""FeatureMapAttention: every registered operator on (B, C, H, W) feature maps by name, equal to the operator on
the reshaped tokens, and padded pixels of a batch of different image sizes never influence valid outputs."""

import pytest
import torch
from tests.nn.test_operator_registry_smoke import MINIMAL_OPTIONS

from attnfuse.nn import FeatureMapAttention, pad_images, valid_mask
from attnfuse.nn.feature_map import GRID_LAYOUTS, feature_map_support, to_feature_map, to_tokens
from attnfuse.ops import OPERATORS

NAMES = sorted(n for n in OPERATORS if not n.startswith("test_"))
DIM, HEADS = 8, 2


def _module(name: str) -> FeatureMapAttention:
    """The operator chosen by name, its options as keywords (the registry's minimal ones)."""
    spec = OPERATORS[name]
    reason = feature_map_support(spec)
    if reason is not None:  # only a layout that cannot take a grid may be skipped, and the adapter must say so
        assert spec.layout not in GRID_LAYOUTS and "layout" in reason
        with pytest.raises(ValueError, match="layout"):
            FeatureMapAttention(DIM, HEADS, op=name, **MINIMAL_OPTIONS.get(name, {}))
        pytest.skip(reason)
    assert name in MINIMAL_OPTIONS or not spec.required_options, f"add minimal options for {name!r} to MINIMAL_OPTIONS"
    torch.manual_seed(0)
    return FeatureMapAttention(DIM, HEADS, op=name, **MINIMAL_OPTIONS.get(name, {})).eval()


def _padded_batch(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(DIM, 7, 9, generator=g), torch.randn(DIM, 5, 6, generator=g), torch.randn(DIM, 7, 4, generator=g)]
    x, mask = pad_images(images)
    return images, x, mask


@pytest.mark.parametrize("name", NAMES)
def test_every_operator_runs_on_a_padded_feature_map_batch(name):
    module = _module(name)
    _, x, mask = _padded_batch()
    x.requires_grad_(True)
    out = module(x, mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in module.parameters())
    assert module(x.detach()).shape == x.shape  # no mask: every pixel valid


def _direct(module: FeatureMapAttention, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The operator called directly on the tokens reshaped by hand, with the module's projections."""
    attn, spec = module.attn, module.spec
    b, _, h, w = x.shape
    tokens = x.permute(0, 2, 3, 1) * mask[..., None]  # (B, H, W, C), padding zeroed

    def heads(t):  # (B, H, W, heads*Dh) -> (B, heads, H, W, Dh) or (B, heads, H*W, Dh)
        t = t.reshape(b, h, w, attn.heads, attn.head_dim).permute(0, 3, 1, 2, 4)
        return t.reshape(b, attn.heads, h * w, attn.head_dim) if spec.layout == "sequence" else t

    key_mask = mask.reshape(b, h * w) if spec.layout == "sequence" else mask
    o = spec.fn(heads(attn.to_q(tokens)), heads(attn.to_k(tokens)), heads(attn.to_v(tokens)), key_mask=key_mask,
                **attn.op.options())
    o = o.reshape(b, attn.heads, h, w, attn.head_dim).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return (attn.proj(o) * mask[..., None]).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", NAMES)
def test_output_equals_the_operator_on_the_reshaped_tokens(name):
    module = _module(name)
    _, x, mask = _padded_batch(1)
    with torch.no_grad():
        torch.testing.assert_close(module(x, mask), _direct(module, x, mask), atol=1e-5, rtol=1e-5)
        full = torch.ones_like(mask)
        torch.testing.assert_close(module(x), _direct(module, x, full), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_padded_pixels_do_not_influence_valid_outputs(name):
    module = _module(name)
    _, x, mask = _padded_batch(2)
    pad = ~mask[:, None].expand_as(x)
    with torch.no_grad():
        ref = module(x, mask)
        for fill in (1e4, float("nan"), float("inf")):
            other = x.clone()
            other[pad] = fill
            assert torch.equal(module(other, mask), ref), f"{name}: padding filled with {fill} changed the output"
    assert (ref[pad] == 0).all()  # outputs at padded pixels are zero
    # the isolation comes from the key mask, not only from zeroing the padding: with the padding left in the
    # tokens (no zeroing), the valid outputs of the attention are still unchanged
    tokens, valid = to_tokens(x), mask[..., None]
    with torch.no_grad():
        base = module.attn(torch.where(valid, tokens, 0.0), mask=mask)
        for fill in (1e4, float("nan")):
            got = module.attn(torch.where(valid, tokens, fill), mask=mask)
            assert torch.equal(torch.where(valid, got, 0.0), torch.where(valid, base, 0.0)), f"{name}: {fill} leaked"
    x.requires_grad_(True)
    module(x, mask).sum().backward()
    assert (x.grad[pad] == 0).all() and x.grad[~pad].abs().sum() > 0


# what the module docstring claims about padding (kept true by this test)
SAME_AS_UNPADDED = {"dense", "axial", "halo", "silu_kernel", "kernel"}
GEOMETRY_CHANGES = {"neighborhood", "routing", "combiner"}


@pytest.mark.parametrize("name", sorted((SAME_AS_UNPADDED | GEOMETRY_CHANGES) & set(NAMES)))
def test_which_operators_give_the_unpadded_result(name):
    module = _module(name)
    images, x, mask = _padded_batch(3)
    with torch.no_grad():
        batched = module(x, mask)
        alone = module(images[1][None])[0]
    valid = batched[1, :, : images[1].shape[1], : images[1].shape[2]]
    if name in SAME_AS_UNPADDED:
        torch.testing.assert_close(valid, alone, atol=1e-5, rtol=1e-5)
    else:
        assert (valid - alone).abs().max() > 1e-3


def test_volumes_and_cross_attention_with_a_context_map():
    torch.manual_seed(0)
    vol = torch.randn(2, DIM, 3, 4, 5)
    m = FeatureMapAttention(DIM, HEADS, op="dense").eval()
    assert m(vol, torch.ones(2, 3, 4, 5, dtype=torch.bool)).shape == vol.shape
    out, weights = m(vol, return_weights=True)
    assert out.shape == vol.shape and weights.shape == (2, HEADS, 60, 60)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, HEADS, 60))
    cross = FeatureMapAttention(DIM, HEADS, op="dense", context_dim=4).eval()
    ctx, ctx_mask = pad_images([torch.randn(4, 3, 3), torch.randn(4, 2, 1)])
    x = torch.randn(2, DIM, 5, 6)
    out = cross(x, context=ctx, context_mask=ctx_mask)
    assert out.shape == x.shape
    # the padded context pixels are never attended
    ctx2 = ctx.clone()
    ctx2[~ctx_mask[:, None].expand_as(ctx)] = 1e3
    torch.testing.assert_close(cross(x, context=ctx2, context_mask=ctx_mask), out)
    with pytest.raises(ValueError, match="does not support cross-attention"):
        FeatureMapAttention(DIM, HEADS, op="neighborhood", kernel_size=3)(x, context=torch.randn(2, DIM, 2, 2))


def test_pad_images_and_valid_mask():
    x, mask = pad_images([torch.ones(3, 4, 5), torch.ones(3, 2, 7)], multiple=4, value=-1.0)
    assert x.shape == (2, 3, 4, 8) and mask.shape == (2, 4, 8)
    assert mask[0].sum() == 20 and mask[1].sum() == 14 and mask[1, :2, :7].all()
    assert (x[~mask[:, None].expand_as(x)] == -1).all() and (x[mask[:, None].expand_as(x)] == 1).all()
    assert valid_mask([[1, 2]], (2, 3)).tolist() == [[[True, True, False], [False, False, False]]]
    assert torch.equal(to_feature_map(to_tokens(x)), x) and to_tokens(x).shape == (2, 4, 8, 3)
    with pytest.raises(ValueError, match="sizes must lie in"):
        valid_mask([[3, 1]], (2, 3))
    with pytest.raises(ValueError, match="one C and grid rank"):
        pad_images([torch.ones(3, 4, 5), torch.ones(2, 4, 5)])


def test_errors_name_the_argument():
    m = FeatureMapAttention(DIM, HEADS)
    x = torch.randn(2, DIM, 4, 4)
    with pytest.raises(ValueError, match="x must have 8 channels"):
        m(torch.randn(2, 4, 4, 4))
    with pytest.raises(ValueError, match=r"x must be a feature map \(B, C, H, W\)"):
        m(torch.randn(2, 16, DIM))
    with pytest.raises(ValueError, match=r"mask must be bool with shape \(2, 4, 4\)"):
        m(x, torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(KeyError, match="unknown attention operator"):
        FeatureMapAttention(DIM, HEADS, op="no_such_op")
    with pytest.raises(TypeError, match="needs option"):
        FeatureMapAttention(DIM, HEADS, op="neighborhood")

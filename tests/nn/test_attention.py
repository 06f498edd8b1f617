"""nn.Attention / TransformerBlock / Encoder: operator plumbing, masks, weights, errors."""

import pytest
import torch

from attnfuse.nn import Attention, Encoder, TransformerBlock
from attnfuse.ops import operator
from attnfuse.ops._registry import OPERATORS


def _manual_attention(attn: Attention, x, context=None, key_mask=None):
    """Independent formula: projections, per-head softmax over valid keys, output projection."""
    ctx = x if context is None else context
    b, n, _ = x.shape
    h, dh = attn.heads, attn.head_dim
    q = attn.to_q(x).reshape(b, n, h, dh).transpose(1, 2)
    k = attn.to_k(ctx).reshape(b, ctx.shape[1], h, dh).transpose(1, 2)
    v = attn.to_v(ctx).reshape(b, ctx.shape[1], h, dh).transpose(1, 2)
    s = q @ k.transpose(-1, -2) / dh**0.5
    if key_mask is not None:
        s = s.masked_fill(~key_mask[:, None, None, :], float("-inf"))
    w = torch.softmax(s, dim=-1).nan_to_num(0.0)
    out = (w @ v).transpose(1, 2).reshape(b, n, h * dh)
    out = attn.proj(out)
    if key_mask is not None:
        out = out * key_mask.any(1)[:, None, None]
    return out, w


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("cross", [False, True])
def test_attention_matches_manual(backend, cross):
    torch.manual_seed(0)
    attn = Attention(24, 3, backend=backend).double()
    x = torch.randn(3, 5, 24, dtype=torch.float64)
    ctx = torch.randn(3, 7, 24, dtype=torch.float64) if cross else None
    n_keys = 7 if cross else 5
    key_mask = torch.rand(3, n_keys) > 0.3
    key_mask[1] = False  # a sample with no key
    key_mask[0, 0] = True
    kwargs = {"context": ctx, "context_mask": key_mask} if cross else {"mask": key_mask}
    out = attn(x, **kwargs)
    ref, _ = _manual_attention(attn, x, ctx, key_mask)
    torch.testing.assert_close(out, ref)
    assert torch.equal(out[1], torch.zeros_like(out[1])), "no key -> exactly zero update"


def test_attention_weights_and_gradients_finite_with_empty_sample():
    torch.manual_seed(0)
    attn = Attention(16, 2)
    x = torch.randn(2, 4, 16, requires_grad=True)
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    out, w = attn(x, mask=mask, return_weights=True)
    assert w.shape == (2, 2, 4, 4)
    torch.testing.assert_close(w[0].sum(-1), torch.ones(2, 4))
    assert torch.all(w[1] == 0)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters())
    assert torch.isfinite(x.grad).all()


def test_value_from_other_source():
    torch.manual_seed(0)
    attn = Attention(8, 2).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    keys = torch.randn(2, 4, 8, dtype=torch.float64)
    values = torch.randn(2, 4, 8, dtype=torch.float64)
    out = attn(x, context=keys, value=values)
    b, h, dh = 2, 2, 4
    q = attn.to_q(x).reshape(b, 3, h, dh).transpose(1, 2)
    k = attn.to_k(keys).reshape(b, 4, h, dh).transpose(1, 2)
    v = attn.to_v(values).reshape(b, 4, h, dh).transpose(1, 2)
    ref = attn.proj((torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1) @ v).transpose(1, 2).reshape(b, 3, 8))
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="value"):
        attn(x, context=keys, value=values[:, :3])


def test_multi_axis_tokens_are_flattened_for_sequence_ops():
    attn = Attention(8, 2)
    x = torch.randn(2, 3, 4, 8)
    mask = torch.rand(2, 3, 4) > 0.2
    out = attn(x, mask=mask)
    flat = attn(x.reshape(2, 12, 8), mask=mask.reshape(2, 12))
    torch.testing.assert_close(out.reshape(2, 12, 8), flat)


@pytest.fixture
def scaled_operator():
    name = "test_scaled_dense"
    yield name
    OPERATORS.pop(name, None)  # keep the global registry clean for other tests


def test_new_operator_is_usable_by_name(scaled_operator):
    name = scaled_operator
    if name not in OPERATORS:

        @operator(name)
        def scaled(q, k, v, *, key_mask=None, mask=None, bias=None, return_weights=False, factor: float = 1.0):
            from attnfuse.ops import dense_attention

            return dense_attention(q * factor, k, v, key_mask=key_mask, mask=mask, bias=bias, return_weights=return_weights)

    attn = Attention(8, 2, op=name, factor=0.0)
    x = torch.randn(1, 5, 8)
    out = attn(x)
    # factor 0 -> uniform attention: every query gets the mean value
    v = attn.to_v(x)
    torch.testing.assert_close(out, attn.proj(v.mean(1, keepdim=True)).expand_as(out), rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="factor"):
        Attention(8, 2, op=name, bogus=1)


@pytest.mark.parametrize(
    ("kwargs", "err", "match"),
    [
        ({"op": "nope"}, KeyError, "registered operators"),
        ({"backend_options": 1}, TypeError, "accepts"),
    ],
)
def test_attention_constructor_errors(kwargs, err, match):
    with pytest.raises(err, match=match):
        Attention(8, 2, **kwargs)


def test_attention_bad_sizes_and_masks():
    with pytest.raises(ValueError, match="divisible"):
        Attention(10, 3)
    attn = Attention(8, 2)
    with pytest.raises(ValueError, match="mask must be bool"):
        attn(torch.randn(2, 4, 8), mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"\(2, 4\)"):
        attn(torch.randn(2, 4, 8), mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must be"):
        attn(torch.randn(4, 8))
    with pytest.raises(ValueError, match="batch"):
        attn(torch.randn(2, 4, 8), context=torch.randn(3, 4, 8))


def test_block_gates_make_identity_at_init():
    block = TransformerBlock(16, 4, gate=True, cross_attention=True)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    torch.testing.assert_close(block(x, context=ctx), x)
    plain = TransformerBlock(16, 4)
    assert not torch.allclose(plain(x), x)


def test_block_returns_maps_and_requires_context():
    block = TransformerBlock(16, 4, cross_attention=True)
    x, ctx = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    out, maps = block(x, context=ctx, return_weights=True)
    assert out.shape == x.shape and maps["self"].shape == (2, 4, 5, 5) and maps["cross"].shape == (2, 4, 5, 3)
    with pytest.raises(ValueError, match="context"):
        block(x)
    with pytest.raises(ValueError, match="self_attention or cross_attention"):
        TransformerBlock(16, 4, self_attention=False)


def test_encoder_depth_zero_is_identity_and_maps_per_layer():
    x = torch.randn(2, 6, 16)
    assert torch.equal(Encoder(16, depth=0, heads=2)(x), x)
    enc = Encoder(16, depth=3, heads=2)
    out, maps = enc(x, mask=torch.ones(2, 6, dtype=torch.bool), return_weights=True)
    assert out.shape == x.shape and len(maps) == 3
    with pytest.raises(ValueError, match="depth"):
        Encoder(16, depth=-1, heads=2)


def test_masked_tokens_do_not_change_valid_outputs():
    torch.manual_seed(0)
    enc = Encoder(16, depth=2, heads=2).eval()
    x = torch.randn(2, 6, 16)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], dtype=torch.bool)
    out = enc(x, mask=mask)
    x2 = x.clone()
    x2[~mask] = 1e3  # garbage in padded positions
    out2 = enc(x2, mask=mask)
    torch.testing.assert_close(out[mask], out2[mask])
    # padded tokens == deleted tokens
    torch.testing.assert_close(out[1, :3], enc(x[1:, :3])[0])


def test_causal_query_without_any_visible_key_gets_zero_update():
    torch.manual_seed(0)
    attn = Attention(8, 2)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[False, False, True, True, True], [True] * 5])  # left padding in sample 0
    out = attn(x, mask=mask, is_causal=True)
    assert torch.equal(out[0, :2], torch.zeros(2, 8)), "queries 0, 1 see only padded keys"
    assert (out[0, 2:].abs().sum(-1) > 0).all() and (out[1].abs().sum(-1) > 0).all()

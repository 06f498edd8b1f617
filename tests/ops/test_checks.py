"""Bad input to dense_attention: errors name the argument and the expected shape or dtype."""

from __future__ import annotations

import re

import pytest
import torch

from attnfuse import ops

B, H, L, S, D, DV = 2, 3, 5, 7, 4, 6


def good():
    g = torch.Generator().manual_seed(0)
    return {
        "q": torch.randn(B, H, L, D, generator=g),
        "k": torch.randn(B, H, S, D, generator=g),
        "v": torch.randn(B, H, S, DV, generator=g),
    }


def esc(s: str) -> str:
    return re.escape(s)


# (name, change applied to the good inputs, error type, message pattern)
BAD = [
    ("q-rank3", {"q": torch.randn(B, L, D)}, ValueError, esc("q must have rank 4 (B, H, L, D), got q.shape=(2, 5, 4)")),
    ("k-rank5", {"k": torch.randn(B, H, S, D, 1)}, ValueError, esc("k must have rank 4 (B, H, L, D), got k.shape=(2, 3, 7, 4, 1)")),
    ("v-rank2", {"v": torch.randn(S, DV)}, ValueError, esc("v must have rank 4 (B, H, L, D), got v.shape=(7, 6)")),
    ("batch", {"k": torch.randn(B + 1, H, S, D), "v": torch.randn(B + 1, H, S, DV)}, ValueError,
     esc("q, k, v must share batch and head dims (B, H); got q.shape=(2, 3, 5, 4), k.shape=(3, 3, 7, 4)")),
    ("heads", {"v": torch.randn(B, H + 1, S, DV)}, ValueError,
     esc("must share batch and head dims (B, H)") + ".*" + esc("v.shape=(2, 4, 7, 6)")),
    ("head-dim", {"k": torch.randn(B, H, S, D + 1)}, ValueError,
     esc("q and k must share the head dim D; got q.shape[-1]=4, k.shape[-1]=5")),
    ("key-length", {"v": torch.randn(B, H, S + 1, DV)}, ValueError,
     esc("k and v must have the same key length S; got k.shape=(2, 3, 7, 4), v.shape=(2, 3, 8, 6)")),
    ("mixed-dtype", {"v": torch.randn(B, H, S, DV, dtype=torch.float64)}, TypeError,
     esc("q, k, v must share a dtype, got q.dtype=torch.float32, k.dtype=torch.float32, v.dtype=torch.float64")),
    ("int-q", {"q": torch.ones(B, H, L, D, dtype=torch.long)}, TypeError,
     esc("q must be a floating-point tensor, got q.dtype=torch.int64")),
    ("bool-k", {"k": torch.ones(B, H, S, D, dtype=torch.bool)}, TypeError, esc("k must be a floating-point tensor")),
    ("list-v", {"v": [[1.0]]}, TypeError, esc("v must be a torch.Tensor, got list")),
    ("mask-float", {"mask": torch.ones(B, 1, 1, S)}, TypeError,
     esc("mask must be a torch.bool tensor (True = key takes part), got torch.float32")),
    ("mask-int", {"mask": torch.ones(B, 1, 1, S, dtype=torch.int64)}, TypeError, esc("mask must be a torch.bool tensor")),
    ("mask-keys", {"mask": torch.ones(B, 1, 1, S + 1, dtype=torch.bool)}, ValueError,
     esc("mask must broadcast to (2, 3, 5, 7) (B, H, L, S), got mask.shape=(2, 1, 1, 8)")),
    ("mask-batch", {"mask": torch.ones(B + 1, 1, 1, S, dtype=torch.bool)}, ValueError,
     esc("mask must broadcast to (2, 3, 5, 7) (B, H, L, S), got mask.shape=(3, 1, 1, 7)")),
    ("mask-rank5", {"mask": torch.ones(1, B, 1, 1, S, dtype=torch.bool)}, ValueError,
     esc("mask must broadcast to (2, 3, 5, 7) (B, H, L, S), got mask.shape=(1, 2, 1, 1, 7)")),
    ("mask-padding-2d", {"mask": torch.ones(B, S, dtype=torch.bool)}, ValueError,
     esc("mask must broadcast to (2, 3, 5, 7) (B, H, L, S), got mask.shape=(2, 7)")),
    ("bias-shape", {"bias": torch.zeros(L + 1, S)}, ValueError,
     esc("bias must broadcast to (2, 3, 5, 7) (B, H, L, S), got bias.shape=(6, 7)")),
    ("bias-heads", {"bias": torch.zeros(1, H + 2, L, S)}, ValueError,
     esc("bias must broadcast to (2, 3, 5, 7) (B, H, L, S), got bias.shape=(1, 5, 5, 7)")),
    ("bias-bool", {"bias": torch.ones(L, S, dtype=torch.bool)}, TypeError,
     esc("bias must be a floating-point tensor, got torch.bool; for a boolean mask pass mask=")),
]


@pytest.mark.parametrize(("change", "error", "match"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
@pytest.mark.parametrize("backend", ["auto", "sdpa", "reference"])
def test_bad_input_is_rejected_with_a_clear_message(change, error, match, backend):
    kwargs = {**good(), **change}
    with pytest.raises(error, match=match):
        ops.dense_attention(**kwargs, backend=backend)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize(
    "shape",
    [(), (S,), (L, S), (1, S), (B, 1, 1, S), (1, H, 1, S), (1, 1, L, S), (B, H, L, S), (B, 1, L, 1), (1, 1, 1, 1)],
    ids=str,
)
def test_every_broadcastable_mask_and_bias_shape_is_accepted(backend, shape):
    g = torch.Generator().manual_seed(1)
    inputs = {name: t.double() for name, t in good().items()}
    mask = torch.rand(shape, generator=g) < 0.7
    bias = torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
    out = ops.dense_attention(**inputs, mask=mask, bias=bias, backend=backend)
    full_mask = torch.broadcast_to(mask, (B, H, L, S))
    full_bias = torch.broadcast_to(bias.detach(), (B, H, L, S)).clone().requires_grad_()
    want = ops.dense_attention(**inputs, mask=full_mask, bias=full_bias, backend="reference")
    torch.testing.assert_close(out, want)
    (g_bias,) = torch.autograd.grad(out.sum(), bias)
    (g_full,) = torch.autograd.grad(want.sum(), full_bias)
    assert g_bias.shape == bias.shape
    torch.testing.assert_close(g_bias, g_full.sum_to_size(shape) if shape else g_full.sum())

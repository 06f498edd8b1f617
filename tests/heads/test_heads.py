"""Heads and pooling."""

import pytest
import torch

from attnfuse.fusion import TokenSet
from attnfuse.heads import AttentionPool, ClassificationHead, Pool, RegressionHead, mean_pool


def test_mean_pool_over_valid_tokens_and_zero_when_none():
    x = torch.randn(3, 4, 8)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]], dtype=torch.bool)
    x[0, 2:] = float("nan")  # padded garbage must not leak
    out = mean_pool(x, mask)
    torch.testing.assert_close(out[0], x[0, :2].mean(0))
    torch.testing.assert_close(out[1], x[1].mean(0))
    assert torch.equal(out[2], torch.zeros(8))


def test_attention_pool_matches_manual_softmax_and_ignores_padding():
    torch.manual_seed(0)
    pool = AttentionPool(8, heads=2).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out, w = pool(x, mask, return_weights=True)
    k = pool.key(x).reshape(2, 5, 2, 4).transpose(1, 2)
    s = (pool.query[None] @ k.transpose(-1, -2)).squeeze(2) / 2.0  # (B, H, N)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    ref_w = torch.softmax(s[0], -1)
    torch.testing.assert_close(w[0], ref_w)
    v = x.reshape(2, 5, 2, 4).transpose(1, 2)
    torch.testing.assert_close(out[0], (ref_w[:, None] @ v[0]).reshape(8))
    assert torch.equal(out[1], torch.zeros(8, dtype=torch.float64))


@pytest.mark.parametrize("pooling", ["mean", "fusion", "cls", "attention"])
def test_heads_shapes_and_gradients(pooling):
    ts = TokenSet(torch.randn(4, 6, 16), torch.rand(4, 6) > 0.3)
    cls_head = ClassificationHead(16, 5, pooling=pooling, hidden=32, dropout=0.1)
    reg_head = RegressionHead(16, 2, pooling=pooling)
    logits, pred = cls_head(ts), reg_head(ts.x, ts.mask)
    assert logits.shape == (4, 5) and pred.shape == (4, 2)
    (logits.sum() + pred.sum()).backward()
    assert all(torch.isfinite(p.grad).all() for p in cls_head.parameters() if p.grad is not None)


def test_fusion_pooling_reads_first_token():
    x = torch.randn(2, 3, 4)
    torch.testing.assert_close(Pool(4, "fusion")(x), x[:, 0])


def test_head_errors():
    with pytest.raises(ValueError, match="pooling must be one of"):
        ClassificationHead(8, 3, pooling="max")
    with pytest.raises(ValueError, match="output size"):
        ClassificationHead(8, 0)
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        ClassificationHead(8, 3)(torch.randn(2, 8))


@pytest.mark.parametrize("pooling", ["mean", "fusion", "cls", "attention"])
def test_pooling_of_an_empty_batch_and_of_no_tokens(pooling):
    pool = Pool(8, pooling, heads=2)
    x = torch.randn(0, 5, 8, requires_grad=True)
    out = pool(TokenSet(x, torch.ones(0, 5, dtype=torch.bool)))
    assert out.shape == (0, 8)
    out.sum().backward()
    assert x.grad.shape == x.shape
    assert ClassificationHead(8, 3, pooling=pooling, heads=2)(TokenSet(torch.randn(0, 5, 8))).shape == (0, 3)
    no_tokens = torch.randn(2, 0, 8)
    for mask in (None, torch.ones(2, 0, dtype=torch.bool)):
        if pooling in ("fusion", "cls"):  # there is no first token to read
            with pytest.raises(ValueError, match=r"first-token pooling .* needs at least one token, got x.shape=\(2, 0, 8\)"):
                pool(no_tokens, mask)
        else:  # a sample without tokens pools to 0
            assert torch.equal(pool(no_tokens, mask), torch.zeros(2, 8))

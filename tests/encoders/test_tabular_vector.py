"""Numeric, categorical and vector encoders: shapes, missing-sample masks, references, registry."""

from __future__ import annotations

import pytest
import torch

from attnfuse.data import TableDataset, TablePreprocessor, collate_fn, make_synthetic_table
from attnfuse.encoders import (
    ENCODERS,
    CategoricalEncoder,
    NumericEncoder,
    VectorEncoder,
    chunk_tokens_reference,
    create_encoder,
    encode_inputs,
    get_encoder,
    register_encoder,
)

PRESENT = torch.tensor([True, False, True, True])


def _nan_rows(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[~PRESENT] = float("nan")  # absent rows may hold anything, NaN included
    return x


@pytest.mark.parametrize("tokens,n", [("feature", 5), ("group", 1)])
def test_numeric_shapes_and_missing(tokens, n):
    torch.manual_seed(0)
    enc = NumericEncoder(5, 8, tokens=tokens)
    x = _nan_rows(torch.randn(4, 5)).requires_grad_()
    out = enc(x, PRESENT)
    assert out.x.shape == (4, n, 8) and out.mask.shape == (4, n)
    assert out.mask.tolist() == [[p] * n for p in PRESENT.tolist()]
    assert torch.isfinite(out.x).all() and (out.x[1] == 0).all()
    out.x.sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())  # NaN in absent rows must not reach the weights
    assert (enc(torch.randn(4, 5)).mask).all()  # mask=None: all present


def test_numeric_feature_tokens_match_per_feature_linear_reference():
    torch.manual_seed(0)
    enc = NumericEncoder(3, 4).double()
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    out = enc(x).x
    ref = torch.stack([x[:, j:j + 1] * enc.weight[j] + enc.bias[j] for j in range(3)], dim=1)  # one Linear(1, D) per feature
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    gx, gw = torch.autograd.grad(out, (x, enc.weight), g)
    rx, rw = torch.autograd.grad(ref, (x, enc.weight), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def test_numeric_input_checks():
    enc = NumericEncoder(3, 4)
    with pytest.raises(ValueError, match=r"\(B, 3\)"):
        enc(torch.randn(2, 4))
    with pytest.raises(ValueError, match="mask must have shape"):
        enc(torch.randn(2, 3), torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"torch\.bool"):
        enc(torch.randn(2, 3), torch.ones(2))
    with pytest.raises(ValueError, match="tokens must be one of"):
        NumericEncoder(3, 4, tokens="row")


def test_categorical_shapes_codes_and_missing():
    torch.manual_seed(0)
    enc = CategoricalEncoder([3, 2], 8)
    x = torch.tensor([[1, 2], [3, 0], [0, 1], [2, 2]])
    out = enc(x, PRESENT)
    assert out.x.shape == (4, 2, 8) and out.mask.tolist() == [[p, p] for p in PRESENT.tolist()]
    assert (out.x[1] == 0).all()
    # each column has its own table: code 1 in column 0 and in column 1 differ
    assert not torch.equal(enc(torch.tensor([[1, 1]])).x[0, 0], enc(torch.tensor([[1, 1]])).x[0, 1])
    # unknown codes (out of range, negative) use the reserved code 0 of that column
    unk = enc(torch.tensor([[7, -1]])).x
    zero = enc(torch.tensor([[0, 0]])).x
    torch.testing.assert_close(unk, zero)
    group = CategoricalEncoder([3, 2], 8, tokens="group")
    group.load_state_dict(enc.state_dict())
    torch.testing.assert_close(group(x, PRESENT).x, out.x.mean(1, keepdim=True))
    with pytest.raises(ValueError, match="integer codes"):
        enc(x.float())


@pytest.mark.parametrize("mode,k", [("linear", 1), ("linear", 3), ("chunk", 3), ("chunk", 7)])
def test_vector_shapes_and_missing(mode, k):
    torch.manual_seed(0)
    enc = VectorEncoder(7, 8, num_tokens=k, mode=mode)
    out = enc(_nan_rows(torch.randn(4, 7)), PRESENT)
    assert out.x.shape == (4, k, 8) and out.mask.tolist() == [[p] * k for p in PRESENT.tolist()]
    assert torch.isfinite(out.x).all() and (out.x[1] == 0).all()
    out.x.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in enc.parameters())


def test_vector_chunk_matches_reference_forward_and_grad():
    torch.manual_seed(0)
    enc = VectorEncoder(10, 4, num_tokens=3, mode="chunk").double()  # chunks of 4, last one zero-padded
    x = torch.randn(5, 10, dtype=torch.float64, requires_grad=True)
    out = enc.tokens(x)
    ref = chunk_tokens_reference(x, enc.weight, enc.bias)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (x, enc.weight, enc.bias), g), torch.autograd.grad(ref, (x, enc.weight, enc.bias), g)):
        torch.testing.assert_close(a, b)
    # token i depends only on chunk i
    x2 = x.detach().clone()
    x2[:, 0] += 1.0
    changed = (enc.tokens(x2) - enc.tokens(x.detach())).abs().sum((0, 2))
    assert changed[0] > 0 and (changed[1:] == 0).all()


def test_vector_sequence_input():
    enc = VectorEncoder(3, 4, num_tokens=2)
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, True, False, False, False], [False] * 5])
    out = enc(x, mask)
    assert out.x.shape == (2, 10, 4) and out.mask.sum(1).tolist() == [4, 0]
    assert (out.x[1] == 0).all()


def test_registry():
    assert {"numeric", "categorical", "vector", "text"} <= set(ENCODERS)
    assert get_encoder("vector") is VectorEncoder
    with pytest.raises(KeyError, match="registered encoders"):
        get_encoder("audio")
    with pytest.raises(ValueError, match="already registered"):
        register_encoder("numeric")(NumericEncoder)


def test_encoders_from_preprocessor_configs_and_encode_inputs():
    torch.manual_seed(0)
    df, schema = make_synthetic_table(64, seed=0, missing_rate=0.25)
    pre = TablePreprocessor.fit(df, schema)
    encoders = {name: create_encoder(cfg.pop("kind"), dim=16, **cfg) for name, cfg in pre.encoder_configs().items()}
    ds = TableDataset(pre.transform(df))
    batch = collate_fn([ds[i] for i in range(16)])
    tokens = encode_inputs(encoders, batch["inputs"])
    assert list(tokens) == ["cat", "num", "vec"]
    assert tokens["num"].x.shape == (16, 4, 16) and tokens["cat"].x.shape == (16, 2, 16) and tokens["vec"].x.shape == (16, 1, 16)
    for name, ts in tokens.items():
        assert ts.present().tolist() == batch["inputs"][name]["mask"].tolist()
        assert torch.isfinite(ts.x).all()
    with pytest.raises(KeyError, match="inputs without encoder"):
        encode_inputs({"num": encoders["num"]}, batch["inputs"])

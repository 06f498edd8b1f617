"""dense_attention against the explicit formula (conftest.explicit_attention), forward and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse import ops
from attnfuse.ops import backends

BACKEND_NAMES = ["sdpa", "reference"]
F64 = torch.float64

# (B, H, L, S, D, Dv): Lq != Lk, Dv != D, B/H = 1, odd lengths, a single query and key.
SHAPES = [
    (2, 3, 5, 7, 4, 6),
    (1, 1, 1, 1, 1, 1),
    (1, 2, 9, 3, 8, 5),
    (3, 1, 4, 4, 2, 2),
    (2, 2, 7, 11, 3, 1),
]
MASK_KINDS = [None, "key_padding", "shared", "full"]


def make_qkv(b, h, lq, lk, d, dv, *, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, lq, d, generator=g, dtype=dtype).requires_grad_()
    k = torch.randn(b, h, lk, d, generator=g, dtype=dtype).requires_grad_()
    v = torch.randn(b, h, lk, dv, generator=g, dtype=dtype).requires_grad_()
    return q, k, v


def make_mask(kind, b, h, lq, lk, *, seed=1, p=0.6):
    """Random bool mask of a broadcast shape; every kind keeps at least one empty query row possible."""
    if kind is None:
        return None
    shape = {"key_padding": (b, 1, 1, lk), "shared": (1, 1, lq, lk), "full": (b, h, lq, lk)}[kind]
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) < p


def grads(out, inputs, seed=123):
    """Gradients of ``<out, w>`` for a fixed random ``w`` (zeros for inputs that do not take part)."""
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(out.dtype)
    gs = torch.autograd.grad((out * w).sum(), inputs, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


def assert_matches_oracle(oracle, tol, q, k, v, *, backend, mask=None, bias=None, scale=None, is_causal=False):
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    out = ops.dense_attention(q, k, v, mask=mask, bias=bias, scale=scale, is_causal=is_causal, backend=backend)
    want, _, _ = oracle(q, k, v, mask=mask, bias=bias, scale=scale, is_causal=is_causal)
    torch.testing.assert_close(out, want, **tol(q.dtype, "fwd"))
    for name, got, exp in zip("qkvb", grads(out, inputs), grads(want, inputs)):
        torch.testing.assert_close(got, exp, **tol(q.dtype, "bwd"), msg=lambda m, n=name: f"grad {n}: {m}")


def test_oracle_matches_python_loop(oracle):
    # The oracle itself, against scalar Python arithmetic on a tiny case with mask, bias and an empty row.
    q, k, v = make_qkv(1, 1, 3, 4, 2, 2)
    bias = torch.randn(1, 1, 3, 4, dtype=F64)
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [True, True, False, True]])
    out, weights, lse = oracle(q, k, v, mask=mask, bias=bias, scale=0.7)
    for i in range(3):
        s = [0.7 * sum(q[0, 0, i, c].item() * k[0, 0, j, c].item() for c in range(2)) + bias[0, 0, i, j].item() for j in range(4)]
        e = [math.exp(s[j]) if mask[i, j] else 0.0 for j in range(4)]
        z = sum(e)
        for c in range(2):
            want = sum(e[j] / z * v[0, 0, j, c].item() for j in range(4)) if z else 0.0
            assert out[0, 0, i, c].item() == pytest.approx(want, abs=1e-12)
        assert lse[0, 0, i].item() == (pytest.approx(math.log(z), abs=1e-12) if z else -math.inf)
        assert weights[0, 0, i].sum().item() == pytest.approx(1.0 if z else 0.0)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", MASK_KINDS)
@pytest.mark.parametrize("with_bias", [False, True], ids=["nobias", "bias"])
def test_matches_formula(oracle, tol, backend, shape, mask_kind, with_bias):
    b, h, lq, lk, _, _ = shape
    q, k, v = make_qkv(*shape)
    mask = make_mask(mask_kind, b, h, lq, lk)
    bias = torch.randn(1, h, lq, lk, dtype=F64).requires_grad_() if with_bias else None
    assert_matches_oracle(oracle, tol, q, k, v, backend=backend, mask=mask, bias=bias)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("lengths", [(5, 5), (4, 7), (7, 4), (1, 6)], ids=lambda t: f"L{t[0]}S{t[1]}")
@pytest.mark.parametrize("extra", ["plain", "mask", "bias", "mask+bias"])
def test_causal(oracle, tol, backend, lengths, extra):
    lq, lk = lengths
    q, k, v = make_qkv(2, 2, lq, lk, 3, 4, seed=5)
    mask = make_mask("key_padding", 2, 2, lq, lk, p=0.7) if "mask" in extra else None
    bias = torch.randn(2, 1, lq, lk, dtype=F64).requires_grad_() if "bias" in extra else None
    assert_matches_oracle(oracle, tol, q, k, v, backend=backend, mask=mask, bias=bias, is_causal=True)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("scale", [0.3, 2.0])
def test_scale(oracle, tol, backend, scale):
    q, k, v = make_qkv(2, 2, 6, 5, 4, 3, seed=7)
    assert_matches_oracle(oracle, tol, q, k, v, backend=backend, mask=make_mask("full", 2, 2, 6, 5), scale=scale)
    # the default scale is 1/sqrt(D), not 1
    default = ops.dense_attention(q, k, v, backend=backend)
    torch.testing.assert_close(default, ops.dense_attention(q, k, v, scale=0.5, backend=backend))
    assert not torch.allclose(default, ops.dense_attention(q, k, v, scale=1.0, backend=backend))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
@pytest.mark.parametrize("causal", [False, True])
def test_fully_masked_rows_and_batches(oracle, backend, causal):
    b, h, lq, lk = 3, 2, 5, 6
    q, k, v = make_qkv(b, h, lq, lk, 4, 3, seed=11)
    bias = torch.randn(b, h, lq, lk, dtype=F64).requires_grad_()
    mask = make_mask("full", b, h, lq, lk, p=0.7)
    mask[0, 1, 2] = False  # one empty query row
    mask[1, :, 0] = False  # query 0 of batch 1 sees nothing in any head
    mask[2] = False  # batch 2 is fully masked
    out = ops.dense_attention(q, k, v, mask=mask, bias=bias, is_causal=causal, backend=backend)
    gq, gk, gv, gb = grads(out, [q, k, v, bias])
    for g in (gq, gk, gv, gb):
        assert torch.isfinite(g).all()
    zero_out = torch.zeros(3, dtype=F64)
    assert torch.equal(out[0, 1, 2], zero_out)
    assert torch.equal(out[1, :, 0], torch.zeros(h, 3, dtype=F64))
    assert torch.equal(out[2], torch.zeros_like(out[2]))
    # nothing flows from or into an empty row / batch
    assert torch.equal(gq[0, 1, 2], torch.zeros(4, dtype=F64))
    assert torch.equal(gq[1, :, 0], torch.zeros(h, 4, dtype=F64))
    for g in (gq, gk, gv, gb):
        assert torch.equal(g[2], torch.zeros_like(g[2]))
    # a masked-out score gets no gradient
    allowed = mask & torch.ones(lq, lk, dtype=torch.bool).tril() if causal else mask
    assert torch.equal(gb[~allowed], torch.zeros_like(gb[~allowed]))
    want, _, _ = oracle(q, k, v, mask=mask, bias=bias, is_causal=causal)
    torch.testing.assert_close(out, want)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_masked_keys_do_not_change_output(backend):
    q, k, v = make_qkv(2, 2, 4, 6, 3, 3, seed=3)
    mask = make_mask("key_padding", 2, 2, 4, 6)
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[~mask.expand(2, 2, 1, 6).squeeze(2)] = 1e3
    v2[~mask.expand(2, 2, 1, 6).squeeze(2)] = -7.0
    a = ops.dense_attention(q, k, v, mask=mask, backend=backend)
    b = ops.dense_attention(q, k2, v2, mask=mask, backend=backend)
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_no_keys_at_all(backend):
    q, k, v = make_qkv(2, 2, 3, 0, 4, 5)
    out = ops.dense_attention(q, k, v, backend=backend)
    assert out.shape == (2, 2, 3, 5) and torch.equal(out, torch.zeros_like(out))
    _, lse = ops.dense_attention(q, k, v, return_lse=True)
    assert torch.equal(lse, torch.full((2, 2, 3), -math.inf, dtype=F64))


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_non_contiguous_inputs(oracle, tol, backend):
    # (B, L, H, D) tensors viewed as (B, H, L, D): strided, not contiguous
    g = torch.Generator().manual_seed(4)
    q = torch.randn(2, 5, 3, 4, generator=g, dtype=F64).transpose(1, 2).detach().requires_grad_()
    k = torch.randn(2, 6, 3, 4, generator=g, dtype=F64).transpose(1, 2).detach().requires_grad_()
    v = torch.randn(2, 3, 4, 6, generator=g, dtype=F64).permute(0, 1, 3, 2).detach().requires_grad_()
    assert not q.is_contiguous() and not v.is_contiguous()
    assert_matches_oracle(oracle, tol, q, k, v, backend=backend, mask=make_mask("shared", 2, 3, 5, 6))


def test_bias_of_another_float_dtype_is_cast():
    q, k, v = make_qkv(2, 2, 4, 5, 3, 3, dtype=torch.float32)
    bias = torch.randn(4, 5, dtype=F64)
    a = ops.dense_attention(q, k, v, bias=bias, backend="sdpa")
    b = ops.dense_attention(q, k, v, bias=bias, backend="reference")
    assert a.dtype == b.dtype == torch.float32
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_low_precision_vs_float64_formula(oracle, tol, dtype, backend):
    b, h, lq, lk = 2, 3, 9, 13
    q, k, v = make_qkv(b, h, lq, lk, 16, 8, dtype=dtype, seed=21)
    bias = torch.randn(1, h, lq, lk, dtype=dtype).requires_grad_()
    mask = make_mask("full", b, h, lq, lk, p=0.7)
    mask[0, 0, 0] = False
    try:
        out = ops.dense_attention(q, k, v, mask=mask, bias=bias, backend=backend)
    except RuntimeError as err:  # pragma: no cover - depends on the CPU build
        pytest.skip(f"{dtype} not supported by {backend} on this CPU: {err}")
    assert out.dtype == dtype
    inputs = [q, k, v, bias]
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    want, _, _ = oracle(*ref_inputs[:3], mask=mask, bias=ref_inputs[3])
    torch.testing.assert_close(out.double(), want, **tol(dtype, "fwd"))
    for got, exp in zip(grads(out, inputs), grads(want, ref_inputs)):
        torch.testing.assert_close(got.double(), exp, **tol(dtype, "bwd"))


def test_sdpa_vs_reference_float32(tol):
    b, h, lq, lk = 2, 4, 17, 23
    q, k, v = make_qkv(b, h, lq, lk, 32, 16, dtype=torch.float32, seed=9)
    bias = torch.randn(b, 1, lq, lk).requires_grad_()
    mask = make_mask("key_padding", b, h, lq, lk, p=0.8)
    outs, gs = [], []
    for backend in BACKEND_NAMES:
        out = ops.dense_attention(q, k, v, mask=mask, bias=bias, is_causal=True, backend=backend)
        outs.append(out)
        gs.append(grads(out, [q, k, v, bias]))
    torch.testing.assert_close(outs[0], outs[1], **tol(torch.float32, "fwd"))
    for a, b_ in zip(*gs):
        torch.testing.assert_close(a, b_, **tol(torch.float32, "bwd"))


def test_return_weights_and_lse(oracle, tol):
    b, h, lq, lk = 2, 3, 5, 7
    q, k, v = make_qkv(b, h, lq, lk, 4, 6)
    mask = make_mask("full", b, h, lq, lk)
    mask[1, 2, 3] = False
    want_out, want_w, want_lse = oracle(q, k, v, mask=mask)
    out, w = ops.dense_attention(q, k, v, mask=mask, return_weights=True)
    assert w.shape == (b, h, lq, lk)
    torch.testing.assert_close(w, want_w, **tol(F64, "fwd"))
    out2, lse = ops.dense_attention(q, k, v, mask=mask, return_lse=True)
    assert lse.shape == (b, h, lq)
    assert lse[1, 2, 3].item() == -math.inf
    torch.testing.assert_close(lse, want_lse, **tol(F64, "fwd"))  # -inf positions must agree too
    out3, w3, lse3 = ops.dense_attention(q, k, v, mask=mask, return_weights=True, return_lse=True)
    for o in (out, out2, out3):
        torch.testing.assert_close(o, want_out, **tol(F64, "fwd"))
    torch.testing.assert_close(w3, w)
    torch.testing.assert_close(lse3, lse)
    # weights are a distribution over allowed keys, zero rows where nothing is allowed
    row_sums = w.sum(-1)
    torch.testing.assert_close(row_sums, mask.any(-1).to(F64))
    assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))


def test_auto_picks_sdpa_unless_weights(monkeypatch, backend_spy):
    spy = backend_spy("dense")
    q, k, v = make_qkv(1, 2, 4, 4, 3, 3)
    ops.dense_attention(q, k, v)
    with torch.no_grad():
        ops.dense_attention(q, k, v)
    ops.dense_attention(q, k, v, return_weights=True)
    ops.dense_attention(q, k, v, return_lse=True)  # the fused kernels return the log-sum-exp (test_dense_lse.py)
    assert spy.used == ["sdpa", "sdpa", "reference", "sdpa"]


def test_unknown_backend_lists_valid_names():
    q, k, v = make_qkv(1, 1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match=r"unknown backend 'nope'.*'auto', 'sdpa', 'reference'"):
        ops.dense_attention(q, k, v, backend="nope")


@pytest.mark.parametrize(("flag", "reason"), [("return_weights", "attention weights")])
def test_named_backend_that_cannot_serve_the_call(flag, reason):
    q, k, v = make_qkv(1, 1, 2, 2, 2, 2)
    with pytest.raises(ValueError, match=f"backend 'sdpa' of operator 'dense' cannot run this call: cannot return {reason}"):
        ops.dense_attention(q, k, v, backend="sdpa", **{flag: True})


def test_restrict_scope_is_restored_also_after_an_error(monkeypatch, backend_spy):
    spy = backend_spy("dense")
    q, k, v = make_qkv(1, 2, 3, 3, 2, 2)
    with backends.restrict("reference"):
        ops.dense_attention(q, k, v)
        ops.dense_attention(q, k, v, backend="sdpa")  # a per-call name wins over the scope
        with backends.restrict("sdpa", "reference"):
            ops.dense_attention(q, k, v)
        ops.dense_attention(q, k, v)
    assert spy.used == ["reference", "sdpa", "sdpa", "reference"]
    with pytest.raises(RuntimeError, match="boom"), backends.restrict("reference"):
        raise RuntimeError("boom")
    ops.dense_attention(q, k, v)
    assert spy.used[-1] == "sdpa"
    with backends.restrict("sdpa"), pytest.raises(ValueError, match=r"no backend of operator 'dense' supports this call.*weights"):
        ops.dense_attention(q, k, v, return_weights=True)
    with pytest.raises(ValueError, match="at least one backend"), backends.restrict():
        pass


def test_list_backends_in_priority_order():
    assert backends.list_backends("dense") == ["sdpa", "reference"]


@pytest.mark.parametrize("backend", BACKEND_NAMES)
def test_gradcheck_with_empty_row(backend):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 3, 2, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(1, 2, 4, 2, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(1, 2, 4, 3, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(1, 1, 3, 4, generator=g, dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [True, True, False, False]])

    def fn(q, k, v, bias):
        return ops.dense_attention(q, k, v, mask=mask, bias=bias, backend=backend)

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))
    assert torch.autograd.gradcheck(lambda q, k, v: ops.dense_attention(q, k, v, is_causal=True, backend=backend), (q, k, v))


def test_sdpa_backend_calls_torch_sdpa(monkeypatch):
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def counting(*args, **kwargs):
        calls.append(kwargs.get("attn_mask") is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    q, k, v = make_qkv(1, 2, 3, 4, 2, 2)
    ops.dense_attention(q, k, v, backend="sdpa")
    ops.dense_attention(q, k, v, mask=make_mask("key_padding", 1, 2, 3, 4), backend="sdpa")
    ops.dense_attention(q, k, v, backend="reference")
    assert calls == [False, True]

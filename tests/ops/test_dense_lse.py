"""dense_attention(return_lse=True) on the fused kernels: out, lse and gradients through both, vs the formula."""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse import ops
from attnfuse.ops import _sdpa_lse

F64 = torch.float64
SHAPES = [(2, 3, 5, 7, 4, 6), (1, 1, 1, 1, 1, 1), (1, 2, 9, 3, 8, 5), (2, 2, 7, 11, 3, 1), (1, 2, 16, 16, 8, 8)]


def make(b, h, lq, lk, d, dv, *, dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=dtype).requires_grad_() for s in ((b, h, lq, d), (b, h, lk, d), (b, h, lk, dv))]


def make_mask(kind, b, h, lq, lk, seed=1):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand({"key": (b, 1, 1, lk), "pair": (b, h, lq, lk)}[kind], generator=g) < 0.6
    if kind == "pair":
        mask[0, 0, 0] = False  # one query with no key
    return mask


def loss(out, lse, *, use_out=True, use_lse=True, seed=7):
    g = torch.Generator().manual_seed(seed)
    w_out = torch.randn(out.shape, generator=g, dtype=F64).to(out.dtype)
    w_lse = torch.randn(lse.shape, generator=g, dtype=F64).to(out.dtype)
    total = out.new_zeros(())
    if use_out:
        total = total + (out * w_out).sum()
    if use_lse:
        total = total + (torch.where(torch.isfinite(lse), lse, 0.0) * w_lse).sum()
    return total


def check(oracle, tol, q, k, v, *, use_out=True, use_lse=True, **kw):
    out, lse = ops.dense_attention(q, k, v, return_lse=True, backend="sdpa", **kw)
    want, _, want_lse = oracle(q, k, v, **kw)
    torch.testing.assert_close(out, want, **tol(q.dtype, "fwd"))
    torch.testing.assert_close(lse, want_lse, **tol(q.dtype, "fwd"))  # -inf where the oracle has -inf
    got = torch.autograd.grad(loss(out, lse, use_out=use_out, use_lse=use_lse), (q, k, v), allow_unused=True)
    exp = torch.autograd.grad(loss(want, want_lse, use_out=use_out, use_lse=use_lse), (q, k, v), allow_unused=True)
    for name, x, a, e in zip("qkv", (q, k, v), got, exp):
        a, e = (torch.zeros_like(x) if t is None else t for t in (a, e))
        torch.testing.assert_close(a, e, **tol(q.dtype, "bwd"), msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("mask_kind", [None, "key", "pair"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_fused_lse_matches_formula(oracle, tol, shape, mask_kind, causal):
    b, h, lq, lk, _, _ = shape
    q, k, v = make(*shape)
    check(oracle, tol, q, k, v, mask=make_mask(mask_kind, b, h, lq, lk), is_causal=causal)


@pytest.mark.parametrize(("use_out", "use_lse"), [(True, False), (False, True), (True, True)], ids=["out", "lse", "both"])
def test_gradient_of_each_output(oracle, tol, use_out, use_lse):
    # lse only: dO = 0, the extra-column path; both: the folded path; out only: the plain aten backward
    q, k, v = make(2, 2, 6, 9, 4, 4, seed=3)
    check(oracle, tol, q, k, v, use_out=use_out, use_lse=use_lse, mask=make_mask("key", 2, 2, 6, 9))


def test_both_lse_gradient_paths_agree(monkeypatch):
    q, k, v = make(1, 2, 5, 6, 3, 3, seed=4)
    out, lse = ops.dense_attention(q, k, v, return_lse=True, backend="sdpa")
    folded = torch.autograd.grad(loss(out, lse), (q, k, v), retain_graph=True)
    monkeypatch.setattr(_sdpa_lse, "_fold_dlse_into_out", lambda *a: None)  # force the extra column
    column = torch.autograd.grad(loss(out, lse), (q, k, v))
    for a, b in zip(folded, column):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_bias_is_added_and_bias_gradient_falls_back(oracle, tol, backend_spy):
    q, k, v = make(2, 2, 4, 5, 3, 3, seed=5)
    bias = torch.randn(1, 2, 4, 5, dtype=F64)
    check(oracle, tol, q, k, v, bias=bias, mask=make_mask("key", 2, 2, 4, 5), is_causal=True)
    bias.requires_grad_()
    out, lse = ops.dense_attention(q, k, v, bias=bias, return_lse=True)
    want, _, want_lse = oracle(q, k, v, bias=bias)
    g = torch.autograd.grad(loss(out, lse), bias)[0]
    torch.testing.assert_close(g, torch.autograd.grad(loss(want, want_lse), bias)[0], **tol(F64, "bwd"))


def test_gradcheck_fused_lse():
    g = torch.Generator().manual_seed(0)
    q, k = (torch.randn(1, 2, n, 2, generator=g, dtype=F64, requires_grad=True) for n in (3, 4))
    v = torch.randn(1, 2, 4, 3, generator=g, dtype=F64, requires_grad=True)
    mask = torch.tensor([[True, False, True, True], [False, False, False, False], [True, True, False, False]])

    def fn(q, k, v):
        out, lse = ops.dense_attention(q, k, v, mask=mask, return_lse=True, backend="sdpa")
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v))
    def lse_only(q, k, v):
        return ops.dense_attention(q, k, v, is_causal=True, return_lse=True, backend="sdpa")[1]

    assert torch.autograd.gradcheck(lse_only, (q, k, v))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision(oracle, tol, dtype):
    q, k, v = make(2, 2, 9, 13, 16, 8, dtype=dtype, seed=8)
    mask = make_mask("pair", 2, 2, 9, 13)
    out, lse = ops.dense_attention(q, k, v, mask=mask, return_lse=True, backend="sdpa")
    assert out.dtype == lse.dtype == dtype
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want, _, want_lse = oracle(*ref, mask=mask)
    torch.testing.assert_close(out.double(), want, **tol(dtype, "fwd"))
    torch.testing.assert_close(lse.double(), want_lse, **tol(dtype, "fwd"))
    for a, e in zip(torch.autograd.grad(loss(out, lse), (q, k, v)), torch.autograd.grad(loss(want, want_lse), ref)):
        torch.testing.assert_close(a.double(), e, **tol(dtype, "bwd"))


def test_aten_backward_reads_out_only_through_the_row_dot():
    # The log-sum-exp gradient relies on this: changing O orthogonally to dO leaves dQ, dK, dV unchanged.
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g, dtype=F64) for _ in range(3))
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=0.5)
    dout = torch.randn(out.shape, generator=g, dtype=F64)
    p = torch.randn(out.shape, generator=g, dtype=F64)
    p = p - (p * dout).sum(-1, keepdim=True) / (dout * dout).sum(-1, keepdim=True) * dout  # p ⟂ dO per row
    back = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
    for a, b in zip(back(dout, q, k, v, out, lse, 0.0, False, scale=0.5), back(dout, q, k, v, out + p, lse, 0.0, False, scale=0.5)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_merge_of_fused_parts_is_exact_and_differentiable(oracle, tol):
    q, k, v = make(1, 2, 5, 8, 4, 4, seed=9)
    parts = [ops.dense_attention(q, k[:, :, i::2], v[:, :, i::2], return_lse=True) for i in range(2)]
    out, lse = ops.merge_attention([p[0] for p in parts], [p[1] for p in parts])
    want, _, want_lse = oracle(q, k, v)
    torch.testing.assert_close(out, want, **tol(F64, "fwd"))
    got = torch.autograd.grad(loss(out, lse), (q, k, v))
    exp = torch.autograd.grad(loss(want, want_lse), (q, k, v))
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, **tol(F64, "bwd"))


def test_fully_masked_rows_give_minus_inf_and_zero_gradient():
    q, k, v = make(1, 1, 3, 4, 2, 2, seed=1)
    mask = torch.tensor([[True, True, False, False], [False] * 4, [False, True, True, True]])
    out, lse = ops.dense_attention(q, k, v, mask=mask, return_lse=True, backend="sdpa")
    assert lse[0, 0, 1].item() == -math.inf and torch.equal(out[0, 0, 1], torch.zeros(2, dtype=F64))
    gq = torch.autograd.grad(loss(out, lse), q)[0]
    assert torch.isfinite(gq).all() and torch.equal(gq[0, 0, 1], torch.zeros(2, dtype=F64))


def test_compiled_matches_eager():
    q, k, v = make(1, 2, 6, 6, 4, 4, dtype=torch.float32, seed=11)
    mask = make_mask("key", 1, 2, 6, 6)

    def fn(q, k, v):
        out, lse = ops.dense_attention(q, k, v, mask=mask, return_lse=True)
        return out.sum() + lse.sum()

    eager = torch.autograd.grad(fn(q, k, v), (q, k, v))
    compiled = torch.autograd.grad(torch.compile(fn, backend="aot_eager", fullgraph=True)(q, k, v), (q, k, v))
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_cuda_fused_lse(oracle, tol, dtype):  # pragma: no cover - no GPU in CI
    q, k, v = (t.detach().to("cuda", dtype).requires_grad_() for t in make(2, 2, 37, 45, 16, 24))
    mask = make_mask("key", 2, 2, 37, 45).cuda()
    out, lse = ops.dense_attention(q, k, v, mask=mask, is_causal=True, return_lse=True)
    ref = [x.detach().double().requires_grad_() for x in (q, k, v)]
    want, _, want_lse = oracle(*ref, mask=mask, is_causal=True)
    torch.testing.assert_close(out.double(), want, **tol(dtype, "fwd"))
    torch.testing.assert_close(lse.double(), want_lse, **tol(dtype, "fwd"))
    for a, e in zip(torch.autograd.grad(loss(out, lse), (q, k, v)), torch.autograd.grad(loss(want, want_lse), ref)):
        torch.testing.assert_close(a.double(), e, **tol(dtype, "bwd"))

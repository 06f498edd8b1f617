"""Hypothesis fuzzing of dense_attention shapes, masks and flags against the explicit formula."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfuse import ops

F64 = torch.float64


@st.composite
def cases(draw):
    b, h = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    lq, lk = draw(st.integers(1, 9)), draw(st.integers(1, 9))
    d, dv = draw(st.integers(1, 6)), draw(st.integers(1, 6))
    mask_shape = draw(st.sampled_from([None, (b, 1, 1, lk), (1, 1, lq, lk), (b, h, lq, lk), (lq, lk), (1, h, 1, lk), (lk,), ()]))
    bias_shape = draw(st.sampled_from([None, (b, h, lq, lk), (1, h, lq, lk), (lk,)]))
    p_keep = draw(st.floats(0.0, 1.0))
    empty_rows = draw(st.booleans())
    return {
        "shape": (b, h, lq, lk, d, dv),
        "mask_shape": mask_shape,
        "bias_shape": bias_shape,
        "p_keep": p_keep,
        "empty_rows": empty_rows,
        "causal": draw(st.booleans()),
        "scale": draw(st.sampled_from([None, 0.5, 3.0])),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_dense_fuzz(oracle, tol, backend, case):
    b, h, lq, lk, d, dv = case["shape"]
    g = torch.Generator().manual_seed(case["seed"])
    q = torch.randn(b, h, lq, d, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(b, h, lk, d, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(b, h, lk, dv, generator=g, dtype=F64, requires_grad=True)
    mask = None
    if case["mask_shape"] is not None:
        mask = torch.rand(case["mask_shape"], generator=g) < case["p_keep"]
        if case["empty_rows"]:
            if mask.dim() >= 2:
                mask[..., 0, :] = False  # the first query row of the mask (or of every broadcast copy) is empty
            else:
                mask[...] = False  # a mask without a query axis empties every row
    bias = None
    if case["bias_shape"] is not None:
        bias = torch.randn(case["bias_shape"], generator=g, dtype=F64, requires_grad=True)
    kwargs = {"mask": mask, "bias": bias, "scale": case["scale"], "is_causal": case["causal"]}
    out = ops.dense_attention(q, k, v, backend=backend, **kwargs)
    want, _, _ = oracle(q, k, v, **kwargs)
    assert out.shape == (b, h, lq, dv)
    torch.testing.assert_close(out, want, **tol(F64, "fwd"))
    inputs = [q, k, v] + ([bias] if bias is not None else [])
    w = torch.randn(out.shape, generator=g, dtype=F64)
    got = torch.autograd.grad((out * w).sum(), inputs, allow_unused=True)
    exp = torch.autograd.grad((want * w).sum(), inputs, allow_unused=True)
    for x, a, e in zip(inputs, got, exp):
        a = torch.zeros_like(x) if a is None else a
        e = torch.zeros_like(x) if e is None else e
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, **tol(F64, "bwd"))
    if mask is not None:  # empty query rows give exactly zero
        empty = ~torch.broadcast_to(mask, (b, h, lq, lk)).any(-1)  # (B, H, L)
        assert torch.equal(out[empty], torch.zeros_like(out[empty]))

"""Hypothesis fuzzing of neighborhood_attention (any kernel, stride, border): tiled vs reference, reference vs a dense oracle."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfuse import ops
from attnfuse.ops.neighborhood import make_geometry, window_indices
from attnfuse.ops.neighborhood.tiled import tiled_neighborhood

F64 = torch.float64


@st.composite
def cases(draw):
    rank = draw(st.integers(1, 3))
    max_extent = {1: 24, 2: 9, 3: 6}[rank]
    grid, kernel, dilation, causal, stride = [], [], [], [], []
    for _ in range(rank):
        n = draw(st.integers(1, max_extent))
        d = draw(st.integers(1, max(1, n)))
        k = draw(st.integers(1, n // d))  # odd or even, k * d <= n
        grid.append(n), kernel.append(k), dilation.append(d), causal.append(draw(st.booleans()))
        stride.append(draw(st.integers(1, k)))
    with_rpb = not any(causal) and draw(st.booleans())
    return {
        "grid": tuple(grid),
        "kernel": tuple(kernel),
        "dilation": tuple(dilation),
        "causal": tuple(causal),
        "stride": tuple(stride),
        "border": draw(st.sampled_from(["shift", "clip"])),
        "b": draw(st.integers(1, 2)),
        "h": draw(st.integers(1, 2)),
        "d": draw(st.integers(1, 5)),
        "dv": draw(st.integers(1, 5)),
        "mask": draw(st.sampled_from([None, "batch", "head"])),
        "p_keep": draw(st.floats(0.0, 1.0)),
        "rpb": with_rpb,
        "bias": draw(st.booleans()),
        "extra": draw(st.integers(0, 3)),
        "tile": tuple(draw(st.integers(1, 9)) for _ in range(rank)),
        "seed": draw(st.integers(0, 2**31 - 1)),
    }


def _inputs(case):
    g = torch.Generator().manual_seed(case["seed"])
    b, h, grid, d, dv = case["b"], case["h"], case["grid"], case["d"], case["dv"]
    geom = make_geometry(grid, case["kernel"], case["dilation"], case["causal"], case["stride"], case["border"])
    q = torch.randn(b, h, *grid, d, generator=g, dtype=F64).requires_grad_()
    k = torch.randn(b, h, *grid, d, generator=g, dtype=F64).requires_grad_()
    v = torch.randn(b, h, *grid, dv, generator=g, dtype=F64).requires_grad_()
    mask = None
    if case["mask"] == "batch":
        mask = torch.rand(b, *grid, generator=g) < case["p_keep"]
    elif case["mask"] == "head":
        mask = torch.rand(b, h, *grid, generator=g) < case["p_keep"]
    rpb = torch.randn(h, *geom.rpb_shape, generator=g, dtype=F64).requires_grad_() if case["rpb"] else None
    bias = torch.randn(b, 1, *grid, geom.window_size, generator=g, dtype=F64).requires_grad_() if case["bias"] else None
    extra_k = extra_v = None
    if case["extra"]:
        extra_k = torch.randn(b, h, case["extra"], d, generator=g, dtype=F64).requires_grad_()
        extra_v = torch.randn(b, h, case["extra"], dv, generator=g, dtype=F64).requires_grad_()
    return geom, q, k, v, {"key_mask": mask, "rpb": rpb, "bias": bias, "extra_k": extra_k, "extra_v": extra_v}


def _mask_bhn(mask, rank):
    """``(B, *grid)`` or ``(B, H, *grid)`` -> ``(B, 1 or H, N)``."""
    if mask.dim() == rank + 1:
        mask = mask.unsqueeze(1)
    return mask.reshape(mask.shape[0], mask.shape[1], -1)


def _grads(out, inputs):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    gs = torch.autograd.grad((out * w).sum(), inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


@settings(max_examples=60, deadline=None)
@given(case=cases())
def test_tiled_matches_reference_fuzz(tol, case):
    geom, q, k, v, kw = _inputs(case)
    args = {"dilation": geom.dilation, "is_causal": geom.causal, "stride": geom.stride, "border": geom.border, **kw}
    want, want_lse = ops.neighborhood_attention(q, k, v, geom.kernel, **args, backend="reference", return_lse=True)
    got, lse = ops.neighborhood_attention(q, k, v, geom.kernel, **args, backend="tiled", return_lse=True)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, **tol(F64, "fwd"))
    torch.testing.assert_close(lse, want_lse, **tol(F64, "fwd"))
    inputs = [t for t in (q, k, v, kw["rpb"], kw["bias"], kw["extra_k"], kw["extra_v"]) if t is not None]
    for a, b in zip(_grads(got, inputs), _grads(want, inputs)):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, **tol(F64, "bwd"))


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_tiled_any_tile_fuzz(tol, case):
    geom, q, k, v, kw = _inputs(case)
    scale = 1.0 / math.sqrt(case["d"])
    want = ops.neighborhood_attention(q, k, v, geom.kernel, dilation=geom.dilation, is_causal=geom.causal, stride=geom.stride,
                                      border=geom.border, key_mask=kw["key_mask"], rpb=kw["rpb"], backend="reference")
    mask = None if kw["key_mask"] is None else _mask_bhn(kw["key_mask"], geom.rank)
    got, _ = tiled_neighborhood(q, k, v, geom, scale=scale, mask=mask, rpb=kw["rpb"], tile=case["tile"])
    torch.testing.assert_close(got, want, **tol(F64, "fwd"))


@settings(max_examples=40, deadline=None)
@given(case=cases())
def test_reference_matches_dense_oracle_fuzz(oracle, tol, case):
    # the reference against dense attention restricted to the window set (window sets themselves
    # are checked against a from-the-definition loop in test_neighborhood.py)
    geom, q, k, v, kw = _inputs(case)
    b, h, n = case["b"], case["h"], geom.num_tokens
    keys, valid, _ = window_indices(geom)
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[torch.arange(n)[:, None].expand_as(keys)[valid], keys[valid]] = True  # (N, N)
    mask = kw["key_mask"]
    dense_mask = allowed
    if mask is not None:
        dense_mask = allowed & _mask_bhn(mask, geom.rank).unsqueeze(-2)  # (B, Hm, N, N)
    out = ops.neighborhood_attention(q, k, v, geom.kernel, dilation=geom.dilation, is_causal=geom.causal, key_mask=mask,
                                     stride=geom.stride, border=geom.border, backend="reference")
    flat = [t.reshape(b, h, n, -1) for t in (q, k, v)]
    want, _, _ = oracle(*flat, mask=dense_mask)
    torch.testing.assert_close(out, want.reshape(out.shape), **tol(F64, "fwd"))

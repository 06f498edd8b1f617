"""Axial attention: every 1-D slice equals dense attention on that slice; cross grids, masks, weights, errors."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfuse import ops
from attnfuse.fusion import EarlyFusion, TokenSet
from attnfuse.nn import Attention
from attnfuse.ops.configs import Axial

F64 = torch.float64


def rand(shape, seed, d):
    return torch.randn(*shape, d, generator=torch.Generator().manual_seed(seed), dtype=F64, requires_grad=True)


def slice_by_slice(oracle, q, k, v, axis, mask=None, is_causal=False):
    """Loop over every index of the other grid axes and run the explicit formula on the 1-D slice."""
    grid = q.shape[2:-1]
    out = torch.zeros(*q.shape[:-1], v.shape[-1], dtype=q.dtype)
    others = [range(g) if a != axis else [slice(None)] for a, g in enumerate(grid)]
    for idx in itertools.product(*others):
        sel = (slice(None), slice(None), *idx)
        m = None if mask is None else mask[sel].unsqueeze(-2)  # (B', H', 1, Nk)
        out[sel] = oracle(q[sel], k[sel], v[sel], mask=m, is_causal=is_causal)[0]
    return out


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
@pytest.mark.parametrize("axis", [0, 1, 2, -1])
@pytest.mark.parametrize("causal", [False, True])
def test_each_slice_is_dense_attention(oracle, tol, backend, axis, causal):
    q, k, v = rand((2, 3, 4, 5, 3), 0, 6), rand((2, 3, 4, 5, 3), 1, 6), rand((2, 3, 4, 5, 3), 2, 4)
    mask = torch.rand(2, 1, 4, 5, 3, generator=torch.Generator().manual_seed(3)) > 0.3
    out = ops.axial_attention(q, k, v, axis, key_mask=mask, is_causal=causal, backend=backend)
    want = slice_by_slice(oracle, q, k, v, axis % 3, mask, causal)
    torch.testing.assert_close(out, want, **tol(F64, "fwd"))
    g_out = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g_out), torch.autograd.grad(want, (q, k, v), g_out)):
        torch.testing.assert_close(a, b, **tol(F64, "bwd"))


def test_cross_attention_along_an_axis_and_empty_slices(oracle, tol):
    q = rand((2, 2, 6, 4), 0, 5)  # 6 query times, 4 agents
    k, v = rand((2, 2, 9, 4), 1, 5), rand((2, 2, 9, 4), 2, 3)  # 9 key times, same agents
    mask = torch.rand(2, 2, 9, 4, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[:, :, :, 1] = False  # agent 1 has no valid key at any time
    for backend in ("sdpa", "reference"):
        out = ops.axial_attention(q, k, v, 0, key_mask=mask, backend=backend)
        torch.testing.assert_close(out, slice_by_slice(oracle, q, k, v, 0, mask), **tol(F64, "fwd"))
        assert torch.equal(out[:, :, :, 1], torch.zeros_like(out[:, :, :, 1]))
        assert all(torch.isfinite(g).all() for g in torch.autograd.grad(out.sum(), (q, k, v)))


def test_dense_weights_are_block_diagonal_per_slice(oracle):
    q, k, v = rand((1, 2, 3, 4), 0, 5), rand((1, 2, 3, 4), 1, 5), rand((1, 2, 3, 4), 2, 5)
    out, w = ops.axial_attention(q, k, v, 1, return_weights=True)
    coords = torch.tensor(list(itertools.product(range(3), range(4))))
    same_row = coords[:, None, 0] == coords[None, :, 0]  # axis 1 = the second grid axis: same first coordinate
    want, want_w, _ = oracle(q.reshape(1, 2, 12, 5), k.reshape(1, 2, 12, 5), v.reshape(1, 2, 12, 5), mask=same_row)
    torch.testing.assert_close(w, want_w)
    torch.testing.assert_close(out.reshape(1, 2, 12, 5), want)


@st.composite
def axial_cases(draw):
    grid = tuple(draw(st.integers(1, 5)) for _ in range(draw(st.integers(1, 3))))
    return grid, draw(st.integers(0, len(grid) - 1)), draw(st.booleans()), draw(st.floats(0, 1)), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=25, deadline=None)
@given(case=axial_cases())
def test_axial_fuzz(oracle, tol, case):
    grid, axis, causal, p_keep, seed = case
    q, k, v = rand((2, 2, *grid), seed, 4), rand((2, 2, *grid), seed + 1, 4), rand((2, 2, *grid), seed + 2, 3)
    mask = torch.rand(2, 1, *grid, generator=torch.Generator().manual_seed(seed)) < p_keep
    out = ops.axial_attention(q, k, v, axis, key_mask=mask, is_causal=causal, backend="sdpa")
    torch.testing.assert_close(out, slice_by_slice(oracle, q, k, v, axis, mask, causal), **tol(F64, "fwd"))


def test_bad_arguments():
    q = k = v = torch.randn(1, 2, 3, 4, 5)
    with pytest.raises(ValueError, match=r"axis must be in \[-2, 2\)"):
        ops.axial_attention(q, k, v, 2)
    with pytest.raises(TypeError, match="axis must be an int"):
        ops.axial_attention(q, k, v, "time")
    with pytest.raises(ValueError, match="at least one grid axis"):
        ops.axial_attention(q[0, 0], k[0, 0], v[0, 0], 0)
    with pytest.raises(ValueError, match="k may differ from q only along axis 0"):
        ops.axial_attention(q, k[:, :, :, :2], v[:, :, :, :2], 0)
    with pytest.raises(ValueError, match=r"key_mask must be \(B, \*grid"):
        ops.axial_attention(q, k, v, 0, key_mask=torch.ones(1, 1, 12, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot return attention weights"):
        ops.axial_attention(q, k, v, 0, return_weights=True, backend="sdpa")


def test_registered_and_used_by_modules():
    spec = ops.get_operator("axial")
    assert spec.layout == "grid" and spec.cross
    torch.manual_seed(0)
    attn = Attention(16, 2, op="axial", axis=0)
    x, ctx = torch.randn(2, 6, 3, 16), torch.randn(2, 8, 3, 16)
    assert attn(x, mask=torch.rand(2, 6, 3) > 0.2).shape == x.shape
    assert attn(x, context=ctx, context_mask=torch.rand(2, 8, 3) > 0.2).shape == x.shape  # cross along time
    # on flattened fused tokens axis 0 is plain dense attention
    fusion = EarlyFusion(["a", "b"], 16, heads=2, depth=1, op=Axial(axis=0))
    dense = EarlyFusion(["a", "b"], 16, heads=2, depth=1)
    dense.load_state_dict(fusion.state_dict())
    inputs = {"a": TokenSet(torch.randn(2, 5, 16)), "b": TokenSet(torch.randn(2, 6, 16), torch.rand(2, 6) > 0.3)}
    torch.testing.assert_close(fusion(inputs).fused.x, dense(inputs).fused.x, atol=1e-5, rtol=1e-4)

"""Halo attention: key sets from brute force, blocked vs reference (forward and gradients), dense limits, errors."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from attnfuse import ops
from attnfuse.fusion import EarlyFusion, TokenSet
from attnfuse.nn import Attention
from attnfuse.ops.configs import Halo
from attnfuse.ops.halo import halo_key_sets, halo_query_blocks, halo_relative_index, halo_relative_logits, halo_windows

F64 = torch.float64


def brute_allowed(grid, block, halo):
    """Key set of each query by looping over coordinates (independent of the operator's index arithmetic)."""
    coords = list(itertools.product(*(range(g) for g in grid)))
    allowed = torch.zeros(len(coords), len(coords), dtype=torch.bool)
    for i, cq in enumerate(coords):
        for j, ck in enumerate(coords):
            allowed[i, j] = all((c // b) * b - h <= y < (c // b) * b + b + h for c, y, b, h in zip(cq, ck, block, halo))
    return allowed


def brute_dense_bias(bias5, grid, block, halo):
    """Scatter a (B, H, NB, Bq, W) bias to the dense (B, H, N, N) layout with explicit loops."""
    coords = list(itertools.product(*(range(g) for g in grid)))
    counts = [math.ceil(g / b) for g, b in zip(grid, block)]
    win = [b + 2 * h for b, h in zip(block, halo)]
    dense = torch.zeros(bias5.shape[0], bias5.shape[1], len(coords), len(coords), dtype=bias5.dtype)
    for i, cq in enumerate(coords):
        blk = pos = 0
        for c, b, n in zip(cq, block, counts):
            blk, pos = blk * n + c // b, pos * b + c % b
        for j, ck in enumerate(coords):
            w = 0
            for c, y, b, h, wd in zip(cq, ck, block, halo, win):
                off = y - ((c // b) * b - h)
                if not 0 <= off < wd:
                    break
                w = w * wd + off
            else:
                dense[:, :, i, j] = bias5[:, :, blk, pos, w]
    return dense


def rand_qkv(b, h, grid, d=6, dv=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, *grid, d, generator=g, dtype=dtype, requires_grad=True)
    k = torch.randn(b, h, *grid, d, generator=g, dtype=dtype, requires_grad=True)
    v = torch.randn(b, h, *grid, dv, generator=g, dtype=dtype, requires_grad=True)
    return q, k, v


CASES = [((10, 7), 4, 1), ((8, 8), 4, 2), ((9, 6), (3, 2), (1, 0)), ((5,), 2, 1), ((4, 5, 3), 2, 1), ((3, 3), 5, 0)]


@pytest.mark.parametrize("grid,block,halo", CASES)
def test_key_sets_match_brute_force(grid, block, halo):
    rank = len(grid)
    block = (block,) * rank if isinstance(block, int) else block
    halo = (halo,) * rank if isinstance(halo, int) else halo
    allowed, _ = halo_key_sets(grid, block, halo)
    assert torch.equal(allowed, brute_allowed(grid, block, halo))


def test_materialised_docstring_example():
    allowed, _ = halo_key_sets((5,), (2,), (1,))
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [0, 1, 1, 1, 1], [0, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    assert torch.equal(allowed, want)


@pytest.mark.parametrize("grid,block,halo", CASES)
def test_blocked_matches_reference_and_oracle(oracle, tol, grid, block, halo):
    rank = len(grid)
    blk = (block,) * rank if isinstance(block, int) else block
    hal = (halo,) * rank if isinstance(halo, int) else halo
    q, k, v = rand_qkv(2, 3, grid)
    mask = torch.rand(2, 1, *grid, generator=torch.Generator().manual_seed(1)) > 0.3
    counts, bq, w = halo_windows(grid, blk, hal)
    bias = torch.randn(3, math.prod(counts), bq, w, dtype=F64, requires_grad=True)  # per head and block
    kw = {"key_mask": mask, "bias": bias, "scale": 0.7}
    out = ops.halo_attention(q, k, v, block, halo, backend="blocked", **kw)
    ref = ops.halo_attention(q, k, v, block, halo, backend="reference", **kw)
    n = math.prod(grid)
    full = brute_allowed(grid, blk, hal) & mask.reshape(2, 1, 1, n)
    dense_bias = brute_dense_bias(bias.unsqueeze(0).expand(1, 3, -1, -1, -1), grid, blk, hal)
    want, _, _ = oracle(q.reshape(2, 3, n, -1), k.reshape(2, 3, n, -1), v.reshape(2, 3, n, -1), mask=full, bias=dense_bias, scale=0.7)
    torch.testing.assert_close(out, ref, **tol(F64, "fwd"))
    torch.testing.assert_close(ref.reshape(2, 3, n, -1), want, **tol(F64, "fwd"))
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v, bias), g_out)
    grads_ref = torch.autograd.grad(ref, (q, k, v, bias), g_out)
    for a, b in zip(grads, grads_ref):
        torch.testing.assert_close(a, b, **tol(F64, "bwd"))


@pytest.mark.parametrize("backend", ["blocked", "reference"])
def test_window_covering_the_grid_is_dense(oracle, tol, backend):
    q, k, v = rand_qkv(2, 2, (7, 5))
    mask = torch.rand(2, 1, 7, 5, generator=torch.Generator().manual_seed(3)) > 0.4
    flat = lambda t: t.reshape(2, 2, 35, -1)  # noqa: E731
    want, _, _ = oracle(flat(q), flat(k), flat(v), mask=mask.reshape(2, 1, 1, 35))
    for block, halo in [(3, 7), ((7, 5), 0), (2, (7, 5))]:  # halo or block reaching every key
        out = ops.halo_attention(q, k, v, block, halo, key_mask=mask, backend=backend)
        torch.testing.assert_close(flat(out), want, **tol(F64, "fwd"))


@pytest.mark.parametrize("backend", ["blocked", "reference"])
def test_queries_without_keys_give_zero_and_finite_gradients(backend):
    q, k, v = rand_qkv(2, 2, (6, 6))
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[0] = False  # no key at all in sample 0
    mask[1, :, :4, :4] = False  # block (0, 0) of size 2, halo 1: its window [-1, 3)^2 has no valid key
    out = ops.halo_attention(q, k, v, 2, 1, key_mask=mask, backend=backend)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.equal(out[1, :, :2, :2], torch.zeros_like(out[1, :, :2, :2]))
    assert out[1, :, 4:, 4:].abs().sum() > 0
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_weights_are_dense_rows_summing_to_one():
    q, k, v = rand_qkv(1, 2, (5, 6))
    out, w = ops.halo_attention(q, k, v, 2, 1, return_weights=True)
    assert w.shape == (1, 2, 30, 30)
    torch.testing.assert_close(w.sum(-1), torch.ones(1, 2, 30, dtype=F64))
    allowed = brute_allowed((5, 6), (2, 2), (1, 1))
    assert torch.all(w[..., ~allowed] == 0) and torch.all(w[..., allowed] > 0)
    torch.testing.assert_close(out.reshape(1, 2, 30, -1), w @ v.reshape(1, 2, 30, -1))


def test_half_precision_follows_reference():
    q, k, v = rand_qkv(1, 2, (9, 7), d=16, dv=16, dtype=torch.float32)
    want = ops.halo_attention(q, k, v, 4, 2, backend="reference")
    got = ops.halo_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 4, 2, backend="blocked")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


@st.composite
def halo_cases(draw):
    rank = draw(st.integers(1, 2))
    grid = tuple(draw(st.integers(1, 9)) for _ in range(rank))
    block = tuple(draw(st.integers(1, 5)) for _ in range(rank))
    halo = tuple(draw(st.integers(0, 3)) for _ in range(rank))
    return grid, block, halo, draw(st.floats(0.0, 1.0)), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=25, deadline=None)
@given(case=halo_cases())
def test_halo_fuzz(tol, case):
    grid, block, halo, p_keep, seed = case
    q, k, v = rand_qkv(2, 2, grid, seed=seed)
    mask = torch.rand(2, 1, *grid, generator=torch.Generator().manual_seed(seed)) < p_keep
    out = ops.halo_attention(q, k, v, block, halo, key_mask=mask, backend="blocked")
    ref = ops.halo_attention(q, k, v, block, halo, key_mask=mask, backend="reference")
    torch.testing.assert_close(out, ref, **tol(F64, "fwd"))
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **tol(F64, "bwd"))


def test_bad_arguments():
    q, k, v = rand_qkv(1, 1, (4, 4))
    with pytest.raises(ValueError, match=r"q must be a grid \(B, H, \*grid, D\)"):
        ops.halo_attention(q[0, 0], k[0, 0], v[0, 0], 2, 1)
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        ops.halo_attention(q, k, v, 0, 1)
    with pytest.raises(ValueError, match="halo_size must be >= 0"):
        ops.halo_attention(q, k, v, 2, -1)
    with pytest.raises(ValueError, match="block_size must have one entry per grid axis"):
        ops.halo_attention(q, k, v, (2, 2, 2), 1)
    with pytest.raises(TypeError, match="block_size must be an int"):
        ops.halo_attention(q, k, v, 2.5, 1)
    with pytest.raises(ValueError, match="same grid"):
        ops.halo_attention(q, k[:, :, :3], v[:, :, :3], 2, 1)
    with pytest.raises(TypeError, match=r"key_mask must be a torch\.bool"):
        ops.halo_attention(q, k, v, 2, 1, key_mask=torch.ones(1, 1, 4, 4))
    with pytest.raises(ValueError, match=r"key_mask must be \(B, \*grid"):
        ops.halo_attention(q, k, v, 2, 1, key_mask=torch.ones(1, 1, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"bias must broadcast to \(B, H, NB, Bq, W\)"):
        ops.halo_attention(q, k, v, 2, 1, bias=torch.zeros(4, 17, dtype=F64))
    with pytest.raises(ValueError, match="unknown backend"):
        ops.halo_attention(q, k, v, 2, 1, backend="nope")
    with pytest.raises(ValueError, match="cannot return attention weights"):
        ops.halo_attention(q, k, v, 2, 1, backend="blocked", return_weights=True)


def test_registered_and_used_by_modules():
    spec = ops.get_operator("halo")
    assert spec.layout == "grid" and not spec.cross
    assert spec.options == frozenset({"block_size", "halo_size", "scale", "backend"})
    torch.manual_seed(0)
    attn = Attention(16, 2, op="halo", block_size=3, halo_size=1)
    x = torch.randn(2, 7, 5, 16)
    mask = torch.rand(2, 7, 5) > 0.2
    y, w = attn(x, mask=mask, return_weights=True)
    assert y.shape == x.shape and w.shape == (2, 2, 35, 35)
    ref = Attention(16, 2, op="halo", block_size=3, halo_size=1, backend="reference")
    ref.load_state_dict(attn.state_dict())
    torch.testing.assert_close(y, ref(x, mask=mask), atol=1e-5, rtol=1e-4)
    # over flattened tokens (a 1-D grid) inside early fusion
    fusion = EarlyFusion(["a", "b"], 16, heads=2, depth=1, op=Halo(block_size=4, halo_size=2))
    out = fusion({"a": TokenSet(torch.randn(2, 5, 16)), "b": TokenSet(torch.randn(2, 6, 16))})
    assert out.fused.x.shape == (2, 12, 16)
    out.fused.x.sum().backward()


@pytest.mark.parametrize(("grid", "block", "halo"), [((9,), (4,), (2,)), ((5, 7), (2, 3), (1, 2)), ((4, 3, 5), (2, 2, 3), (1, 0, 1))])
def test_relative_logits_match_the_pairwise_definition(grid, block, halo):
    # bias[b, h, n, i, w] = q_i . sum_a r_a[offset_a(i, w)] for every (query in block, key in window) pair
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, *grid, 4, generator=g, dtype=torch.float64, requires_grad=True)
    tables = [torch.randn(2 * (b + h) - 1, 4, generator=g, dtype=torch.float64, requires_grad=True) for b, h in zip(block, halo)]
    got = halo_relative_logits(q, tables, block, halo)
    counts, bq, w = halo_windows(grid, block, halo)
    assert got.shape == (2, 3, math.prod(counts), bq, w)
    q_blk = halo_query_blocks(q, block)  # (B, H, NB, Bq, D)
    index = halo_relative_index(block, halo)  # (k, Bq, W)
    want = torch.zeros_like(got)
    for i, j in itertools.product(range(bq), range(w)):
        emb = sum(t[index[a, i, j]] for a, t in enumerate(tables))  # (D,)
        want[..., i, j] = q_blk[..., i, :] @ emb
    torch.testing.assert_close(got, want)
    g_got = torch.autograd.grad(got.sum(), [q, *tables])
    g_want = torch.autograd.grad(want.sum(), [q, *tables])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="tables must be one"):
        halo_relative_logits(q, tables[:-1], block, halo)

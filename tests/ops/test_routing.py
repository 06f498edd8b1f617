"""Bi-level routing attention: routing vs a brute-force oracle, gather vs reference, topk = all == dense, errors."""

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
from attnfuse.ops.configs import Routing

F64 = torch.float64


def rand_qkv(b, h, grid, d=6, dv=5, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, h, *grid, c, generator=g, dtype=dtype, requires_grad=True) for c in (d, d, dv))


def region_members(grid, regions):
    """Flat positions of each region (row-major region numbering), by explicit enumeration."""
    size = [math.ceil(g / r) for g, r in zip(grid, regions)]
    coords = list(itertools.product(*(range(g) for g in grid)))
    members = []
    for reg in itertools.product(*(range(r) for r in regions)):
        members.append([i for i, c in enumerate(coords) if all(x // s == rr for x, s, rr in zip(c, size, reg))])
    return members


def brute_routing(q, k, grid, regions, topk, mask=None):
    """Routing by loops: per batch element, mean of valid tokens over all heads, affinity, top-k sets."""
    b, h = q.shape[:2]
    n = math.prod(grid)
    qf, kf = q.detach().reshape(b, h, n, -1), k.detach().reshape(b, h, n, -1)
    valid = torch.ones(b, n, dtype=torch.bool) if mask is None else mask.expand(b, 1, *grid).reshape(b, n)
    members = region_members(grid, regions)
    routes = []
    for bi in range(b):
        qbar, kbar, empty = [], [], []
        for pos in members:
            pos = [p for p in pos if valid[bi, p]]
            empty.append(not pos)
            qbar.append(qf[bi, :, pos].mean(1).flatten() if pos else torch.zeros(qf.shape[1] * qf.shape[3], dtype=q.dtype))
            kbar.append(kf[bi, :, pos].mean(1).flatten() if pos else torch.zeros(kf.shape[1] * kf.shape[3], dtype=q.dtype))
        aff = torch.stack(qbar) @ torch.stack(kbar).T
        aff[:, torch.tensor(empty)] = float("-inf")
        routes.append([sorted(row.topk(topk).indices.tolist()) for row in aff])
    return routes, members


CASES = [((8, 8), 4, 3), ((10, 7), 3, 2), ((9,), 4, 2), ((12,), 3, 3), ((9, 6), (4, 2), 5), ((5, 5), 5, 25)]


@pytest.mark.parametrize("grid,regions,topk", CASES)
def test_routing_matches_brute_force_and_outputs_match_oracle(oracle, tol, grid, regions, topk):
    q, k, v = rand_qkv(2, 3, grid)
    mask = torch.rand(2, 1, *grid, generator=torch.Generator().manual_seed(5)) > 0.25
    regs = (regions,) * len(grid) if isinstance(regions, int) else regions
    out, routing = ops.routing_attention(q, k, v, regions, topk, key_mask=mask, return_routing=True, backend="reference")
    assert routing.shape == (2, math.prod(regs), topk)
    routes, members = brute_routing(q, k, grid, regs, topk, mask)
    assert [[sorted(r) for r in batch] for batch in routing.tolist()] == routes
    n = math.prod(grid)
    allowed = torch.zeros(2, 1, n, n, dtype=torch.bool)
    for bi, qi in itertools.product(range(2), range(len(members))):
        for kr in routes[bi][qi]:
            rows, cols = torch.tensor(members[qi], dtype=torch.long), torch.tensor(members[kr], dtype=torch.long)
            allowed[bi, 0, rows.view(-1, 1), cols.view(1, -1)] = True
    allowed = allowed & mask.reshape(2, 1, 1, n)
    want, _, _ = oracle(q.reshape(2, 3, n, -1), k.reshape(2, 3, n, -1), v.reshape(2, 3, n, -1), mask=allowed)
    torch.testing.assert_close(out.reshape(2, 3, n, -1), want, **tol(F64, "fwd"))


@pytest.mark.parametrize("grid,regions,topk", CASES)
def test_gather_matches_reference(tol, grid, regions, topk):
    q, k, v = rand_qkv(2, 3, grid, seed=1)
    mask = torch.rand(2, 3, *grid, generator=torch.Generator().manual_seed(2)) > 0.25  # per-head mask
    out = ops.routing_attention(q, k, v, regions, topk, key_mask=mask, scale=0.8, backend="gather")
    ref = ops.routing_attention(q, k, v, regions, topk, key_mask=mask, scale=0.8, backend="reference")
    torch.testing.assert_close(out, ref, **tol(F64, "fwd"))
    g_out = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g_out), torch.autograd.grad(ref, (q, k, v), g_out)):
        torch.testing.assert_close(a, b, **tol(F64, "bwd"))


@pytest.mark.parametrize("backend", ["gather", "reference"])
@pytest.mark.parametrize("grid,regions", [((8, 8), 4), ((7, 9), (3, 2)), ((10,), 3)])
def test_topk_all_regions_is_dense(oracle, tol, backend, grid, regions):
    q, k, v = rand_qkv(2, 2, grid, seed=3)
    mask = torch.rand(2, 1, *grid, generator=torch.Generator().manual_seed(4)) > 0.3
    n_regions = math.prod((regions,) * len(grid) if isinstance(regions, int) else regions)
    out = ops.routing_attention(q, k, v, regions, n_regions, key_mask=mask, backend=backend)
    n = math.prod(grid)
    want, _, _ = oracle(q.reshape(2, 2, n, -1), k.reshape(2, 2, n, -1), v.reshape(2, 2, n, -1), mask=mask.reshape(2, 1, 1, n))
    torch.testing.assert_close(out.reshape(2, 2, n, -1), want, **tol(F64, "fwd"))


def test_routing_is_shared_by_heads_and_carries_no_gradient():
    q, k, v = rand_qkv(2, 4, (8, 8), seed=6)
    out, routing = ops.routing_attention(q, k, v, 4, 2, return_routing=True)
    assert routing.shape == (2, 16, 2) and routing.dtype == torch.long and not routing.requires_grad
    # with the routing frozen, the gradient is that of dense attention under the routed mask (reference)
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ops.routing_attention(q, k, v, 4, 2, backend="reference").sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)


def test_empty_regions_are_never_routed_and_empty_samples_are_zero():
    q, k, v = rand_qkv(2, 2, (8, 8), seed=7)
    mask = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    mask[0, :, :4, :4] = False  # 2 x 2 regions of 4 x 4: region 0 has no valid key
    mask[1] = False
    for backend in ("gather", "reference"):
        out, routing = ops.routing_attention(q, k, v, 2, 3, key_mask=mask, return_routing=True, backend=backend)
        assert not (routing[0] == 0).any()
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        grads = torch.autograd.grad(out.sum(), (q, k, v))
        assert all(torch.isfinite(g).all() for g in grads)


def test_non_divisible_grid_pads_without_attending_padding():
    # 9 positions, 4 regions of ceil(9/4) = 3: the 4th region lies entirely in the padding
    q, k, v = rand_qkv(1, 2, (9,), seed=8)
    out, routing = ops.routing_attention(q, k, v, 4, 3, return_routing=True, backend="gather")
    assert not (routing == 3).any()
    ref = ops.routing_attention(q, k, v, 4, 3, backend="reference")
    torch.testing.assert_close(out, ref)


def test_bfloat16_follows_float32_reference():
    q, k, v = rand_qkv(1, 2, (12, 10), d=16, dv=16, seed=9, dtype=torch.float32)
    want = ops.routing_attention(q, k, v, 3, 3, backend="reference")
    got = ops.routing_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), 3, 3, backend="gather")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


@st.composite
def routing_cases(draw):
    rank = draw(st.integers(1, 2))
    grid = tuple(draw(st.integers(1, 9)) for _ in range(rank))
    regions = tuple(draw(st.integers(1, g)) for g in grid)
    topk = draw(st.integers(1, math.prod(regions)))
    return grid, regions, topk, draw(st.floats(0.0, 1.0)), draw(st.integers(0, 2**31 - 1))


@settings(max_examples=25, deadline=None)
@given(case=routing_cases())
def test_routing_fuzz(tol, case):
    grid, regions, topk, p_keep, seed = case
    q, k, v = rand_qkv(2, 2, grid, seed=seed)
    mask = torch.rand(2, 1, *grid, generator=torch.Generator().manual_seed(seed)) < p_keep
    out = ops.routing_attention(q, k, v, regions, topk, key_mask=mask, backend="gather")
    ref = ops.routing_attention(q, k, v, regions, topk, key_mask=mask, backend="reference")
    torch.testing.assert_close(out, ref, **tol(F64, "fwd"))
    g = torch.autograd.grad(out.sum(), (q, k, v))
    g_ref = torch.autograd.grad(ref.sum(), (q, k, v))
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b, **tol(F64, "bwd"))


def test_bad_arguments():
    q, k, v = rand_qkv(1, 1, (4, 4))
    with pytest.raises(ValueError, match=r"topk must be in \[1, number of regions = 4\], got topk=5"):
        ops.routing_attention(q, k, v, 2, 5)
    with pytest.raises(ValueError, match="topk must be in"):
        ops.routing_attention(q, k, v, 2, 0)
    with pytest.raises(TypeError, match="topk must be an int"):
        ops.routing_attention(q, k, v, 2, True)
    with pytest.raises(ValueError, match="regions must be at most the grid extent"):
        ops.routing_attention(q, k, v, 5, 1)
    with pytest.raises(ValueError, match="regions must be >= 1"):
        ops.routing_attention(q, k, v, 0, 1)
    with pytest.raises(ValueError, match="regions must have one entry per grid axis"):
        ops.routing_attention(q, k, v, (2, 2, 2), 1)
    with pytest.raises(ValueError, match="q must be a grid"):
        ops.routing_attention(q[0, 0], k[0, 0], v[0, 0], 2, 1)
    with pytest.raises(ValueError, match=r"key_mask must be \(B, \*grid"):
        ops.routing_attention(q, k, v, 2, 1, key_mask=torch.ones(1, 1, 16, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="cannot return attention weights"):
        ops.routing_attention(q, k, v, 2, 1, return_weights=True, backend="gather")


def test_registered_and_used_by_modules():
    spec = ops.get_operator("routing")
    assert spec.layout == "grid" and not spec.cross
    assert spec.options == frozenset({"regions", "topk", "scale", "backend"})
    torch.manual_seed(0)
    attn = Attention(16, 2, op="routing", regions=3, topk=2)
    x, mask = torch.randn(2, 9, 7, 16), torch.rand(2, 9, 7) > 0.2
    y, w = attn(x, mask=mask, return_weights=True)
    assert y.shape == x.shape and w.shape == (2, 2, 63, 63)
    ref = Attention(16, 2, op="routing", regions=3, topk=2, backend="reference")
    ref.load_state_dict(attn.state_dict())
    torch.testing.assert_close(y, ref(x, mask=mask), atol=1e-5, rtol=1e-4)
    fusion = EarlyFusion(["a", "b"], 16, heads=2, depth=1, op=Routing(regions=3, topk=2))
    out = fusion({"a": TokenSet(torch.randn(2, 5, 16)), "b": TokenSet(torch.randn(2, 6, 16))})
    assert out.fused.x.shape == (2, 12, 16)
    out.fused.x.sum().backward()

"""neighborhood_attention: NATTEN window rule from a brute-force definition, backends vs reference and the oracle."""

from __future__ import annotations

import importlib.util
import itertools
import math

import pytest
import torch

from attnfuse import ops
from attnfuse.nn import Attention, NeighborhoodAttention
from attnfuse.ops.backends import BACKENDS
from attnfuse.ops.neighborhood import make_geometry, window_indices
from attnfuse.ops.neighborhood.tiled import tiled_neighborhood

F64 = torch.float64
NA = ops.neighborhood_attention


# ----------------------------------------------------------------------------------------------
# The window rule written from its definition, one query at a time (independent of _windows.py)
# ----------------------------------------------------------------------------------------------
def brute_windows(grid, kernel, dilation, causal):
    """For every query (row-major), the list of (key coordinate tuple, relative offsets) it sees."""
    per_axis = []
    for n, k, d, c in zip(grid, kernel, dilation, causal):
        rows = []
        for i in range(n):
            group = [j for j in range(n) if j % d == i % d]  # the dilation group of i, in order
            p = group.index(i)
            if c:
                chosen = list(range(max(0, p - k + 1), p + 1))
            else:
                start = p - k // 2
                start = max(0, min(start, len(group) - k))  # shift inside the group, never pad
                chosen = list(range(start, start + k))
            rows.append([(group[j], j - p) for j in chosen])
        per_axis.append(rows)
    out = []
    for idx in itertools.product(*[range(n) for n in grid]):
        keys = itertools.product(*[per_axis[a][i] for a, i in enumerate(idx)])
        out.append([(tuple(kc for kc, _ in key), tuple(off for _, off in key)) for key in keys])
    return out


def dense_terms(grid, kernel, dilation, causal, rpb=None):
    """Dense ``(N, N)`` allowed matrix and, with ``rpb (H, 2k-1, ...)``, the dense ``(H, N, N)`` bias."""
    n = math.prod(grid)
    strides = [math.prod(grid[a + 1 :]) for a in range(len(grid))]
    allowed = torch.zeros(n, n, dtype=torch.bool)
    bias = None if rpb is None else torch.zeros(rpb.shape[0], n, n, dtype=rpb.dtype)
    for qi, window in enumerate(brute_windows(grid, kernel, dilation, causal)):
        for key, offsets in window:
            kj = sum(c * s for c, s in zip(key, strides))
            allowed[qi, kj] = True
            if bias is not None:
                bias[:, qi, kj] = rpb[(slice(None), *(o + k - 1 for o, k in zip(offsets, kernel)))]
    return allowed, bias


def make_qkv(b, h, grid, d=4, dv=None, dtype=F64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, *grid, d), (b, h, *grid, d), (b, h, *grid, dv or d)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_(grad) for s in shapes]


def grads(out, inputs, seed=7):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(out.dtype)
    gs = torch.autograd.grad((out * w).sum(), inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


def assert_same(got, want, inputs, tol, dtype=F64):
    torch.testing.assert_close(got, want, **tol(dtype, "fwd"))
    for i, (a, b) in enumerate(zip(grads(got, inputs), grads(want, inputs))):
        torch.testing.assert_close(a, b, **tol(dtype, "bwd"), msg=lambda m, i=i: f"grad of input {i}: {m}")


# (grid, kernel, dilation, causal): ranks 1-3, odd and even extents, borders, dilation groups of
# unequal size, causal per axis, kernel = extent.
CONFIGS = [
    ((9,), 3, 1, False),
    ((10,), 5, 2, False),
    ((13,), 3, 4, True),
    ((7,), 7, 1, False),
    ((7, 9), (3, 5), (2, 1), (False, True)),
    ((6, 5), 3, 1, False),
    ((10, 7), (3, 3), (3, 2), False),
    ((5, 6, 7), 3, (1, 2, 1), (True, False, False)),
    ((4, 5, 3), (3, 5, 3), 1, False),
]
BACKENDS_FAST = ["tiled", "reference"]


@pytest.mark.parametrize("grid,kernel,dilation,causal", CONFIGS)
def test_window_indices_match_brute_force(grid, kernel, dilation, causal):
    geom = make_geometry(grid, kernel, dilation, causal)
    keys, valid, _ = window_indices(geom)
    allowed, _ = dense_terms(grid, geom.kernel, geom.dilation, geom.causal)
    for qi in range(geom.num_tokens):
        got = sorted(keys[qi][valid[qi]].tolist())
        assert got == sorted(allowed[qi].nonzero().flatten().tolist()), f"query {qi}"
        assert len(got) == len(set(got)), "a key appears twice in a window"
    if not any(geom.causal):
        assert bool(valid.all()), "non-causal windows always hold exactly prod(kernel) keys"


def test_window_rule_small_example():
    # 1-D, n=7, k=3: the windows of the module docstring (border queries shifted, not cut)
    geom = make_geometry((7,), 3)
    keys, _, _ = window_indices(geom)
    assert keys.tolist() == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [4, 5, 6]]
    keys, _, _ = window_indices(make_geometry((7,), 3, dilation=2))
    assert keys.tolist() == [[0, 2, 4], [1, 3, 5], [0, 2, 4], [1, 3, 5], [2, 4, 6], [1, 3, 5], [2, 4, 6]]


@pytest.mark.parametrize("backend", BACKENDS_FAST)
@pytest.mark.parametrize("grid,kernel,dilation,causal", CONFIGS)
def test_matches_dense_restricted_to_brute_force_windows(oracle, tol, backend, grid, kernel, dilation, causal):
    geom = make_geometry(grid, kernel, dilation, causal)
    q, k, v = make_qkv(2, 3, grid, d=4, dv=3)
    rpb = None
    if not any(geom.causal):
        rpb = torch.randn(3, *geom.rpb_shape, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    out = NA(q, k, v, kernel, dilation=dilation, is_causal=causal, rpb=rpb, backend=backend)
    allowed, bias = dense_terms(grid, geom.kernel, geom.dilation, geom.causal, rpb)
    n = geom.num_tokens
    want, _, _ = oracle(q.reshape(2, 3, n, 4), k.reshape(2, 3, n, 4), v.reshape(2, 3, n, 3), mask=allowed, bias=bias)
    inputs = [q, k, v] + ([rpb] if rpb is not None else [])
    assert_same(out, want.reshape(out.shape), inputs, tol)


@pytest.mark.parametrize("grid,kernel,dilation,causal", CONFIGS)
@pytest.mark.parametrize("with_mask", [False, True])
def test_tiled_matches_reference_with_mask_bias_rpb(tol, grid, kernel, dilation, causal, with_mask):
    geom = make_geometry(grid, kernel, dilation, causal)
    q, k, v = make_qkv(2, 2, grid, d=3, dv=5, seed=1)
    g = torch.Generator().manual_seed(4)
    mask = (torch.rand(2, 1, *grid, generator=g) > 0.3) if with_mask else None
    bias = torch.randn(1, 2, *grid, geom.window_size, generator=g, dtype=F64).requires_grad_()
    rpb = None if any(geom.causal) else torch.randn(2, *geom.rpb_shape, generator=g, dtype=F64).requires_grad_()
    kw = {"dilation": dilation, "is_causal": causal, "key_mask": mask, "bias": bias, "rpb": rpb}
    ref, lse_ref = NA(q, k, v, kernel, **kw, backend="reference", return_lse=True)
    got, lse = NA(q, k, v, kernel, **kw, backend="tiled", return_lse=True)
    torch.testing.assert_close(lse, lse_ref, **tol(F64, "fwd"))
    inputs = [q, k, v, bias] + ([rpb] if rpb is not None else [])
    assert_same(got, ref, inputs, tol)
    assert_same(NA(q, k, v, kernel, **kw, backend="tiled"), ref, inputs, tol)  # the SDPA core (no lse)


@pytest.mark.parametrize("tile", [(1,), (2,), (5,), (64,)])
def test_tiled_any_tile_size_1d(tol, tile):
    q, k, v = make_qkv(1, 2, (23,), seed=2)
    geom = make_geometry((23,), 5, 2, False)
    out, _ = tiled_neighborhood(q, k, v, geom, scale=0.5, tile=tile)
    assert_same(out, NA(q, k, v, 5, dilation=2, scale=0.5, backend="reference"), [q, k, v], tol)


@pytest.mark.parametrize("tile", [(1, 3), (3, 2), (4, 4), (16, 16)])
def test_tiled_any_tile_size_2d(tol, tile):
    q, k, v = make_qkv(1, 1, (9, 11), seed=5)
    geom = make_geometry((9, 11), (3, 5), (2, 1), (False, True))
    out, _ = tiled_neighborhood(q, k, v, geom, scale=0.5, tile=tile)
    want = NA(q, k, v, (3, 5), dilation=(2, 1), is_causal=(False, True), scale=0.5, backend="reference")
    assert_same(out, want, [q, k, v], tol)


@pytest.mark.parametrize("backend", BACKENDS_FAST)
@pytest.mark.parametrize("grid", [(9,), (5, 7), (3, 5, 3)])
def test_full_kernel_is_dense_attention(tol, backend, grid):
    q, k, v = make_qkv(2, 2, grid, seed=3)
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(2, *grid, generator=g) > 0.4
    out = NA(q, k, v, grid, key_mask=mask, backend=backend)
    n = math.prod(grid)
    flat = [t.reshape(2, 2, n, -1) for t in (q, k, v)]
    want = ops.dense_attention(*flat, mask=mask.reshape(2, 1, 1, n), backend="reference")
    assert_same(out, want.reshape(out.shape), [q, k, v], tol)


@pytest.mark.parametrize("backend", BACKENDS_FAST)
def test_full_causal_kernel_is_causal_dense_attention(tol, backend):
    q, k, v = make_qkv(1, 2, (11,), seed=4)
    out = NA(q, k, v, 11, is_causal=True, backend=backend)
    assert_same(out, ops.dense_attention(q, k, v, is_causal=True, backend="reference"), [q, k, v], tol)


@pytest.mark.parametrize("backend", BACKENDS_FAST)
def test_query_with_every_window_key_masked_is_zero(backend):
    q, k, v = make_qkv(1, 2, (8, 9), seed=6)
    mask = torch.ones(1, 8, 9, dtype=torch.bool)
    mask[:, :4, :4] = False  # the window (3x3) of query (0, 0) is rows 0-2, cols 0-2: all masked
    out, lse = NA(q, k, v, 3, key_mask=mask, backend=backend, return_lse=True)
    assert torch.equal(out[:, :, 0, 0], torch.zeros_like(out[:, :, 0, 0]))
    assert torch.isneginf(lse[:, :, 0, 0]).all()
    assert not torch.equal(out[:, :, 7, 8], torch.zeros_like(out[:, :, 7, 8]))
    gq, gk, gv = torch.autograd.grad(out.sum(), (q, k, v))
    assert all(torch.isfinite(g).all() for g in (gq, gk, gv))
    assert torch.equal(gq[:, :, 0, 0], torch.zeros_like(gq[:, :, 0, 0]))


@pytest.mark.parametrize("backend", BACKENDS_FAST)
@pytest.mark.parametrize("grid,kernel,dilation,causal", [((11,), 3, 2, False), ((6, 7), 3, 1, (True, False)), ((3, 4, 5), 3, 1, False)])
def test_extra_keys_equal_dense_over_window_and_extras(oracle, tol, backend, grid, kernel, dilation, causal):
    geom = make_geometry(grid, kernel, dilation, causal)
    q, k, v = make_qkv(2, 2, grid, d=4, dv=3, seed=8)
    g = torch.Generator().manual_seed(9)
    ek = torch.randn(2, 2, 3, 4, generator=g, dtype=F64).requires_grad_()
    ev = torch.randn(2, 2, 3, 3, generator=g, dtype=F64).requires_grad_()
    mask = torch.rand(2, *grid, generator=g) > 0.5
    out, lse = NA(q, k, v, kernel, dilation=dilation, is_causal=causal, key_mask=mask, extra_k=ek, extra_v=ev, backend=backend,
                  return_lse=True)
    n = geom.num_tokens
    allowed, _ = dense_terms(grid, geom.kernel, geom.dilation, geom.causal)
    allowed = allowed & mask.reshape(2, 1, 1, n)  # (B, 1, N, N)
    full = torch.cat([allowed, torch.ones(2, 1, n, 3, dtype=torch.bool)], dim=-1)
    keys = torch.cat([k.reshape(2, 2, n, 4), ek], dim=2)
    values = torch.cat([v.reshape(2, 2, n, 3), ev], dim=2)
    want, _, want_lse = oracle(q.reshape(2, 2, n, 4), keys, values, mask=full)
    torch.testing.assert_close(lse, want_lse.reshape(lse.shape), **tol(F64, "fwd"))
    assert_same(out, want.reshape(out.shape), [q, k, v, ek, ev], tol)


def test_reference_weights_are_dense_weights_at_window_slots(oracle):
    grid, kernel, dilation, causal = (5, 6), (3, 3), (1, 2), (True, False)
    geom = make_geometry(grid, kernel, dilation, causal)
    q, k, v = make_qkv(1, 2, grid, grad=False, seed=10)
    _, w = NA(q, k, v, kernel, dilation=dilation, is_causal=causal, return_weights=True)
    assert w.shape == (1, 2, *grid, geom.window_size)
    keys, valid, _ = window_indices(geom)
    dense = torch.zeros(1, 2, geom.num_tokens, geom.num_tokens, dtype=F64)
    dense.scatter_add_(-1, keys.expand(1, 2, -1, -1), w.reshape(1, 2, geom.num_tokens, -1) * valid)
    allowed, _ = dense_terms(grid, kernel, dilation, causal)
    _, want, _ = oracle(*(t.reshape(1, 2, geom.num_tokens, -1) for t in (q, k, v)), mask=allowed)
    torch.testing.assert_close(dense, want)
    assert torch.all(w.reshape(1, 2, geom.num_tokens, -1)[..., ~valid] == 0), "empty causal slots have weight 0"


@pytest.mark.parametrize("grid,kernel,dilation,causal", [CONFIGS[1], CONFIGS[4], CONFIGS[7]])
def test_fp32_tiled_matches_fp32_reference(tol, grid, kernel, dilation, causal):
    geom = make_geometry(grid, kernel, dilation, causal)
    q, k, v = make_qkv(2, 2, grid, d=16, dtype=torch.float32, seed=14)
    g = torch.Generator().manual_seed(15)
    mask = torch.rand(2, *grid, generator=g) > 0.2
    rpb = None if any(geom.causal) else torch.randn(2, *geom.rpb_shape, generator=g).requires_grad_()
    kw = {"dilation": dilation, "is_causal": causal, "key_mask": mask, "rpb": rpb}
    want = NA(q, k, v, kernel, **kw, backend="reference")
    got = NA(q, k, v, kernel, **kw, backend="tiled")
    inputs = [q, k, v] + ([rpb] if rpb is not None else [])
    assert_same(got, want, inputs, tol, dtype=torch.float32)


@pytest.mark.parametrize("kernel", [3, 5])
def test_bf16_tiled_close_to_float64_reference(kernel):
    q, k, v = make_qkv(1, 2, (12, 10), d=8, seed=11)
    rpb = torch.randn(2, 2 * kernel - 1, 2 * kernel - 1, dtype=F64).requires_grad_()
    want = NA(q, k, v, kernel, rpb=rpb, backend="reference")
    lo = [t.detach().bfloat16().requires_grad_() for t in (q, k, v, rpb)]
    got = NA(*lo[:3], kernel, rpb=lo[3], backend="tiled")
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, atol=3e-2, rtol=3e-2)
    for a, b in zip(grads(got, lo), grads(want, [q, k, v, rpb])):
        torch.testing.assert_close(a.double(), b, atol=1e-1, rtol=1e-1)


# ----------------------------------------------------------------------------------------------
# errors, dispatch, modules
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shape,kwargs,match",
    [
        ((1, 1, 9, 4), {"kernel_size": 0}, "kernel_size must be >= 1"),
        ((1, 1, 9, 4), {"kernel_size": 4, "stride": 5}, "stride must be in"),
        ((1, 1, 9, 4), {"kernel_size": 4, "stride": 0}, "stride must be in"),
        ((1, 1, 9, 4), {"kernel_size": 4, "border": "pad"}, "border must be one of"),
        ((1, 1, 9, 4), {"kernel_size": 11}, "larger than the grid"),
        ((1, 1, 9, 4), {"kernel_size": 5, "dilation": 2}, "exceeds the grid"),
        ((1, 1, 9, 4), {"kernel_size": 3, "dilation": 0}, "dilation"),
        ((1, 9, 4), {"kernel_size": 3}, "rank|B, H, L, D"),
        ((1, 1, 2, 2, 2, 2, 4), {"kernel_size": 1}, "B, H, L, D"),
        ((1, 1, 9, 9, 4), {"kernel_size": (3, 3, 3)}, "tuple of 2"),
        ((1, 2, 9, 4), {"kernel_size": 3, "is_causal": True, "rpb": torch.zeros(2, 5)}, "causal"),
        ((1, 2, 9, 4), {"kernel_size": 3, "rpb": torch.zeros(2, 3)}, "rpb must have shape"),
        ((1, 2, 9, 4), {"kernel_size": 3, "key_mask": torch.ones(1, 8, dtype=torch.bool)}, "key_mask must be"),
        ((1, 2, 9, 4), {"kernel_size": 3, "bias": torch.zeros(9, 4)}, "bias must broadcast"),
        ((1, 2, 9, 4), {"kernel_size": 3, "extra_k": torch.zeros(1, 2, 3, 4)}, "together"),
        ((1, 2, 9, 4), {"kernel_size": 3, "backend": "nope"}, "unknown backend"),
    ],
)
def test_bad_arguments_raise_value_errors(shape, kwargs, match):
    q = torch.zeros(shape)
    with pytest.raises(ValueError, match=match):
        NA(q, q, q, **kwargs)


def test_bad_types_raise_type_errors():
    q = torch.zeros(1, 1, 9, 4)
    with pytest.raises(TypeError, match="mask"):
        NA(q, q, q, 3, key_mask=torch.ones(1, 9))
    with pytest.raises(TypeError, match="kernel_size"):
        NA(q, q, q, 3.0)


def test_keys_on_another_grid_raise():
    q = torch.zeros(1, 1, 9, 4)
    with pytest.raises(ValueError, match="query grid"):
        NA(q, torch.zeros(1, 1, 7, 4), torch.zeros(1, 1, 7, 4), 3)


def test_auto_dispatch_on_cpu(monkeypatch, backend_spy):
    spy = backend_spy("neighborhood")
    q = torch.randn(1, 2, 9, 4, requires_grad=True)
    NA(q, q, q, 3)
    with torch.no_grad():
        NA(q, q, q, 3)
    NA(q, q, q, 3, return_weights=True)
    assert spy.used == ["tiled", "tiled", "reference"]


def test_backend_capabilities_are_declared():
    names = [b.name for b in BACKENDS["neighborhood"]]
    assert names == ["natten", "flex", "tiled", "reference"]
    q = torch.randn(1, 2, 9, 4, requires_grad=True)
    with pytest.raises(ValueError, match="no backward on 'cpu'"):
        NA(q, q, q, 3, backend="flex")
    with pytest.raises(ValueError, match="cannot return attention weights"):
        NA(q, q, q, 3, backend="tiled", return_weights=True)
    if importlib.util.find_spec("natten") is None:
        with pytest.raises(ValueError, match="natten not installed"):
            NA(q, q, q, 3, backend="natten")


def test_attention_module_with_neighborhood_op_on_a_grid(tol):
    torch.manual_seed(0)
    attn = Attention(12, 3, op="neighborhood", kernel_size=(3, 5), dilation=(1, 2)).double()
    x = torch.randn(2, 7, 10, 12, dtype=F64, requires_grad=True)
    mask = torch.rand(2, 7, 10) > 0.2
    out = attn(x, mask=mask)
    assert out.shape == x.shape
    ref_attn = Attention(12, 3, op="neighborhood", kernel_size=(3, 5), dilation=(1, 2), backend="reference").double()
    ref_attn.load_state_dict(attn.state_dict())
    assert_same(out, ref_attn(x, mask=mask), [x], tol)
    # a query only depends on its window: perturb a token outside the window of query (0, 0)
    x2 = x.detach().clone()
    x2[:, 6, 9] += 1.0
    torch.testing.assert_close(attn(x2, mask=mask)[:, 0, 0], out[:, 0, 0])
    assert not torch.allclose(attn(x2, mask=mask)[:, 6, 9], out[:, 6, 9])


def test_neighborhood_module_rpb_context_and_errors():
    torch.manual_seed(0)
    m = NeighborhoodAttention(16, 2, kernel_size=3, rank=1)
    x = torch.randn(2, 11, 16)
    ctx = torch.randn(2, 4, 16)
    out, w = m(x, context=ctx, return_weights=True, mask=torch.rand(2, 11) > 0.3)
    assert out.shape == x.shape and w.shape == (2, 2, 11, 3 + 4)
    out.sum().backward()
    assert m.rpb.grad is not None and torch.isfinite(m.rpb.grad).all() and m.rpb.grad.abs().sum() > 0
    m2 = NeighborhoodAttention(16, 2, kernel_size=(3, 3), is_causal=(True, False), rel_pos_bias=False)
    assert m2(torch.randn(1, 5, 6, 16)).shape == (1, 5, 6, 16)
    with pytest.raises(ValueError, match="rel_pos_bias"):
        NeighborhoodAttention(16, 2, kernel_size=3, is_causal=True)
    with pytest.raises(ValueError, match="2-D grid"):
        NeighborhoodAttention(16, 2, kernel_size=3)(torch.randn(1, 5, 16))


@pytest.mark.skipif(importlib.util.find_spec("natten") is None, reason="natten not installed")
@pytest.mark.parametrize("grid,kernel,dilation,causal", CONFIGS[:6])
def test_natten_backend_matches_reference(grid, kernel, dilation, causal):
    q, k, v = make_qkv(1, 2, grid, d=8, dtype=torch.float32, grad=False)
    ref = NA(q, k, v, kernel, dilation=dilation, is_causal=causal, backend="reference")
    got = NA(q, k, v, kernel, dilation=dilation, is_causal=causal, backend="natten")
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(
    "grid,kernel,dilation,causal,extra,with_mask,with_rpb",
    [
        ((40,), 5, 2, False, 3, False, False),
        ((10, 12), (3, 5), (2, 1), False, 0, True, True),
        ((5, 6, 7), 3, (1, 2, 1), (True, False, False), 0, True, False),
    ],
)
def test_flex_matches_reference_cpu_inference(grid, kernel, dilation, causal, extra, with_mask, with_rpb):
    geom = make_geometry(grid, kernel, dilation, causal)
    q, k, v = make_qkv(2, 2, grid, d=16, dtype=torch.float32, grad=False, seed=12)
    g = torch.Generator().manual_seed(13)
    ek, ev = (torch.randn(2, 2, extra, 16, generator=g) for _ in range(2)) if extra else (None, None)
    mask = torch.rand(2, *grid, generator=g) > 0.3 if with_mask else None
    rpb = torch.randn(2, *geom.rpb_shape, generator=g) if with_rpb else None
    kw = {"dilation": dilation, "is_causal": causal, "key_mask": mask, "rpb": rpb, "extra_k": ek, "extra_v": ev}
    want = NA(q, k, v, kernel, **kw, backend="reference")
    got = NA(q, k, v, kernel, **kw, backend="flex")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)

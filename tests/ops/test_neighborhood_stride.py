"""neighborhood_attention with even kernels, stride and both borders (NATTEN 0.21 / GNA rule).

The window rule is written below from its definition, one query at a time ("for each query, the
set of keys"), independently of ``_windows.py``; every backend is checked against dense attention
restricted to those sets, and against NATTEN itself when it is importable.
"""

from __future__ import annotations

import importlib.util
import itertools
import math

import pytest
import torch

from attnfuse import ops
from attnfuse.nn import NeighborhoodAttention
from attnfuse.ops.backends import BACKENDS, Call
from attnfuse.ops.neighborhood import make_geometry, window_indices
from attnfuse.ops.neighborhood._backend import NACall
from attnfuse.ops.neighborhood.tiled import tiled_neighborhood

F64 = torch.float64
NA = ops.neighborhood_attention


def axis_sets(n, k, d, causal, s, border):
    """Per query position of one axis: the list of (key position, offset in group coordinates)."""
    rows = []
    for i in range(n):
        group = [j for j in range(n) if j % d == i % d]
        ng, p = len(group), group.index(i)
        if causal:
            leader = min((p // s) * s + s - 1, ng - 1)  # the last query of the stride group
            chosen = [j for j in range(ng) if leader - k < j <= p]
        else:
            leader = (p // s) * s + s // 2  # the centre query (right-hand centre for even s)
            left, right = k // 2, k - 1 - k // 2  # even k = 2r: r keys left, r - 1 right
            if border == "shift":
                centre = min(max(min(leader, ng - 1), left), ng - 1 - right)
                chosen = list(range(centre - left, centre + right + 1))
            else:  # clip: the padded window, positions outside the group dropped
                chosen = [j for j in range(leader - left, leader + right + 1) if 0 <= j < ng]
        rows.append([(group[j], j - p) for j in chosen])
    return rows


def brute_sets(grid, kernel, dilation, causal, stride, border):
    """For every query (row-major): the set of flat key indices it sees, and their offsets."""
    per_axis = [axis_sets(*args, border) for args in zip(grid, kernel, dilation, causal, stride)]
    strides = [math.prod(grid[a + 1 :]) for a in range(len(grid))]
    out = []
    for idx in itertools.product(*[range(n) for n in grid]):
        keys = {}
        for combo in itertools.product(*[per_axis[a][i] for a, i in enumerate(idx)]):
            keys[sum(c * st for (c, _), st in zip(combo, strides))] = tuple(o for _, o in combo)
        out.append(keys)
    return out


def dense_terms(geom, rpb=None):
    """Dense ``(N, N)`` allowed matrix and, with ``rpb (H, 2k-1, ...)``, the dense ``(H, N, N)`` bias."""
    n = geom.num_tokens
    allowed = torch.zeros(n, n, dtype=torch.bool)
    rel = torch.zeros(n, n, dtype=torch.long)
    sets = brute_sets(geom.grid, geom.kernel, geom.dilation, geom.causal, geom.stride, geom.border)
    for qi, keys in enumerate(sets):
        for kj, offsets in keys.items():
            allowed[qi, kj] = True
            flat = 0
            for o, k in zip(offsets, geom.kernel):
                flat = flat * (2 * k - 1) + o + k - 1
            rel[qi, kj] = flat
    bias = None if rpb is None else rpb.reshape(rpb.shape[0], -1)[:, rel] * allowed  # (H, N, N)
    return allowed, bias


def make_qkv(b, h, grid, d=4, dv=None, dtype=F64, seed=0, grad=True):
    g = torch.Generator().manual_seed(seed)
    shapes = [(b, h, *grid, d), (b, h, *grid, d), (b, h, *grid, dv or d)]
    return [torch.randn(sh, generator=g, dtype=dtype).requires_grad_(grad) for sh in shapes]


def grads(out, inputs, seed=7):
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=F64).to(out.dtype)
    gs = torch.autograd.grad((out * w).sum(), inputs, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, gs)]


def kwargs(geom):
    return {"dilation": geom.dilation, "is_causal": geom.causal, "stride": geom.stride, "border": geom.border}


# (grid, kernel, dilation, causal, stride, border): 1/2/3-D x even/odd x dilation x causal x stride x border
CONFIGS = [
    ((9,), 4, 1, False, 1, "shift"),
    ((11,), 4, 1, False, 2, "shift"),
    ((13,), 6, 2, False, 3, "shift"),
    ((10,), 5, 1, False, 5, "shift"),  # blocked (stride = kernel)
    ((12,), 4, 1, True, 2, "shift"),
    ((11,), 3, 3, True, 3, "shift"),
    ((14,), 6, 1, False, 2, "clip"),  # halo b=2, h=2
    ((13,), 5, 2, False, 3, "clip"),
    ((7, 9), (4, 3), (1, 2), (False, True), (2, 3), "shift"),
    ((8, 7), (2, 5), 1, False, (2, 1), "shift"),
    ((9, 8), (5, 4), (1, 2), False, (3, 2), "clip"),
    ((6, 7, 5), (4, 3, 2), (1, 2, 1), (False, False, True), (2, 3, 1), "shift"),
    ((5, 4, 7), (4, 3, 6), 1, False, (2, 3, 4), "clip"),
]
IDS = [f"{len(c[0])}d-k{c[1]}-s{c[4]}-{c[5]}" + ("-causal" if any(c[3] if isinstance(c[3], tuple) else (c[3],)) else "") for c in CONFIGS]


def test_docstring_examples_even_kernel_and_stride():
    keys, _, _ = window_indices(make_geometry((7,), 4))
    assert [sorted(r) for r in keys.tolist()] == [[0, 1, 2, 3]] * 3 + [[1, 2, 3, 4], [2, 3, 4, 5]] + [[3, 4, 5, 6]] * 2
    keys, _, _ = window_indices(make_geometry((7,), 4, stride=2))
    assert [sorted(r) for r in keys.tolist()] == [[0, 1, 2, 3]] * 2 + [[1, 2, 3, 4]] * 2 + [[3, 4, 5, 6]] * 3
    # clip: the halo window [2n - 1, 2n + 3) cut at the grid
    keys, valid, _ = window_indices(make_geometry((7,), 4, stride=2, border="clip"))
    sets = [sorted(set(r[v].tolist())) for r, v in zip(keys, valid)]
    assert sets == [[0, 1, 2]] * 2 + [[1, 2, 3, 4]] * 2 + [[3, 4, 5, 6]] * 2 + [[5, 6]]


@pytest.mark.parametrize("grid,kernel,dilation,causal,stride,border", CONFIGS, ids=IDS)
def test_window_sets_match_brute_force(grid, kernel, dilation, causal, stride, border):
    geom = make_geometry(grid, kernel, dilation, causal, stride, border)
    keys, valid, rel = window_indices(geom)
    want = brute_sets(grid, geom.kernel, geom.dilation, geom.causal, geom.stride, border)
    radices = geom.rpb_shape
    for qi in range(geom.num_tokens):
        got = {int(kj): int(r) for kj, ok, r in zip(keys[qi], valid[qi], rel[qi]) if ok}
        assert set(got) == set(want[qi]), f"query {qi}"
        for kj, offsets in want[qi].items():  # the relative-position index of every key
            flat = 0
            for o, k, rad in zip(offsets, geom.kernel, radices):
                flat = flat * rad + o + k - 1
            assert got[kj] == flat
        assert int(valid[qi].sum()) == len(want[qi])  # no key listed twice
    if border == "shift" and not any(geom.causal):
        assert bool(valid.all())  # always prod(kernel) keys


@pytest.mark.parametrize("backend", ["tiled", "reference"])
@pytest.mark.parametrize("grid,kernel,dilation,causal,stride,border", CONFIGS, ids=IDS)
def test_backends_match_dense_over_brute_force_sets(oracle, tol, backend, grid, kernel, dilation, causal, stride, border):
    geom = make_geometry(grid, kernel, dilation, causal, stride, border)
    q, k, v = make_qkv(2, 2, grid, d=4, dv=3)
    rpb = None
    if not any(geom.causal):
        rpb = torch.randn(2, *geom.rpb_shape, dtype=F64, generator=torch.Generator().manual_seed(3)).requires_grad_()
    out, lse = NA(q, k, v, kernel, **kwargs(geom), rpb=rpb, return_lse=True, backend=backend)
    allowed, bias = dense_terms(geom, rpb)
    n = geom.num_tokens
    want, _, want_lse = oracle(q.reshape(2, 2, n, 4), k.reshape(2, 2, n, 4), v.reshape(2, 2, n, 3), mask=allowed, bias=bias)
    torch.testing.assert_close(out, want.reshape(out.shape), **tol(F64, "fwd"))
    torch.testing.assert_close(lse, want_lse.reshape(lse.shape), **tol(F64, "fwd"))
    inputs = [q, k, v] + ([rpb] if rpb is not None else [])
    for a, b in zip(grads(out, inputs), grads(want.reshape(out.shape), inputs)):
        torch.testing.assert_close(a, b, **tol(F64, "bwd"))


@pytest.mark.parametrize("tile", [(1,), (2,), (3,), (5,), (16,)])
@pytest.mark.parametrize("stride,border", [(2, "shift"), (3, "clip"), (4, "shift")])
def test_tiled_any_tile_with_stride(tol, tile, stride, border):
    geom = make_geometry((23,), 6, 1, False, stride, border)
    q, k, v = make_qkv(1, 2, (23,), grad=False)
    want = NA(q, k, v, 6, stride=stride, border=border, backend="reference")
    got, _ = tiled_neighborhood(q, k, v, geom, scale=0.5, tile=tile)
    torch.testing.assert_close(got, NA(q, k, v, 6, stride=stride, border=border, scale=0.5, backend="reference"), **tol(F64, "fwd"))
    assert want.shape == got.shape


def test_blocked_stride_equals_dense_inside_blocks(oracle, tol):
    # stride = kernel = block, grid divisible: independent per-block dense attention
    q, k, v = make_qkv(1, 2, (8, 12), grad=False)
    got = NA(q, k, v, (4, 3), stride=(4, 3), backend="tiled")
    def blocks(t):  # (1, H, 8, 12, D) -> (blocks, H, 12, D): one batch entry per 4x3 block
        return t.reshape(1, 2, 2, 4, 4, 3, -1).permute(0, 2, 4, 1, 3, 5, 6).reshape(8, 2, 12, -1)

    want, _, _ = oracle(blocks(q), blocks(k), blocks(v))
    want = want.reshape(1, 2, 4, 2, 4, 3, -1).permute(0, 3, 1, 4, 2, 5, 6).reshape(1, 2, 8, 12, -1)
    torch.testing.assert_close(got, want, **tol(F64, "fwd"))


def test_key_mask_and_bias_with_stride_and_clip(tol):
    geom = make_geometry((9, 8), (4, 3), 1, False, (2, 3), "clip")
    q, k, v = make_qkv(2, 2, geom.grid)
    g = torch.Generator().manual_seed(5)
    mask = torch.rand(2, *geom.grid, generator=g) > 0.4
    bias = torch.randn(2, 1, *geom.grid, geom.window_size, generator=g, dtype=F64).requires_grad_()
    kw = {**kwargs(geom), "key_mask": mask, "bias": bias}
    want = NA(q, k, v, geom.kernel, **kw, backend="reference")
    got = NA(q, k, v, geom.kernel, **kw, backend="tiled")
    torch.testing.assert_close(got, want, **tol(F64, "fwd"))
    for a, b in zip(grads(got, [q, k, v, bias]), grads(want, [q, k, v, bias])):
        torch.testing.assert_close(a, b, **tol(F64, "bwd"))


def test_natten_backend_declines_clip_and_unit_kernel():
    natten = next(b for b in BACKENDS["neighborhood"] if b.name == "natten")
    q = torch.zeros(1, 1, 9, 4)
    call = NACall.make(Call.of(q, q, q), has_rpb=False, has_extra=False, rank=1, clip=True, unit_kernel=True)
    reasons = " | ".join(natten.not_supported_reasons(call))
    if "not installed" in reasons:
        assert reasons == "natten not installed"
    else:
        assert 'border="clip"' in reasons and "kernel_size 1" in reasons


def test_errors_name_the_argument():
    q = torch.zeros(1, 1, 9, 4)
    with pytest.raises(ValueError, match=r"stride must be in \[1, kernel_size\]"):
        NA(q, q, q, 3, stride=4)
    with pytest.raises(TypeError, match="stride"):
        NA(q, q, q, 3, stride=1.5)
    with pytest.raises(ValueError, match="border must be one of"):
        NA(q, q, q, 3, border="zeros")


def test_module_stride_and_border():
    torch.manual_seed(0)
    m = NeighborhoodAttention(16, 2, kernel_size=(4, 6), stride=(2, 2), border="clip")
    x = torch.randn(2, 7, 9, 16)
    out = m(x)
    assert out.shape == x.shape
    out.sum().backward()
    assert m.rpb.grad is not None and m.rpb.grad.abs().sum() > 0
    q, k, v = (m._heads(t) for t in m.to_qkv(x).chunk(3, dim=-1))
    op = NA(q, k, v, (4, 6), stride=(2, 2), border="clip", rpb=m.rpb, backend="reference")
    torch.testing.assert_close(m.proj(op.movedim(1, -2).flatten(-2)), out, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="stride"):
        NeighborhoodAttention(16, 2, kernel_size=3, stride=4)
    with pytest.raises(ValueError, match="border"):
        NeighborhoodAttention(16, 2, kernel_size=3, border="pad")


@pytest.mark.slow
@pytest.mark.parametrize("grid,kernel,dilation,causal,stride,border", [CONFIGS[1], CONFIGS[10]], ids=[IDS[1], IDS[10]])
def test_flex_matches_reference_cpu_inference(grid, kernel, dilation, causal, stride, border):
    geom = make_geometry(grid, kernel, dilation, causal, stride, border)
    q, k, v = make_qkv(1, 2, grid, d=16, dtype=torch.float32, grad=False, seed=12)
    want = NA(q, k, v, kernel, **kwargs(geom), backend="reference")
    got = NA(q, k, v, kernel, **kwargs(geom), backend="flex")
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


# NATTEN itself (skipped unless importable; its FlexAttention path runs on a CPU-only machine)
NATTEN_CASES = [c for c in CONFIGS if c[5] == "shift"]


@pytest.mark.skipif(importlib.util.find_spec("natten") is None, reason="natten not installed")
@pytest.mark.parametrize("grid,kernel,dilation,causal,stride,border", NATTEN_CASES)
def test_matches_natten(grid, kernel, dilation, causal, stride, border):
    import natten

    geom = make_geometry(grid, kernel, dilation, causal, stride, border)
    q, k, v = make_qkv(1, 2, grid, d=8, dtype=torch.float32, grad=False)
    fn = {1: natten.na1d, 2: natten.na2d, 3: natten.na3d}[geom.rank]
    heads_last = [t.movedim(1, -2).contiguous() for t in (q, k, v)]
    want = fn(*heads_last, kernel_size=geom.kernel, stride=geom.stride, dilation=geom.dilation, is_causal=geom.causal,
              backend="flex-fna" if q.device.type == "cpu" else None).movedim(-2, 1)
    for backend in ("reference", "tiled"):
        got = NA(q, k, v, kernel, **kwargs(geom), backend=backend)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("need_lse", [False, True])
@pytest.mark.parametrize("extras", ["none", "mask_rpb", "bias"])
def test_tiled_worker_pool_equals_single_call(tol, need_lse, extras):
    # the no-grad path cuts the tiles into chunks run by a thread pool; it must equal one call
    from attnfuse.ops.neighborhood.tiled import TiledOptions

    geom = make_geometry((11, 10), (4, 5), 1, False, (2, 1))
    q, k, v = make_qkv(2, 3, geom.grid, grad=True)
    g = torch.Generator().manual_seed(2)
    n = geom.num_tokens
    mask = (torch.rand(2, 1, n, generator=g) > 0.3) if extras == "mask_rpb" else None
    rpb = torch.randn(3, *geom.rpb_shape, generator=g, dtype=F64) if extras == "mask_rpb" else None
    bias = torch.randn(1, 3, n, geom.window_size, generator=g, dtype=F64) if extras == "bias" else None
    kw = {"scale": 0.3, "mask": mask, "rpb": rpb, "bias": bias, "need_lse": need_lse}
    with torch.no_grad():
        one = tiled_neighborhood(q, k, v, geom, **kw, options=TiledOptions(workers=1))
        pooled = tiled_neighborhood(q, k, v, geom, **kw, options=TiledOptions(workers=2, chunks_per_worker=3, min_pool_work=0))
    with torch.inference_mode():
        inf = tiled_neighborhood(q, k, v, geom, **kw, options=TiledOptions(workers=3, min_pool_work=0))
    for a, b, c in zip(one, pooled, inf):
        if a is None:
            assert b is None and c is None
            continue
        assert not b.requires_grad
        torch.testing.assert_close(b, a, **tol(F64, "fwd"))
        torch.testing.assert_close(c, a, **tol(F64, "fwd"))
    from attnfuse.ops.neighborhood import tiled

    assert {2, 3} <= set(tiled._POOLS)  # the pooled path ran
    threads = torch.get_num_threads()
    tiled_neighborhood(q.detach(), k.detach(), v.detach(), geom, scale=0.3, options=TiledOptions(workers=2, min_pool_work=0))
    assert torch.get_num_threads() == threads  # the caller's thread count is untouched

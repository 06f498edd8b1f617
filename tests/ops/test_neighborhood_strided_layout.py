"""The tiled backend's ``"strided"`` layout (key regions as overlapping views) against the reference.

The layout serves no-grad calls on 1-D / 2-D grids without dilation, mask, bias, rpb or log-sum-exp
(issue 13, item 10); everything else must fall back to the gather layout unchanged.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse import ops
from attnfuse.ops.neighborhood import make_geometry
from attnfuse.ops.neighborhood import tiled as tiled_mod
from attnfuse.ops.neighborhood.tiled import TiledOptions, tiled_neighborhood

F64 = torch.float64
NA = ops.neighborhood_attention

# (grid, kernel, stride, causal, border): shifted borders, even kernels, stride groups, causal
# axes, clipped windows, kernel = extent, grids that are not a multiple of the tile.
CASES = [
    ((23,), 7, 1, False, "shift"),
    ((37,), 8, 2, True, "shift"),
    ((19,), 6, 3, False, "clip"),
    ((19, 23), (5, 4), 1, False, "shift"),
    ((19, 23), (5, 4), 1, (True, False), "shift"),
    ((17, 14), 5, (3, 2), False, "shift"),
    ((15, 16), (5, 6), 1, False, "clip"),
    ((12, 13), (12, 13), 1, False, "shift"),
    ((21, 20), 13, 1, False, "shift"),
]
TILES = {1: [None, (1,), (4,), (64,)], 2: [None, (1, 8), (3, 5), (8, 8)]}


def qkv(grid, seed=0, dv=5, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 3, *grid, d, generator=g, dtype=dtype) for d in (8, 8, dv)]


@pytest.mark.parametrize("grid,kernel,stride,causal,border", CASES)
@pytest.mark.parametrize("workers", [1, 2])
def test_strided_layout_matches_reference(grid, kernel, stride, causal, border, workers):
    q, k, v = qkv(grid)
    geom = make_geometry(grid, kernel, 1, causal, stride, border)
    want = NA(q, k, v, kernel, stride=stride, is_causal=causal, border=border, scale=0.3, backend="reference")
    for tile in TILES[len(grid)]:
        opts = TiledOptions(tile=tile, layout="strided", workers=workers, chunks_per_worker=3, min_pool_work=0)
        with torch.no_grad():
            got, lse = tiled_neighborhood(q, k, v, geom, scale=0.3, options=opts)
        assert lse is None and got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10, msg=lambda m, t=tile: f"tile {t}: {m}")


def test_strided_layout_in_inference_mode_and_fp32():
    q, k, v = qkv((20, 18), seed=1, dtype=torch.float32)
    geom = make_geometry((20, 18), 7)
    gather = TiledOptions(layout="gather", workers=1)
    with torch.no_grad():
        want = tiled_neighborhood(q, k, v, geom, scale=0.4, options=gather)[0]
    with torch.inference_mode():  # pool workers are new threads: inference mode must reach them
        got = tiled_neighborhood(q, k, v, geom, scale=0.4, options=TiledOptions(workers=2, min_pool_work=0))[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid", [(29,), (9, 11)])
@pytest.mark.parametrize("form", ["heads_last", "sliced"])
def test_strided_layout_with_non_contiguous_inputs(grid, form):
    # heads-last projections viewed as (1, H, *grid, D), or a slice of D: the views must not assume contiguous storage
    g = torch.Generator().manual_seed(4)
    if form == "heads_last":
        q, k, v = (torch.randn(1, *grid, 3, 8, generator=g, dtype=F64).movedim(-2, 1) for _ in range(3))
    else:
        q, k, v = (torch.randn(2, 3, *grid, 8, generator=g, dtype=F64)[..., 1:7] for _ in range(3))
    assert not k.is_contiguous()
    geom = make_geometry(grid, 5)
    with torch.no_grad():
        got = tiled_neighborhood(q, k, v, geom, scale=0.3, options=TiledOptions(layout="strided"))[0]
    want = NA(q, k, v, 5, scale=0.3, backend="reference")
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("workers", [1, 2])
def test_strided_layout_under_no_grad_with_inputs_that_require_grad(workers):
    q, k, v = (x.requires_grad_(True) for x in qkv((11, 12)))
    geom = make_geometry((11, 12), 5)
    with torch.no_grad():
        got = tiled_neighborhood(q, k, v, geom, scale=0.3, options=TiledOptions(workers=workers, min_pool_work=0))[0]
        want = NA(q, k, v, 5, scale=0.3, backend="reference")
    assert not got.requires_grad
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_auto_layout_uses_views_only_where_it_applies(monkeypatch):
    calls = []
    real = tiled_mod._strided_forward
    monkeypatch.setattr(tiled_mod, "_strided_forward", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    grid = (9, 10)
    q, k, v = qkv(grid)
    plain = make_geometry(grid, 3)
    with torch.no_grad():
        tiled_neighborhood(q, k, v, plain, scale=0.3)
        assert len(calls) == 1
        tiled_neighborhood(q, k, v, plain, scale=0.3, options=TiledOptions(layout="gather"))
        tiled_neighborhood(q, k, v, plain, scale=0.3, need_lse=True)
        tiled_neighborhood(q, k, v, plain, scale=0.3, mask=torch.ones(1, 1, 90, dtype=torch.bool))
        tiled_neighborhood(q, k, v, make_geometry(grid, 3, dilation=2), scale=0.3)
        q3, k3, v3 = qkv((4, 5, 6))
        tiled_neighborhood(q3, k3, v3, make_geometry((4, 5, 6), 3), scale=0.3)
    q.requires_grad_(True)
    out, _ = tiled_neighborhood(q, k, v, plain, scale=0.3)  # gradients: the gather layout
    assert out.requires_grad and len(calls) == 1
    with pytest.raises(ValueError, match="layout"):
        tiled_neighborhood(q, k, v, plain, scale=0.3, options=TiledOptions(layout="views"))

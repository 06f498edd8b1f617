"""HaloNet blocked attention is strided neighborhood attention: kernel b + 2h, stride b.

``border="clip"`` (windows centred on the block, cut at the grid: HaloNet's zero padding masked out)
equals ``ops.halo_attention`` on every block, partial last blocks included; NATTEN's ``"shift"``
equals it on interior blocks (windows inside the grid) and differs at the border.
"""

from __future__ import annotations

import pytest
import torch

from attnfuse import ops

F64 = torch.float64

# (grid, block, halo)
CASES = [((24,), 4, 2), ((30,), 5, 1), ((27,), 6, 2), ((13,), 4, 1), ((12, 10), (4, 2), (1, 2)), ((11, 9), 3, 1)]


def _qkv(grid, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 2, *grid, 5, generator=g, dtype=F64).requires_grad_(grad) for _ in range(3)]


def _per_axis(x, rank):
    return x if isinstance(x, tuple) else (x,) * rank


@pytest.mark.parametrize("backend", ["tiled", "reference"])
@pytest.mark.parametrize("grid,block,halo", CASES)
def test_clip_border_equals_halo_everywhere(tol, backend, grid, block, halo):
    rank = len(grid)
    b, h = _per_axis(block, rank), _per_axis(halo, rank)
    kernel = tuple(bb + 2 * hh for bb, hh in zip(b, h))
    q, k, v = _qkv(grid, grad=True)
    want = ops.halo_attention(q, k, v, block, halo, backend="reference")
    got = ops.neighborhood_attention(q, k, v, kernel, stride=b, border="clip", backend=backend)
    torch.testing.assert_close(got, want, **tol(F64, "fwd"))
    w = torch.randn(got.shape, generator=torch.Generator().manual_seed(1), dtype=F64)
    for a, c in zip(torch.autograd.grad((got * w).sum(), (q, k, v)), torch.autograd.grad((want * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, c, **tol(F64, "bwd"))


@pytest.mark.parametrize("grid,block,halo", CASES)
def test_shift_border_equals_halo_on_interior_blocks(tol, grid, block, halo):
    rank = len(grid)
    b, h = _per_axis(block, rank), _per_axis(halo, rank)
    kernel = tuple(bb + 2 * hh for bb, hh in zip(b, h))
    q, k, v = _qkv(grid)
    want = ops.halo_attention(q, k, v, block, halo, backend="reference")
    got = ops.neighborhood_attention(q, k, v, kernel, stride=b, backend="tiled")
    # interior: the block's whole window [nb - h, (n + 1) b + h) lies inside the grid on every axis
    inside = torch.ones(grid, dtype=torch.bool)
    for a, (n, bb, hh) in enumerate(zip(grid, b, h)):
        x = torch.arange(n)
        start = (x // bb) * bb
        ok = (start - hh >= 0) & (start + bb + hh <= n)
        inside &= ok.view([-1 if i == a else 1 for i in range(rank)])
    assert inside.any() and not inside.all()
    torch.testing.assert_close(got[:, :, inside], want[:, :, inside], **tol(F64, "fwd"))
    assert not torch.allclose(got[:, :, ~inside], want[:, :, ~inside])  # the border rule differs there

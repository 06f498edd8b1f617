"""merge_attention over disjoint key subsets equals attention over all keys (out, lse, gradients)."""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse import ops

F64 = torch.float64


def random_split(lk: int, n: int, g: torch.Generator) -> list[torch.Tensor]:
    """Split key indices ``0..lk-1`` into ``n`` disjoint, non-contiguous index sets (some may be empty)."""
    labels = torch.randint(0, n, (lk,), generator=g)
    labels[torch.randperm(lk, generator=g)[:n]] = torch.arange(n)  # every subset gets a key when lk >= n
    return [torch.nonzero(labels == i).flatten() for i in range(n)]


def partial(q, k, v, mask, bias, idx):
    """Attention of every query over the keys ``idx`` only, with its log-sum-exp."""
    return ops.dense_attention(q, k[:, :, idx], v[:, :, idx], mask=mask[..., idx], bias=bias[..., idx], return_lse=True)


def loss_of(out, lse, g):
    """A scalar touching out and the finite part of lse, with fixed random weights."""
    w_out = torch.randn(out.shape, generator=g, dtype=F64)
    w_lse = torch.randn(lse.shape, generator=g, dtype=F64)
    finite_lse = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    return (out * w_out).sum() + (finite_lse * w_lse).sum()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_merge_of_random_split_equals_full(oracle, tol, n, seed):
    g = torch.Generator().manual_seed(seed)
    b, h, lq, lk, d, dv = 2, 3, 5, 11, 4, 6
    q = torch.randn(b, h, lq, d, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(b, h, lk, d, generator=g, dtype=F64, requires_grad=True)
    v = torch.randn(b, h, lk, dv, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(1, h, lq, lk, generator=g, dtype=F64, requires_grad=True)
    mask = torch.rand(b, h, lq, lk, generator=g) < 0.8
    subsets = random_split(lk, n, g)
    mask[0, :, 1, subsets[0]] = False  # subset 0 is empty for one query
    mask[1, 2, 4] = False  # a query with no key in any subset
    if n > 1:
        mask[..., subsets[-1]] = False  # the last subset is empty for every query

    parts = [partial(q, k, v, mask, bias, idx) for idx in subsets]
    out, lse = ops.merge_attention([o for o, _ in parts], [s for _, s in parts])
    want_out, _, want_lse = oracle(q, k, v, mask=mask, bias=bias)  # attention over all keys
    torch.testing.assert_close(out, want_out, **tol(F64, "fwd"))
    torch.testing.assert_close(lse, want_lse, **tol(F64, "fwd"))
    assert torch.equal(out[1, 2, 4], torch.zeros(dv, dtype=F64)) and lse[1, 2, 4].item() == -math.inf

    inputs = [q, k, v, bias]
    got = torch.autograd.grad(loss_of(out, lse, torch.Generator().manual_seed(99)), inputs)
    exp = torch.autograd.grad(loss_of(want_out, want_lse, torch.Generator().manual_seed(99)), inputs)
    for a, e in zip(got, exp):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, e, **tol(F64, "bwd"))


def test_merge_with_a_subset_of_no_keys_and_in_any_order(tol):
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 2, 4, 3, generator=g, dtype=F64)
    k = torch.randn(1, 2, 6, 3, generator=g, dtype=F64)
    v = torch.randn(1, 2, 6, 2, generator=g, dtype=F64)
    mask = torch.rand(1, 1, 4, 6, generator=g) < 0.7
    bias = torch.zeros(4, 6, dtype=F64)
    subsets = [torch.tensor([4, 0, 2]), torch.tensor([], dtype=torch.long), torch.tensor([5, 1, 3])]
    parts = [partial(q, k, v, mask, bias, idx) for idx in subsets]
    want_out, want_lse = ops.dense_attention(q, k, v, mask=mask, return_lse=True)
    for order in ([0, 1, 2], [2, 0, 1], [1, 2, 0]):
        out, lse = ops.merge_attention([parts[i][0] for i in order], [parts[i][1] for i in order])
        torch.testing.assert_close(out, want_out, **tol(F64, "fwd"))
        torch.testing.assert_close(lse, want_lse, **tol(F64, "fwd"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_low_precision(tol, dtype):
    g = torch.Generator().manual_seed(5)
    outs = [torch.randn(2, 2, 3, 4, generator=g, dtype=F64) for _ in range(3)]
    lses = [torch.randn(2, 2, 3, generator=g, dtype=F64) * 3 for _ in range(3)]
    lses[1][0, 0, 0] = -math.inf
    want_out, want_lse = ops.merge_attention(outs, lses)
    out, lse = ops.merge_attention([o.to(dtype) for o in outs], [s.to(dtype) for s in lses])
    assert out.dtype == lse.dtype == dtype
    torch.testing.assert_close(out.double(), want_out, **tol(dtype, "fwd"))
    torch.testing.assert_close(lse.double(), want_lse, **tol(dtype, "fwd"))


def test_merge_single_part_is_identity():
    out = torch.randn(1, 2, 3, 4, dtype=F64)
    lse = torch.randn(1, 2, 3, dtype=F64)
    lse[0, 1, 2] = -math.inf
    out[0, 1, 2] = 0.0
    m_out, m_lse = ops.merge_attention([out], [lse])
    torch.testing.assert_close(m_out, out)
    torch.testing.assert_close(m_lse, lse)


@pytest.mark.parametrize(
    ("outputs", "lses", "match"),
    [
        ([], [], r"equally many outputs and lses \(>= 1\), got 0 and 0"),
        ([torch.zeros(1, 1, 2, 3)], [], r"got 1 and 0"),
        ([torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 4)], [torch.zeros(1, 1, 2)] * 2, r"outputs\[1\].shape=\(1, 1, 2, 4\) differs"),
        ([torch.zeros(1, 1, 2, 3)], [torch.zeros(1, 1, 3)], r"lses\[0\] must have shape \(1, 1, 2\) \(B, H, L\), got \(1, 1, 3\)"),
        ([torch.zeros(1, 1, 2, 3)], [torch.zeros(1, 1, 2, 3)], r"lses\[0\] must have shape \(1, 1, 2\)"),
    ],
    ids=["empty", "lengths", "out-shape", "lse-shape", "lse-rank"],
)
def test_merge_bad_inputs(outputs, lses, match):
    with pytest.raises(ValueError, match=match):
        ops.merge_attention(outputs, lses)

"""torch.compile(fullgraph=True) of dense_attention matches eager, without recompiling."""

from __future__ import annotations

import shutil

import pytest
import torch

from attnfuse import ops

pytestmark = pytest.mark.slow


def _compile_unavailable() -> str | None:
    if not hasattr(torch, "compile"):
        return "torch.compile is not available in this torch build"
    if shutil.which("cc") is None and shutil.which("gcc") is None and shutil.which("clang") is None:
        return "torch.compile (inductor, CPU) needs a C compiler and none was found"
    return None


@pytest.mark.skipif(_compile_unavailable() is not None, reason=str(_compile_unavailable()))
@pytest.mark.parametrize("backend", ["sdpa", "auto"])
def test_compiled_dense_attention_matches_eager(backend):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)

    def step(q, k, v, mask, bias):
        out = ops.dense_attention(q, k, v, mask=mask, bias=bias, backend=backend)
        return (out * out).sum()

    compiled = torch.compile(step, fullgraph=True)

    def inputs(seed_offset: int):
        g.manual_seed(seed_offset)
        q = torch.randn(2, 2, 6, 8, generator=g, requires_grad=True)
        k = torch.randn(2, 2, 9, 8, generator=g, requires_grad=True)
        v = torch.randn(2, 2, 9, 4, generator=g, requires_grad=True)
        bias = torch.randn(1, 2, 6, 9, generator=g, requires_grad=True)
        mask = torch.rand(2, 1, 6, 9, generator=g) < 0.7
        mask[0, 0, 3] = False  # an empty query row
        return q, k, v, mask, bias

    with torch._dynamo.config.patch(recompile_limit=1, error_on_recompile=True):
        for seed in (1, 2):  # the second call must reuse the first graph
            args = inputs(seed)
            eager_args = [a.detach().clone().requires_grad_(a.requires_grad) for a in args]
            got = compiled(*args)
            want = step(*eager_args)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
            got_grads = torch.autograd.grad(got, [args[i] for i in (0, 1, 2, 4)])
            want_grads = torch.autograd.grad(want, [eager_args[i] for i in (0, 1, 2, 4)])
            for a, b in zip(got_grads, want_grads):
                assert torch.isfinite(a).all()
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)

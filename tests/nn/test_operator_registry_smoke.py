"""Every registered operator runs forward and backward through nn.Attention on a tiny input (R16.6).

A new operator must add its minimal options here, so it is exercised automatically.
"""

import pytest
import torch

from attnfuse.nn import Attention
from attnfuse.ops import OPERATORS

MINIMAL_OPTIONS = {
    "dense": {},
    "silu_kernel": {},
    "kernel": {"similarity": "taylor"},
    "combiner": {"mode": "fixed", "block_size": 4},
    "axial": {"axis": 1},
    "halo": {"block_size": 2, "halo_size": 1},
    "neighborhood": {"kernel_size": 3},
    "routing": {"regions": 2, "topk": 2},
}


def test_every_registered_operator_has_smoke_options():
    missing = sorted(set(OPERATORS) - set(MINIMAL_OPTIONS) - {n for n in OPERATORS if n.startswith("test_")})
    assert not missing, f"add minimal options for {missing} to MINIMAL_OPTIONS"


@pytest.mark.parametrize("name", sorted(MINIMAL_OPTIONS))
def test_operator_forward_backward_through_attention(name):
    torch.manual_seed(0)
    spec = OPERATORS[name]
    attn = Attention(8, 2, op=spec.config(**MINIMAL_OPTIONS[name]))  # the typed options of the operator
    x = torch.randn(2, 6, 6, 8, requires_grad=True) if spec.layout == "grid" else torch.randn(2, 12, 8, requires_grad=True)
    mask = torch.ones(x.shape[:-1], dtype=torch.bool)
    mask[1, 0] = False
    out = attn(x, mask=mask)
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in attn.parameters())


@pytest.mark.parametrize("name", sorted(MINIMAL_OPTIONS))
def test_operator_with_an_empty_batch_or_no_tokens_through_attention(name):
    """Batch 0 and 0 tokens (an empty grid) through nn.Attention: outputs of the input's shape, a backward pass."""
    torch.manual_seed(0)
    spec = OPERATORS[name]
    attn = Attention(8, 2, op=spec.config(**MINIMAL_OPTIONS[name]))
    shapes = [(0, 6, 6, 8), (2, 0, 6, 8)] if spec.layout == "grid" else [(0, 12, 8), (2, 0, 8)]
    for shape in shapes:
        x = torch.randn(shape, requires_grad=True)
        for mask in (None, torch.ones(shape[:-1], dtype=torch.bool)):
            out = attn(x, mask=mask)
            assert out.shape == x.shape, f"{name} {shape}"
            out.sum().backward()
            assert x.grad.shape == x.shape

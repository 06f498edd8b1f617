"""Fixtures of the merge tests (models in merge_models.py)."""

from __future__ import annotations

import pytest
import torch
from merge_models import TinyViT, _perturb, permuted_copy


@pytest.fixture
def vit_pair():
    """``(A, B, x, perms)``: a float64 TinyViT, a permuted copy of it, inputs."""
    torch.manual_seed(0)
    a = _perturb(TinyViT().double(), 1).eval()
    b, perms = permuted_copy(a, 2)
    x = torch.randn(24, 6, 5, dtype=torch.float64)
    return a, b.eval(), x, perms


@pytest.fixture
def make_vit():
    def make(seed: int, **kw) -> TinyViT:
        torch.manual_seed(seed)
        return _perturb(TinyViT(**kw).double(), seed + 100).eval()
    return make

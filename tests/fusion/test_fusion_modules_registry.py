"""Registry declarations of the fusion modules added with the paper operators (issue 6)."""

import pytest
import torch
from torch import nn

from attnfuse.fusion import (
    FUSIONS,
    AxisAttention,
    BudgetRouter,
    CoAttention,
    ConditionalCrossAttention,
    EvidentialFusion,
    GatedFusion,
    Inject,
    LayerAttention,
    MutualAttention,
    ParameterFreeCrossAttention,
)

D = 8

BUILDERS = {
    "coattention": (lambda: CoAttention("a", "b", D, heads=2), "equivariant"),
    "mutual": (lambda: MutualAttention("a", "b", D, reduction=2), "equivariant"),
    "conditional": (lambda: ConditionalCrossAttention("a", D, heads=2, num_conditions=2), "equivariant"),
    "parameter_free": (lambda: ParameterFreeCrossAttention("a", "b"), "equivariant"),
    "axis": (lambda: AxisAttention(["a"], D, axis="token", heads=2), "equivariant"),
    "layer": (lambda: LayerAttention("a", D, num_layers=2, heads=2), "invariant"),
    "evidential": (lambda: EvidentialFusion(["a", "b"], num_classes=2), "equivariant"),
    "gated": (lambda: GatedFusion(["a", "b"], D), "invariant"),
    "inject": (lambda: Inject(nn.Sequential(nn.Linear(D, D)), GatedFusion(["q"], D), sites=["0"], query="q"), "ordered"),
    "router": (lambda: BudgetRouter("a", D, num_sites=2), "invariant"),
}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_declarations_match_instances(name):
    build, symmetry = BUILDERS[name]
    cls = FUSIONS[name]
    module = build()
    assert type(module) is cls and cls.symmetry == symmetry
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert (trainable > 0) == cls.has_parameters


def test_instances_that_change_their_symmetry_say_so():
    assert ConditionalCrossAttention("a", D, heads=2, num_conditions=2, query_positions="cls_only").symmetry == "ordered"
    assert LayerAttention("a", D, num_layers=2, heads=2, readout=None).symmetry == "equivariant"
    assert torch.is_tensor(FUSIONS["router"](source="a", dim=D, num_sites=1).costs)

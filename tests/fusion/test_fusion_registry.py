"""Fusion registries: FUSIONS (the fusion protocol) and BLOCKS (building blocks), their rules and the documented examples."""

import doctest

import pytest
import torch
from torch import nn

import attnfuse.fusion as fusion_pkg
from attnfuse.fusion import (
    BLOCKS,
    FUSIONS,
    AxisAttention,
    BudgetRouter,
    CoAttention,
    ConditionalCrossAttention,
    DempsterFusion,
    EarlyFusion,
    EvidentialFusion,
    GatedFusion,
    Inject,
    LayerAttention,
    MutualAttention,
    ParameterFreeCrossAttention,
    RouteDecision,
    TokenSet,
    get_block,
    get_fusion,
    list_blocks,
    list_fusions,
    register_block,
    register_fusion,
)

D = 8

#: paper configurations of the fusions added with the paper operators (issue 6), with their declared symmetry
PAPER_SETTINGS = {
    "coattention": (lambda: CoAttention(["a", "b"], D, heads=2, merge="concat_ffn"), "equivariant"),
    "mutual": (lambda: MutualAttention(["a", "b"], D, reduction=2, form="affinity_swap", merge="sum"), "equivariant"),
    "conditional": (lambda: ConditionalCrossAttention(["a"], D, heads=2, num_conditions=2), "equivariant"),
    "parameter_free": (lambda: ParameterFreeCrossAttention(["a", "b"], D), "equivariant"),
    "axis": (lambda: AxisAttention(["a"], D, axis="token", heads=2), "equivariant"),
    "layer": (lambda: LayerAttention(["a"], D, num_layers=2, heads=2), "invariant"),
    "evidential": (lambda: EvidentialFusion(["a", "b"], D, num_classes=2), "invariant"),
    "gated": (lambda: GatedFusion(["a", "b"], D), "invariant"),
}

#: every building block, built as its documentation shows (a new block must be added here: see the test below)
BLOCK_BUILDERS = {
    "inject": lambda: Inject(nn.Sequential(nn.Linear(D, D)), ParameterFreeCrossAttention(["q", "ctx"], D), sites=["0"], query="q"),
    "router": lambda: BudgetRouter("a", D, num_sites=2),
    "dempster": lambda: DempsterFusion(["a", "b"], num_classes=2),
}


@pytest.mark.parametrize("name", list(PAPER_SETTINGS))
def test_paper_settings_match_declarations(name):
    build, symmetry = PAPER_SETTINGS[name]
    cls = FUSIONS[name]
    module = build()
    assert type(module) is cls and cls.symmetry == symmetry
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    assert (trainable > 0) == cls.has_parameters


def test_instances_that_change_their_symmetry_say_so():
    assert ConditionalCrossAttention(["a"], D, heads=2, num_conditions=2, query_positions="cls_only").symmetry == "ordered"
    assert LayerAttention(["a"], D, num_layers=2, heads=2, readout=None).symmetry == "equivariant"


def test_blocks_and_fusions_are_disjoint_and_blocks_are_not_fusions():
    assert set(BLOCKS).isdisjoint(FUSIONS)
    assert {"inject", "router", "dempster"} <= set(BLOCKS)
    assert list_blocks() == sorted(BLOCKS) and list_fusions() == sorted(FUSIONS)
    assert get_block("inject") is Inject and get_block("router") is BudgetRouter
    with pytest.raises(KeyError, match="building block"):
        get_fusion("inject")
    with pytest.raises(KeyError, match="registered blocks"):
        get_block("early")


def test_every_block_is_constructible_as_documented():
    assert set(BLOCK_BUILDERS) == set(BLOCKS), "document (and add here) how to build every registered block"
    for name, build in BLOCK_BUILDERS.items():
        assert isinstance(build(), BLOCKS[name])
    x = torch.randn(2, 3, D)
    inject = BLOCK_BUILDERS["inject"]()
    context = {"ctx": TokenSet(torch.randn(2, 4, D))}
    assert torch.equal(inject(x, context=context), inject.backbone(x))  # identity at initialisation
    with torch.no_grad():
        inject.gates["0"].fill_(1.0)
    assert not torch.equal(inject(x, context=context), inject.backbone(x))
    decision = BLOCK_BUILDERS["router"]()({"a": TokenSet(x)}, mode="fixed", budget=1.0)
    assert isinstance(decision, RouteDecision) and decision.config.shape == (2,)
    fused = BLOCK_BUILDERS["dempster"]()({"a": TokenSet(torch.randn(2, 1, 2)), "b": TokenSet(torch.randn(2, 1, 2))})
    assert fused.fused.x.shape == (2, 1, 2) and (fused.fused.x >= 1).all()


def test_registry_rules():
    with pytest.raises(ValueError, match="already registered as a block"):
        register_fusion("inject")(EarlyFusion)
    with pytest.raises(ValueError, match="already registered as a fusion"):
        register_block("early")(Inject)
    with pytest.raises(ValueError, match="already registered as a block"):
        register_block("router")(BudgetRouter)
    no_output = type("NoOutput", (), {"symmetry": "invariant", "has_parameters": False})
    with pytest.raises(ValueError, match="output"):
        register_fusion("no_output")(no_output)
    assert "no_output" not in FUSIONS


def _doctests():
    finder = doctest.DocTestFinder()
    names = {name: getattr(fusion_pkg, name) for name in fusion_pkg.__all__}
    seen, tests = set(), []
    for obj in list(FUSIONS.values()) + list(BLOCKS.values()) + [fusion_pkg.TokenSet, fusion_pkg.multiscale_bank]:
        for test in finder.find(obj, globs={"torch": torch, **names}):
            if test.examples and test.name not in seen:
                seen.add(test.name)
                tests.append(test)
    return tests


@pytest.mark.parametrize("test", _doctests(), ids=lambda t: t.name.split(".")[-1])
def test_docstring_examples_run(test):
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    torch.manual_seed(0)
    runner.run(test)
    assert runner.failures == 0, f"docstring example of {test.name} failed (see the captured output)"

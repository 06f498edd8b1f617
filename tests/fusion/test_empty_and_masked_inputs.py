"""Empty, mixed-dtype and NaN-padded inputs, for every entry of ``FUSIONS`` (built with defaults) and ``BLOCKS``.

Every registered fusion, built as ``cls(["a", "b", "c"], 16)`` (a ``num_classes=None`` filled in, as a model
builder does), must:

* run a batch of 0 samples forward and backward, with the fused width and token count of a non-empty batch;
* treat sources with 0 tokens exactly as absent sources (there is nothing of them to fuse), one or all but one;
* promote sources of different floating dtypes to their common dtype: the result equals the one with every
  source cast to that dtype first;
* give the same fused output and gradients when the masked tokens of a source hold NaN / inf as when they
  hold zeros (masked positions never influence the result).

Building blocks (``BLOCKS``: no shared protocol) get the same checks where their inputs have the feature.
"""

from __future__ import annotations

import dataclasses
import inspect
import itertools

import pytest
import torch
from torch import nn

from attnfuse.fusion import (
    BLOCKS,
    BudgetRouter,
    DempsterFusion,
    FusionOutput,
    Inject,
    ParameterFreeCrossAttention,
    TokenSet,
    get_fusion,
    list_fusions,
)

D = 16
K = 3  # classes given to a constructor whose num_classes defaults to None
NAMES = ("a", "b", "c")
F64 = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-9}
FUSION_NAMES = list_fusions()


def build(name: str, dtype: torch.dtype = F64) -> nn.Module:
    """The fusion with default options (parameters nudged so that zero-initialised gates do not hide anything)."""
    cls = get_fusion(name)
    params = inspect.signature(cls).parameters
    extra = {"num_classes": K} if "num_classes" in params and params["num_classes"].default is None else {}
    torch.manual_seed(0)
    fusion = cls(list(NAMES), D, dtype=dtype, **extra).eval()
    with torch.no_grad():
        for p in fusion.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return fusion


def make_inputs(batch: int = 3, counts=(5, 4, 6), dtype: torch.dtype = F64, seed: int = 0) -> dict[str, TokenSet]:
    """Plain ``(B, N, D)`` token sets with random masks; token 0 valid where a source has tokens."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, n in zip(NAMES, counts):
        mask = torch.rand(batch, n, generator=g) > 0.3
        if n:
            mask[:, 0] = True
        out[name] = TokenSet(torch.randn(batch, n, D, generator=g, dtype=F64).to(dtype), mask)
    return out


def valid_tokens(out: FusionOutput, sample: int) -> torch.Tensor:
    return out.fused.x[sample][out.fused.valid()[sample]]


def loss_of(out: FusionOutput) -> torch.Tensor:
    loss = (out.fused.x * out.fused.valid().unsqueeze(-1)).square().sum()
    for ts in out.per_source.values():
        loss = loss + (ts.x * ts.valid().unsqueeze(-1)).sum()
    return loss


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_batch_of_zero_samples(name):
    fusion = build(name).train()
    full = fusion(make_inputs(batch=2))
    inputs = {n: TokenSet(ts.x.requires_grad_(), ts.mask) for n, ts in make_inputs(batch=0).items()}
    out = fusion(inputs)
    assert out.fused.x.shape == (0, *full.fused.x.shape[1:]) and out.fused.valid().shape == out.fused.x.shape[:-1]
    assert out.fused.x.shape[-1] == fusion.out_dim
    for n, ts in out.per_source.items():
        assert ts.x.shape[0] == 0, n
    loss_of(out).backward()
    assert all(p.grad is None or torch.equal(p.grad, torch.zeros_like(p.grad)) for p in fusion.parameters())
    with_maps = fusion(make_inputs(batch=0), return_weights=True)
    assert all(w.shape[0] == 0 for w in with_maps.weights.values() if w.dim() > 0)


EMPTY_SETS = [e for r in (1, len(NAMES) - 1) for e in itertools.combinations(NAMES, r)]  # one source; all but one


@pytest.mark.parametrize("empty", EMPTY_SETS, ids="+".join)
@pytest.mark.parametrize("name", FUSION_NAMES)
def test_sources_with_zero_tokens_are_absent_sources(name, empty):
    fusion = build(name)
    counts = tuple(0 if n in empty else c for n, c in zip(NAMES, (5, 4, 6)))
    inputs = make_inputs(counts=counts)
    leaves = {n: TokenSet(ts.x.clone().requires_grad_(), ts.mask) for n, ts in inputs.items()}
    out = fusion(leaves)
    absent = fusion({n: ts for n, ts in inputs.items() if n not in empty})
    for s in range(3):
        torch.testing.assert_close(valid_tokens(out, s), valid_tokens(absent, s), **TOL)
    assert torch.isfinite(out.fused.x).all()
    loss_of(out).backward()
    assert all(ts.x.grad is None or torch.isfinite(ts.x.grad).all() for ts in leaves.values())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in fusion.parameters())


@pytest.mark.parametrize(("module_dtype", "source_dtypes"), [
    (torch.float64, (torch.float32, torch.float64, torch.bfloat16)),
    (torch.float32, (torch.float32, torch.bfloat16, torch.float16)),
], ids=["to-float64", "to-float32"])
@pytest.mark.parametrize("name", FUSION_NAMES)
def test_mixed_dtypes_are_promoted_to_the_common_dtype(name, module_dtype, source_dtypes):
    fusion = build(name, dtype=module_dtype)
    inputs = make_inputs()
    mixed = {n: dataclasses.replace(ts, x=ts.x.to(dt)) for (n, ts), dt in zip(inputs.items(), source_dtypes)}
    common = {n: dataclasses.replace(ts, x=ts.x.to(module_dtype)) for n, ts in mixed.items()}
    got, want = fusion(mixed), fusion(common)
    assert got.fused.x.dtype == module_dtype
    torch.testing.assert_close(got.fused.x, want.fused.x, rtol=0, atol=0)
    assert torch.equal(got.fused.valid(), want.fused.valid())


def _poison(inputs: dict[str, TokenSet], value: float | None) -> dict[str, TokenSet]:
    """Leaf copies of ``inputs`` whose masked tokens hold ``value`` (None: keep them as they are)."""
    out = {}
    for n, ts in inputs.items():
        x = ts.x.detach().clone()
        if value is not None:
            x = torch.where(ts.mask.unsqueeze(-1), x, torch.full((), value, dtype=x.dtype))
        out[n] = TokenSet(x.requires_grad_(), ts.mask)
    return out


@pytest.mark.parametrize("name", FUSION_NAMES)
def test_masked_tokens_holding_nan_give_the_result_of_zeros(name):
    fusion = build(name)
    inputs = make_inputs()
    runs = {}
    for label, value in (("zero", 0.0), ("nan", float("nan")), ("inf", float("inf")), ("-inf", float("-inf"))):
        leaves = _poison(inputs, value)
        fusion.zero_grad(set_to_none=True)
        out = fusion(leaves)
        loss_of(out).backward()
        grads = [ts.x.grad for ts in leaves.values()] + [p.grad for p in fusion.parameters()]
        runs[label] = (out, grads)
    out0, grads0 = runs["zero"]
    for label in ("nan", "inf", "-inf"):
        out, grads = runs[label]
        assert torch.isfinite(out.fused.x).all(), f"{name}: {label} in masked tokens reaches the fused output"
        torch.testing.assert_close(out.fused.x, out0.fused.x, **TOL, msg=f"{name}: {label} in masked tokens")
        for n in out0.per_source:
            torch.testing.assert_close(out.per_source[n].x, out0.per_source[n].x, **TOL, msg=f"{name}: per_source {n}")
        for g, g0 in zip(grads, grads0):
            if g0 is None:
                continue
            assert torch.isfinite(g).all(), f"{name}: {label} in masked tokens gives a non-finite gradient"
            torch.testing.assert_close(g, g0, **TOL)


# Building blocks: how to build each and run it on ``{name: TokenSet}`` inputs, and which features apply.
def _inject():
    torch.manual_seed(0)
    block = Inject(nn.Sequential(nn.Linear(D, D, dtype=F64)), ParameterFreeCrossAttention(["q", "ctx"], D), sites=["0"],
                   query="q")
    with torch.no_grad():
        block.gates["0"].fill_(1.0)
    return block


def _run_inject(block, inputs):
    b = inputs["b"].batch_size
    x = torch.randn(b, 3, D, generator=torch.Generator().manual_seed(1), dtype=F64)  # the backbone input (the query)
    return block(x, context={"ctx": inputs["b"]})


def _run_router(block, inputs):
    return block({"a": inputs["a"]}, mode="policy").logits


def _run_dempster(block, inputs):
    return block({n: TokenSet(ts.x[..., :2], ts.mask) for n, ts in inputs.items() if n in ("a", "b")}).fused.x


BLOCK_CASES = {
    # name: (build, run -> tensor, features that apply)
    "inject": (_inject, _run_inject, {"batch0", "zero_tokens", "nan"}),
    "router": (lambda: BudgetRouter("a", D, num_sites=2, dtype=F64), _run_router, {"batch0", "zero_tokens", "nan"}),
    "dempster": (lambda: DempsterFusion(["a", "b"], num_classes=2), _run_dempster, {"batch0", "mixed", "nan"}),
}


def test_every_block_has_a_case():
    assert set(BLOCK_CASES) == set(BLOCKS), "add how to build and run every registered block to BLOCK_CASES"


@pytest.mark.parametrize("name", sorted(BLOCK_CASES))
def test_blocks_with_empty_mixed_and_nan_inputs(name):
    build, run, features = BLOCK_CASES[name]
    block = build().eval()
    inputs = make_inputs(counts=(4, 4, 4))
    ref = run(block, inputs)
    if "batch0" in features:
        out = run(block, make_inputs(batch=0, counts=(4, 4, 4)))
        assert out.shape == (0, *ref.shape[1:])
    if "zero_tokens" in features:
        empty = make_inputs(counts=(4, 0, 0)) if name == "inject" else make_inputs(counts=(0, 4, 4))
        assert torch.isfinite(run(block, empty)).all()
    if "mixed" in features:
        mixed = dict(inputs, a=dataclasses.replace(inputs["a"], x=inputs["a"].x.float()))
        common = dict(mixed, a=dataclasses.replace(mixed["a"], x=mixed["a"].x.double()))
        torch.testing.assert_close(run(block, mixed), run(block, common), rtol=0, atol=0)
    if "nan" in features:
        zero = run(block, _poison(inputs, 0.0))
        for value in (float("nan"), float("inf")):
            got = run(block, _poison(inputs, value))
            assert torch.isfinite(got).all(), f"{name}: {value} in masked tokens"
            torch.testing.assert_close(got, zero, **TOL)

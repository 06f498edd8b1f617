"""GatedFusion: formula, token-order invariance, absent == masked, padding, export."""

import pytest
import torch

from attnfuse.fusion import GatedFusion, TensorFusion, TokenSet

D = 8
SOURCES = ("a", "b", "c")


def inputs(batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, n in zip(SOURCES, (4, 5, 3)):
        mask = torch.rand(batch, n, generator=g) > 0.3
        mask[:, 0] = True
        out[name] = TokenSet(torch.randn(batch, n, D, generator=g), mask)
    return out


def module(**kw):
    torch.manual_seed(0)
    return GatedFusion(SOURCES, D, **kw).eval()


def test_matches_written_out_formula():
    gate = module()
    inp = inputs()
    out = gate(inp, return_weights=True)
    pooled = [(t.x * t.mask[..., None]).sum(1) / t.mask.sum(1, keepdim=True) for t in (inp[n] for n in SOURCES)]
    z = torch.cat(pooled, -1)
    ref = sum(torch.sigmoid(gate.gates[i](z)) * torch.tanh(gate.values[i](pooled[i])) for i in range(3))
    torch.testing.assert_close(out.fused.x[:, 0], ref)
    assert out.weights["gates"].shape == (3, 3, D) and ((out.weights["gates"] > 0) & (out.weights["gates"] < 1)).all()


def test_token_order_invariance_absent_equals_masked_and_padding():
    gate = module()
    inp = inputs()
    shuffled = {n: TokenSet(t.x[:, torch.randperm(t.x.shape[1])], None) for n, t in inp.items()}
    unpadded = {n: TokenSet(t.x, None) for n, t in inp.items()}
    torch.testing.assert_close(gate(shuffled).fused.x, gate(unpadded).fused.x, rtol=1e-5, atol=1e-6)
    absent = gate({n: inp[n] for n in ("a", "c")}).fused.x
    masked = gate(dict(inp, b=inp["b"].with_mask(torch.zeros(3, 5, dtype=torch.bool)))).fused.x
    torch.testing.assert_close(absent, masked)
    assert not torch.allclose(absent, gate(inp).fused.x)
    alone = gate({n: TokenSet(t.x[2:3][:, t.mask[2]]) for n, t in inp.items()}).fused.x
    torch.testing.assert_close(alone[0], gate(inp).fused.x[2], rtol=1e-5, atol=1e-6)


def test_own_gates_ignore_other_sources_gradients_and_empty():
    gate = module(gate_input="own")
    inp = inputs()
    with_b = gate(inp).per_source["a"].x
    without_b = gate({n: inp[n] for n in ("a", "c")}).per_source["a"].x
    torch.testing.assert_close(with_b, without_b)
    leaf = {n: TokenSet(t.x.clone().requires_grad_(), t.mask) for n, t in inp.items()}
    gate(leaf).fused.x.sum().backward()
    assert all(t.x.grad.abs().sum() > 0 for t in leaf.values())
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in gate.parameters())
    empty = gate({n: t.with_mask(torch.zeros_like(t.mask)) for n, t in inp.items()})
    assert torch.count_nonzero(empty.fused.x) == 0 and not empty.fused.valid().any()
    with pytest.raises(ValueError, match="gate_input"):
        GatedFusion(SOURCES, D, gate_input="none")


def test_export_round_trip():
    model = TensorFusion(module(), SOURCES).eval()
    inp = inputs()
    args = tuple(t for n in SOURCES for t in (inp[n].x, inp[n].mask))
    exported = torch.export.export(model, args)
    other = inputs(seed=5)
    other_args = [t for n in SOURCES for t in (other[n].x, other[n].mask)]
    other_args[3] = torch.zeros_like(other_args[3])
    for got, want in zip(exported.module()(*other_args), model(*other_args)):
        torch.testing.assert_close(got, want)

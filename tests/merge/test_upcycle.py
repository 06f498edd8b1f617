"""BAM / BTX upcycling (spec bam.md, invariants 4 and 5) and continued training of the mixture model."""

from __future__ import annotations

import copy

import pytest
import torch
from merge_models import TinyParallelLM

from attnfuse.merge import bam_upcycle, btx_upcycle, moe_aux_loss
from attnfuse.nn import Attention, MixtureOfAttention, MoEFeedForward


def _specialist(seed: TinyParallelLM, k: int) -> TinyParallelLM:
    m = copy.deepcopy(seed)
    g = torch.Generator().manual_seed(k)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return m


@pytest.fixture
def seed_lm():
    torch.manual_seed(0)
    return TinyParallelLM().double().eval()


@pytest.mark.parametrize("attention", ["experts", "shared_kv", "average"])
def test_upcycled_copies_of_the_seed_reproduce_the_seed(seed_lm, attention):
    tokens = torch.randint(0, 11, (3, 12))
    up = bam_upcycle(seed_lm, [seed_lm, seed_lm], attention=attention, gate="renormalized", router_std=1.0).eval()
    torch.testing.assert_close(up(tokens)[0], seed_lm(tokens)[0], atol=1e-12, rtol=0)
    _, auxes = up(tokens)
    assert auxes[0]["ffn_logits"].shape == (3, 12, 3)
    # BAM's own gate (full-softmax probability, not renormalised) scales the FFN: not the seed
    bam_gate = bam_upcycle(seed_lm, [seed_lm, seed_lm], attention=attention, router_std=1.0).eval()
    assert not torch.allclose(bam_gate(tokens)[0], seed_lm(tokens)[0])


def test_experts_come_from_the_dense_models_and_the_rest_is_averaged(seed_lm):
    specs = [_specialist(seed_lm, 1), _specialist(seed_lm, 2)]
    dense = [seed_lm, *specs]
    up = bam_upcycle(seed_lm, specs, generator=torch.Generator().manual_seed(0))
    blk = up.blocks[1]
    assert isinstance(blk.attn, MixtureOfAttention) and isinstance(blk.ffn, MoEFeedForward)
    for i, d in enumerate(dense):  # bitwise
        assert torch.equal(blk.ffn.experts[i].fc1.weight, d.blocks[1].ffn.fc1.weight)
        assert torch.equal(blk.attn.experts[i].to_k.weight, d.blocks[1].attn.to_k.weight)
        assert torch.equal(blk.attn.experts[i].proj.bias, d.blocks[1].attn.proj.bias)
    for name in ("embed.weight", "pos", "norm.weight", "head.bias", "blocks.0.norm.bias"):
        want = sum(dict(d.named_parameters())[name] for d in dense) / 3
        torch.testing.assert_close(dict(up.named_parameters())[name], want, atol=1e-12, rtol=0)
    assert 0 < blk.ffn.router.weight.std() < 0.05  # random routers, std 0.02
    shared = bam_upcycle(seed_lm, specs, attention="shared_kv")
    want_k = sum(d.blocks[0].attn.to_k.weight for d in dense) / 3
    torch.testing.assert_close(shared.blocks[0].attn.to_k.weight, want_k, atol=1e-12, rtol=0)
    btx = btx_upcycle(seed_lm, specs)
    assert isinstance(btx.blocks[0].attn, Attention) and isinstance(btx.blocks[0].ffn, MoEFeedForward)
    torch.testing.assert_close(btx.blocks[0].attn.to_q.weight, sum(d.blocks[0].attn.to_q.weight for d in dense) / 3)
    assert isinstance(seed_lm.blocks[0].attn, Attention)  # the dense models are untouched


def test_continued_training_step_reaches_experts_and_routers(seed_lm):
    up = bam_upcycle(seed_lm, [_specialist(seed_lm, 1)]).train()
    tokens = torch.randint(0, 11, (4, 12))
    logits, auxes = up(tokens)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 11), tokens[:, 1:].reshape(-1)) + moe_aux_loss(auxes)
    loss.backward()
    blk = up.blocks[0]
    assert blk.attn.router.weight.grad.abs().sum() > 0 and blk.ffn.router.weight.grad.abs().sum() > 0
    assert all(e.to_q.weight.grad.abs().sum() > 0 for e in blk.attn.experts)


def test_errors():
    with pytest.raises(ValueError, match="no ParallelBlock"):
        bam_upcycle(torch.nn.Linear(3, 3), [torch.nn.Linear(3, 3)])
    with pytest.raises(ValueError, match="parameter names or shapes"):
        bam_upcycle(TinyParallelLM(), [TinyParallelLM(dim=8)])
    with pytest.raises(ValueError, match="attention"):
        bam_upcycle(TinyParallelLM(), [], attention="mixed")

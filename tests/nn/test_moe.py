"""MoEFeedForward, ParallelBlock and the MoE auxiliary losses (spec bam.md, invariants 1, 3, 7, 8)."""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse.losses import moh_load_balance_loss, router_z_loss
from attnfuse.merge import moe_aux_loss
from attnfuse.nn import MLP, Attention, MoEFeedForward, ParallelBlock


def _moe_like(mlp: MLP, n: int, **kw) -> MoEFeedForward:
    moe = MoEFeedForward(mlp.fc1.in_features, mlp.fc1.out_features, n, **kw).double()
    for e in moe.experts:
        e.load_state_dict(mlp.state_dict())
    return moe


@pytest.mark.parametrize("gate", ["softmax_then_topk", "renormalized"])
def test_one_expert_equals_the_mlp(gate):
    torch.manual_seed(0)
    mlp = MLP(8, hidden=16).double()
    moe = _moe_like(mlp, 1, gate=gate)
    torch.nn.init.normal_(moe.router.weight, std=4.0)
    x = torch.randn(3, 5, 8, dtype=torch.float64)
    out, logits, sel = moe(x)
    torch.testing.assert_close(out, mlp(x), atol=1e-12, rtol=0)
    assert logits.shape == (3, 5, 1) and sel.shape == (3, 5, 1) and (sel == 0).all()


def test_identical_experts_depend_on_the_gate():
    torch.manual_seed(1)
    mlp = MLP(8, hidden=16).double()
    x = torch.randn(4, 6, 8, dtype=torch.float64)
    renorm = _moe_like(mlp, 3, k=1, gate="renormalized")
    torch.nn.init.normal_(renorm.router.weight, std=2.0)
    torch.testing.assert_close(renorm(x)[0], mlp(x), atol=1e-12, rtol=0)
    bam = _moe_like(mlp, 3, k=1, gate="softmax_then_topk")
    bam.router.load_state_dict(renorm.router.state_dict())
    out, logits, _ = bam(x)
    p_top = torch.softmax(logits, -1).max(-1).values  # BAM's gate: p_top * FFN, not FFN
    torch.testing.assert_close(out, p_top[..., None] * mlp(x), atol=1e-12, rtol=0)
    assert not torch.allclose(out, mlp(x))
    all_k = _moe_like(mlp, 3, k=3, gate="softmax_then_topk")  # k = N: the probabilities sum to 1
    torch.testing.assert_close(all_k(x)[0], mlp(x), atol=1e-12, rtol=0)


@pytest.mark.parametrize(("k", "gate"), [(1, "softmax_then_topk"), (2, "renormalized")])
def test_sparse_dispatch_equals_dense_reference_forward_and_backward(k, gate):
    torch.manual_seed(2)
    sparse = MoEFeedForward(8, 16, 4, k=k, gate=gate, dispatch="sparse").double()
    torch.nn.init.normal_(sparse.router.weight, std=1.0)
    dense = MoEFeedForward(8, 16, 4, k=k, gate=gate, dispatch="dense").double()
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(3, 10, 8, dtype=torch.float64)
    out_s, out_d = sparse(x)[0], dense(x)[0]
    torch.testing.assert_close(out_s, out_d)
    out_s.square().sum().backward()
    out_d.square().sum().backward()
    for (n, ps), pd in zip(sparse.named_parameters(), dense.parameters(), strict=True):
        torch.testing.assert_close(ps.grad, pd.grad, msg=n)


def test_load_balance_and_z_loss_documented_values():
    n, t = 4, 8
    uniform = torch.full((t, n), 1 / n)
    balanced = torch.arange(t).remainder(n)[:, None]  # top-1, every expert gets t / n tokens
    assert moh_load_balance_loss(uniform, balanced, normalization="code").item() == pytest.approx(1.0)
    collapsed = torch.zeros(t, n)
    collapsed[:, 0] = 1.0
    assert moh_load_balance_loss(collapsed, torch.zeros(t, 1, dtype=torch.long), normalization="code").item() == pytest.approx(n)
    assert router_z_loss(torch.zeros(t, n)).item() == pytest.approx(math.log(n) ** 2)
    logits = torch.randn(5, 7, n)
    z = router_z_loss(logits)
    assert z.item() >= 0
    torch.testing.assert_close(z, (torch.logsumexp(logits, -1) ** 2).mean())
    mask = torch.zeros(5, 7, dtype=torch.bool)
    mask[:, :3] = True
    torch.testing.assert_close(router_z_loss(logits, token_mask=mask), (torch.logsumexp(logits[:, :3], -1) ** 2).mean())
    aux = {"ffn_logits": torch.zeros(t, n), "ffn_selected": balanced}
    assert moe_aux_loss([aux, {}], alpha=0.01, beta=0.001).item() == pytest.approx(0.01 + 0.001 * math.log(n) ** 2)
    with pytest.raises(TypeError):
        router_z_loss(torch.zeros(3, 2, dtype=torch.long))


def test_parallel_block_with_zero_ffn_is_an_attention_residual_block():
    torch.manual_seed(3)
    blk = ParallelBlock(8, 2).double()
    with torch.no_grad():
        blk.ffn.fc2.weight.zero_()
        blk.ffn.fc2.bias.zero_()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    out, aux = blk(x)
    torch.testing.assert_close(out, x + blk.attn(blk.norm(x)))
    assert aux == {}
    full, _ = ParallelBlock(8, 2, attn=blk.attn, ffn=MLP(8, hidden=8).double()).double()(x)
    assert full.shape == x.shape
    with pytest.raises(ValueError, match="attn must be"):
        ParallelBlock(8, 2, attn=MLP(8, hidden=8))
    assert isinstance(blk.attn, Attention)


def test_bad_arguments():
    with pytest.raises(ValueError, match="k"):
        MoEFeedForward(8, 16, 2, k=3)
    with pytest.raises(ValueError, match="gate"):
        MoEFeedForward(8, 16, 2, gate="sigmoid")

"""MixtureOfAttention (BAM soft mixture of attention experts; spec bam.md, invariants 1, 2, 6)."""

from __future__ import annotations

import pytest
import torch

from attnfuse.nn import Attention, MixtureOfAttention


def _copy_expert(moa: MixtureOfAttention, attn: Attention) -> None:
    for expert in moa.experts:
        for name in ("to_q", "to_k", "to_v", "proj"):
            getattr(expert, name).load_state_dict(getattr(attn, name).state_dict())


@pytest.mark.parametrize(("routing", "k"), [("soft", None), ("topk", 1)])
def test_one_expert_equals_its_expert_for_any_router(routing, k):
    torch.manual_seed(0)
    moa = MixtureOfAttention(16, 4, 1, routing=routing, k=k).double()
    torch.nn.init.normal_(moa.router.weight, std=5.0)
    x = torch.randn(3, 7, 16, dtype=torch.float64)
    mask = torch.rand(3, 7) > 0.3
    out, w = moa(x, mask=mask)
    want = moa.experts[0](x, mask=mask) * mask[..., None]  # padded queries: a zero update (Attention leaves them as computed)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)
    assert torch.equal(w, mask[..., None].double())
    torch.testing.assert_close(moa(x)[0], moa.experts[0](x), atol=1e-12, rtol=0)
    out_c, _ = moa(x, is_causal=True)
    torch.testing.assert_close(out_c, moa.experts[0](x, is_causal=True), atol=1e-12, rtol=0)


@pytest.mark.parametrize("shared_kv", [False, True])
@pytest.mark.parametrize(("routing", "k"), [("soft", None), ("topk", 2)])
def test_identical_experts_equal_the_seed_attention_regardless_of_router(shared_kv, routing, k):
    torch.manual_seed(1)
    seed = Attention(16, 4).double()
    moa = MixtureOfAttention(16, 4, 3, shared_kv=shared_kv, routing=routing, k=k).double()
    _copy_expert(moa, seed)
    x = torch.randn(2, 9, 16, dtype=torch.float64)
    for std in (0.02, 3.0):
        torch.nn.init.normal_(moa.router.weight, std=std)
        out, w = moa(x)
        torch.testing.assert_close(out, seed(x), atol=1e-12, rtol=0)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 9, dtype=torch.float64))
        assert (w >= 0).all()
        if routing == "topk":
            assert ((w > 0).sum(-1) == k).all()


def test_different_experts_mix_by_the_router_weights():
    torch.manual_seed(2)
    moa = MixtureOfAttention(8, 2, 2).double()
    torch.nn.init.normal_(moa.router.weight, std=1.0)
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    out, w = moa(x)
    g = torch.softmax(x @ moa.router.weight.T, -1)  # explicit router
    want = g[..., :1] * moa.experts[0](x) + g[..., 1:] * moa.experts[1](x)
    torch.testing.assert_close(out, want)
    torch.testing.assert_close(w, g)


def test_shared_kv_is_one_module_and_one_set_of_parameters():
    moa = MixtureOfAttention(16, 2, 3, shared_kv=True)
    assert all(e.to_k is moa.to_k and e.to_v is moa.to_v for e in moa.experts)
    n_kv = sum(p.numel() for p in MixtureOfAttention(16, 2, 3).parameters())
    n_shared = sum(p.numel() for p in moa.parameters())
    assert n_kv - n_shared == 2 * 2 * (16 * 16 + 16)  # two fewer K/V pairs


def test_masks_padded_queries_get_zero_update_and_masked_keys_are_ignored():
    torch.manual_seed(3)
    moa = MixtureOfAttention(8, 2, 3)
    x = torch.randn(2, 6, 8)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[0, 4:] = False
    out, w = moa(x, mask=mask)
    assert torch.equal(out[0, 4:], torch.zeros(2, 8)) and torch.equal(w[0, 4:], torch.zeros(2, 3))
    x2 = x.clone()
    x2[0, 4:] = 100.0  # the padded tokens change: every expert ignores them as keys
    out2, _ = moa(x2, mask=mask)
    torch.testing.assert_close(out2[0, :4], out[0, :4])


def test_bad_arguments():
    with pytest.raises(ValueError, match="n_experts"):
        MixtureOfAttention(8, 2, 0)
    with pytest.raises(ValueError, match="k"):
        MixtureOfAttention(8, 2, 2, routing="topk")
    with pytest.raises(ValueError, match="routing"):
        MixtureOfAttention(8, 2, 2, routing="hard")

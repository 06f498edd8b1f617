"""HaloAttention (relative logits / bias) and RoutingAttention (LePE) against formulas written out by hand."""

from __future__ import annotations

import itertools

import pytest
import torch

from attnfuse import ops
from attnfuse.nn import HaloAttention, RoutingAttention

F64 = torch.float64


def _heads(attn, x):
    b, *grid, _ = x.shape
    qkv = attn.to_qkv(x).reshape(b, *grid, 3, attn.heads, attn.head_dim)
    return [qkv[..., i, :, :].movedim(-2, 1) for i in range(3)]  # (B, H, *grid, Dh)


@pytest.mark.parametrize("rel_pos", ["logits", "bias", None])
def test_halo_attention_matches_a_hand_written_formula(rel_pos):
    torch.manual_seed(0)
    attn = HaloAttention(12, 2, block_size=2, halo_size=1, rel_pos=rel_pos).double()
    for p in attn.rel:
        torch.nn.init.normal_(p)  # make the relative term large enough to matter
    x = torch.randn(2, 5, 4, 12, dtype=F64)
    mask = torch.rand(2, 5, 4) > 0.2
    out = attn(x, mask=mask)
    q, k, v = _heads(attn, x)
    coords = list(itertools.product(range(5), range(4)))
    n, scale = len(coords), attn.head_dim**-0.5
    s = torch.full((2, 2, n, n), float("-inf"), dtype=F64)
    for (i, (qx, qy)), (j, (kx, ky)) in itertools.product(enumerate(coords), enumerate(coords)):
        lo = ((qx // 2) * 2 - 1, (qy // 2) * 2 - 1)
        if not (lo[0] <= kx < lo[0] + 4 and lo[1] <= ky < lo[1] + 4):
            continue
        score = scale * (q[:, :, qx, qy] * k[:, :, kx, ky]).sum(-1)  # (B, H)
        dx, dy = kx - qx + 2, ky - qy + 2  # relative offset + (block + halo - 1), tables of size 5
        if rel_pos == "logits":
            score = score + q[:, :, qx, qy] @ attn.rel[0][dx] + q[:, :, qx, qy] @ attn.rel[1][dy]
        elif rel_pos == "bias":
            score = score + attn.rel[0][:, dx, dy]
        s[:, :, i, j] = torch.where(mask[:, kx, ky].unsqueeze(1), score, float("-inf"))
    w = torch.softmax(s, -1).nan_to_num(0.0)
    want = attn.proj((w @ v.reshape(2, 2, n, -1)).transpose(1, 2).reshape(2, 5, 4, -1))
    torch.testing.assert_close(out, want)
    ref = HaloAttention(12, 2, block_size=2, halo_size=1, rel_pos=rel_pos, backend="reference").double()
    ref.load_state_dict(attn.state_dict())
    torch.testing.assert_close(ref(x, mask=mask), out)


@pytest.mark.parametrize(("scale", "lepe_kernel", "want_scale"), [
    ("qk_dim", 5, 16**-0.5),  # the official module: all heads' width, 5x5 LCE (the defaults)
    ("head_dim", 3, 8**-0.5),  # per-head scale, 3x3 LCE
    (0.3, 3, 0.3),
])
def test_routing_attention_is_operator_plus_lepe(scale, lepe_kernel, want_scale):
    torch.manual_seed(1)
    attn = RoutingAttention(16, 2, regions=3, topk=2, lepe_kernel=lepe_kernel, scale=scale).double()
    x = torch.randn(2, 9, 7, 16, dtype=F64)
    mask = torch.rand(2, 9, 7) > 0.2
    out, w = attn(x, mask=mask, return_weights=True)
    assert w.shape == (2, 2, 63, 63)
    q, k, v = _heads(attn, x)
    core = ops.routing_attention(q, k, v, 3, 2, key_mask=mask, scale=want_scale)  # (B, H, 9, 7, Dh)
    v_cl = v.movedim(1, -2).reshape(2, 9, 7, 16) * mask.unsqueeze(-1)
    pad = lepe_kernel // 2
    lepe = torch.nn.functional.conv2d(v_cl.permute(0, 3, 1, 2), attn.lepe.weight, attn.lepe.bias, padding=pad, groups=16)
    want = attn.proj(core.movedim(1, -2).reshape(2, 9, 7, 16) + lepe.permute(0, 2, 3, 1))
    torch.testing.assert_close(out, want)
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in attn.parameters() if p.grad is not None)


def test_routing_defaults_are_the_official_biformer_module():
    # BiFormer's BiLevelRoutingAttention with top-k = all regions is full attention: written out here with
    # its defaults, scale = qk_dim ** -0.5 (qk_dim = C, all heads) and a 5x5 depthwise LCE on V.
    torch.manual_seed(2)
    attn = RoutingAttention(16, 4, regions=2, topk=4).double()
    assert attn.lepe.kernel_size == (5, 5) and attn.scale == 16**-0.5
    x = torch.randn(1, 6, 6, 16, dtype=F64)
    q, k, v = (attn.to_qkv(x).reshape(1, 36, 3, 4, 4)[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, N, Dh)
    s = (q @ k.transpose(-1, -2)) * 16**-0.5  # (B, H, N, N)
    core = (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(1, 6, 6, 16)
    v_img = v.transpose(1, 2).reshape(1, 6, 6, 16).permute(0, 3, 1, 2)  # (B, C, 6, 6)
    lce = torch.nn.functional.conv2d(v_img, attn.lepe.weight, attn.lepe.bias, padding=2, groups=16).permute(0, 2, 3, 1)
    torch.testing.assert_close(attn(x), attn.proj(core + lce))


def test_one_dimensional_and_errors():
    assert RoutingAttention(8, 2, regions=2, topk=1, rank=1)(torch.randn(1, 10, 8)).shape == (1, 10, 8)
    assert HaloAttention(8, 2, block_size=(3,), halo_size=(1,))(torch.randn(1, 10, 8)).shape == (1, 10, 8)
    with pytest.raises(ValueError, match="lepe_kernel must be 0 or odd"):
        RoutingAttention(8, 2, regions=2, topk=1, lepe_kernel=2)
    with pytest.raises(ValueError, match="scale must be 'qk_dim', 'head_dim' or a float"):
        RoutingAttention(8, 2, regions=2, topk=1, scale="per_head")
    with pytest.raises(ValueError, match="rel_pos must be"):
        HaloAttention(8, 2, rel_pos="sinusoid")
    with pytest.raises(ValueError, match="2-D grid"):
        HaloAttention(8, 2, block_size=2, halo_size=1)(torch.randn(1, 4, 8))
    with pytest.raises(ValueError, match="mask must be bool"):
        RoutingAttention(8, 2, regions=2, topk=1)(torch.randn(1, 4, 4, 8), mask=torch.ones(1, 4, 4))

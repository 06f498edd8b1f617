"""FactorizedEncoder: block schedule, equivalence with per-slice dense blocks, axis-order independence, masks, errors."""

from __future__ import annotations

import pytest
import torch

from attnfuse.fusion import TokenSet
from attnfuse.nn import FactorizedEncoder, TransformerBlock


def test_block_schedules():
    seq = FactorizedEncoder(8, 2, axes=("time", "space"), depth=4, mode="sequential")
    assert seq.block_axes == ("time", "time", "space", "space")
    inter = FactorizedEncoder(8, 2, axes=("time", "space"), depth=3, mode="interleaved")
    assert inter.block_axes == ("time", "space", "time")
    assert [b.attn.op.axis for b in inter.blocks] == [0, 1, 0]


def test_a_time_block_is_a_dense_block_on_every_agent_history():
    torch.manual_seed(0)
    enc = FactorizedEncoder(16, 2, axes=("time", "space"), depth=2, mode="sequential", final_norm=False).double()
    x = torch.randn(3, 5, 4, 16, dtype=torch.float64)  # (B, time, space, D)
    mask = torch.rand(3, 5, 4) > 0.2
    out = enc(TokenSet(x, mask, ("time", "space"))).x
    # the same weights in dense blocks applied slice by slice
    dense = [TransformerBlock(16, 2).double() for _ in range(2)]
    for d, b in zip(dense, enc.blocks):
        d.load_state_dict(b.state_dict())
    h = x.permute(0, 2, 1, 3).reshape(12, 5, 16)  # time slices: (B * space, time, D)
    m = mask.permute(0, 2, 1).reshape(12, 5)
    h = dense[0](h, mask=m).reshape(3, 4, 5, 16).permute(0, 2, 1, 3)  # back to (B, time, space, D)
    h = dense[1](h.reshape(15, 4, 16), mask=mask.reshape(15, 4)).reshape(3, 5, 4, 16)  # space slices
    valid = mask.unsqueeze(-1)
    torch.testing.assert_close(out * valid, h * valid)


def test_axis_order_of_the_token_set_does_not_matter():
    torch.manual_seed(1)
    enc = FactorizedEncoder(8, 2, axes=("time", "space"), depth=2, mode="interleaved")
    x, mask = torch.randn(2, 5, 3, 8), torch.rand(2, 5, 3) > 0.2
    a = enc(TokenSet(x, mask, ("time", "space")))
    b = enc(TokenSet(x.transpose(1, 2), mask.transpose(1, 2), ("space", "time")))
    assert b.axes == ("space", "time")
    torch.testing.assert_close(a.x, b.x.transpose(1, 2))


def test_one_time_block_mixes_no_agents_and_masked_tokens_do_not_leak():
    torch.manual_seed(2)
    enc = FactorizedEncoder(8, 2, axes=("time", "space"), depth=1, mode="interleaved", final_norm=False)
    x = torch.randn(1, 4, 3, 8, requires_grad=True)
    out = enc(TokenSet(x, axes=("time", "space"))).x
    grad = torch.autograd.grad(out[0, :, 0].sum(), x)[0]
    assert grad[0, :, 1:].abs().sum() == 0 and grad[0, :, 0].abs().sum() > 0  # agent 0 only sees agent 0
    mask = torch.ones(1, 4, 3, dtype=torch.bool)
    mask[0, 2, 1] = False
    enc2 = FactorizedEncoder(8, 2, axes=("time", "space"), depth=2, mode="interleaved")
    base = enc2(TokenSet(x.detach(), mask, ("time", "space"))).x
    x2 = x.detach().clone()
    x2[0, 2, 1] += 10.0
    moved = enc2(TokenSet(x2, mask, ("time", "space"))).x
    torch.testing.assert_close(base[mask], moved[mask])


def test_weights_and_gradients():
    enc = FactorizedEncoder(8, 2, axes=("a", "b", "c"), depth=3)
    x = torch.randn(2, 2, 3, 4, 8, requires_grad=True)
    out, maps = enc(TokenSet(x, axes=("c", "a", "b")), return_weights=True)
    assert out.x.shape == x.shape and len(maps) == 3 and maps[0].shape == (2, 2, 24, 24)
    out.x.sum().backward()
    assert torch.isfinite(x.grad).all()


def test_bad_arguments():
    with pytest.raises(ValueError, match="distinct axis names"):
        FactorizedEncoder(8, 2, axes=("time", "time"), depth=2)
    with pytest.raises(ValueError, match="divisible by len"):
        FactorizedEncoder(8, 2, axes=("time", "space"), depth=3, mode="sequential")
    with pytest.raises(ValueError, match="mode must be"):
        FactorizedEncoder(8, 2, depth=2, mode="parallel")
    with pytest.raises(ValueError, match="must not set 'axis'"):
        FactorizedEncoder(8, 2, depth=2, op_options={"axis": 1})
    enc = FactorizedEncoder(8, 2, axes=("time", "space"), depth=2)
    with pytest.raises(ValueError, match=r"token set axes \('time', 'agent'\) must be exactly the encoder axes"):
        enc(TokenSet(torch.randn(1, 2, 3, 8), axes=("time", "agent")))
    with pytest.raises(ValueError, match="must be exactly"):
        enc(TokenSet(torch.randn(1, 2, 8), axes=("time",)))
    with pytest.raises(TypeError, match="takes a TokenSet"):
        enc(torch.randn(1, 2, 3, 8))

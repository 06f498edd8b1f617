"""Pooled gates (attnfuse.nn.gates): coordinate attention invariants, official / timm parity, SE, DFYP RCA."""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
import types

import pytest
import torch
from torch import nn

from attnfuse.nn.gates import CoordinateAttention, ResolutionAwareChannelAttention, SqueezeExcite, make_divisible


class OfficialCoordAtt(nn.Module):
    """Independent re-statement of houqb/CoordAttention ``coordatt.py::CoordAtt`` (test oracle, own code).

    Adaptive average pools to (H, 1) and (1, W), the W strip transposed to a column, concatenated along H,
    1x1 conv (bias) -> BatchNorm2d -> x·relu6(x + 3)/6 -> split -> two 1x1 convs (bias) -> sigmoid;
    out = x · a_w · a_h. Attribute names as released so that state dicts are interchangeable.
    """

    def __init__(self, inp: int, reduction: int = 32) -> None:
        super().__init__()
        mip = max(8, inp // reduction)
        self.conv1 = nn.Conv2d(inp, mip, 1)
        self.bn1 = nn.BatchNorm2d(mip)
        self.conv_h = nn.Conv2d(mip, inp, 1)
        self.conv_w = nn.Conv2d(mip, inp, 1)

    def forward(self, x):
        h, w = x.shape[-2:]
        pooled_h = nn.functional.adaptive_avg_pool2d(x, (h, 1))  # (n, c, h, 1)
        pooled_w = nn.functional.adaptive_avg_pool2d(x, (1, w)).transpose(2, 3)  # (n, c, w, 1)
        y = self.bn1(self.conv1(torch.cat((pooled_h, pooled_w), 2)))
        y = y * nn.functional.relu6(y + 3) / 6
        y_h, y_w = y[:, :, :h], y[:, :, h:].transpose(2, 3)
        return x * torch.sigmoid(self.conv_w(y_w)) * torch.sigmoid(self.conv_h(y_h))


def _timm_layers():
    """timm 1.0.31's ``layers.coord_attn`` and ``layers.squeeze_excite``; skipped when timm is absent.

    timm's package ``__init__`` needs torchvision (no CPU wheel matches the CPU torch here), so when that
    import fails the two layer files are loaded from timm's folder under a private package name.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None:
        pytest.skip("timm not installed (pip install 'attnfuse[vision-ref]')")
    try:
        from timm.layers import coord_attn, squeeze_excite
        return coord_attn, squeeze_excite
    except Exception:  # torchvision missing or mismatched
        name = "_attnfuse_timm_layers"
        if name not in sys.modules:
            pkg = types.ModuleType(name)
            pkg.__path__ = [os.path.join(os.path.dirname(spec.origin), "layers")]
            sys.modules[name] = pkg
        return importlib.import_module(f"{name}.coord_attn"), importlib.import_module(f"{name}.squeeze_excite")


def _randomise(module: nn.Module) -> None:
    torch.manual_seed(3)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
        for name, b in module.named_buffers():
            if name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
            elif name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)


# ------------------------------------------------------------------------------------ official / timm parity
@pytest.mark.parametrize("channels,shape", [(64, (2, 9, 7)), (16, (3, 5, 5)), (384, (1, 4, 6))])
@pytest.mark.parametrize("train", [False, True])
def test_official_parity_with_copied_weights(channels, shape, train):
    ref = OfficialCoordAtt(channels)
    _randomise(ref)
    ca = CoordinateAttention(channels, preset="official")
    ca.load_state_dict(ref.state_dict())  # same names and shapes: a released checkpoint loads as it is
    assert ca.width == max(8, channels // 32)
    ref.train(train), ca.train(train)
    x = torch.randn(shape[0], channels, *shape[1:])
    torch.testing.assert_close(ca(x), ref(x), atol=1e-6, rtol=1e-5)
    if train:  # BN statistics pooled over both directions' strips: running stats agree too
        torch.testing.assert_close(ca.bn1.running_mean, ref.bn1.running_mean)


def test_parameter_count_and_widths():
    assert sum(p.numel() for p in CoordinateAttention(64).parameters()) == 1688
    assert sum(p.numel() for p in CoordinateAttention(64, preset="timm").parameters()) == 1552
    for c, official, timm_w in [(16, 8, 8), (192, 8, 8), (384, 12, 16), (576, 18, 24), (960, 30, 40)]:
        assert CoordinateAttention(c).width == official
        assert CoordinateAttention(c, preset="timm").width == timm_w
    assert make_divisible(64 / 24, 8, round_limit=0.0) == 8


@pytest.mark.parametrize("channels", [32, 384])
def test_timm_coordattn_parity(channels):
    coord_attn, _ = _timm_layers()
    ref = coord_attn.CoordAttn(channels)
    _randomise(ref)
    ref.eval()
    ca = CoordinateAttention(channels, preset="timm").eval()
    ca.load_state_dict(ref.state_dict())
    x = torch.randn(2, channels, 6, 5)
    torch.testing.assert_close(ca(x), ref(x), atol=1e-6, rtol=1e-5)
    skip_ref = coord_attn.CoordAttn(channels, has_skip=True, gate_layer="hardsigmoid").eval()
    skip_ref.load_state_dict(ref.state_dict())
    ours = CoordinateAttention(channels, preset="timm", skip=True, gate="hardsigmoid").eval()
    ours.load_state_dict(ref.state_dict())
    torch.testing.assert_close(ours(x), skip_ref(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("pools,add_maxpool", [(("avg",), False)])
def test_timm_se_parity(pools, add_maxpool):
    _, squeeze_excite = _timm_layers()
    ref = squeeze_excite.SEModule(64)  # hidden = make_divisible(64 / 16, 8) = 8, biases, ReLU
    _randomise(ref)
    se = SqueezeExcite(64, hidden=8, pools=pools)
    with torch.no_grad():
        se.fc1.weight.copy_(ref.fc1.weight.flatten(1)), se.fc1.bias.copy_(ref.fc1.bias)
        se.fc2.weight.copy_(ref.fc2.weight.flatten(1)), se.fc2.bias.copy_(ref.fc2.bias)
    x = torch.randn(2, 64, 5, 6)
    torch.testing.assert_close(se(x), ref(x), atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------ CA invariants
def _ca(**kw) -> CoordinateAttention:
    torch.manual_seed(0)
    ca = CoordinateAttention(16, reduction=4, **kw)
    _randomise(ca)
    return ca.eval()


def test_rank_one_gate_and_bounds():
    ca = _ca()
    x = torch.rand(2, 16, 6, 9) + 0.5  # nonzero, so y / x is the gate
    y, g_h, g_w = ca(x, return_gates=True)
    assert g_h.shape == (2, 16, 6, 1) and g_w.shape == (2, 16, 1, 9)
    gate = y / x
    torch.testing.assert_close(gate, g_h * g_w, atol=1e-6, rtol=1e-5)
    s = torch.linalg.svdvals(gate.double())  # (2, 16, 6)
    assert (s[..., 1] / s[..., 0]).max() < 1e-6
    assert ((gate > 0) & (gate < 1)).all() and (y.abs() <= x.abs()).all()
    x0 = x.clone()
    x0[:, :, 2, 3] = 0
    assert (ca(x0)[:, :, 2, 3] == 0).all()


@pytest.mark.parametrize("axis", [2, 3])
def test_axis_permutation_equivariance_but_not_pixels(axis):
    ca = _ca()
    x = torch.randn(2, 16, 6, 7)
    perm = torch.randperm(x.shape[axis], generator=torch.Generator().manual_seed(axis))
    torch.testing.assert_close(ca(x.index_select(axis, perm)), ca(x).index_select(axis, perm), atol=1e-6, rtol=1e-5)
    pix = torch.randperm(42, generator=torch.Generator().manual_seed(9))
    scrambled = x.flatten(2)[..., pix].view_as(x)
    err = (ca(scrambled).flatten(2) - ca(x).flatten(2)[..., pix]).abs().max()
    assert err > 1e-3  # a pixel permutation does not commute: CA is not a pointwise gate


@pytest.mark.parametrize("hw", [(6, 6), (5, 8)])
def test_hw_swap_equivariance_with_shared_convs(hw):
    x = torch.randn(2, 16, *hw)
    shared = _ca(share_hw=True)
    assert shared.conv_h is shared.conv_w
    torch.testing.assert_close(shared(x.transpose(2, 3)), shared(x).transpose(2, 3), atol=1e-6, rtol=1e-5)
    separate = _ca()
    assert (separate(x.transpose(2, 3)) - separate(x).transpose(2, 3)).abs().max() > 1e-3


def test_zero_head_convs_give_quarter_and_skip():
    ca = _ca()
    with torch.no_grad():
        for conv in (ca.conv_h, ca.conv_w):
            conv.weight.zero_(), conv.bias.zero_()
    x = torch.randn(2, 16, 4, 5)
    assert torch.equal(ca(x), x * 0.5 * 0.5)
    skip = _ca(skip=True)
    plain = _ca()
    torch.testing.assert_close(skip(x), x + plain(x))


def test_constant_input_reduces_to_channel_gate_and_1x1():
    ca = _ca()
    x = torch.randn(2, 16, 1, 1).expand(2, 16, 5, 6).contiguous()
    _, g_h, g_w = ca(x, return_gates=True)
    torch.testing.assert_close(g_h, g_h[:, :, :1].expand_as(g_h))
    torch.testing.assert_close(g_w, g_w[..., :1].expand_as(g_w))
    assert ca(torch.randn(2, 16, 1, 1)).shape == (2, 16, 1, 1)


def test_batch_independence_eval_not_train():
    ca = _ca()
    x = torch.randn(3, 16, 4, 5)
    torch.testing.assert_close(ca(x)[:1], ca(x[:1]))
    ca.train()
    assert (ca(x)[:1] - ca(x[:1])).abs().max() > 1e-4


def test_three_d_and_directions():
    ca = CoordinateAttention(16, reduction=4, axes=3).eval()
    _randomise(ca)
    x = torch.rand(2, 16, 3, 4, 5) + 0.5
    y, g_t, g_h, g_w = ca(x, return_gates=True)
    assert g_t.shape == (2, 16, 3, 1, 1) and g_h.shape == (2, 16, 1, 4, 1) and g_w.shape == (2, 16, 1, 1, 5)
    torch.testing.assert_close(y, x * g_t * g_h * g_w)
    for axis in (2, 3, 4):  # permutation along each axis commutes; flips are a special case
        torch.testing.assert_close(ca(x.flip(axis)), ca(x).flip(axis), atol=1e-6, rtol=1e-5)
    h_only = CoordinateAttention(16, reduction=4, directions=("h",)).eval()
    y, g_h = h_only(torch.randn(2, 16, 4, 5), return_gates=True)
    assert g_h.shape == (2, 16, 4, 1) and not hasattr(h_only, "conv_w")


def test_errors():
    with pytest.raises(ValueError, match="C=16"):
        CoordinateAttention(16)(torch.randn(2, 8, 4, 4))
    with pytest.raises(ValueError, match="preset"):
        CoordinateAttention(16, preset="paper")
    with pytest.raises(ValueError, match="directions"):
        CoordinateAttention(16, directions=("t",))
    with pytest.raises(ValueError, match="pools"):
        SqueezeExcite(16, pools=("avg", "dct"))


# ------------------------------------------------------------------------------------------- SE and RCA
def test_se_pools_and_gate():
    torch.manual_seed(0)
    x = torch.randn(2, 16, 5, 6)
    se = SqueezeExcite(16, reduction=4, pools=("avg", "max"), bias=False)
    y, g = se(x, return_gate=True)
    want = torch.sigmoid(se.fc2(torch.relu(se.fc1(x.mean((2, 3))))) + se.fc2(torch.relu(se.fc1(x.amax((2, 3))))))
    torch.testing.assert_close(g, want)
    torch.testing.assert_close(y, x * want[..., None, None])
    pix = torch.randperm(30)
    torch.testing.assert_close(se(x.flatten(2)[..., pix].view_as(x)), y.flatten(2)[..., pix].view_as(x))


def test_se_dct_pool_is_fcanet():
    torch.manual_seed(0)
    se = SqueezeExcite(16, reduction=16, pools="dct", dct_size=(14, 14), bias=False)
    x = torch.randn(2, 16, 28, 21)
    y, g = se(x, return_gate=True)
    pooled = nn.functional.adaptive_avg_pool2d(x, (14, 14))
    z = (pooled * se.dct_weight.unsqueeze(0)).sum((2, 3))  # one basis image per channel (16 freqs, 16 channels)
    torch.testing.assert_close(g, torch.sigmoid(se.fc2(torch.relu(se.fc1(z)))))
    assert y.shape == x.shape
    torch.testing.assert_close(se.dct_weight[0], torch.full((14, 14), 1 / 14))  # (0, 0): constant 1/sqrt(hw)


def test_rca_presets_widths_and_permutation():
    modis = ResolutionAwareChannelAttention(9, source="modis")
    assert modis.fc1.out_features == 1 and modis.pools == ("max",) and modis.fc1.bias is None
    sentinel = ResolutionAwareChannelAttention(3, source="sentinel")
    assert sentinel.fc1.out_features == 1 and sentinel.pools == ("avg",)
    x = torch.randn(2, 9, 8, 8)
    _, g = modis(x, return_gate=True)
    assert ((g > 0) & (g < 1)).all()
    pix = torch.randperm(64)
    torch.testing.assert_close(modis(x.flatten(2)[..., pix].view_as(x)), modis(x).flatten(2)[..., pix].view_as(x))
    with pytest.raises(ValueError, match="source"):
        ResolutionAwareChannelAttention(9, source="landsat")


def test_mpfnet_released_variant_is_a_pointwise_gate():
    torch.manual_seed(4)
    for axes, shape in ((2, (2, 16, 5, 6)), (3, (2, 16, 3, 4, 5))):
        released = CoordinateAttention(16, axes=axes, variant="released").eval()
        x = torch.randn(shape)
        n = x[0, 0].numel()
        pix = torch.randperm(n)
        scrambled = x.flatten(2)[..., pix].view_as(x)
        # equivariant to ANY voxel permutation (no pooling), unlike the strip-pooled block (tested above)
        torch.testing.assert_close(released(scrambled).flatten(2), released(x).flatten(2)[..., pix])
        y, g_c, g_s = released(x, return_gates=True)
        torch.testing.assert_close(y, x * g_c * g_s)
        assert ((g_c > 0) & (g_c < 1)).all() and (y.abs() <= x.abs()).all()
    with pytest.raises(ValueError, match="variant"):
        CoordinateAttention(16, variant="paper")


def test_se_gate_fixed_at_one_is_identity():
    se = SqueezeExcite(8, reduction=2)
    with torch.no_grad():
        se.fc2.weight.zero_(), se.fc2.bias.fill_(60.0)  # sigmoid(60) == 1 in float32
    x = torch.randn(2, 8, 3, 4)
    assert torch.equal(se(x), x)


@pytest.mark.parametrize("shape,axes", [((2, 3, 4, 5), (0, 1)), ((1, 2, 1, 4), (0, 1)), ((2, 2, 3, 4), (1,)),
                                        ((1, 2, 3, 2, 4), (0, 1, 2)), ((1, 2, 3, 1, 4), (0, 2))])
def test_gate_product_backward_matches_autograd(shape, axes):
    from attnfuse.nn.gates import _GateProduct

    torch.manual_seed(5)
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    gates = []
    for a in axes:
        gshape = [shape[0], shape[1]] + [1] * (len(shape) - 2)
        gshape[2 + a] = shape[2 + a]
        gates.append(torch.rand(gshape, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda x, *g: _GateProduct.apply(axes, x, *g), (x, *gates))
    chain = x
    for g in reversed(gates):
        chain = chain * g
    torch.testing.assert_close(_GateProduct.apply(axes, x, *gates), chain)

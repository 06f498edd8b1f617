"""Frequency / wavelet blocks (attnfuse.nn.frequency): FSAM, ALC, FDCA, PFM, AFFN, WDAM — intended vs released."""

from __future__ import annotations

import pytest
import torch

from attnfuse.nn.frequency import (
    AdaptiveLaplacianConv,
    AutocorrelationFFN,
    FrequencyCrossAttention,
    FrequencySpatialAttention,
    PhaseFusion,
    WaveletDirectionalAttention,
    _shift_mask,
)
from attnfuse.ops.frequency import patch_autocorrelation
from attnfuse.ops.wavelet import haar_dwt, haar_idwt


# ------------------------------------------------------------------------------------------------ FSAM
def test_fsam_gates_bound_output_and_stats():
    torch.manual_seed(0)
    fsam = FrequencySpatialAttention(16, reduction=4, dct_size=(14, 14))
    x = torch.randn(2, 16, 9, 11)
    y = fsam(x)
    assert y.shape == x.shape and (y.abs() <= x.abs() + 1e-7).all()
    xc = fsam.channel_gate(x)
    s = torch.sigmoid(fsam.spatial(torch.cat([xc.amax(1, keepdim=True), xc.std(1, keepdim=True)], 1)))
    torch.testing.assert_close(y, xc * s)
    with pytest.raises(ValueError, match="pools"):
        FrequencySpatialAttention(16, pools=("max", "min"))


# ------------------------------------------------------------------------------------------------- ALC
def test_alc_init_kernel_and_harmonic_fields():
    alc = AdaptiveLaplacianConv(2)
    w = alc.weight
    assert (w[:, :, 1, 1, 1] == -6).all() and w.sum() == 0 and ((w != 0).sum((2, 3, 4)) == 7).all()
    d, h, ww = torch.meshgrid(torch.arange(6.0), torch.arange(7.0), torch.arange(8.0), indexing="ij")
    affine = (0.5 * d - 0.25 * h + 0.125 * ww + 1.0).expand(1, 2, 6, 7, 8)
    y = alc(affine)
    torch.testing.assert_close(y[..., 1:-1, 1:-1, 1:-1], affine[..., 1:-1, 1:-1, 1:-1], atol=1e-5, rtol=1e-6)
    const = torch.full((1, 2, 5, 5, 5), 3.0)
    torch.testing.assert_close(alc(const)[..., 1:-1, 1:-1, 1:-1], const[..., 1:-1, 1:-1, 1:-1])
    assert (alc(const)[..., 0, :, :] != 3.0).any()  # zero padding changes the border
    assert alc.regularizer() == 0


def test_alc_fisher_freeze_resets_and_blocks_gradient():
    torch.manual_seed(1)
    alc = AdaptiveLaplacianConv(2)
    with torch.no_grad():
        alc.weight.add_(0.1 * torch.randn_like(alc.weight))
    fisher = torch.rand_like(alc.weight)
    fisher[0, 1, 0, 0, 0] = 100.0
    n = alc.freeze_by_fisher(fisher)
    assert n >= 1 and alc.frozen[0, 1, 0, 0, 0]
    assert torch.equal(alc.weight[alc.frozen], alc.laplacian[alc.frozen])
    alc(torch.randn(1, 2, 4, 4, 4)).square().sum().backward()
    assert (alc.weight.grad[alc.frozen] == 0).all() and alc.weight.grad[~alc.frozen].abs().sum() > 0


# ------------------------------------------------------------------------------------------------ FDCA
def _fdca(variant="intended", uncertainty=False, zero=False, open_gates=False):
    torch.manual_seed(2)
    m = FrequencyCrossAttention(16, slices=4, variant=variant, uncertainty=uncertainty)
    if zero or open_gates:
        with torch.no_grad():
            for p in m.parameters():
                p.zero_()
            if open_gates:  # sigmoid(60) == 1 in float32: every gate fixed at 1
                m.semantic[2].bias.fill_(60.0), m.positional.bias.fill_(60.0), m.slice[2].bias.fill_(60.0)
    return m.eval()


def test_fdca_open_gates_is_identity_and_homogeneity_degrees():
    x = torch.randn(2, 16, 4, 5, 6)
    torch.testing.assert_close(_fdca(open_gates=True)(x), x, atol=1e-5, rtol=1e-5)  # unitary FFT
    intended, released = _fdca(zero=True), _fdca("released", zero=True)  # constant gates 1/2
    torch.testing.assert_close(intended(x), x / 8, atol=1e-6, rtol=1e-5)
    ratio_i = intended(2 * x).norm() / intended(x).norm()
    ratio_r = released(2 * x).norm() / released(x).norm()
    assert abs(ratio_i - 2) < 1e-4 and abs(ratio_r / 256 - 1) < 1e-4  # degree 1 vs degree 8


def test_fdca_determinism_batch_safety_and_slices():
    x = torch.randn(3, 16, 4, 5, 6)
    m = _fdca(uncertainty=True)
    torch.testing.assert_close(m(x), m(x))  # intended: the mean in eval mode
    torch.testing.assert_close(m(x)[1:2], m(x[1:2]), atol=1e-6, rtol=1e-5)
    r = _fdca("released", uncertainty=True)
    r.load_state_dict(m.state_dict())
    torch.manual_seed(0)
    assert (r(x) - r(x)).abs().max() > 1e-4  # released: sampled at inference
    m.train()
    out = m(x)
    out.square().sum().backward()
    assert m.lin_factor.bias.grad.abs().sum() > 0 and m.lin_diag.bias.grad.abs().sum() > 0  # reparameterised
    r.train()
    r.zero_grad()
    r(x).square().sum().backward()
    assert r.lin_mean.bias.grad is None or r.lin_mean.bias.grad.abs().sum() == 0  # released: dead parameters
    with pytest.raises(ValueError, match="slices=4"):
        m(torch.randn(1, 16, 5, 5, 6))


# ------------------------------------------------------------------------------------------------- PFM
def test_pfm_released_gate_input_is_one_and_ignores_reference():
    torch.manual_seed(3)
    x = torch.randn(2, 12, 8, 8)
    f1, f2, f3 = x.split(4, 1)
    rel = PhaseFusion(4, variant="released")
    torch.testing.assert_close(rel.gate_input(f1, f2), torch.ones(2, 4, 8, 5), atol=1e-6, rtol=0)
    with torch.no_grad():
        rel.merge.weight[:, 4:8].zero_()  # the reference frame's direct path off
    other = torch.cat([f1, torch.randn_like(f2), f3], 1)
    torch.testing.assert_close(rel(other), rel(x), atol=1e-5, rtol=1e-5)  # gated paths ignore frame 2
    intended = PhaseFusion(4)
    intended.load_state_dict(rel.state_dict())
    assert (intended(other) - intended(x)).abs().max() > 1e-3
    same = torch.cat([f1, f1, f3], 1)
    torch.testing.assert_close(intended.gate_input(f1, f1), torch.ones(2, 4, 8, 5), atol=1e-5, rtol=0)
    assert intended(same).shape == (2, 4, 8, 8)
    with pytest.raises(ValueError, match="three frames"):
        intended(torch.randn(2, 8, 8, 8))


# ------------------------------------------------------------------------------------------------ AFFN
def test_affn_algebra_and_released_equivalence():
    torch.manual_seed(4)
    z = torch.randn(2, 2 * int(4 * 2.66), 8, 8)
    m = AutocorrelationFFN(4, patch=4)
    torch.testing.assert_close(m.patch_map(z), z + patch_autocorrelation(z, patch=4), atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        m.lam.zero_()
    torch.testing.assert_close(m.patch_map(z), z, atol=1e-5, rtol=1e-5)  # W = 1, λ = 0: identity patch map
    rel = AutocorrelationFFN(4, patch=4, variant="released")
    x = torch.randn(2, 4, 8, 8)
    outs = []
    for a, b in ((0.9, 0.1), (0.5, 0.5)):
        with torch.no_grad():
            rel.alpha.fill_(a), rel.beta.fill_(b)
        outs.append(rel(x))
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)  # only α + β matters
    state = {k: v for k, v in rel.state_dict().items() if k not in ("alpha", "beta")}
    m.load_state_dict({**state, "lam": rel.alpha.detach() + rel.beta.detach()})
    torch.testing.assert_close(m(x), outs[1], atol=1e-5, rtol=1e-5)
    assert (m(2 * x) - 2 * m(x)).abs().max() > 1e-3  # not positively homogeneous


# ------------------------------------------------------------------------------------------------ WDAM
def test_wdam_shapes_and_released_dead_projections():
    torch.manual_seed(5)
    x = torch.randn(2, 4, 16, 16)
    for variant, dead in (("released", True), ("intended", False)):
        m = WaveletDirectionalAttention(4, heads=2, window=4, variant=variant)
        out = m(x)
        assert out.shape == x.shape
        out.square().sum().backward()
        qk_grad = m.qkv.weight.grad[:8].abs().sum()  # rows producing q̃ and k̃
        assert (qk_grad == 0) == dead
        assert m.qkv.weight.grad[8:].abs().sum() > 0


def test_wdam_identity_paths_and_shift_mask():
    torch.manual_seed(6)
    m = WaveletDirectionalAttention(4, heads=1, window=4)
    with torch.no_grad():
        m.project_out.weight.zero_()
        m.details.weight.zero_()
    x = torch.randn(1, 4, 16, 16)
    torch.testing.assert_close(m(x), torch.zeros_like(x), atol=1e-6, rtol=0)  # every band zero -> zero image
    mask = _shift_mask(8, 8, 4, 2, "cpu")
    assert mask.shape == (4, 16, 16) and mask[0].all() and not mask[-1].all()
    small = WaveletDirectionalAttention(4, window=8)
    assert small(torch.randn(1, 4, 8, 8)).shape == (1, 4, 8, 8)  # LL 4x4 < window: window shrinks, no shift
    with pytest.raises(ValueError, match="divisible"):
        WaveletDirectionalAttention(4, window=4)(torch.randn(1, 4, 12, 20))
    with pytest.raises(ValueError, match="sequence-layout"):
        WaveletDirectionalAttention(4, op="neighborhood")


def test_wdam_single_window_equals_direct_formula():
    """One window covering the LL band (no shift): WDAM equals the formula written out with plain tensor ops."""
    torch.manual_seed(7)
    m = WaveletDirectionalAttention(4, heads=2, window=4).eval()
    with torch.no_grad():
        m.rel_bias.normal_()
        m.temperature.copy_(torch.tensor([1.5, 0.5]).view(2, 1, 1))
    x = torch.randn(2, 4, 8, 8)
    bands = haar_dwt(x)
    ll, lh, hl, hh = bands.unbind(2)
    guide = torch.relu(m.guide_pw(torch.relu(m.guide_dw(torch.cat([lh, hl], 1)))))
    q, k, v = m.qkv_dw(m.qkv(ll)).chunk(3, 1)
    v = v * (1 + guide)
    tok = lambda t: t.flatten(2).unflatten(1, (2, 2)).transpose(-1, -2)  # (B, heads, 16, d)  # noqa: E731
    qn, kn = torch.nn.functional.normalize(tok(q), dim=-1), torch.nn.functional.normalize(tok(k), dim=-1)
    coords = torch.stack(torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")).flatten(1)
    rel = coords[:, :, None] - coords[:, None, :] + 3
    bias = m.rel_bias[rel[0] * 7 + rel[1]].permute(2, 0, 1)  # (heads, 16, 16)
    attn = torch.softmax(m.temperature * qn @ kn.transpose(-1, -2) + bias, dim=-1)
    out = (attn @ tok(v)).transpose(-1, -2).flatten(1, 2).unflatten(-1, (4, 4))  # (B, C, 4, 4)
    out = m.project_out(out)
    details = m.details(torch.cat([lh, hl, hh], 1)).unflatten(1, (3, 4)).transpose(1, 2)
    want = haar_idwt(torch.cat([out.unsqueeze(2), details], 2))
    torch.testing.assert_close(m(x), want, atol=1e-5, rtol=1e-5)


class _ReleasedFDCA(torch.nn.Module):
    """Independent re-statement of VinyehShaw/HFF ``FrequencyCrossAttention`` without the Gaussian slice gate, for
    batch 1 (test oracle, own code): each sub-module returns ``R ⊙ a`` and the caller multiplies R and I by it."""

    def __init__(self, m: FrequencyCrossAttention) -> None:
        super().__init__()
        self.m = m

    def forward(self, x):
        spec = torch.fft.fftn(x, dim=(2, 3, 4), norm="ortho")
        r, i = spec.real, spec.imag
        sem = self.m.semantic
        a = torch.sigmoid(sem(r.amax((2, 3, 4)).squeeze()) + sem(r.mean((2, 3, 4)).squeeze()))
        t = r * a.view(1, -1, 1, 1, 1)
        r, i = r * t, i * t
        a = torch.sigmoid(self.m.positional(torch.cat([r.amax(1, keepdim=True).amax(2, keepdim=True),
                                                       r.mean((1, 2), keepdim=True)], 1)))
        t = r * a
        r, i = r * t, i * t
        sl = self.m.slice
        a = torch.sigmoid(sl(r.amax((1, 3, 4))) + sl(r.mean((1, 3, 4))))
        t = r * a.view(1, 1, -1, 1, 1)
        r, i = r * t, i * t
        return torch.fft.ifftn(torch.complex(r, i), dim=(2, 3, 4), norm="ortho").real


def test_fdca_released_matches_restated_official_block():
    torch.manual_seed(8)
    m = FrequencyCrossAttention(16, slices=4, variant="released").eval()
    x = 0.5 * torch.randn(1, 16, 4, 5, 6)
    torch.testing.assert_close(m(x), _ReleasedFDCA(m)(x), atol=1e-6, rtol=1e-5)


def test_wdam_intended_passes_the_swin_mask_and_shifts_v():
    torch.manual_seed(9)
    seen = {}
    for variant in ("intended", "released"):
        m = WaveletDirectionalAttention(4, heads=1, window=4, shift=2, variant=variant)
        fn = m.op.fn

        def spy(q, k, v, *, variant=variant, fn=fn, **kw):
            seen[variant] = kw.get("mask")
            return fn(q, k, v, **kw)

        m.op = type(m.op)(**{**m.op.__dict__, "fn": spy})
        assert m(torch.randn(2, 4, 16, 16)).shape == (2, 4, 16, 16)
    assert seen["released"] is None  # no shifted-window mask in the released code
    mask = seen["intended"]
    assert mask.shape == (2 * 4, 1, 16, 16)  # (B·nW, 1, L, L): 2x2 windows of 4x4 on the 8x8 LL band
    assert mask[0].all() and not mask[3].all()  # the first window has one region, the last has four
    torch.testing.assert_close(mask[3, 0].float().sum(-1), torch.full((16,), 4.0))  # 4 tokens per region

"""Parameter-free frequency ops (attnfuse.ops.frequency): phase correlation, autocorrelation, DCT, kernels, FFT split."""

from __future__ import annotations

import math

import pytest
import torch

from attnfuse.ops.frequency import (
    circular_autocorrelation_reference,
    dct_basis,
    dct_pool,
    estimate_shift,
    fcanet_frequencies,
    fftn_ortho,
    frequency_decomposition,
    gaussian_lowpass,
    gradient_magnitude,
    ifftn_ortho,
    laplacian_kernel_3d,
    oriented_highpass,
    patch_autocorrelation,
    patchify,
    phase_agreement,
    phase_correlation,
    scharr_kernel,
    sobel_kernel,
    unpatchify,
)


@pytest.mark.parametrize("shift", [(0, 0), (3, 5), (7, 1), (15, 11)])
def test_phase_correlation_recovers_integer_circular_shift(shift):
    torch.manual_seed(0)
    b = torch.randn(2, 3, 16, 12, dtype=torch.float64)
    a = torch.roll(b, shift, dims=(-2, -1))
    surface = phase_correlation(a, b)
    want = torch.zeros(16, 12, dtype=torch.float64)
    want[shift[0] % 16, shift[1] % 12] = 1.0
    torch.testing.assert_close(surface, want.expand_as(surface), atol=1e-7, rtol=0)  # a unit impulse at s (eps = 1e-8)
    got = estimate_shift(a, b)
    assert got.shape == (2, 3, 2) and (got == torch.tensor([shift[0] % 16, shift[1] % 12])).all()
    a32, b32 = a.float(), b.float()
    assert (estimate_shift(a32, b32) == got).all()  # exact in float32 too


def test_phase_correlation_3d_and_agreement():
    torch.manual_seed(1)
    b = torch.randn(1, 1, 6, 8, 10)
    a = torch.roll(b, (2, 7, 3), dims=(-3, -2, -1))
    assert estimate_shift(a, b, dims=3).tolist() == [[[2, 7, 3]]]
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(phase_agreement(x, x), torch.ones(2, 3, 8, 5), atol=1e-5, rtol=0)
    agree = phase_agreement(x, torch.randn(2, 3, 8, 8))
    assert agree.min() >= -1 - 1e-6 and agree.max() <= 1 + 1e-6 and agree.min() < 0
    with pytest.raises(ValueError, match="same shape"):
        phase_correlation(x, x[..., :4])


def test_patch_autocorrelation_matches_direct_sum_and_invariances():
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 8, dtype=torch.float64)
    r = patch_autocorrelation(x, patch=8)
    want = unpatchify(circular_autocorrelation_reference(patchify(x, 8)))
    torch.testing.assert_close(r, want, atol=1e-10, rtol=0)
    patch = x[0, 0, :8, :8]
    shifted = torch.roll(patch, (3, 2), (0, 1))
    torch.testing.assert_close(patch_autocorrelation(shifted, patch=8), patch_autocorrelation(patch, patch=8))
    rows = torch.randn(4, 8, dtype=torch.float64).repeat(2, 1)  # rows periodic with period 4
    rr = patch_autocorrelation(rows, patch=8)
    torch.testing.assert_close(rr[:4], rr[4:])
    with pytest.raises(ValueError, match="divisible"):
        patch_autocorrelation(torch.randn(1, 1, 12, 8), patch=8)


def test_dct_basis_orthonormal_and_fcanet_lists():
    freqs = fcanet_frequencies("top16", (224, 224))
    assert freqs[:3] == [(0, 0), (0, 32), (6 * 32, 0)] and len(freqs) == 16
    basis = dct_basis(224, 224, freqs, dtype=torch.float64)
    gram = basis.flatten(1) @ basis.flatten(1).T
    assert (gram - torch.eye(16, dtype=torch.float64)).abs().max() < 1e-5
    torch.testing.assert_close(basis[0], torch.full((224, 224), 1 / 224, dtype=torch.float64))
    x = torch.randn(2, 16, 224, 224, dtype=torch.float64)
    z = dct_pool(x, basis)
    torch.testing.assert_close(z[:, 0], 224 * x[:, 0].mean((-2, -1)))  # (0, 0): 224 x global average
    assert fcanet_frequencies("low4") == [(0, 0), (0, 1), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match="top\\|low\\|bot"):
        fcanet_frequencies("top3")
    with pytest.raises(ValueError, match="divisible"):
        dct_pool(torch.randn(1, 6, 7, 7), dct_basis(7, 7, fcanet_frequencies("top4")))


def test_edge_kernels_and_gradient_magnitude():
    assert laplacian_kernel_3d().sum() == 0 and laplacian_kernel_3d()[1, 1, 1] == -6
    assert (laplacian_kernel_3d() != 0).sum() == 7
    torch.manual_seed(3)
    x = torch.randn(2, 3, 9, 9)
    for k in (sobel_kernel(), scharr_kernel()):
        g = gradient_magnitude(x, k)
        torch.testing.assert_close(gradient_magnitude(torch.rot90(x, 1, (2, 3)), k), torch.rot90(g, 1, (2, 3)),
                                   atol=1e-5, rtol=1e-5)  # 90° rotation equivariance, zero padding included
    const = gradient_magnitude(torch.full((1, 1, 5, 5), 2.0), sobel_kernel(), eps=1e-6)
    torch.testing.assert_close(const[..., 1:-1, 1:-1], torch.full((1, 1, 3, 3), math.sqrt(1e-6)))
    ramp = torch.arange(6.0).expand(1, 1, 6, 6)  # d/dx = 1 per pixel: Sobel response 8
    torch.testing.assert_close(gradient_magnitude(ramp, sobel_kernel(), eps=0.0)[..., 1:-1, 1:-1],
                               torch.full((1, 1, 4, 4), 8.0))


def test_ortho_fft_parseval_and_frequency_split():
    torch.manual_seed(4)
    x = torch.randn(2, 3, 4, 6, 8, dtype=torch.float64)
    z = fftn_ortho(x, dims=3)
    torch.testing.assert_close(z.abs().square().sum(), x.square().sum())
    torch.testing.assert_close(ifftn_ortho(z, dims=3).real, x)
    img = torch.randn(2, 1, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(gaussian_lowpass(torch.full((1, 16, 16), 3.0)), torch.full((1, 16, 16), 3.0))
    low, high = frequency_decomposition(img, orientations=4)
    assert low.shape == img.shape and high.shape == (2, 1, 4, 16, 16)
    torch.testing.assert_close(low + high.sum(-3) * (2 / 4), img)  # cos² windows sum to K / 2
    vertical = torch.sin(torch.arange(16.0, dtype=torch.float64) * 2 * math.pi / 4).expand(16, 16)  # varies along W
    bands = oriented_highpass(vertical).square().sum((-2, -1))
    assert bands.argmax() == 0 and bands[2] < 1e-12 * bands[0] + 1e-12


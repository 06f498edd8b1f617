"""Orthonormal Haar DWT / IDWT (attnfuse.ops.wavelet): fast path vs matrix reference vs PyWavelets, round trip, energy."""

from __future__ import annotations

import pytest
import torch

from attnfuse.ops.wavelet import haar_dwt, haar_dwt_reference, haar_idwt, haar_idwt_reference, haar_matrix

SHAPES_2D = [(2, 3, 8, 8), (1, 2, 6, 10), (3, 1, 2, 2), (2, 4, 14, 4)]
SHAPES_3D = [(2, 2, 4, 6, 8), (1, 3, 2, 2, 2)]


@pytest.mark.parametrize("shape,dims", [(s, 2) for s in SHAPES_2D] + [(s, 3) for s in SHAPES_3D])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_energy_and_reference(shape, dims, dtype):
    torch.manual_seed(0)
    x = torch.randn(shape, dtype=dtype)
    bands = haar_dwt(x, dims=dims)
    assert bands.shape == (*shape[:-dims], 2**dims, *(s // 2 for s in shape[-dims:]))
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(haar_idwt(bands, dims=dims), x, atol=tol, rtol=0)
    torch.testing.assert_close(bands.square().sum(), x.square().sum(), rtol=tol, atol=0)  # orthonormal
    torch.testing.assert_close(bands, haar_dwt_reference(x, dims=dims), atol=tol, rtol=0)
    torch.testing.assert_close(haar_idwt_reference(bands, dims=dims), x, atol=tol, rtol=0)


def test_matrix_is_orthonormal_and_known():
    m = haar_matrix(4)
    torch.testing.assert_close(m @ m.T, torch.eye(4, dtype=torch.float64))
    s = 2**-0.5
    expected = torch.tensor([[s, s, 0, 0], [0, 0, s, s], [s, -s, 0, 0], [0, 0, s, -s]], dtype=torch.float64)
    torch.testing.assert_close(m, expected)


def test_constant_image_has_only_ll():
    x = torch.full((1, 1, 4, 6), 3.0)
    bands = haar_dwt(x)
    torch.testing.assert_close(bands[:, :, 0], torch.full((1, 1, 2, 3), 6.0))  # 3 * 2 (two sqrt(2) factors)
    assert bands[:, :, 1:].abs().max() == 0


def test_band_order_follows_axes():
    x = torch.zeros(1, 1, 4, 4)
    x[..., 0::2, :] = 1.0  # varies along H only -> energy in "high along H" (band 1) and LL
    bands = haar_dwt(x)
    assert bands[:, :, 2].abs().max() == 0 and bands[:, :, 3].abs().max() == 0
    assert bands[:, :, 1].abs().min() > 0


def test_matches_pywavelets():
    pywt = pytest.importorskip("pywt")
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 8, dtype=torch.float64)
    ca, (ch, cv, cd) = pywt.dwt2(x.numpy(), "haar", axes=(-2, -1))
    bands = haar_dwt(x)
    for k, ref in enumerate((ca, ch, cv, cd)):
        torch.testing.assert_close(bands[:, :, k], torch.from_numpy(ref), atol=1e-12, rtol=0)
    x3 = torch.randn(1, 2, 4, 6, 2, dtype=torch.float64)
    ref3 = pywt.dwtn(x3.numpy(), "haar", axes=(-3, -2, -1))
    bands3 = haar_dwt(x3, dims=3)
    for k in range(8):
        key = "".join("d" if (k >> a) & 1 else "a" for a in range(3))
        torch.testing.assert_close(bands3[:, :, k], torch.from_numpy(ref3[key]), atol=1e-12, rtol=0)


def test_gradients_and_errors():
    x = torch.randn(1, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: haar_idwt(haar_dwt(t) * 1.5), (x,))
    with pytest.raises(ValueError, match="even size"):
        haar_dwt(torch.randn(1, 1, 5, 4))
    with pytest.raises(ValueError, match="dims must be"):
        haar_dwt(torch.randn(1, 1, 4, 4), dims=4)
    with pytest.raises(ValueError, match="bands must have shape"):
        haar_idwt(torch.randn(1, 1, 3, 2, 2))
    with pytest.raises(TypeError, match="floating"):
        haar_dwt(torch.ones(1, 1, 4, 4, dtype=torch.long))


@pytest.mark.parametrize("dims,shape", [(2, (1, 2, 4, 6)), (3, (1, 1, 2, 4, 2)), (1, (2, 6))])
def test_vjp_is_the_inverse_transform(dims, shape):
    """The backward passes are the inverse transforms (orthogonality); checked by gradcheck and gradgradcheck."""
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: haar_dwt(t, dims=dims), (x,))
    assert torch.autograd.gradgradcheck(lambda t: haar_dwt(t, dims=dims), (x,))
    bands = haar_dwt(x.detach(), dims=dims).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda b: haar_idwt(b, dims=dims), (bands,))
    torch.testing.assert_close(haar_dwt_reference(x.detach(), dims=dims) if dims > 1 else haar_dwt(x.detach(), dims=1),
                               haar_dwt(x.detach(), dims=dims))

"""Parameter-free frequency-domain and fixed-filter operators for dense-vision blocks.

Plain functions (not ``@operator`` attention operators) used by the modules of
:mod:`attnfuse.nn.frequency`, :mod:`attnfuse.nn.gates` and :mod:`attnfuse.nn.edge`:

* **Phase** (Flickerformer PFM, arXiv 2603.22794): :func:`unit_phasor` ``F/(|F| + eps)``,
  :func:`phase_agreement` ``Re(P_a·conj P_b) = cos(φ_a − φ_b)``, :func:`phase_correlation` (the surface
  ``irfftn(P_a·conj P_b)``, peaked at the circular shift between ``a`` and ``b``), :func:`estimate_shift`.
* **Autocorrelation** (Flickerformer AFFN): :func:`patch_autocorrelation` ``irfft2(|rfft2(a)|²)`` per
  non-overlapping patch, and the direct-sum oracle :func:`circular_autocorrelation_reference`.
* **DCT** (FcaNet / FSATFusion FSAM): :func:`dct_basis` (orthonormal 2-D DCT-II basis images),
  :func:`fcanet_frequencies` (FcaNet's ``top`` / ``low`` / ``bot`` lists on the 7x7 grid, scaled) and
  :func:`dct_pool` (multi-spectral channel pooling).
* **Fixed kernels** (DFYP AOL, HFF-Net ALC): :func:`sobel_kernel`, :func:`scharr_kernel`,
  :func:`laplacian_kernel_3d`, and :func:`gradient_magnitude` (depthwise, zero padding).
* **Low / high frequency split** (HFF-Net FDD stand-in): :func:`gaussian_lowpass`,
  :func:`oriented_highpass`, :func:`frequency_decomposition`. HFF-Net uses a DTCWT low-pass and a MATLAB
  NSCT high-pass; neither is available here, so these are documented stand-ins (FFT Gaussian low-pass and a
  steerable ``cos²`` oriented band-pass), not the paper's filters.
* **Ortho FFT helpers**: :func:`fftn_ortho`, :func:`ifftn_ortho` (unitary: Parseval holds).

Shapes: images ``(B, C, H, W)``, volumes ``(B, C, D, H, W)``; every function works on any leading dims
unless its docstring says otherwise. ``dims`` counts the trailing spatial axes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "circular_autocorrelation_reference",
    "dct_basis",
    "dct_pool",
    "estimate_shift",
    "fcanet_frequencies",
    "fftn_ortho",
    "frequency_decomposition",
    "gaussian_lowpass",
    "gradient_magnitude",
    "ifftn_ortho",
    "laplacian_kernel_3d",
    "oriented_highpass",
    "patch_autocorrelation",
    "patchify",
    "phase_agreement",
    "phase_correlation",
    "scharr_kernel",
    "sobel_kernel",
    "unit_phasor",
    "unpatchify",
]


def _spatial(dims: int) -> tuple[int, ...]:
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3, got {dims=}")
    return tuple(range(-dims, 0))


def _check_pair(a: Tensor, b: Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)=} and {tuple(b.shape)=}")


# ----------------------------------------------------------------------------------------------- ortho FFT
def fftn_ortho(x: Tensor, *, dims: int = 2) -> Tensor:
    """Unitary FFT over the trailing ``dims`` axes (complex, same shape): ``||fftn_ortho(x)|| == ||x||``."""
    return torch.fft.fftn(x, dim=_spatial(dims), norm="ortho")


def ifftn_ortho(z: Tensor, *, dims: int = 2) -> Tensor:
    """Inverse of :func:`fftn_ortho` (complex result; take ``.real`` for real signals)."""
    return torch.fft.ifftn(z, dim=_spatial(dims), norm="ortho")


# --------------------------------------------------------------------------------------------------- phase
def unit_phasor(x: Tensor, *, dims: int = 2, eps: float = 1e-8) -> Tensor:
    """``P = F / (|F| + eps)`` with ``F = rfftn(x)`` over the trailing ``dims`` axes.

    Shapes: x ``(*, H, W)`` -> P ``(*, H, W // 2 + 1)`` complex (2-D).
    """
    f = torch.fft.rfftn(x, dim=_spatial(dims))
    return f / (f.abs() + eps)


def phase_agreement(a: Tensor, b: Tensor, *, dims: int = 2, eps: float = 1e-8) -> Tensor:
    """``Re(P_a · conj P_b) = cos(φ_a − φ_b)`` on the rfft grid, in ``[-1, 1]`` (1 where the phases agree).

    This is Flickerformer PFM's *intended* gate input; the released code uses ``|P_a · conj P_b|``,
    which is identically 1 (see :class:`attnfuse.nn.PhaseFusion`).

    Shapes: a, b ``(*, H, W)`` -> ``(*, H, W // 2 + 1)`` real (2-D).
    """
    _check_pair(a, b)
    return (unit_phasor(a, dims=dims, eps=eps) * unit_phasor(b, dims=dims, eps=eps).conj()).real


def phase_correlation(a: Tensor, b: Tensor, *, dims: int = 2, eps: float = 1e-8) -> Tensor:
    """Phase-correlation surface ``irfftn(P_a · conj P_b)``, real, same shape as ``a``.

    If ``a = roll(b, s)`` (circular shift by the integer vector ``s``) the surface is a unit impulse at ``s``
    (up to round-off): every phasor product equals ``exp(-2πi k·s/N)``.

    Shapes: a, b ``(*, *spatial)`` -> ``(*, *spatial)``.
    """
    _check_pair(a, b)
    sizes = a.shape[a.dim() - dims:]
    cross = unit_phasor(a, dims=dims, eps=eps) * unit_phasor(b, dims=dims, eps=eps).conj()
    return torch.fft.irfftn(cross, s=sizes, dim=_spatial(dims))


def estimate_shift(a: Tensor, b: Tensor, *, dims: int = 2, eps: float = 1e-8) -> Tensor:
    """Integer circular shift ``s`` with ``a ≈ roll(b, s)``: the argmax of :func:`phase_correlation`.

    Returns:
        ``(*, dims)`` int64, each component in ``[0, size)`` (take ``s - size`` for a negative shift).
    """
    surface = phase_correlation(a, b, dims=dims, eps=eps)
    sizes = surface.shape[surface.dim() - dims:]
    flat = surface.flatten(-dims).argmax(-1)  # (*,)
    out = []
    for size in reversed(sizes):
        out.append(flat % size)
        flat = torch.div(flat, size, rounding_mode="floor")
    return torch.stack(out[::-1], dim=-1)


# ------------------------------------------------------------------------------------------ autocorrelation
def patch_autocorrelation(x: Tensor, *, patch: int = 8) -> Tensor:
    """Circular autocorrelation ``irfft2(|rfft2(a)|²)`` of every non-overlapping ``patch x patch`` patch.

    ``R[u, v] = Σ_n a[n] · a[(n + (u, v)) mod patch]`` inside each patch (Flickerformer AFFN's ``R``).

    Shapes: x ``(*, H, W)`` with ``H, W`` divisible by ``patch`` -> ``(*, H, W)``.

    Raises:
        ValueError: ``H`` or ``W`` not divisible by ``patch``.
    """
    spec = torch.fft.rfft2(patchify(x, patch))  # (*, H/p, W/p, p, p/2+1)
    r = torch.fft.irfft2(spec.real.square() + spec.imag.square(), s=(patch, patch))  # (*, H/p, W/p, p, p)
    return unpatchify(r)  # (*, H, W)


def circular_autocorrelation_reference(a: Tensor) -> Tensor:
    """Direct-sum oracle: ``R[u, v] = Σ_{i,j} a[i, j] · a[(i + u) mod p, (j + v) mod q]`` for ``a (*, p, q)``."""
    p, q = a.shape[-2:]
    out = a.new_zeros(a.shape)
    for u in range(p):
        for v in range(q):
            out[..., u, v] = (a * torch.roll(a, shifts=(-u, -v), dims=(-2, -1))).sum((-2, -1))
    return out


# ------------------------------------------------------------------------------------------------------ DCT
_FCANET = {  # cfzd/FcaNet get_freq_indices: (row index u, column index v) on a 7x7 grid, best first
    "top": ([0, 0, 6, 0, 0, 1, 1, 4, 5, 1, 3, 0, 0, 0, 3, 2, 4, 6, 3, 5, 5, 2, 6, 5, 5, 3, 3, 4, 2, 2, 6, 1],
            [0, 1, 0, 5, 2, 0, 2, 0, 0, 6, 0, 4, 6, 3, 5, 2, 6, 3, 3, 3, 5, 1, 1, 2, 4, 2, 1, 1, 3, 0, 5, 3]),
    "low": ([0, 0, 1, 1, 0, 2, 2, 1, 2, 0, 3, 4, 0, 1, 3, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 6, 1, 2, 3, 4],
            [0, 1, 0, 1, 2, 0, 1, 2, 2, 3, 0, 0, 4, 3, 1, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3, 2, 1, 0, 6, 5, 4, 3]),
    "bot": ([6, 1, 3, 3, 2, 4, 1, 2, 4, 4, 5, 1, 4, 6, 2, 5, 6, 1, 6, 2, 2, 4, 3, 3, 5, 5, 6, 2, 5, 5, 3, 6],
            [6, 4, 4, 6, 6, 3, 1, 4, 4, 5, 6, 5, 2, 2, 5, 1, 4, 3, 5, 0, 3, 1, 1, 2, 4, 2, 1, 1, 5, 3, 3, 3]),
}


def fcanet_frequencies(method: str = "top16", size: tuple[int, int] = (7, 7)) -> list[tuple[int, int]]:
    """FcaNet's frequency list (``"top1|2|4|8|16|32"``, ``"low…"``, ``"bot…"``) scaled to a ``size`` DCT grid.

    Indices are defined on a 7x7 grid and multiplied by ``size // 7`` per axis, as in FcaNet
    (FSATFusion: ``size = (224, 224)``, so ``top16`` frequencies are the 7x7 ones times 32).

    Raises:
        ValueError: unknown method or count.
    """
    kind, count = method[:3], method[3:]
    if kind not in _FCANET or not count.isdigit() or int(count) not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"method must be top|low|bot followed by 1, 2, 4, 8, 16 or 32 (e.g. 'top16'), got {method!r}")
    n = int(count)
    us, vs = _FCANET[kind]
    sh, sw = size[0] // 7, size[1] // 7
    return [(u * sh, v * sw) for u, v in zip(us[:n], vs[:n])]


def dct_basis(height: int, width: int, frequencies: Sequence[tuple[int, int]], *,
              dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Orthonormal 2-D DCT-II basis images, one per frequency ``(u, v)``: ``(K, height, width)``.

    ``B_{u,v}[i, j] = c_u(i) · c_v(j)``, ``c_u(i) = cos(π u (i + ½) / n) / sqrt(n)`` times ``sqrt(2)`` for ``u > 0``.
    ``(0, 0)`` is the constant ``1 / sqrt(height · width)``.

    Raises:
        ValueError: a frequency outside ``[0, height) x [0, width)``.
    """
    for u, v in frequencies:
        if not (0 <= u < height and 0 <= v < width):
            raise ValueError(f"DCT frequency {(u, v)} outside the {height}x{width} grid")

    def cos_1d(n: int, f: int) -> Tensor:
        pos = torch.arange(n, dtype=torch.float64)
        c = torch.cos(math.pi * f * (pos + 0.5) / n) / math.sqrt(n)
        return c * (math.sqrt(2.0) if f else 1.0)

    basis = torch.stack([torch.outer(cos_1d(height, u), cos_1d(width, v)) for u, v in frequencies])
    return basis.to(dtype=dtype, device=device)


def dct_pool(x: Tensor, basis: Tensor) -> Tensor:
    """Multi-spectral pooling (FcaNet): channel group ``k`` is projected on basis image ``k``.

    ``z[b, c] = Σ_{i,j} x[b, c, i, j] · basis[c // (C / K), i, j]``; with the ``(0, 0)`` frequency this is
    ``sqrt(H·W)`` times global average pooling.

    Shapes: x ``(B, C, h, w)``, basis ``(K, h, w)`` with ``C`` divisible by ``K`` -> ``(B, C)``.

    Raises:
        ValueError: ``C`` not divisible by ``K`` or spatial sizes that differ from the basis.
    """
    b, c, h, w = x.shape
    k = basis.shape[0]
    if c % k or basis.shape[1:] != (h, w):
        raise ValueError(f"dct_pool: x (B, C, h, w) needs C divisible by K and (h, w) == basis (K, h, w); "
                         f"got {tuple(x.shape)=}, {tuple(basis.shape)=}")
    xg = x.reshape(b, k, c // k, h * w)  # (B, K, C/K, hw)
    return torch.einsum("bkcn,kn->bkc", xg, basis.reshape(k, h * w).to(x.dtype)).reshape(b, c)


# ----------------------------------------------------------------------------------------------- kernels
def sobel_kernel(*, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Sobel ``k_x = [[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]]`` (``k_y = k_xᵀ``), cross-correlation convention."""
    return torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=dtype, device=device)


def scharr_kernel(*, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """Scharr ``k_x = [[-3, 0, 3], [-10, 0, 10], [-3, 0, 3]]`` (``k_y = k_xᵀ``)."""
    return torch.tensor([[-3.0, 0.0, 3.0], [-10.0, 0.0, 10.0], [-3.0, 0.0, 3.0]], dtype=dtype, device=device)


def laplacian_kernel_3d(*, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None) -> Tensor:
    """7-point 3-D Laplacian ``(3, 3, 3)``: −6 at the centre, +1 on the 6 face neighbours, 0 elsewhere."""
    k = torch.zeros(3, 3, 3, dtype=dtype, device=device)
    k[1, 1, 1] = -6.0
    for d in ((0, 1, 1), (2, 1, 1), (1, 0, 1), (1, 2, 1), (1, 1, 0), (1, 1, 2)):
        k[d] = 1.0
    return k


def gradient_magnitude(x: Tensor, kx: Tensor, ky: Tensor | None = None, *, eps: float = 1e-6) -> Tensor:
    """Depthwise gradient magnitude ``sqrt((k_x ⋆ x)² + (k_y ⋆ x)² + eps)`` with zero padding.

    Args:
        x: ``(B, C, H, W)``.
        kx: ``(3, 3)`` (or any odd square) kernel, cross-correlation convention; shared by every channel.
        ky: defaults to ``kx.T``.
        eps: keeps the square root differentiable at 0 (a constant input gives ``sqrt(eps)`` inside).

    Returns:
        ``(B, C, H, W)``.
    """
    if x.dim() != 4:
        raise ValueError(f"gradient_magnitude expects x (B, C, H, W), got {tuple(x.shape)=}")
    ky = kx.transpose(-1, -2) if ky is None else ky
    c = x.shape[1]
    k = kx.shape[-1]
    weight = torch.stack([kx, ky]).to(x.dtype).unsqueeze(1).repeat(c, 1, 1, 1)  # (2C, 1, k, k): [kx, ky] per channel
    g = F.conv2d(x, weight, padding=k // 2, groups=c)  # (B, 2C, H, W)
    g = g.unflatten(1, (c, 2))  # (B, C, 2, H, W)
    return (g.square().sum(2) + eps).sqrt()


# ------------------------------------------------------------------------------------ low / high frequency
def _radial_grid(h: int, w: int, device, dtype) -> tuple[Tensor, Tensor]:
    fy = torch.fft.fftfreq(h, device=device, dtype=dtype).view(h, 1)  # cycles / pixel
    fx = torch.fft.rfftfreq(w, device=device, dtype=dtype).view(1, w // 2 + 1)
    return fy.expand(h, w // 2 + 1), fx.expand(h, w // 2 + 1)


def gaussian_lowpass(x: Tensor, *, sigma: float = 2.0) -> Tensor:
    """Gaussian low-pass in the Fourier domain (circular boundary): the spatial Gaussian of std ``sigma`` pixels.

    Transfer function ``exp(-2 π² σ² |f|²)``; a constant image is unchanged. Shapes: ``(*, H, W)`` -> same.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma=}")
    h, w = x.shape[-2:]
    fy, fx = _radial_grid(h, w, x.device, x.dtype)
    transfer = torch.exp(-2.0 * math.pi**2 * sigma**2 * (fy.square() + fx.square()))
    return torch.fft.irfft2(torch.fft.rfft2(x) * transfer, s=(h, w))


def oriented_highpass(x: Tensor, *, orientations: int = 4, sigma: float = 2.0) -> Tensor:
    """Steerable oriented high-pass bands: ``(1 − lowpass) · cos²(θ_f − θ_k)``, ``θ_k = k π / orientations``.

    A stand-in for NSCT directional sub-bands (HFF-Net, MATLAB-only): the ``cos²`` angular windows sum to
    ``orientations / 2``, so ``(2 / orientations) · Σ_k band_k`` equals ``x − gaussian_lowpass(x)``.

    Shapes: ``(*, H, W)`` -> ``(*, orientations, H, W)``.
    """
    if orientations < 2:
        raise ValueError(f"orientations must be >= 2, got {orientations=}")
    h, w = x.shape[-2:]
    fy, fx = _radial_grid(h, w, x.device, x.dtype)
    high = 1.0 - torch.exp(-2.0 * math.pi**2 * sigma**2 * (fy.square() + fx.square()))
    theta = torch.atan2(fy, fx)
    spec = torch.fft.rfft2(x).unsqueeze(-3)  # (*, 1, H, W/2+1)
    angles = torch.arange(orientations, device=x.device, dtype=x.dtype).view(-1, 1, 1) * (math.pi / orientations)
    window = torch.cos(theta - angles).square() * high  # (K, H, W/2+1)
    return torch.fft.irfft2(spec * window, s=(h, w))


def frequency_decomposition(x: Tensor, *, sigma: float = 2.0, orientations: int = 4) -> tuple[Tensor, Tensor]:
    """HFF-Net FDD stand-in: ``(low, high)`` with ``low = gaussian_lowpass(x)`` ``(*, H, W)`` and
    ``high = oriented_highpass(x)`` ``(*, orientations, H, W)``.

    Deviation (documented): the paper uses a DTCWT low-pass band (``dtcwt``, 1 level) and NSCT directional
    sub-bands from a MATLAB toolbox, each min-max / percentile stretched per slice; here both filters are
    FFT stand-ins and no stretching is applied (do it in preprocessing if wanted).
    """
    return gaussian_lowpass(x, sigma=sigma), oriented_highpass(x, orientations=orientations, sigma=sigma)


# ------------------------------------------------------------------------------------------------ patches
def patchify(x: Tensor, patch: int) -> Tensor:
    """``(*, H, W)`` -> ``(*, H/p, W/p, p, p)``: non-overlapping ``p x p`` patches (``H``, ``W`` divisible by ``p``)."""
    h, w = x.shape[-2:]
    if h % patch or w % patch:
        raise ValueError(f"H and W must be divisible by patch={patch}, got {(h, w)=}")
    return x.unflatten(-1, (w // patch, patch)).unflatten(-3, (h // patch, patch)).transpose(-3, -2)


def unpatchify(p: Tensor) -> Tensor:
    """Inverse of :func:`patchify`: ``(*, H/p, W/p, p, p)`` -> ``(*, H, W)``."""
    return p.transpose(-3, -2).flatten(-2).flatten(-3, -2)

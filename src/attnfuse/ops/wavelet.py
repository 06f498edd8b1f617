"""Orthonormal Haar discrete wavelet transform (one level), 2-D and 3-D, and its exact inverse.

Used by Flickerformer's wavelet-guided directional attention (WDAM, arXiv 2603.22794) and available to
any block that wants a lossless 2x down-sampling into frequency bands. Parameter-free; no
pytorch_wavelets / PyWavelets dependency (PyWavelets is a test-only reference).

Status: exact. The transform is orthonormal, so ``haar_idwt(haar_dwt(x)) == x`` up to round-off and
``||haar_dwt(x)|| == ||x||`` (energy preserved). Band values equal PyWavelets' ``pywt.dwt2(x, "haar")`` /
``pywt.dwtn(x, "haar")`` (tested).

Definition, per transformed axis, on the pairs ``(e, o) = (x[2i], x[2i + 1])``::

    low[i]  = (e + o) / sqrt(2)
    high[i] = (e - o) / sqrt(2)

applied along every spatial axis in turn. Band ``k`` holds, for each axis ``a`` (``a = 0`` the first
spatial axis: ``H`` in 2-D, ``D`` in 3-D), the high-pass of that axis iff bit ``a`` of ``k`` is set::

    2-D, x (B, C, H, W):     k = 0 LL, 1 high along H (PyWavelets cH), 2 high along W (cV), 3 HH (cD)
    3-D, x (B, C, D, H, W):  k = bit_D + 2·bit_H + 4·bit_W   (PyWavelets dwtn key "aad" is k = 4, ...)

Equivalent dense formulation (what :func:`haar_dwt_reference` computes): with the orthonormal
one-level Haar matrix ``M_n`` (``n x n``, rows ``[low_0 .. low_{n/2-1}, high_0 .. high_{n/2-1}]``,
:func:`haar_matrix`), the 2-D transform is ``M_H · x · M_Wᵀ`` split into its four quadrants.

Materialised 1-D example (n = 4, s = 1/sqrt(2))::

    M_4 = [[s, s, 0, 0],
           [0, 0, s, s],
           [s, -s, 0, 0],
           [0, 0, s, -s]]

Shapes:
    2-D: x ``(B, C, H, W)`` -> bands ``(B, C, 4, H/2, W/2)``;
    3-D: x ``(B, C, D, H, W)`` -> bands ``(B, C, 8, D/2, H/2, W/2)``.
    Any number of leading dims is allowed; ``dims`` (2 or 3) counts the trailing spatial axes.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["haar_dwt", "haar_dwt_reference", "haar_idwt", "haar_idwt_reference", "haar_matrix"]

_SQRT1_2 = 1.0 / math.sqrt(2.0)


def _check_dims(dims: int) -> None:
    if dims not in (1, 2, 3):
        raise ValueError(f"dims must be 1, 2 or 3 (trailing spatial axes), got {dims=}")


def _check_input(x: Tensor, dims: int, name: str = "x") -> None:
    _check_dims(dims)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {type(x).__name__} "
                        f"{getattr(x, 'dtype', '')}")
    if x.dim() < dims:
        raise ValueError(f"{name} must have at least {dims} dims (the spatial axes), got {tuple(x.shape)=}")
    sizes = x.shape[x.dim() - dims:]
    odd = [s for s in sizes if s % 2]
    if odd:
        raise ValueError(
            f"haar_dwt needs an even size along every spatial axis; {name} has spatial shape {tuple(sizes)} "
            f"(pad or crop it to even sizes, e.g. torch.nn.functional.pad(x, (0, W % 2, 0, H % 2)))"
        )


def _block_matrix(dims: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``(2**dims, 2**dims)`` orthonormal matrix taking a ``2 x ... x 2`` pixel block to its band values.

    ``K[k, j] = Π_a h[bit_a(k), o_a(j)]`` with ``h = [[1, 1], [1, -1]] / sqrt(2)``; ``o_a(j)`` is the offset along
    spatial axis ``a`` of block element ``j`` (row-major, axis 0 slowest). ``K`` is orthogonal, so the inverse is
    ``Kᵀ``.
    """
    n = 2**dims
    h = ((1.0, 1.0), (1.0, -1.0))
    rows = []
    for k in range(n):
        row = []
        for j in range(n):
            v = 1.0
            for a in range(dims):
                v *= h[(k >> a) & 1][(j >> (dims - 1 - a)) & 1]
            row.append(v * _SQRT1_2**dims)
        rows.append(row)
    return torch.tensor(rows, dtype=dtype, device=device)


def _blocks(x: Tensor, dims: int) -> tuple[Tensor, tuple[int, ...]]:
    """``(*lead, *spatial)`` -> ``(*lead, 2**dims, prod(spatial/2))``: every ``2 x ... x 2`` block as a column."""
    lead = x.dim() - dims
    half = tuple(s // 2 for s in x.shape[lead:])
    split = x.reshape(*x.shape[:lead], *[v for h in half for v in (h, 2)])  # (*lead, h0, 2, h1, 2, ...)
    order = list(range(lead)) + [lead + 2 * a + 1 for a in range(dims)] + [lead + 2 * a for a in range(dims)]
    return split.permute(order).reshape(*x.shape[:lead], 2**dims, -1), half  # (*lead, 2**dims, N)


def haar_dwt(x: Tensor, *, dims: int = 2) -> Tensor:
    """One level of the orthonormal Haar DWT over the trailing ``dims`` axes.

    Computed as one small matmul per ``2 x ... x 2`` pixel block: ``bands = K · block`` with the orthonormal
    ``(2**dims, 2**dims)`` matrix ``K = h ⊗ ... ⊗ h`` (``h = [[1, 1], [1, -1]] / sqrt(2)``); equal to
    :func:`haar_dwt_reference` (tested) and as fast as a strided depthwise convolution on the CPU
    (``benchmarks/bench_vision.py``).

    Args:
        x: ``(*lead, *spatial)`` floating tensor, every spatial size even.
        dims: number of trailing spatial axes (2 for ``(B, C, H, W)``, 3 for ``(B, C, D, H, W)``; 1 allowed).

    Returns:
        ``(*lead, 2**dims, *spatial/2)``: band ``k`` is high-pass along spatial axis ``a`` iff bit ``a`` of ``k``
        is set (module docstring).

    Raises:
        ValueError: ``dims`` not in 1..3, too few dims, or an odd spatial size.
        TypeError: ``x`` not a floating tensor.

    Example:
        >>> bands = haar_dwt(torch.randn(2, 3, 8, 6))
        >>> bands.shape
        torch.Size([2, 3, 4, 4, 3])
    """
    _check_input(x, dims)
    return _HaarDWT.apply(x, dims)


def haar_idwt(bands: Tensor, *, dims: int = 2) -> Tensor:
    """Inverse of :func:`haar_dwt`: ``(*lead, 2**dims, *half)`` -> ``(*lead, *(2·half))`` (``block = Kᵀ · bands``).

    Raises:
        ValueError: ``bands`` without a band axis of size ``2**dims`` before the ``dims`` spatial axes.
        TypeError: ``bands`` not a floating tensor.
    """
    _check_dims(dims)
    if not isinstance(bands, Tensor) or not bands.is_floating_point():
        raise TypeError(f"bands must be a floating-point tensor, got {type(bands).__name__}")
    nb = 2**dims
    if bands.dim() < dims + 1 or bands.shape[-dims - 1] != nb:
        raise ValueError(f"bands must have shape (*lead, {nb}, *spatial) for dims={dims}, got {tuple(bands.shape)=}")
    return _HaarIDWT.apply(bands, dims)


def _dwt(x: Tensor, dims: int) -> Tensor:
    blocks, half = _blocks(x, dims)  # (*lead, 2**dims, N)
    k = _block_matrix(dims, x.dtype, x.device)
    return torch.matmul(k, blocks).reshape(*x.shape[: x.dim() - dims], 2**dims, *half)


def _idwt(bands: Tensor, dims: int) -> Tensor:
    nb = 2**dims
    lead_shape = bands.shape[: bands.dim() - dims - 1]
    lead = len(lead_shape)
    half = tuple(bands.shape[lead + 1:])
    k = _block_matrix(dims, bands.dtype, bands.device)
    blocks = torch.matmul(k.T, bands.reshape(*lead_shape, nb, -1))  # (*lead, 2**dims, N)
    split = blocks.reshape(*lead_shape, *([2] * dims), *half)  # (*lead, 2, .., 2, h0, h1, ..)
    order = list(range(lead)) + [v for a in range(dims) for v in (lead + dims + a, lead + a)]
    return split.permute(order).reshape(*lead_shape, *(2 * h for h in half))  # (*lead, 2·h0, 2·h1, ..)


class _HaarDWT(torch.autograd.Function):
    """The transform is orthogonal, so its vector-Jacobian product is the inverse transform of the gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, dims: int) -> Tensor:
        ctx.dims = dims
        return _dwt(x, dims)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _HaarIDWT.apply(grad, ctx.dims), None


class _HaarIDWT(torch.autograd.Function):
    """Inverse transform; its vector-Jacobian product is the forward transform of the gradient."""

    @staticmethod
    def forward(ctx, bands: Tensor, dims: int) -> Tensor:
        ctx.dims = dims
        return _idwt(bands, dims)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return _HaarDWT.apply(grad.contiguous(), ctx.dims), None


def haar_matrix(n: int, *, dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """The orthonormal one-level Haar analysis matrix ``(n, n)``: rows ``[low_0.., high_0..]`` (``n`` even)."""
    if n <= 0 or n % 2:
        raise ValueError(f"haar_matrix needs a positive even n, got {n=}")
    m = torch.zeros(n, n, dtype=dtype, device=device)
    i = torch.arange(n // 2, device=device)
    m[i, 2 * i] = _SQRT1_2
    m[i, 2 * i + 1] = _SQRT1_2
    m[n // 2 + i, 2 * i] = _SQRT1_2
    m[n // 2 + i, 2 * i + 1] = -_SQRT1_2
    return m


def haar_dwt_reference(x: Tensor, *, dims: int = 2) -> Tensor:
    """Plain matrix form of :func:`haar_dwt` (test oracle): multiply each axis by :func:`haar_matrix`."""
    _check_input(x, dims)
    lead = x.dim() - dims
    y = x
    for a in range(dims):
        axis = lead + a
        m = haar_matrix(x.shape[axis], dtype=x.dtype, device=x.device)
        y = torch.movedim(torch.tensordot(y, m, dims=([axis], [1])), -1, axis)  # apply M along `axis`
    # split every axis into (low, high) halves and gather the 2**dims quadrants as bands
    out = []
    for k in range(2**dims):
        idx = y
        for a in range(dims):
            axis = lead + a
            half = x.shape[axis] // 2
            idx = idx.narrow(axis, half if (k >> a) & 1 else 0, half)
        out.append(idx)
    return torch.stack(out, dim=lead)


def haar_idwt_reference(bands: Tensor, *, dims: int = 2) -> Tensor:
    """Plain matrix form of :func:`haar_idwt` (the transpose of each axis' orthonormal matrix)."""
    nb = 2**dims
    lead = bands.dim() - dims - 1
    half = bands.shape[lead + 1:]
    y = bands.new_zeros(*bands.shape[:lead], *(2 * h for h in half))
    for k in range(nb):
        index = [slice(None)] * lead + [
            slice(half[a], 2 * half[a]) if (k >> a) & 1 else slice(0, half[a]) for a in range(dims)
        ]
        y[tuple(index)] = bands.select(lead, k)
    for a in range(dims):
        axis = lead + a
        m = haar_matrix(y.shape[axis], dtype=y.dtype, device=y.device)
        y = torch.movedim(torch.tensordot(y, m, dims=([axis], [0])), -1, axis)  # apply Mᵀ along `axis`
    return y

"""Frequency- and wavelet-domain blocks of the dense-vision papers.

* :class:`FrequencySpatialAttention`: FSATFusion's FSAM (FcaNet DCT channel gate, then a 7x7 spatial gate on
  ``[max_C, std_C]``). Zhang et al., CVIU 263 (2026) 104600.
* :class:`AdaptiveLaplacianConv`, :class:`FrequencyCrossAttention`: HFF-Net's ALC and FDCA. Shao et al.,
  IEEE TMI 2025, arXiv 2506.10142.
* :class:`PhaseFusion`, :class:`AutocorrelationFFN`, :class:`WaveletDirectionalAttention`: Flickerformer's
  PFM, AFFN and WDAM. Qu et al., CVPR 2026, arXiv 2603.22794.

Status: each block implements the mechanism the paper describes by default (``variant="intended"``); where
the released code does something else, ``variant="released"`` reproduces it (listed per class and in
``docs/vision-blocks.md``). Parameter-free math lives in :mod:`attnfuse.ops.frequency` and
:mod:`attnfuse.ops.wavelet`; WDAM's window attention is one call to a registered attention operator.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnfuse.nn._registry import register_module
from attnfuse.nn.gates import SqueezeExcite
from attnfuse.ops._registry import OpConfig, get_operator, op_config
from attnfuse.ops.frequency import laplacian_kernel_3d, patchify, phase_agreement, unit_phasor, unpatchify
from attnfuse.ops.wavelet import haar_dwt, haar_idwt

__all__ = [
    "AdaptiveLaplacianConv",
    "AutocorrelationFFN",
    "FrequencyCrossAttention",
    "FrequencySpatialAttention",
    "PhaseFusion",
    "WaveletDirectionalAttention",
]

_VARIANTS = ("intended", "released")


def _check_variant(variant: str) -> str:
    if variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    return variant


def _check_x(x: Tensor, channels: int, spatial: int, name: str) -> None:
    if x.dim() != 2 + spatial or x.shape[1] != channels:
        layout = "(B, C, H, W)" if spatial == 2 else "(B, C, D, H, W)"
        raise ValueError(f"{name} expects x {layout} with C={channels}, got {tuple(x.shape)=}")


# ------------------------------------------------------------------------------------------------ FSAM
def _tiny_fsam():
    return FrequencySpatialAttention(16, reduction=4, dct_size=(14, 14)), (torch.randn(2, 16, 10, 12),)


@register_module("frequency_spatial_attention", group="frequency", example=_tiny_fsam)
class FrequencySpatialAttention(nn.Module):
    """FSATFusion FSAM: DCT (FcaNet) channel gate, then a spatial gate from channel statistics.

    ::

        x_c = x ⊙ σ(fc2(relu(fc1(dct_pool(adaptive_avg_pool(x, dct_size))))))   # SqueezeExcite(pools="dct")
        s   = σ(conv_{k x k, 2 -> 1, no bias}([pool_1(x_c) ; pool_2(x_c)]))     # pools over channels
        out = x_c ⊙ s

    Args:
        channels: ``C`` (divisible by the number of DCT frequencies, 16 for ``"top16"``).
        reduction: channel-gate reduction (hidden ``max(C // r, 1)``; FSATFusion: 16 -> 1 unit for C = 16).
        dct_size: DCT pooling grid (released: 224 x 224 whatever the input size; kept).
        dct_frequencies: FcaNet list (``"top16"``).
        spatial_kernel: spatial gate kernel (7).
        pools: channel statistics of the spatial gate: ``("max", "std")`` (FSATFusion; ``std`` is the unbiased
            standard deviation, ``torch.std``'s default) or ``("mean", "max")`` (CBAM).
        device, dtype: for the parameters.

    Shapes: x ``(B, C, H, W)`` -> same. Gates lie in (0, 1), so ``|out| <= |x|`` element-wise.

    Released-code notes (fsatfusion.md): the released module also builds a BatchNorm that ``forward`` never
    uses; it is omitted (a checkpoint loader should drop those keys).

    Raises:
        ValueError: bad ``pools``, an even ``spatial_kernel``, ``channels < 2`` with ``"std"``, channels not
            divisible by the number of DCT frequencies, or an input of another shape.

    Example:
        >>> FrequencySpatialAttention(16, dct_size=(14, 14))(torch.randn(2, 16, 32, 32)).shape
        torch.Size([2, 16, 32, 32])
    """

    def __init__(
        self,
        channels: int,
        *,
        reduction: int = 16,
        dct_size: tuple[int, int] = (224, 224),
        dct_frequencies: str = "top16",
        spatial_kernel: int = 7,
        pools: tuple[str, str] = ("max", "std"),
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if any(p not in ("max", "std", "mean") for p in pools) or len(pools) != 2:
            raise ValueError(f"pools must be two of ('max', 'std', 'mean'), got {pools}")
        if spatial_kernel % 2 == 0:
            raise ValueError(f"spatial_kernel must be odd, got {spatial_kernel=}")
        if "std" in pools and channels < 2:
            raise ValueError(f"the 'std' channel statistic needs channels >= 2, got {channels=}")
        self.channels, self.pools = channels, tuple(pools)
        self.channel_gate = SqueezeExcite(channels, reduction=reduction, pools=("dct",), bias=False, dct_size=dct_size,
                                          dct_frequencies=dct_frequencies, device=device, dtype=dtype)
        self.spatial = nn.Conv2d(2, 1, spatial_kernel, padding=spatial_kernel // 2, bias=False, device=device,
                                 dtype=dtype)

    @staticmethod
    def _stat(x: Tensor, pool: str) -> Tensor:
        if pool == "max":
            return x.amax(1, keepdim=True)
        if pool == "mean":
            return x.mean(1, keepdim=True)
        return x.std(1, keepdim=True)

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.channels, 2, "FrequencySpatialAttention")
        xc = self.channel_gate(x)
        stats = torch.cat([self._stat(xc, p) for p in self.pools], dim=1)  # (B, 2, H, W)
        return xc * torch.sigmoid(self.spatial(stats))


# ------------------------------------------------------------------------------------------------- ALC
def _tiny_alc():
    return AdaptiveLaplacianConv(3), (torch.randn(2, 3, 4, 5, 6),)


@register_module("adaptive_laplacian_conv", group="frequency", example=_tiny_alc)
class AdaptiveLaplacianConv(nn.Module):
    """HFF-Net ALC: ``y = x + conv3d(x; W)``, every ``W[o, i]`` initialised to the 7-point 3-D Laplacian.

    Training extras (HFF-Net): :meth:`regularizer` ``= ||W − W_lap||²`` (the paper weights it 5e-6) and
    :meth:`freeze_by_fisher`: entries whose Fisher information exceeds ``mean + k·std`` are reset to the
    Laplacian and frozen (the forward pass uses ``W_lap`` there, so they receive exactly zero gradient).
    The Fisher estimate (mean squared gradient over the warm-up epoch) is computed by the training loop.

    Args:
        channels: ``C`` (input = output channels, as the residual needs).
        device, dtype: for the parameters.

    Shapes: x ``(B, C, D, H, W)`` -> same. A harmonic (affine) field passes unchanged in the interior.

    Example:
        >>> alc = AdaptiveLaplacianConv(16)
        >>> loss = alc(torch.randn(1, 16, 8, 8, 8)).square().mean() + 5e-6 * alc.regularizer()
    """

    def __init__(self, channels: int, *, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.channels = channels
        lap = laplacian_kernel_3d(dtype=dtype or torch.float32, device=device).expand(channels, channels, 3, 3, 3)
        self.register_buffer("laplacian", lap.clone(), persistent=False)
        self.weight = nn.Parameter(lap.clone())
        self.register_buffer("frozen", torch.zeros(channels, channels, 3, 3, 3, dtype=torch.bool, device=device))

    def effective_weight(self) -> Tensor:
        """The kernel the forward pass uses: ``W`` with frozen entries replaced by the Laplacian."""
        return torch.where(self.frozen, self.laplacian.to(self.weight.dtype), self.weight)

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.channels, 3, "AdaptiveLaplacianConv")
        return x + F.conv3d(x, self.effective_weight(), padding=1)

    def regularizer(self) -> Tensor:
        """``||W − W_lap||²`` over the trainable (not frozen) entries."""
        return (self.effective_weight() - self.laplacian).square().sum()

    @torch.no_grad()
    def freeze_by_fisher(self, fisher: Tensor, k: float = 1.0) -> int:
        """Freeze entries with ``fisher > mean + k·std`` (reset to the Laplacian). Returns how many are frozen."""
        if fisher.shape != self.weight.shape:
            raise ValueError(f"fisher must have the weight's shape {tuple(self.weight.shape)}, got {tuple(fisher.shape)}")
        new = fisher > fisher.mean() + k * fisher.std()
        self.frozen |= new
        self.weight.copy_(torch.where(self.frozen, self.laplacian, self.weight))
        return int(self.frozen.sum())


# ------------------------------------------------------------------------------------------------ FDCA
def _tiny_fdca():
    return FrequencyCrossAttention(16, slices=4, uncertainty=True), (torch.randn(2, 16, 4, 5, 6),)


@register_module("frequency_cross_attention", group="frequency", example=_tiny_fdca)
class FrequencyCrossAttention(nn.Module):
    """HFF-Net FDCA: semantic (channel), positional (H x W) and slice (D) gates on the 3-D spectrum.

    ::

        X̂ = fftn_{D,H,W}(x, ortho);  R, I = Re X̂, Im X̂
        a_c = σ(MLP_c(max_{DHW} R) + MLP_c(mean_{DHW} R))                        (B, C, 1, 1, 1), C -> C/16 -> C
        a_s = σ(conv3d_{2 -> 1, k = 3}([max_{C,D} R ; mean_{C,D} R]))            (B, 1, 1, H, W)
        s   = MLP_d(max_{C,H,W} R) + MLP_d(mean_{C,H,W} R)                        (B, D),  D -> 4D -> D
              uncertainty: t = relu(s); μ = lin_μ(t); diag = softplus(exp(lin_d(t))) + 1; F = lin_f(t) (D x rank)
                           s ~ N(μ, F Fᵀ + diag) in training (reparameterised), s = μ in eval
        a_d = σ(s)                                                                (B, 1, D, 1, 1)
        intended:  for a in (a_c, a_s, a_d) (each computed from the current R):  R <- R ⊙ a;  I <- I ⊙ a
        out = Re ifftn(R + iI, ortho)

    Args:
        channels: ``C``.
        slices: ``D`` (the slice MLP is sized by it; released: hard-wired 16 / 8).
        reduction: semantic MLP reduction (16).
        slice_expansion: slice MLP expansion (4).
        uncertainty: the low-rank Gaussian slice gate.
        rank: its covariance rank (5).
        variant: ``"intended"`` (above) or ``"released"``: every sub-gate returns ``R ⊙ a`` and the caller
            multiplies again, ``t = R ⊙ a; R <- R ⊙ t; I <- I ⊙ t`` (a degree-8 polynomial in ``x`` for constant
            gates), and the slice gate is drawn with ``.sample()`` in eval mode too (stochastic inference; no
            gradient reaches ``lin_μ``, ``lin_d``, ``lin_f``: dead parameters in the released model).
        device, dtype: for the parameters.

    Shapes: x ``(B, C, D, H, W)`` -> same. Batch-safe (the released code fails for B > 1).

    Raises:
        ValueError: an input that is not ``(B, C, slices, H, W)``, or an unknown ``variant``.

    Example:
        >>> FrequencyCrossAttention(128, slices=16)(torch.randn(2, 128, 16, 8, 8)).shape
        torch.Size([2, 128, 16, 8, 8])
    """

    def __init__(
        self,
        channels: int,
        *,
        slices: int,
        reduction: int = 16,
        slice_expansion: int = 4,
        uncertainty: bool = False,
        rank: int = 5,
        variant: str = "intended",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.channels, self.slices, self.rank = channels, slices, rank
        self.variant, self.uncertainty = _check_variant(variant), uncertainty
        hidden = max(channels // reduction, 1)
        self.semantic = nn.Sequential(nn.Linear(channels, hidden, **dd), nn.ReLU(), nn.Linear(hidden, channels, **dd))
        self.positional = nn.Conv3d(2, 1, 3, padding=1, **dd)
        self.slice = nn.Sequential(nn.Linear(slices, slices * slice_expansion, **dd), nn.ReLU(),
                                   nn.Linear(slices * slice_expansion, slices, **dd))
        if uncertainty:
            self.lin_mean = nn.Linear(slices, slices, **dd)
            self.lin_diag = nn.Linear(slices, slices, **dd)
            self.lin_factor = nn.Linear(slices, slices * rank, **dd)

    def _slice_logits(self, r: Tensor) -> Tensor:
        s = self.slice(r.amax(dim=(1, 3, 4))) + self.slice(r.mean(dim=(1, 3, 4)))  # (B, D)
        if not self.uncertainty:
            return s
        t = torch.relu(s)
        mean = self.lin_mean(t)
        if self.variant == "intended" and not self.training:
            return mean
        diag = F.softplus(self.lin_diag(t).exp()) + 1.0  # (B, D)
        factor = self.lin_factor(t).unflatten(-1, (self.slices, self.rank))  # (B, D, rank)
        if self.variant == "released":
            with torch.no_grad():
                eps_f = torch.randn(*factor.shape[:-2], self.rank, 1, device=t.device, dtype=t.dtype)
                eps_d = torch.randn_like(diag)
                return (mean + (factor @ eps_f).squeeze(-1) + diag.sqrt() * eps_d).detach()
        eps_f = torch.randn(*factor.shape[:-2], self.rank, 1, device=t.device, dtype=t.dtype)  # (B, rank, 1)
        return mean + (factor @ eps_f).squeeze(-1) + diag.sqrt() * torch.randn_like(diag)  # reparameterised

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.channels, 3, "FrequencyCrossAttention")
        if x.shape[2] != self.slices:
            raise ValueError(f"FrequencyCrossAttention was built for slices={self.slices}, got D={x.shape[2]}")
        spec = torch.fft.fftn(x, dim=(2, 3, 4), norm="ortho")
        r, i = spec.real, spec.imag
        for gate in ("semantic", "positional", "slice"):
            if gate == "semantic":
                logits = self.semantic(r.amax(dim=(2, 3, 4))) + self.semantic(r.mean(dim=(2, 3, 4)))  # (B, C)
                a = torch.sigmoid(logits)[:, :, None, None, None]
            elif gate == "positional":
                stats = torch.cat([r.amax(dim=(1, 2), keepdim=True), r.mean(dim=(1, 2), keepdim=True)], 1)  # (B,2,1,H,W)
                a = torch.sigmoid(self.positional(stats))  # (B, 1, 1, H, W)
            else:
                a = torch.sigmoid(self._slice_logits(r))[:, None, :, None, None]  # (B, 1, D, 1, 1)
            t = r * a if self.variant == "released" else a
            r, i = r * t, i * t
        return torch.fft.ifftn(torch.complex(r, i), dim=(2, 3, 4), norm="ortho").real


# ------------------------------------------------------------------------------------------------- PFM
def _gate_net(channels: int, hidden: int, bias: bool, dd: dict) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(channels, hidden, 3, padding=1, bias=bias, **dd), nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, padding=1, bias=bias, **dd), nn.ReLU(),
        nn.Conv2d(hidden, channels, 1, bias=bias, **dd),
    )


def _tiny_pfm():
    return PhaseFusion(4), (torch.randn(2, 12, 8, 8),)


@register_module("phase_fusion", group="frequency", example=_tiny_pfm)
class PhaseFusion(nn.Module):
    """Flickerformer PFM: gate the non-reference frames in the Fourier domain by their phase relation to the
    reference frame, then merge the three frames with a 3x3 conv.

    ::

        [f1; f2; f3] = x;  F_k = rfft2(f_k);  P_k = F_k / (|F_k| + 1e-8)
        intended:  c_k2 = Re(P_k · conj P_2) = cos(φ_k − φ_2) ∈ [−1, 1]      (phase agreement)
        released:  c_k2 = |P_k · conj P_2|  (≡ 1: an input-independent learned spectrum mask)
        M_k2 = σ(net_k(c_k2))   net: conv3x3 C->h, relu, conv3x3 h->h, relu, conv1x1 h->C   (on the rfft grid)
        out  = conv3x3_{3C -> C}([irfft2(M_12 ⊙ F_1) ; f_2 ; irfft2(M_32 ⊙ F_3)])

    Args:
        channels: ``C`` per frame (input has ``3C``; the middle frame is the reference).
        hidden: gate-net width (default ``int(2.66 · C)``).
        variant: ``"intended"`` or ``"released"`` (see above). The phase-correlation-surface reading of the
            paper lives on the pixel grid, not the spectrum grid the gate acts on, so it is not offered.
        bias: conv biases (Flickerformer: False).
        device, dtype: for the parameters.

    Shapes: x ``(B, 3C, H, W)`` -> ``(B, C, H, W)``.

    Example:
        >>> PhaseFusion(32)(torch.randn(1, 96, 64, 64)).shape
        torch.Size([1, 32, 64, 64])
    """

    def __init__(self, channels: int, *, hidden: int | None = None, variant: str = "intended", bias: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.channels, self.variant = channels, _check_variant(variant)
        hidden = hidden or int(2.66 * channels)
        self.net_12 = _gate_net(channels, hidden, bias, dd)
        self.net_32 = _gate_net(channels, hidden, bias, dd)
        self.merge = nn.Conv2d(3 * channels, channels, 3, padding=1, bias=bias, **dd)

    def gate_input(self, f: Tensor, ref: Tensor) -> Tensor:
        """``c_k2`` on the rfft grid ``(B, C, H, W/2+1)`` for the chosen variant."""
        if self.variant == "released":
            return (unit_phasor(f) * unit_phasor(ref).conj()).abs()
        return phase_agreement(f, ref)

    def forward(self, x: Tensor) -> Tensor:
        c = self.channels
        if x.dim() != 4 or x.shape[1] != 3 * c:
            raise ValueError(f"PhaseFusion expects x (B, 3C={3 * c}, H, W) (three frames), got {tuple(x.shape)=}")
        f1, f2, f3 = x.split(c, dim=1)
        size = x.shape[-2:]
        g1 = torch.sigmoid(self.net_12(self.gate_input(f1, f2)))  # (B, C, H, W/2+1)
        g3 = torch.sigmoid(self.net_32(self.gate_input(f3, f2)))
        y1 = torch.fft.irfft2(torch.fft.rfft2(f1) * g1, s=size)
        y3 = torch.fft.irfft2(torch.fft.rfft2(f3) * g3, s=size)
        return self.merge(torch.cat([y1, f2, y3], dim=1))


# ------------------------------------------------------------------------------------------------ AFFN
def _tiny_affn():
    return AutocorrelationFFN(4, patch=4), (torch.randn(2, 4, 8, 8),)


@register_module("autocorrelation_ffn", group="frequency", example=_tiny_affn)
class AutocorrelationFFN(nn.Module):
    """Flickerformer AFFN: a patch-spectral gated FFN with an autocorrelation term.

    ::

        z  = conv1x1_{C -> 2h}(x), split into p x p patches
        Z  = rfft2(z_patch) ⊙ W                     W (2h, 1, 1, p, p/2+1), init 1
        R  = irfft2(|Z|²)                           circular autocorrelation of the filtered patch
        z' = irfft2(Z) + λ·R                        intended: one λ (init 1 = α + β at the released init)
             irfft2(Z + α|Z|²) + β·R                released: α, β (init 0.5 each); identical for λ = α + β
        y  = conv1x1_{h -> C}(gelu(z'_1) ⊙ z'_2),  (z'_1, z'_2) = split(dwconv3x3(z'))

    Args:
        channels: ``C``. expansion: ``h = int(expansion · C)`` (2.66). patch: ``p`` (8).
        variant: ``"intended"`` (λ) or ``"released"`` (α, β; released checkpoints load into ``intended`` by
            setting ``λ = α + β``).
        bias: conv biases (False).
        device, dtype: for the parameters.

    Shapes: x ``(B, C, H, W)``, ``H``, ``W`` divisible by ``patch`` -> same. ``R`` is quadratic in ``x``: not
    positively homogeneous.

    Example:
        >>> AutocorrelationFFN(32)(torch.randn(1, 32, 64, 64)).shape
        torch.Size([1, 32, 64, 64])
    """

    def __init__(self, channels: int, *, expansion: float = 2.66, patch: int = 8, variant: str = "intended",
                 bias: bool = False, device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        dd = {"device": device, "dtype": dtype}
        self.channels, self.patch, self.variant = channels, patch, _check_variant(variant)
        h = int(channels * expansion)
        self.project_in = nn.Conv2d(channels, 2 * h, 1, bias=bias, **dd)
        self.fft_weight = nn.Parameter(torch.ones(2 * h, 1, 1, patch, patch // 2 + 1, **dd))
        if self.variant == "intended":
            self.lam = nn.Parameter(torch.ones((), **dd))
        else:
            self.alpha = nn.Parameter(torch.full((), 0.5, **dd))
            self.beta = nn.Parameter(torch.full((), 0.5, **dd))
        self.dwconv = nn.Conv2d(2 * h, 2 * h, 3, padding=1, groups=2 * h, bias=bias, **dd)
        self.project_out = nn.Conv2d(h, channels, 1, bias=bias, **dd)

    def patch_map(self, z: Tensor) -> Tensor:
        """The patch-spectral map ``z -> z'`` on ``(B, 2h, H, W)`` (for tests)."""
        p = self.patch
        spec = torch.fft.rfft2(patchify(z, p)) * self.fft_weight  # (B, 2h, H/p, W/p, p, p/2+1)
        power = spec.real.square() + spec.imag.square()
        if self.variant == "intended":
            out = torch.fft.irfft2(spec, s=(p, p)) + self.lam * torch.fft.irfft2(power, s=(p, p))
        else:
            out = torch.fft.irfft2(spec + self.alpha * power, s=(p, p)) + self.beta * torch.fft.irfft2(power, s=(p, p))
        return unpatchify(out)

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.channels, 2, "AutocorrelationFFN")
        z = self.dwconv(self.patch_map(self.project_in(x)))
        z1, z2 = z.chunk(2, dim=1)
        return self.project_out(F.gelu(z1) * z2)


# ------------------------------------------------------------------------------------------------ WDAM
def _relative_index(w: int, table: int) -> Tensor:
    """``(w², w²)`` index into a ``(2·table − 1)²`` relative-position table for a ``w x w`` window (``w <= table``)."""
    coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)  # (2, w²)
    rel = coords[:, :, None] - coords[:, None, :] + (table - 1)  # (2, w², w²)
    return rel[0] * (2 * table - 1) + rel[1]


def _shift_mask(h: int, w: int, win: int, shift: int, device) -> Tensor:
    """Swin's shifted-window mask ``(nW, win², win²)`` bool, True = same region before the roll (may attend)."""
    region = torch.zeros(h, w, dtype=torch.long, device=device)
    cuts = (slice(0, -win), slice(-win, -shift), slice(-shift, None))
    n = 0
    for hs in cuts:
        for ws in cuts:
            region[hs, ws] = n
            n += 1
    r = patchify(region, win).flatten(0, 1).flatten(1)  # (nW, win²)
    return r[:, :, None] == r[:, None, :]


def _tiny_wdam():
    return WaveletDirectionalAttention(4, heads=2, window=2), (torch.randn(2, 4, 8, 8),)


@register_module("wavelet_directional_attention", group="frequency", example=_tiny_wdam)
class WaveletDirectionalAttention(nn.Module):
    """Flickerformer WDAM: shifted-window attention on the Haar LL band, values gated by the LH/HL details.

    ::

        LL, LH, HL, HH = haar_dwt(x)                                              each (B, C, H/2, W/2)
        guide = relu(conv1x1_{2C -> C}(relu(gconv3x3_{groups=2}([LH ; HL]))))       ≥ 0
        q̃, k̃, v = dwconv3x3(conv1x1_{C -> 3C}(LL));  v <- v ⊙ (1 + guide)
        per head, in w x w windows of the cyclically shifted maps:
            q, k ℓ2-normalised over channels;  A = softmax(τ_h · qᵀk + B_rel [+ Swin mask])
        out = conv1x1(roll_back(merge_windows(A v)))
        details = gconv3x3_{groups=3}([LH ; HL ; HH])
        return haar_idwt([out ; details])

    The window attention is one call to the registered attention operator ``op`` (default ``"dense"``, which
    takes the relative-position ``bias`` and the shifted-window pair ``mask``), with ``scale=1`` and ``τ``
    folded into ``q``.

    Args:
        channels: ``C``. heads: number of heads (``C`` divisible by it). window: ``w`` (8); shrinks to the LL
            band when that is smaller (then no shift). shift: cyclic shift (default ``w // 2``).
        variant: ``"intended"`` or ``"released"``. Released (qulishen/Flickerformer): ``q = k =`` the raw shifted
            ``LL`` (the q̃/k̃ projections get zero gradient), ``v`` not shifted, no shifted-window mask, ``relu`` on
            the (signed) detail coefficients, ``τ`` multiplies the bias too. Intended: projected ``q̃, k̃``, ``v``
            shifted with them and rolled back, the Swin mask, linear details, bias added after ``τ`` scaling
            (the last two unverified against the paper text).
        op: the window attention operator, a registered name or its typed options (:class:`attnfuse.ops.OpConfig`,
            e.g. ``attnfuse.ops.configs.Dense(backend="reference")``): sequence layout, taking a score ``bias`` (the
            relative-position table, both variants) and, for ``"intended"`` with a shift, a pair ``mask`` (the Swin
            mask); its ``scale`` option is overridden by ``scale=1`` (``τ`` is folded into ``q``). Of the built-in
            operators only ``"dense"`` qualifies.
        bias: conv biases (False).
        device, dtype: for the parameters.

    Shapes: x ``(B, C, H, W)``, ``H/2`` and ``W/2`` divisible by the (possibly shrunk) window -> same.

    Raises:
        ValueError: ``channels`` not divisible by ``heads``, an operator that is not sequence-layout or does not take
            the ``bias`` (or, intended with a shift, the pair ``mask``) the window attention passes, or an LL band not
            divisible by the window.
        KeyError: an unknown operator name.

    Example:
        >>> WaveletDirectionalAttention(64, heads=2)(torch.randn(1, 64, 64, 64)).shape
        torch.Size([1, 64, 64, 64])
    """

    def __init__(self, channels: int, *, heads: int = 1, window: int = 8, shift: int | None = None,
                 variant: str = "intended", op: str | OpConfig = "dense", bias: bool = False,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if channels % heads:
            raise ValueError(f"channels must be divisible by heads, got {channels=}, {heads=}")
        dd = {"device": device, "dtype": dtype}
        self.channels, self.heads, self.window = channels, heads, window
        self.shift = window // 2 if shift is None else shift
        self.variant = _check_variant(variant)
        spec = get_operator(op) if isinstance(op, str) else op_config(op).spec  # refuse by geometry before options
        if spec.layout != "sequence":
            raise ValueError(f"op must be a sequence-layout operator (e.g. 'dense'), got operator {spec.name!r} ({spec.layout})")
        needs = [kw for kw, needed in (("bias", True), ("mask", self.variant == "intended" and self.shift > 0)) if needed]
        missing = [kw for kw in needs if not spec.takes.takes(kw)]
        if missing or "scale" not in spec.options:
            what = ", ".join([*(f"{kw}= ({'relative-position score bias' if kw == 'bias' else 'shifted-window pair mask'})"
                                for kw in missing), *([] if "scale" in spec.options else ["the option scale"])])
            hint = " (or shift=0)" if missing == ["mask"] else ""
            raise ValueError(f"WaveletDirectionalAttention (variant {self.variant!r}) needs an operator that takes {what}; "
                             f"operator {spec.name!r} does not: use op='dense'{hint}")
        self.op_options = op_config(op)  # the typed options (OpConfig); self.op: the operator's spec, whose fn is called
        self.op = spec
        self.guide_dw = nn.Conv2d(2 * channels, 2 * channels, 3, padding=1, groups=2, bias=bias, **dd)
        self.guide_pw = nn.Conv2d(2 * channels, channels, 1, bias=bias, **dd)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1, bias=bias, **dd)
        self.qkv_dw = nn.Conv2d(3 * channels, 3 * channels, 3, padding=1, groups=3 * channels, bias=bias, **dd)
        self.temperature = nn.Parameter(torch.ones(heads, 1, 1, **dd))
        self.rel_bias = nn.Parameter(torch.zeros((2 * window - 1) ** 2, heads, **dd))
        self.project_out = nn.Conv2d(channels, channels, 1, bias=bias, **dd)
        self.details = nn.Conv2d(3 * channels, 3 * channels, 3, padding=1, groups=3, bias=bias, **dd)

    def _windows(self, t: Tensor, win: int) -> Tensor:
        """``(B, C, h, w)`` -> ``(B·nW, heads, win², C/heads)``."""
        b, c, _, _ = t.shape
        p = patchify(t, win)  # (B, C, h/win, w/win, win, win)
        p = p.reshape(b, self.heads, c // self.heads, -1, win * win)  # (B, heads, d, nW, win²)
        return p.permute(0, 3, 1, 4, 2).flatten(0, 1)  # (B·nW, heads, win², d)

    def _merge(self, o: Tensor, b: int, h: int, w: int, win: int) -> Tensor:
        """Inverse of :meth:`_windows`: ``(B·nW, heads, win², d)`` -> ``(B, C, h, w)``."""
        o = o.unflatten(0, (b, -1)).permute(0, 2, 4, 1, 3)  # (B, heads, d, nW, win²)
        o = o.reshape(b, self.channels, h // win, w // win, win, win)
        return unpatchify(o)

    def forward(self, x: Tensor) -> Tensor:
        _check_x(x, self.channels, 2, "WaveletDirectionalAttention")
        bands = haar_dwt(x)  # (B, C, 4, H/2, W/2)
        ll, lh, hl, hh = bands.unbind(2)
        b, c, h, w = ll.shape
        win = min(self.window, h, w)
        if h % win or w % win:
            raise ValueError(f"WaveletDirectionalAttention: the LL band {(h, w)} must be divisible by the window {win}")
        shift = self.shift if win < min(h, w) else 0
        shift = min(shift, win - 1) if shift else 0
        guide = torch.relu(self.guide_pw(torch.relu(self.guide_dw(torch.cat([lh, hl], 1)))))
        q, k, v = self.qkv_dw(self.qkv(ll)).chunk(3, dim=1)
        v = v * (1 + guide)
        if self.variant == "released":
            q = k = ll
        roll = (lambda t: torch.roll(t, (-shift, -shift), (2, 3))) if shift else (lambda t: t)
        q, k = roll(q), roll(k)
        if self.variant == "intended":
            v = roll(v)
        qw, kw, vw = (self._windows(t, win) for t in (q, k, v))  # (B·nW, heads, win², d)
        qw, kw = F.normalize(qw, dim=-1), F.normalize(kw, dim=-1)
        tau = self.temperature  # (heads, 1, 1)
        idx = _relative_index(win, self.window).to(x.device)
        bias = self.rel_bias[idx.flatten()].view(win * win, win * win, self.heads).permute(2, 0, 1)  # (heads, L, L)
        mask = None
        if self.variant == "released":
            bias = tau * bias
        elif shift:
            mask = _shift_mask(h, w, win, shift, x.device).repeat(b, 1, 1).unsqueeze(1)  # (B·nW, 1, L, L)
        call = {**self.op_options.options(), "bias": bias.unsqueeze(0), "mask": mask, "scale": 1.0}
        out = self.op.fn(qw * tau, kw, vw, **call)
        out = self._merge(out, b, h, w, win)
        if shift:  # roll back (released too, although its v was never shifted)
            out = torch.roll(out, (shift, shift), (2, 3))
        out = self.project_out(out)
        details = self.details(torch.cat([lh, hl, hh], 1))
        if self.variant == "released":
            details = torch.relu(details)
        return haar_idwt(torch.cat([out.unsqueeze(2), details.unflatten(1, (3, c)).transpose(1, 2)], dim=2))

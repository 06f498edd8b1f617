"""DFYP adaptive operator learning (AOL): Sobel / Scharr / learnable edge operators and the residual blend.

Paper: Zhang et al., "DFYP: A Dynamic Fusion Framework with Spectral Channel Attention and Adaptive Operator
learning for Crop Yield Prediction", arXiv 2507.05849 (IEEE TGRS 2026). Reference code ``onef1shy/DFYP``
(``SobelOperator``, ``ScharrOperator``, ``LearnableOperator``, ``SentinelCropOperatorGate``).

Status: as released. The "adaptive" choice of operator is, in the released code, a per-year / per-crop
lookup table chosen on stage-1 validation RMSE (kept at the model level); the blend weight ``w`` and the
learnable operator's mixing are unconstrained / sigmoid-parametrised as released. The math is
:func:`attnfuse.ops.frequency.gradient_magnitude` with the fixed kernels of :mod:`attnfuse.ops.frequency`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnfuse.nn._registry import register_module
from attnfuse.ops.frequency import gradient_magnitude, scharr_kernel, sobel_kernel

__all__ = ["AdaptiveEdgeBlend", "EdgeOperator"]

_KINDS = ("sobel", "scharr", "learnable")
_LUMA = (0.299, 0.587, 0.114)


def _tiny_edge():
    return EdgeOperator("learnable"), (torch.randn(2, 3, 6, 7),)


@register_module("edge_operator", group="vision", example=_tiny_edge)
class EdgeOperator(nn.Module):
    """Depthwise gradient magnitude ``G(x) = sqrt((k_x ⋆ x)² + (k_y ⋆ x)² + eps)`` (zero padding, per channel).

    ``kind="sobel"`` / ``"scharr"``: the fixed kernels (``k_x`` = ``[[-1,0,1],[-2,0,2],[-1,0,1]]`` /
    ``[[-3,0,3],[-10,0,10],[-3,0,3]]``), no parameters. ``kind="learnable"``::

        k_x = m / max|m|,  m = σ(a)·K_sobel + (1 − σ(a))·K_scharr;   k_y = k_xᵀ;   G <- σ(b)·G
        init a = 0.5, b = 0.1  ->  k_x ≈ [[-.35, 0, .35], [-1, 0, 1], [-.35, 0, .35]], scale σ(0.1) ≈ 0.525

    Args:
        kind: ``"sobel"``, ``"scharr"`` or ``"learnable"``.
        eps: inside the square root (a constant input gives ``sqrt(eps)``, times ``σ(b)`` when learnable).
        device, dtype: for the parameters.

    Shapes: x ``(B, C, H, W)`` -> same. Equivariant to 90° rotations (zero padding included).
    """

    def __init__(self, kind: str = "learnable", *, eps: float = 1e-6, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {kind!r}")
        self.kind, self.eps = kind, eps
        dt = dtype or torch.float32
        self.register_buffer("sobel", sobel_kernel(dtype=dt, device=device), persistent=False)
        self.register_buffer("scharr", scharr_kernel(dtype=dt, device=device), persistent=False)
        if kind == "learnable":
            self.a = nn.Parameter(torch.full((), 0.5, device=device, dtype=dtype))
            self.b = nn.Parameter(torch.full((), 0.1, device=device, dtype=dtype))

    def kernel(self) -> Tensor:
        """The current ``k_x`` ``(3, 3)`` (``k_y = k_xᵀ``)."""
        if self.kind == "sobel":
            return self.sobel
        if self.kind == "scharr":
            return self.scharr
        s = torch.sigmoid(self.a)
        mix = s * self.sobel + (1 - s) * self.scharr
        return mix / mix.abs().amax()

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4:
            raise ValueError(f"EdgeOperator expects x (B, C, H, W), got {tuple(x.shape)=}")
        g = gradient_magnitude(x, self.kernel(), eps=self.eps)
        return torch.sigmoid(self.b) * g if self.kind == "learnable" else g


def _tiny_blend():
    return AdaptiveEdgeBlend(EdgeOperator("learnable")), (torch.randn(2, 3, 6, 7),)


@register_module("adaptive_edge_blend", group="vision", example=_tiny_blend)
class AdaptiveEdgeBlend(nn.Module):
    """DFYP AOL residual blend ``x' = w·G(x) + (1 − w)·x`` with a learnable scalar ``w`` (init 0.5, unconstrained).

    Args:
        operator: the edge operator ``G`` (an :class:`EdgeOperator`, injected).
        luma: compute ``G`` on the luma ``0.299 R + 0.587 G + 0.114 B`` of a 3-channel input and broadcast it to
            the 3 channels (DFYP's Sentinel-2 gate); the blend still uses each channel of ``x``.
        w_init: initial ``w``.
        device, dtype: for the parameters.

    Shapes: x ``(B, C, H, W)`` (``C = 3`` with ``luma``) -> same. ``w = 0`` is the identity, ``w = 1`` the edge map.
    """

    def __init__(self, operator: EdgeOperator, *, luma: bool = False, w_init: float = 0.5,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.operator, self.luma = operator, luma
        self.w = nn.Parameter(torch.full((), w_init, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        if self.luma:
            if x.dim() != 4 or x.shape[1] != 3:
                raise ValueError(f"AdaptiveEdgeBlend(luma=True) expects RGB x (B, 3, H, W), got {tuple(x.shape)=}")
            weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
            g = self.operator((x * weights).sum(1, keepdim=True)).expand_as(x)
        else:
            g = self.operator(x)
        return self.w * g + (1 - self.w) * x

"""Random-feature attention: one multi-head attention layer with frozen random query–key matrices, trainable values.

Paper: Fu, Guo, Bai, Mei, "What can a Single Attention Layer Learn? A Study Through the Random Features Lens"
(NeurIPS 2023, https://arxiv.org/abs/2307.11353). Only the abstract could be read; no official code exists. The
details below (the ``1/d`` score scale, count normalisation, value features ``[x_i; 1]``) are the project's
reconstruction (spec ``shared/papers/random-feature-attention.md``). Not Peng et al.'s "Random Feature Attention"
(a softmax approximation).
Status: exact as specified; the attention is one call to :func:`attnfuse.ops.kernel_attention`.

Model, for a query vector ``x_0`` and keys ``x_1..x_N`` (``R^d``)::

    W_m = c I_d + sigma G_m,  G_m[a, b] ~ N(0, 1), frozen          (m = 1..M heads; the query–key *product*)
    s_{m,i} = x_0^T W_m x_i / d
    phi_m(x) = (1/N) sum_i act(s_{m,i}) [x_i ; 1]                      (count normalisation; "sum" = softmax)
    f(x) = sum_m <v_m, phi_m(x)>,   v_m in R^{d+1} trainable            (linear in V: a random-feature model)

With ``x`` uniform on the sphere of radius ``sqrt(d)``, ``s_{m,i} ~ N(c cos(x_0, x_i), sigma^2)`` over ``W_m``
and ``E_W exp(s) = exp(c cos + sigma^2/2)``: a mean ``c I`` puts the query–key alignment into every feature.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnfuse.nn._registry import register_module
from attnfuse.ops import op_config

__all__ = ["RandomFeatureAttention"]

_SIMILARITY = {"exp": "softmax", "relu": "relu", "identity": "linear"}


@register_module("random_feature_attention", group="attention",
                 example=lambda: (RandomFeatureAttention(4, 8, seed=0), (torch.randn(3, 4), torch.randn(3, 5, 4))))
class RandomFeatureAttention(nn.Module):
    """Multi-head attention with frozen random ``W_m = qk_mean·I + qk_std·G_m`` and trainable value vectors.

    Args:
        dim: input width ``d``.
        heads: number of heads ``M``.
        qk_mean: ``c``, the mean of ``W_m`` is ``c I`` (0: zero-mean Gaussian).
        qk_std: ``sigma``, the std of the Gaussian part.
        value_bias: value features ``[x_i; 1]`` (``d + 1`` per head) instead of ``x_i``.
        seed: seed of ``W`` (the same seed rebuilds the same ``W``); None draws from the global generator.
        activation: ``"exp"``, ``"relu"`` or ``"identity"`` applied to the scores.
        normalize: ``"count"`` (``1/N`` of the valid keys), ``"sum"`` (with ``"exp"``: softmax attention) or ``"none"``.
        device, dtype: for ``W`` and the values.

    Attributes:
        W: buffer ``(M, d, d)``, never trained (saved with the state dict).
        values: parameter ``(M, d + value_bias)``, zero-initialised (``f = 0``).

    Shapes:
        ``forward(x0 (B, d), xs (B, N, d), key_mask (B, N) | None) -> (B,)``;
        ``features(...) -> (B, M·(d + value_bias))``; ``scores(x0, xs) -> (B, M, N)``.

    Raises:
        ValueError: bad sizes or option names.

    Example:
        >>> rfa = RandomFeatureAttention(8, 256, qk_mean=2.0, seed=0)
        >>> rfa(torch.randn(4, 8), torch.randn(4, 8, 8)).shape
        torch.Size([4])
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        qk_mean: float = 0.0,
        qk_std: float = 1.0,
        value_bias: bool = True,
        seed: int | None = None,
        activation: Literal["exp", "relu", "identity"] = "exp",
        normalize: Literal["count", "sum", "none"] = "count",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim <= 0 or heads <= 0:
            raise ValueError(f"dim and heads must be positive, got {dim=}, {heads=}")
        if activation not in _SIMILARITY:
            raise ValueError(f"activation must be one of {list(_SIMILARITY)}, got {activation!r}")
        if normalize not in ("count", "sum", "none"):
            raise ValueError(f"normalize must be 'count', 'sum' or 'none', got {normalize!r}")
        self.dim, self.heads, self.value_bias = dim, heads, value_bias
        self.qk_mean, self.qk_std, self.seed = qk_mean, qk_std, seed
        self.op = op_config("kernel", similarity=_SIMILARITY[activation], normalize=normalize, scale=1.0 / dim)
        g = None if seed is None else torch.Generator().manual_seed(seed)
        w = qk_mean * torch.eye(dim, dtype=torch.float64) + qk_std * torch.randn(heads, dim, dim, generator=g, dtype=torch.float64)
        dtype = dtype or torch.get_default_dtype()
        self.register_buffer("W", w.to(device=device, dtype=dtype))  # (M, d, d)
        self.values = nn.Parameter(torch.zeros(heads, dim + int(value_bias), device=device, dtype=dtype))

    def extra_repr(self) -> str:
        return f"dim={self.dim}, heads={self.heads}, qk_mean={self.qk_mean}, qk_std={self.qk_std}, op={self.op!r}"

    def _check(self, x0: Tensor, xs: Tensor, key_mask: Tensor | None) -> None:
        if x0.dim() != 2 or xs.dim() != 3 or x0.shape[0] != xs.shape[0] or x0.shape[1] != self.dim or xs.shape[2] != self.dim:
            raise ValueError(f"x0 must be (B, d={self.dim}) and xs (B, N, d={self.dim}), got x0.shape={tuple(x0.shape)}, "
                             f"xs.shape={tuple(xs.shape)}")
        if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != xs.shape[:2]):
            raise ValueError(f"key_mask must be bool (B, N) = {tuple(xs.shape[:2])}, got {key_mask.dtype} {tuple(key_mask.shape)}")

    def scores(self, x0: Tensor, xs: Tensor) -> Tensor:
        """``s_{m,i} = x_0^T W_m x_i / d`` ``(B, M, N)``."""
        self._check(x0, xs, None)
        return torch.einsum("bd,mde,bne->bmn", x0, self.W, xs) / self.dim  # (B, M, N)

    def features(self, x0: Tensor, xs: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """The design matrix ``[phi_1(x), ..., phi_M(x)]`` ``(B, M·(d + value_bias))``; ``f = features @ values.flatten()``."""
        self._check(x0, xs, key_mask)
        b, n, _ = xs.shape
        q = torch.einsum("bd,mde->bme", x0, self.W).unsqueeze(2)  # (B, M, 1, d): x_0^T W_m per head
        k = xs.unsqueeze(1).expand(b, self.heads, n, self.dim)  # (B, M, N, d)
        v = torch.cat([xs, xs.new_ones(b, n, 1)], -1) if self.value_bias else xs  # (B, N, d + 1)
        v = v.unsqueeze(1).expand(b, self.heads, n, v.shape[-1])  # (B, M, N, d + 1)
        phi = self.op(q, k, v, key_mask=key_mask)  # (B, M, 1, d + 1)
        return phi.reshape(b, -1)  # (B, M·(d + 1))

    def forward(self, x0: Tensor, xs: Tensor, key_mask: Tensor | None = None) -> Tensor:
        """``f(x) (B,)``; masked keys are left out (``key_mask`` True = the key exists)."""
        return self.features(x0, xs, key_mask) @ self.values.reshape(-1)  # (B,)

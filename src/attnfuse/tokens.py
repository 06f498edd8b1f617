"""TokenSet: the one data type every source to fuse is turned into.

A *source* is anything to fuse: a modality, a network layer, a scale, a condition. Each is a set
of tokens ``x (B, *axes, D)`` with a validity ``mask (B, *axes)`` (True = token present). A source
missing for a sample is a TokenSet whose mask is all False for that sample.

Public path: ``attnfuse.fusion.TokenSet`` (defined here, below ``nn``, so that encoders and heads
can use it without importing fusion).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = ["TokenSet", "zero_invalid"]


def zero_invalid(x: Tensor, mask: Tensor) -> Tensor:
    """Set invalid tokens to exactly zero (``where``, so NaN / inf padding cannot leak through).

    Shapes: ``x (B, *axes, D)``, ``mask (B, *axes)`` bool -> ``(B, *axes, D)``.
    """
    return torch.where(mask.unsqueeze(-1), x, torch.zeros((), dtype=x.dtype, device=x.device))


@dataclass(frozen=True)
class TokenSet:
    """Tokens of one source with their validity mask.

    Args:
        x: tokens ``(B, N, D)`` or ``(B, *axes, D)``, floating point.
        mask: bool ``(B, *axes)``, True = token present; ``None`` means all present.
        axes: one name per token axis, e.g. ``("token",)``, ``("time", "agent")``.
        pos: optional additive positional code broadcastable to ``x``.

    Raises:
        TypeError: non-float ``x``, non-bool ``mask``.
        ValueError: rank below 3, ``axes`` length or ``mask``/``pos`` shape mismatch.

    Example:
        >>> ts = TokenSet(torch.randn(2, 5, 16), mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool())
        >>> ts.flatten().x.shape
        torch.Size([2, 5, 16])
    """

    x: Tensor
    mask: Tensor | None = None
    axes: tuple[str, ...] = ("token",)
    pos: Tensor | None = None
    meta: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        x = self.x
        if not isinstance(x, Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, Tensor) else type(x).__name__
            raise TypeError(f"TokenSet x must be a floating-point tensor (B, *axes, D), got {got}")
        if x.dim() < 3:
            raise ValueError(f"TokenSet x must have shape (B, *axes, D) with at least one token axis, got x.shape={tuple(x.shape)}")
        axes = tuple(self.axes)
        object.__setattr__(self, "axes", axes)
        if len(axes) != x.dim() - 2:
            raise ValueError(f"TokenSet axes={axes} names {len(axes)} token axes but x.shape={tuple(x.shape)} has {x.dim() - 2}")
        if self.mask is not None:
            m = self.mask
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                got = m.dtype if isinstance(m, Tensor) else type(m).__name__
                raise TypeError(f"TokenSet mask must be a torch.bool tensor (True = present), got {got}")
            if m.shape != x.shape[:-1]:
                raise ValueError(f"TokenSet mask must have shape {tuple(x.shape[:-1])} (B, *axes), got mask.shape={tuple(m.shape)}")
        if self.pos is not None:
            try:
                torch.broadcast_shapes(self.pos.shape, x.shape)
            except RuntimeError:
                raise ValueError(f"TokenSet pos must broadcast to {tuple(x.shape)}, got pos.shape={tuple(self.pos.shape)}") from None

    @property
    def batch_size(self) -> int:
        return self.x.shape[0]

    @property
    def dim(self) -> int:
        return self.x.shape[-1]

    @property
    def num_tokens(self) -> int:
        """Number of token positions (product of the token axes)."""
        return math.prod(self.x.shape[1:-1])

    def valid(self) -> Tensor:
        """The mask, materialised: bool ``(B, *axes)``."""
        if self.mask is None:
            return torch.ones(self.x.shape[:-1], dtype=torch.bool, device=self.x.device)
        return self.mask

    def present(self) -> Tensor:
        """bool ``(B,)``: the source has at least one valid token in that sample."""
        return self.valid().flatten(1).any(dim=1)

    def flatten(self) -> TokenSet:
        """The same tokens as one axis: ``x (B, N, D)``, ``mask (B, N)``; positions added into ``x``."""
        x = self.x if self.pos is None else self.x + self.pos
        b, n, d = x.shape[0], math.prod(x.shape[1:-1]), x.shape[-1]  # explicit N: reshape cannot infer -1 when B = 0
        mask = None if self.mask is None else self.mask.reshape(b, n)
        return TokenSet(x.reshape(b, n, d), mask, ("token",), None, dict(self.meta))

    def with_mask(self, mask: Tensor) -> TokenSet:
        """A copy with another mask ``(B, *axes)``."""
        return TokenSet(self.x, mask, self.axes, self.pos, dict(self.meta))

"""Vector encoder: a precomputed feature vector (a view, an embedding) -> k tokens of width D.

Two ways to make ``k`` tokens from ``x (F,)``:

* ``mode="linear"``: one linear map ``F -> k*D``, reshaped to ``(k, D)`` (every token sees all features);
* ``mode="chunk"``: ``x`` is cut into ``k`` consecutive chunks of ``ceil(F/k)`` features (the last one
  zero-padded) and chunk ``i`` gets its own linear map to ``D`` (token ``i`` sees only chunk ``i``).

The chunk mode runs as one batched einsum; :func:`chunk_tokens_reference` is the plain per-chunk loop
it must match (forward and gradients; see the tests).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnfuse.encoders._registry import register_encoder
from attnfuse.encoders.base import check_mask
from attnfuse.tokens import TokenSet

__all__ = ["VectorEncoder", "chunk_tokens_reference"]


def chunk_tokens_reference(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    """Plain per-chunk loop: token ``i = x[..., i*c:(i+1)*c] @ weight[i] + bias[i]`` (x zero-padded to ``k*c``).

    Shapes:
        x ``(..., F)``, weight ``(k, c, D)``, bias ``(k, D)``; returns ``(..., k, D)``.
    """
    k, c, _ = weight.shape
    x = nn.functional.pad(x, (0, k * c - x.shape[-1]))
    return torch.stack([x[..., i * c:(i + 1) * c] @ weight[i] + bias[i] for i in range(k)], dim=-2)


@register_encoder("vector")
class VectorEncoder(nn.Module):
    """A vector input -> ``num_tokens`` tokens (see the module docstring for ``mode``).

    Args:
        in_features: input width ``F``.
        dim: token width ``D``.
        num_tokens: tokens per vector ``k``.
        mode: ``"linear"`` or ``"chunk"``.
        device, dtype: for the parameters.

    Shapes:
        x ``(B, F)`` with mask ``(B,)`` -> ``x (B, k, D)``, ``mask (B, k)``;
        x ``(B, L, F)`` (a padded sequence of vectors) with mask ``(B, L)`` -> ``(B, L*k, D)``, ``(B, L*k)``.
        Tokens of masked positions are zeros.
    """

    def __init__(
        self,
        in_features: int,
        dim: int,
        *,
        num_tokens: int = 1,
        mode: str = "linear",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if in_features < 1 or dim < 1 or num_tokens < 1:
            raise ValueError(f"in_features, dim and num_tokens must be >= 1, got {in_features}, {dim}, {num_tokens}")
        if mode not in ("linear", "chunk"):
            raise ValueError(f"mode must be 'linear' or 'chunk', got {mode!r}")
        if mode == "chunk" and num_tokens > in_features:
            raise ValueError(f"mode='chunk' needs num_tokens <= in_features, got num_tokens={num_tokens}, in_features={in_features}")
        dd = {"device": device, "dtype": dtype}
        self.in_features, self.dim, self.num_tokens, self.mode = in_features, dim, num_tokens, mode
        if mode == "linear":
            self.proj = nn.Linear(in_features, num_tokens * dim, **dd)
        else:
            chunk = math.ceil(in_features / num_tokens)
            bound = 1.0 / math.sqrt(chunk)
            self.weight = nn.Parameter(torch.empty(num_tokens, chunk, dim, **dd).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.empty(num_tokens, dim, **dd).uniform_(-bound, bound))

    def tokens(self, x: Tensor) -> Tensor:
        """Tokens without masking. Shapes: ``(..., F) -> (..., k, D)``."""
        if self.mode == "linear":
            return self.proj(x).unflatten(-1, (self.num_tokens, self.dim))  # (..., k, D)
        k, c, _ = self.weight.shape
        x_kc = nn.functional.pad(x, (0, k * c - x.shape[-1])).unflatten(-1, (k, c))  # (..., k, c)
        return torch.einsum("...kc,kcd->...kd", x_kc, self.weight) + self.bias  # (..., k, D)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> TokenSet:
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_features or not x.is_floating_point():
            raise ValueError(
                f"VectorEncoder expects float x of shape (B, {self.in_features}) or (B, L, {self.in_features}), "
                f"got {x.dtype} {tuple(x.shape)}"
            )
        present = check_mask("VectorEncoder", x, mask)  # (B,) or (B, L)
        x = torch.where(present[..., None], x, torch.zeros_like(x))
        tok = self.tokens(x)  # (B, k, D) or (B, L, k, D)
        tok_mask = present[..., None].expand(tok.shape[:-1])  # (B, k) or (B, L, k)
        tok = torch.where(tok_mask[..., None], tok, torch.zeros_like(tok))
        if x.dim() == 3:
            b = x.shape[0]
            tok, tok_mask = tok.reshape(b, -1, self.dim), tok_mask.reshape(b, -1)  # (B, L*k, D), (B, L*k)
        return TokenSet(tok, tok_mask)

"""Pooling of a token set into one vector per sample."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnfuse.ops import dense_attention
from attnfuse.tokens import TokenSet, zero_invalid

__all__ = ["AttentionPool", "Pool", "first_token_pool", "mean_pool"]


def mean_pool(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean over valid tokens; zero for a sample with no valid token.

    Shapes: ``x (B, N, D)``, ``mask (B, N)`` -> ``(B, D)``.
    """
    if mask is None:
        return x.mean(dim=1) if x.shape[1] else x.sum(dim=1)  # no token: the empty sum, 0
    m = mask.unsqueeze(-1).to(x.dtype)  # (B, N, 1)
    total = zero_invalid(x, mask).sum(dim=1)
    return total / m.sum(dim=1).clamp_min(1.0)


def first_token_pool(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """The first token (the fusion / CLS token, always present). Shapes: ``(B, N, D) -> (B, D)``.

    Raises:
        ValueError: ``x`` has no token (``N = 0``): there is no first token to read.
    """
    if x.shape[1] == 0:
        raise ValueError(f"first-token pooling ('fusion' / 'cls') needs at least one token, got x.shape={tuple(x.shape)} "
                         "(B, N=0, D); use pooling='mean' or 'attention' (0 for a sample without tokens)")
    return x[:, 0]


class AttentionPool(nn.Module):
    """A learned query attends over the valid tokens (multi-head); zero for a sample with none.

    Shapes: ``x (B, N, D)``, ``mask (B, N)`` -> ``(B, D)``.
    """

    def __init__(self, dim: int, *, heads: int = 1, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads, got {dim=}, {heads=}")
        dd = {"device": device, "dtype": dtype}
        self.heads = heads
        self.query = nn.Parameter(torch.randn(heads, 1, dim // heads, **dd) * 0.02)
        self.key = nn.Linear(dim, dim, **dd)

    def forward(self, x: Tensor, mask: Tensor | None = None, *, return_weights: bool = False):
        b, n, d = x.shape
        k = self.key(x).reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, H, N, Dh)
        v = x.reshape(b, n, self.heads, d // self.heads).transpose(1, 2)  # (B, H, N, Dh)
        q = self.query.to(x.dtype).expand(b, -1, -1, -1)  # (B, H, 1, Dh)
        out, w = dense_attention(q, k, v, key_mask=mask, return_weights=True)  # key_mask (B, N) -> (B, H, 1, Dh), (B, H, 1, N)
        out = out.transpose(1, 2).reshape(b, d)  # (B, D)
        return (out, w.squeeze(2)) if return_weights else out


class Pool(nn.Module):
    """Pooling by name: ``"mean"`` (valid tokens), ``"fusion"`` / ``"cls"`` (first token), ``"attention"``."""

    KINDS = ("mean", "fusion", "cls", "attention")

    def __init__(self, dim: int, kind: Literal["mean", "fusion", "cls", "attention"] = "mean", *, heads: int = 1,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if kind not in self.KINDS:
            raise ValueError(f"pooling must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        self.attn = AttentionPool(dim, heads=heads, device=device, dtype=dtype) if kind == "attention" else None

    def forward(self, tokens: TokenSet | Tensor, mask: Tensor | None = None) -> Tensor:
        if isinstance(tokens, TokenSet):
            tokens = tokens.flatten()
            x, mask = tokens.x, tokens.mask
        else:
            x = tokens
        if x.dim() != 3:
            raise ValueError(f"pooling expects tokens (B, N, D), got shape {tuple(x.shape)}")
        if self.kind == "mean":
            return mean_pool(x, mask)
        if self.kind in ("fusion", "cls"):
            return first_token_pool(x, mask)
        return self.attn(x, mask)

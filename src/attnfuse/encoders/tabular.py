"""Tabular encoders: numeric features and categorical columns -> tokens.

Per-feature numeric tokens follow the feature tokenizer of FT-Transformer: Gorishniy et al.,
"Revisiting Deep Learning Models for Tabular Data", NeurIPS 2021, https://arxiv.org/abs/2106.11959
(token ``j = x_j * W_j + b_j``). Status: implemented as described; categorical columns get one
embedding table each (stored as one table with offsets) with index 0 reserved for unknown/missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attnfuse.encoders._registry import register_encoder
from attnfuse.encoders.base import check_mask
from attnfuse.tokens import TokenSet

__all__ = ["CategoricalEncoder", "NumericEncoder"]

_TOKEN_MODES = ("feature", "group")


@register_encoder("numeric")
class NumericEncoder(nn.Module):
    """Numeric features -> tokens: one per feature (``tokens="feature"``) or one per group (``"group"``).

    Args:
        num_features: number of numeric features ``F``.
        dim: token width ``D``.
        tokens: ``"feature"``: token ``j = x_j * W_j + b_j`` (``F`` tokens); ``"group"``: an MLP
            ``F -> hidden -> D`` gives one token.
        hidden: hidden width of the group MLP (default ``dim``).
        dropout: dropout inside the group MLP.
        device, dtype: for the parameters.

    Shapes:
        x ``(B, F)`` float (values of absent samples are ignored, NaN allowed there);
        mask ``(B,)`` bool presence; returns TokenSet ``x (B, N, D)``, ``mask (B, N)`` with ``N = F``
        or ``1``, all False (and zero tokens) for absent samples.

    Example:
        >>> enc = NumericEncoder(3, 16)
        >>> enc(torch.randn(4, 3), torch.tensor([True, False, True, True])).x.shape
        torch.Size([4, 3, 16])
    """

    def __init__(
        self,
        num_features: int,
        dim: int,
        *,
        tokens: str = "feature",
        hidden: int | None = None,
        dropout: float = 0.0,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if num_features < 1 or dim < 1:
            raise ValueError(f"num_features and dim must be >= 1, got num_features={num_features}, dim={dim}")
        if tokens not in _TOKEN_MODES:
            raise ValueError(f"tokens must be one of {_TOKEN_MODES}, got {tokens!r}")
        dd = {"device": device, "dtype": dtype}
        self.num_features, self.dim, self.tokens = num_features, dim, tokens
        if tokens == "feature":
            bound = 1.0 / math.sqrt(dim)
            self.weight = nn.Parameter(torch.empty(num_features, dim, **dd).uniform_(-bound, bound))
            self.bias = nn.Parameter(torch.empty(num_features, dim, **dd).uniform_(-bound, bound))
        else:
            h = hidden or dim
            self.mlp = nn.Sequential(nn.Linear(num_features, h, **dd), nn.GELU(), nn.Dropout(dropout), nn.Linear(h, dim, **dd))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> TokenSet:
        if x.dim() != 2 or x.shape[1] != self.num_features or not x.is_floating_point():
            raise ValueError(f"NumericEncoder expects float x of shape (B, {self.num_features}), got {x.dtype} {tuple(x.shape)}")
        present = check_mask("NumericEncoder", x, mask)  # (B,)
        x = torch.where(present[:, None], x, torch.zeros_like(x))
        if self.tokens == "feature":
            tok = x[:, :, None] * self.weight + self.bias  # (B, F, D)
        else:
            tok = self.mlp(x)[:, None, :]  # (B, 1, D)
        tok_mask = present[:, None].expand(tok.shape[:2])  # (B, N)
        return TokenSet(torch.where(tok_mask[..., None], tok, torch.zeros_like(tok)), tok_mask)


@register_encoder("categorical")
class CategoricalEncoder(nn.Module):
    """Categorical columns -> tokens: one embedding per column value, index 0 = unknown / missing.

    Args:
        cardinalities: number of known categories per column (codes ``1..K_c``; code 0 and any
            code outside ``[0, K_c]`` are the reserved unknown/missing category of that column).
        dim: token width ``D``.
        tokens: ``"feature"``: one token per column; ``"group"``: the mean of the column
            embeddings as one token.
        device, dtype: for the parameters.

    Shapes:
        x ``(B, C)`` integer codes; mask ``(B,)``; returns ``x (B, N, D)``, ``mask (B, N)`` with
        ``N = C`` or ``1``.
    """

    def __init__(
        self,
        cardinalities: Sequence[int],
        dim: int,
        *,
        tokens: str = "feature",
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        cards = [int(c) for c in cardinalities]
        if not cards or min(cards) < 0:
            raise ValueError(f"cardinalities must be a non-empty list of counts >= 0, got {list(cardinalities)}")
        if tokens not in _TOKEN_MODES:
            raise ValueError(f"tokens must be one of {_TOKEN_MODES}, got {tokens!r}")
        self.cardinalities, self.dim, self.tokens = cards, dim, tokens
        sizes = torch.tensor([c + 1 for c in cards])
        self.register_buffer("offsets", torch.cumsum(sizes, 0) - sizes, persistent=False)  # (C,)
        self.register_buffer("limits", torch.tensor(cards), persistent=False)  # (C,)
        self.table = nn.Embedding(int(sizes.sum()), dim, device=device, dtype=dtype)
        nn.init.normal_(self.table.weight, std=1.0 / math.sqrt(dim))

    def forward(self, x: Tensor, mask: Tensor | None = None) -> TokenSet:
        c = len(self.cardinalities)
        if x.dim() != 2 or x.shape[1] != c or x.is_floating_point() or x.dtype == torch.bool:
            raise ValueError(f"CategoricalEncoder expects integer codes of shape (B, {c}), got {x.dtype} {tuple(x.shape)}")
        present = check_mask("CategoricalEncoder", x, mask)  # (B,)
        codes = torch.where((x < 0) | (x > self.limits), torch.zeros_like(x), x)  # unknown -> 0
        tok = self.table(codes + self.offsets)  # (B, C, D)
        if self.tokens == "group":
            tok = tok.mean(dim=1, keepdim=True)  # (B, 1, D)
        tok_mask = present[:, None].expand(tok.shape[:2])
        return TokenSet(torch.where(tok_mask[..., None], tok, torch.zeros_like(tok)), tok_mask)

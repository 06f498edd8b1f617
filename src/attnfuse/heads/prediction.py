"""Classification and regression heads over a fused token set."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnfuse.heads.pooling import Pool
from attnfuse.tokens import TokenSet

__all__ = ["ClassificationHead", "RegressionHead"]


class _PooledHead(nn.Module):
    def __init__(self, dim: int, out_dim: int, *, pooling: str, hidden: int | None, dropout: float, heads: int,
                 device: torch.device | None, dtype: torch.dtype | None) -> None:
        super().__init__()
        if out_dim < 1:
            raise ValueError(f"output size must be >= 1, got {out_dim}")
        dd = {"device": device, "dtype": dtype}
        self.pool = Pool(dim, pooling, heads=heads, **dd)
        self.norm = nn.LayerNorm(dim, **dd)
        layers: list[nn.Module] = [nn.Dropout(dropout)]
        if hidden:
            layers += [nn.Linear(dim, hidden, **dd), nn.GELU(), nn.Dropout(dropout)]
        layers.append(nn.Linear(hidden or dim, out_dim, **dd))
        self.mlp = nn.Sequential(*layers)

    def forward(self, tokens: TokenSet | Tensor, mask: Tensor | None = None) -> Tensor:
        return self.mlp(self.norm(self.pool(tokens, mask)))


class ClassificationHead(_PooledHead):
    """Pool tokens, LayerNorm, optional hidden layer, then class logits.

    Args:
        dim: token width ``D``.
        num_classes: number of classes ``K``.
        pooling: ``"mean"`` over valid tokens, ``"fusion"``/``"cls"`` (first token) or ``"attention"``.
        hidden: optional hidden width of an MLP before the logits.
        dropout: dropout before each linear layer.
        heads: heads of attention pooling.

    Shapes: ``TokenSet (B, N, D)`` (or ``x (B, N, D)`` with ``mask (B, N)``) -> logits ``(B, K)``.
    """

    def __init__(self, dim: int, num_classes: int, *, pooling: Literal["mean", "fusion", "cls", "attention"] = "mean",
                 hidden: int | None = None, dropout: float = 0.0, heads: int = 1,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(dim, num_classes, pooling=pooling, hidden=hidden, dropout=dropout, heads=heads,
                         device=device, dtype=dtype)


class RegressionHead(_PooledHead):
    """Pool tokens, LayerNorm, optional hidden layer, then ``out_dim`` real outputs.

    Shapes: ``TokenSet (B, N, D)`` -> ``(B, out_dim)``. Arguments as :class:`ClassificationHead`.
    """

    def __init__(self, dim: int, out_dim: int = 1, *, pooling: Literal["mean", "fusion", "cls", "attention"] = "mean",
                 hidden: int | None = None, dropout: float = 0.0, heads: int = 1,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__(dim, out_dim, pooling=pooling, hidden=hidden, dropout=dropout, heads=heads,
                         device=device, dtype=dtype)

"""Prediction heads over a fused token set: classification, regression / risk, Dirichlet (evidential), embedding."""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from attnfuse.heads.pooling import Pool
from attnfuse.tokens import TokenSet

__all__ = ["ClassificationHead", "DirichletHead", "EmbeddingHead", "RegressionHead"]


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


class DirichletHead(_PooledHead):
    """Pool tokens, then Dirichlet parameters ``alpha = evidence(logits) + 1`` (evidential classification).

    Args:
        dim: token width ``D``.
        num_classes: ``K``.
        evidence: activation turning logits into non-negative evidence (``"softplus"`` as in TMC,
            ``"relu"``, ``"exp"`` with logits clamped to ``[-10, 10]``).
        pooling, hidden, dropout, heads: as :class:`ClassificationHead`.

    Shapes: ``TokenSet (B, N, D)`` -> alpha ``(B, K)``, every entry ``>= 1``.
    """

    def __init__(self, dim: int, num_classes: int, *, evidence: Literal["softplus", "relu", "exp"] = "softplus",
                 pooling: Literal["mean", "fusion", "cls", "attention"] = "mean", hidden: int | None = None,
                 dropout: float = 0.0, heads: int = 1, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(dim, num_classes, pooling=pooling, hidden=hidden, dropout=dropout, heads=heads,
                         device=device, dtype=dtype)
        if evidence not in ("softplus", "relu", "exp"):
            raise ValueError(f"evidence must be 'softplus', 'relu' or 'exp', got {evidence!r}")
        self.evidence = evidence

    def forward(self, tokens: TokenSet | Tensor, mask: Tensor | None = None) -> Tensor:
        logits = super().forward(tokens, mask)
        if self.evidence == "softplus":
            ev = nn.functional.softplus(logits)
        elif self.evidence == "relu":
            ev = logits.relu()
        else:
            ev = logits.clamp(-10, 10).exp()
        return ev + 1.0


class EmbeddingHead(_PooledHead):
    """Pool tokens, then an ``out_dim`` embedding, L2-normalised by default (metric learning / retrieval).

    Shapes: ``TokenSet (B, N, D)`` -> ``(B, out_dim)``. Other arguments as :class:`ClassificationHead`.
    """

    def __init__(self, dim: int, out_dim: int = 64, *, normalize: bool = True,
                 pooling: Literal["mean", "fusion", "cls", "attention"] = "mean", hidden: int | None = None,
                 dropout: float = 0.0, heads: int = 1, device: torch.device | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__(dim, out_dim, pooling=pooling, hidden=hidden, dropout=dropout, heads=heads,
                         device=device, dtype=dtype)
        self.normalize = normalize

    def forward(self, tokens: TokenSet | Tensor, mask: Tensor | None = None) -> Tensor:
        z = super().forward(tokens, mask)
        return nn.functional.normalize(z, dim=-1) if self.normalize else z

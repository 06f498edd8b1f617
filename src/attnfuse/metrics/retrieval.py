"""Retrieval recall@k of embeddings with identity labels, leave-one-out over the evaluated set."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

__all__ = ["RecallAtK", "recall_at_k"]


def recall_at_k(embeddings: Tensor, labels: Tensor, ks: Sequence[int] = (1, 5), *, block_size: int = 1024) -> dict[int, Tensor]:
    """Share of queries whose ``k`` nearest other items (cosine) include one with the same label.

    Every item is a query against all the others (itself excluded); queries whose label occurs
    only once are skipped (they have no possible hit).

    Args:
        embeddings: ``(N, D)``.
        labels: ``(N,)`` integer identities.
        ks: the cut-offs.
        block_size: queries per block (memory ``block_size × N``).

    Returns:
        ``{k: 0-d tensor in [0, 1]}``; NaN when no query has a possible hit.
    """
    if embeddings.dim() != 2 or labels.shape != embeddings.shape[:1]:
        raise ValueError(f"embeddings must be (N, D) and labels (N,), got {tuple(embeddings.shape)} and {tuple(labels.shape)}")
    if any(int(k) < 1 for k in ks):
        raise ValueError(f"every k must be >= 1, got {list(ks)}")
    z = torch.nn.functional.normalize(embeddings.float(), dim=-1)
    n = z.shape[0]
    kmax = min(max(int(k) for k in ks), max(n - 1, 1))
    hits = {int(k): [] for k in ks}
    counts = torch.bincount(labels.long() - labels.long().min()) if n else labels
    has_pair = counts[labels.long() - labels.long().min()] > 1 if n else labels.bool()
    for start in range(0, n, block_size):
        sim = z[start:start + block_size] @ z.T  # (b, N)
        rows = torch.arange(start, min(start + block_size, n), device=z.device)
        sim[torch.arange(len(rows)), rows] = -float("inf")  # never retrieve the query itself
        top = sim.topk(kmax, dim=1).indices  # (b, kmax)
        same = labels[top] == labels[rows, None]  # (b, kmax)
        for k in hits:
            hits[k].append(same[:, :k].any(dim=1))
    out = {}
    for k, parts in hits.items():
        got = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)
        valid = has_pair
        out[k] = got[valid].float().mean() if valid.any() else torch.tensor(float("nan"))
    return out


class RecallAtK(Metric):
    """:func:`recall_at_k` over every embedding seen since the last reset; ``compute()`` returns ``{"recall@k": value}``."""

    higher_is_better = True
    full_state_update = False

    def __init__(self, ks: Sequence[int] = (1, 5), **kwargs) -> None:
        super().__init__(**kwargs)
        self.ks = tuple(int(k) for k in ks)
        self.add_state("embeddings", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")

    def update(self, embeddings: Tensor, labels: Tensor) -> None:
        self.embeddings.append(embeddings.detach().float())
        self.labels.append(labels.detach().long())

    def compute(self) -> dict[str, Tensor]:
        z, y = dim_zero_cat(self.embeddings), dim_zero_cat(self.labels)
        return {f"recall@{k}": v for k, v in recall_at_k(z, y, self.ks).items()}

"""InfoNCE with in-batch or paired negatives, and ST-Align's multi-target (spot, niche, cross-level) form.

Papers: van den Oord et al., "Representation Learning with Contrastive Predictive Coding" (InfoNCE),
arXiv 1807.03748; ST-Align, "A Multimodal Foundation Model for Image-Gene Alignment in Spatial
Transcriptomics", arXiv 2411.16793 (2024).

Status: complete. ST-Align's released repository is example code; its niche-level features are
still token sets ``(B, 8, 512)`` when they reach a 2-D InfoNCE. Here every input must be ``(N, D)``:
pool or flatten the tokens explicitly before the loss. Its older ``m / m.detach()`` "balancing" (value
1, gradient of ``log m``) is not copied.

::

    NCE(q, k+, {k-_j}) = -log exp(s(q, k+) / tau) / (exp(s(q, k+) / tau) + sum_j exp(s(q, k-_j) / tau))
    s = cosine similarity (default) or dot product;  tau = 0.1 in ST-Align
    L_ST-Align = alpha NCE(img_spot, gene_spot) + beta NCE(img_niche, gene_niche)
                 + (1 - alpha - beta) NCE(fused_spot, fused_niche),   alpha = beta = 0.3
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["ContrastiveTarget", "info_nce", "info_nce_logits", "multi_target_info_nce", "st_align_weights"]


class ContrastiveTarget(NamedTuple):
    """One InfoNCE term of :func:`multi_target_info_nce`.

    Attributes:
        query: ``(N, D)``.
        key: positives ``(N, D)``, row ``i`` pairs with ``query[i]``.
        negative_keys: paired negatives ``(N, M, D)`` (for ``negatives="paired"``), else None.
        negative_mask: ``(N, M)`` bool, True = this negative takes part; None = all.
    """

    query: Tensor
    key: Tensor
    negative_keys: Tensor | None = None
    negative_mask: Tensor | None = None


def _check_2d(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, D), got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype=}")
    if t.dim() != 2:
        raise ValueError(
            f"{name} must have shape (N, D), got {name}.shape={tuple(t.shape)}; pool or flatten token sets "
            "(e.g. (B, 8, 512) -> mean over tokens, or reshape to (B, 4096)) before the loss"
        )


def _similarity(x: Tensor, y: Tensor, kind: str) -> Tensor:
    if kind == "cosine":
        x = F.normalize(x, dim=-1, eps=1e-8)
        y = F.normalize(y, dim=-1, eps=1e-8)
    return (x * y).sum(-1)


def info_nce_logits(
    query: Tensor,
    key: Tensor,
    *,
    temperature: float = 0.1,
    negatives: Literal["batch", "paired"] = "paired",
    negative_keys: Tensor | None = None,
    negative_mask: Tensor | None = None,
    similarity: Literal["cosine", "dot"] = "cosine",
) -> tuple[Tensor, Tensor]:
    """The logits and targets whose cross-entropy is :func:`info_nce` (exposed for tests and metrics).

    Returns:
        ``(logits, target)``: ``"batch"``: logits ``(N, N)`` = ``s(query_i, key_j) / tau``, target
        ``arange(N)``; ``"paired"``: logits ``(N, 1 + M)`` with the positive in column 0 and masked
        negatives at ``-inf``, target zeros.
    """
    _check_2d("query", query)
    _check_2d("key", key)
    if query.shape != key.shape:
        raise ValueError(f"query and key must share (N, D), got query.shape={tuple(query.shape)}, key.shape={tuple(key.shape)}")
    if query.shape[0] == 0:
        raise ValueError("query must hold at least one sample, got N=0")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not (temperature > 0 and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}")
    if similarity not in ("cosine", "dot"):
        raise ValueError(f"similarity must be 'cosine' or 'dot', got {similarity!r}")
    n, dim = query.shape
    if negatives == "batch":
        if negative_keys is not None or negative_mask is not None:
            raise ValueError("negative_keys / negative_mask are only used with negatives='paired'")
        logits = _similarity(query[:, None, :], key[None, :, :], similarity) / temperature  # (N, N)
        return logits, torch.arange(n, device=query.device)
    if negatives != "paired":
        raise ValueError(f"negatives must be 'batch' or 'paired', got {negatives!r}")
    if negative_keys is None:
        raise ValueError("negatives='paired' needs negative_keys (N, M, D); use negatives='batch' for in-batch negatives")
    if not isinstance(negative_keys, Tensor) or negative_keys.dim() != 3 or negative_keys.shape[0] != n or negative_keys.shape[2] != dim:
        got = tuple(negative_keys.shape) if isinstance(negative_keys, Tensor) else type(negative_keys).__name__
        raise ValueError(f"negative_keys must have shape (N, M, D) = ({n}, M, {dim}), got {got}")
    if negative_keys.dtype != query.dtype:
        raise TypeError(f"negative_keys must have query's dtype {query.dtype}, got {negative_keys.dtype}")
    pos = _similarity(query, key, similarity)[:, None]  # (N, 1)
    neg = _similarity(query[:, None, :], negative_keys, similarity)  # (N, M)
    if negative_mask is not None:
        if not isinstance(negative_mask, Tensor) or negative_mask.dtype != torch.bool or negative_mask.shape != neg.shape:
            raise ValueError(f"negative_mask must be a bool tensor of shape {tuple(neg.shape)} (N, M)")
        neg = neg.masked_fill(~negative_mask, float("-inf"))
    logits = torch.cat([pos, neg], dim=1) / temperature  # (N, 1 + M)
    return logits, torch.zeros(n, dtype=torch.long, device=query.device)


def info_nce(
    query: Tensor,
    key: Tensor,
    *,
    temperature: float = 0.1,
    negatives: Literal["batch", "paired"] = "paired",
    negative_keys: Tensor | None = None,
    negative_mask: Tensor | None = None,
    similarity: Literal["cosine", "dot"] = "cosine",
    reduction: Literal["mean", "sum", "none"] = "mean",
) -> Tensor:
    """InfoNCE: cross-entropy of each query's positive against its negatives.

    Args:
        query: ``(N, D)``.
        key: positives ``(N, D)`` (``key[i]`` is ``query[i]``'s positive).
        temperature: ``tau > 0`` (0.1 in ST-Align).
        negatives: ``"paired"``: each query has its own negatives ``negative_keys[i]`` (ST-Align:
            5 spots beyond a distance threshold or from other clusters); ``"batch"``: the other
            rows' keys are the negatives (CLIP-style, one direction).
        negative_keys: ``(N, M, D)``, required for ``"paired"``.
        negative_mask: ``(N, M)`` bool, True = this negative takes part (for a variable count).
            A query with no negative left has loss 0.
        similarity: ``"cosine"`` (invariant to rescaling ``query`` / keys) or ``"dot"``.
        reduction: ``"mean"`` / ``"sum"`` over queries, ``"none"`` for ``(N,)``.

    Returns:
        scalar or ``(N,)``. With all ``M + 1`` similarities equal it is ``log(1 + M)``.

    Raises:
        TypeError / ValueError: non-floating or non-2-D inputs (pool token sets first), shape
            mismatches, a bad temperature, a missing ``negative_keys`` for ``"paired"``.

    Shapes:
        query, key ``(N, D)``, negative_keys ``(N, M, D)``, negative_mask ``(N, M)`` → scalar or ``(N,)``.

    Equivalent:
        ``F.cross_entropy(*info_nce_logits(query, key, ...), reduction=reduction)``.
    """
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    logits, target = info_nce_logits(
        query,
        key,
        temperature=temperature,
        negatives=negatives,
        negative_keys=negative_keys,
        negative_mask=negative_mask,
        similarity=similarity,
    )
    # log-softmax of column `target`; -inf logits (masked negatives) contribute exp(-inf) = 0
    loss = torch.logsumexp(logits, dim=1) - logits.gather(1, target[:, None]).squeeze(1)  # (N,)
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    return loss


def st_align_weights(alpha: float = 0.3, beta: float = 0.3) -> tuple[float, float, float]:
    """ST-Align's weights ``(alpha, beta, 1 - alpha - beta)`` for the spot, niche and cross-level terms.

    Raises:
        ValueError: unless ``alpha, beta >= 0`` and ``alpha + beta <= 1``.
    """
    if not (alpha >= 0 and beta >= 0 and alpha + beta <= 1 + 1e-12):
        raise ValueError(f"ST-Align weights need alpha, beta >= 0 and alpha + beta <= 1, got {alpha=}, {beta=}")
    return float(alpha), float(beta), float(max(0.0, 1.0 - alpha - beta))


def multi_target_info_nce(
    targets: Sequence[ContrastiveTarget | tuple[Tensor, ...]],
    weights: Sequence[float],
    *,
    temperature: float = 0.1,
    negatives: Literal["batch", "paired"] = "paired",
    similarity: Literal["cosine", "dot"] = "cosine",
) -> Tensor:
    """Weighted sum of InfoNCE terms, one per target (ST-Align: spot, niche, cross-level).

    ``sum_t weights[t] * info_nce(query_t, key_t, negative_keys=..., negative_mask=...)``; a term with weight 0 is skipped (so its inputs
    may be absent placeholders). With ST-Align's ``st_align_weights(alpha, beta)`` and targets
    ``[(img_spot, gene_spot, ...), (img_niche, gene_niche, ...), (fused_spot, fused_niche, ...)]``
    this is the paper's loss; ``alpha = 1`` reduces to spot-only alignment, ``alpha = beta = 0`` to
    the cross-level term alone.

    Args:
        targets: :class:`ContrastiveTarget` (or tuples ``(query, key[, negative_keys[, negative_mask]])``).
        weights: one non-negative number per target.
        temperature, negatives, similarity: as :func:`info_nce`, shared by every term.

    Returns:
        scalar.

    Shapes:
        per target: query, key ``(N, D)``, negative_keys ``(N, M, D)``; ``N`` and ``D`` may differ
        between targets.
    """
    targets = [t if isinstance(t, ContrastiveTarget) else ContrastiveTarget(*t) for t in targets]
    weights = [float(w) for w in weights]
    if len(targets) == 0 or len(targets) != len(weights):
        raise ValueError(f"need one weight per target (>= 1), got {len(targets)} targets and {len(weights)} weights")
    if any(not (w >= 0 and math.isfinite(w)) for w in weights):
        raise ValueError(f"weights must be finite and >= 0, got {weights}")
    if all(w == 0 for w in weights):
        raise ValueError("at least one weight must be positive")
    total: Tensor | None = None
    for tgt, w in zip(targets, weights):
        if w == 0:
            continue
        term = w * info_nce(
            tgt.query,
            tgt.key,
            temperature=temperature,
            negatives=negatives,
            negative_keys=tgt.negative_keys,
            negative_mask=tgt.negative_mask,
            similarity=similarity,
        )
        total = term if total is None else total + term
    assert total is not None
    return total

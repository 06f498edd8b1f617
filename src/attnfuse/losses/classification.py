"""Classification losses beyond plain cross-entropy: focal loss (Lin et al., 2017, arXiv:1708.02002)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["focal_loss"]


def focal_loss(logits: Tensor, target: Tensor, *, gamma: float = 2.0, weight: Tensor | None = None) -> Tensor:
    """Mean focal loss ``-w_y (1 - p_y)^gamma log p_y`` over the batch (``gamma = 0`` is weighted cross-entropy).

    Args:
        logits: ``(N, K)``.
        target: class indices ``(N,)``.
        gamma: focusing parameter ``>= 0``.
        weight: optional per-class weights ``(K,)``; the mean is normalised by the summed weights of
            the targets, as :func:`torch.nn.functional.cross_entropy` does.

    Returns:
        scalar loss.

    Raises:
        ValueError: bad shapes or a negative ``gamma``.
    """
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, K) and target (N,), got {tuple(logits.shape)} and {tuple(target.shape)}")
    if gamma < 0:
        raise ValueError(f"gamma must be >= 0, got {gamma}")
    logp = nn.functional.log_softmax(logits.float(), dim=-1).gather(1, target.long()[:, None]).squeeze(1)  # (N,)
    loss = -((1 - logp.exp()).clamp_min(0) ** gamma) * logp
    w = torch.ones_like(loss) if weight is None else weight.to(loss)[target.long()]
    return (w * loss).sum() / w.sum().clamp_min(torch.finfo(loss.dtype).tiny)

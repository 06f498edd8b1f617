"""MoH load-balance loss over the routed attention heads.

Paper: Jin, Zhu, Yuan, Yan, "MoH: Multi-Head Attention as Mixture-of-Head Attention", arXiv
2410.11842 (2024); the form follows the Switch-Transformer balance loss (Fedus et al., arXiv 2101.03961).

Status: complete. The formula below is the paper's as we read it (the paper text was not available
here to re-check; it was cross-checked against the official code, ``SkyworkAI/MoH``,
``MoH-ViT/attention.py``, which computes the same quantity times the number of routed heads):

::

    routed heads i = 1..E (the h - h_s heads that are not shared), T tokens
    P_i = (1 / T) sum_t softmax(W_r x_t)_i                       mean routing probability
    f_i = (1 / T) sum_t 1[token t selects head i]                fraction of tokens routed to head i (top-k)
    L_b = sum_i f_i P_i                                          (normalization="paper")
        = E * sum_i f_i P_i                                      (normalization="code": MoH-ViT's released value)

With top-``k`` routing ``sum_i f_i = k``; the paper-normalised loss is ``k / E`` at perfect balance
and approaches ``k`` when every token picks the same heads with probability ~1. MoH adds
``beta * L_b`` (beta = 0.01) to the task loss per MoH layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from attnfuse.ops.moh import MoHRouting

__all__ = ["moh_load_balance_loss", "moh_load_balance_total"]


def moh_load_balance_loss(
    router_probs: Tensor,
    selected: Tensor,
    *,
    token_mask: Tensor | None = None,
    normalization: Literal["paper", "code"] = "paper",
) -> Tensor:
    """MoH load-balance loss ``sum_i f_i P_i`` over the routed heads.

    Args:
        router_probs: softmax routing probabilities over the ``E`` routed heads ``(..., E)``, one row
            per token (``...`` = any token layout, e.g. ``(B, L)``).
        selected: which heads each token uses: a bool mask ``(..., E)`` (top-k one-hot) or integer
            head indices ``(..., k)``. Not differentiated (``f_i`` is a count).
        token_mask: optional ``(...)`` bool, True = a real token; padding is left out of both means.
        normalization: ``"paper"`` (``sum_i f_i P_i``) or ``"code"`` (``E`` times that, as the
            released MoH-ViT code).

    Returns:
        scalar; 0 when no token is valid.

    Raises:
        TypeError / ValueError: non-floating probabilities, mismatched shapes, out-of-range indices.

    Shapes:
        router_probs ``(..., E)``, selected ``(..., E)`` bool or ``(..., k)`` int, token_mask ``(...)`` → scalar.

    Example:
        >>> p = torch.full((4, 4), 0.25)                         # 4 tokens, 4 routed heads, uniform
        >>> sel = torch.tensor([[0, 1], [2, 3], [0, 1], [2, 3]])  # top-2, balanced
        >>> moh_load_balance_loss(p, sel)                         # sum_i 0.5 * 0.25 = k / E
        tensor(0.5000)
    """
    if not isinstance(router_probs, Tensor) or not router_probs.is_floating_point():
        raise TypeError("router_probs must be a floating-point tensor (..., E)")
    if router_probs.dim() < 1 or router_probs.shape[-1] < 1:
        raise ValueError(f"router_probs must have a head axis last (..., E), got {tuple(router_probs.shape)}")
    if normalization not in ("paper", "code"):
        raise ValueError(f"normalization must be 'paper' or 'code', got {normalization!r}")
    e = router_probs.shape[-1]
    lead = router_probs.shape[:-1]
    if not isinstance(selected, Tensor):
        raise TypeError(f"selected must be a torch.Tensor, got {type(selected).__name__}")
    if selected.dtype == torch.bool:
        if selected.shape != router_probs.shape:
            raise ValueError(f"a bool selected must have router_probs' shape {tuple(router_probs.shape)}, got {tuple(selected.shape)}")
        chosen = selected.to(router_probs.dtype)
    elif not selected.is_floating_point() and not selected.is_complex():
        if selected.shape[:-1] != lead:
            raise ValueError(f"integer selected must be (..., k) with leading shape {tuple(lead)}, got {tuple(selected.shape)}")
        if selected.numel() and (int(selected.min()) < 0 or int(selected.max()) >= e):
            raise ValueError(f"selected head indices must lie in [0, {e - 1}]")
        chosen = torch.zeros_like(router_probs).scatter_(-1, selected.long(), 1.0)
    else:
        raise TypeError(f"selected must be a bool mask (..., E) or integer indices (..., k), got {selected.dtype=}")
    p = router_probs.reshape(-1, e)  # (T, E)
    f = chosen.reshape(-1, e).detach()  # (T, E)
    if token_mask is not None:
        if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool or token_mask.shape != lead:
            raise ValueError(f"token_mask must be a bool tensor of shape {tuple(lead)}")
        keep = token_mask.reshape(-1, 1).to(p.dtype)
        p, f = p * keep, f * keep
        n_tok = keep.sum()
    else:
        n_tok = torch.tensor(float(p.shape[0]), dtype=p.dtype, device=p.device)
    n_tok = n_tok.clamp_min(1.0)
    loss = ((f.sum(0) / n_tok) * (p.sum(0) / n_tok)).sum()
    return loss * e if normalization == "code" else loss


def moh_load_balance_total(
    routings: Sequence[MoHRouting],
    *,
    beta: float = 0.01,
    reduction: Literal["mean", "sum"] = "mean",
    normalization: Literal["paper", "code"] = "code",
) -> Tensor:
    """``beta`` times the load-balance loss of several MoH layers, averaged (or summed) over the layers.

    The released trainers (``MoH-ViT/engine.py``, ``MoH-DiT/train.py``) add ``0.01 ×`` the **mean** over
    the MoH layers of the code-normalised loss (``reduction="mean"``, ``normalization="code"``, the
    defaults here); ``reduction="sum"`` is "``beta · L_b`` per layer". Layers without routed heads and
    padding tokens (each record's ``token_mask``) are left out.

    Args:
        routings: one :class:`attnfuse.ops.MoHRouting` per MoH layer (``return_routing=True`` or
            :func:`attnfuse.nn.collect_routing`).
        beta: the loss weight (0.01 in the paper and the released code).
        reduction: ``"mean"`` or ``"sum"`` over the layers.
        normalization: as :func:`moh_load_balance_loss`.

    Returns:
        scalar; 0 (a plain tensor) when no layer routes.

    Raises:
        ValueError: unknown ``reduction`` / ``normalization``.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if normalization not in ("paper", "code"):
        raise ValueError(f"normalization must be 'paper' or 'code', got {normalization!r}")
    losses = [
        moh_load_balance_loss(r.probs, r.selected, token_mask=r.token_mask, normalization=normalization)
        for r in routings if r.probs.shape[-1] > 0 and r.selected.shape[-1] > 0
    ]
    if not losses:
        return torch.zeros(())
    total = torch.stack(losses).sum()
    return beta * (total / len(losses) if reduction == "mean" else total)


def router_z_loss(router_logits: Tensor, *, token_mask: Tensor | None = None) -> Tensor:
    """Router z-loss of ST-MoE (Zoph et al., arXiv 2202.08906), as BAM adds it per MoE layer.

    ``L_z = (1 / T) sum_t (logsumexp_j x_tj)^2`` over the ``T`` (valid) tokens: it keeps the router logits
    small. ``L_z >= 0``; all-zero logits over ``N`` experts give ``(log N)^2``.

    Args:
        router_logits: ``(..., N)`` router logits, one row per token.
        token_mask: optional ``(...)`` bool, True = a real token; padding is left out of the mean.

    Returns:
        scalar; 0 when no token is valid.

    Raises:
        TypeError / ValueError: non-floating logits, no expert axis, a mask of the wrong shape.

    Example:
        >>> router_z_loss(torch.zeros(5, 4))  # (log 4)^2
        tensor(1.9218)
    """
    if not isinstance(router_logits, Tensor) or not router_logits.is_floating_point():
        raise TypeError("router_logits must be a floating-point tensor (..., N)")
    if router_logits.dim() < 1 or router_logits.shape[-1] < 1:
        raise ValueError(f"router_logits must have an expert axis last (..., N), got {tuple(router_logits.shape)}")
    z = torch.logsumexp(router_logits.float(), dim=-1) ** 2  # (...)
    if token_mask is not None:
        if not isinstance(token_mask, Tensor) or token_mask.dtype != torch.bool or token_mask.shape != z.shape:
            raise ValueError(f"token_mask must be a bool tensor of shape {tuple(z.shape)}")
        keep = token_mask.to(z.dtype)
        return (z * keep).sum() / keep.sum().clamp_min(1.0)
    return z.mean() if z.numel() else z.sum()

"""Shared input validation for attention operators. Errors name the argument and the expected shape."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_bias", "check_broadcastable", "check_key_mask", "check_mask", "check_qkv", "key_mask_to_pairs"]


def check_qkv(q: Tensor, k: Tensor, v: Tensor, *, rank: int = 4) -> None:
    """Check ``q (B, H, L, D)``, ``k (B, H, S, D)``, ``v (B, H, S, Dv)`` (or grid ranks).

    Raises:
        TypeError: if an input is not a floating-point tensor or the dtypes/devices differ.
        ValueError: if ranks, batch/head dims, key lengths or head dims do not match.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {name}.dtype={t.dtype}")
        if t.dim() != rank:
            raise ValueError(
                f"{name} must have rank {rank} (B, H, L, D), got {name}.shape={tuple(t.shape)}"
            )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype=}, {k.dtype=}, {v.dtype=}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device=}, {k.device=}, {v.device=}")
    if q.shape[:2] != k.shape[:2] or q.shape[:2] != v.shape[:2]:
        raise ValueError(
            "q, k, v must share batch and head dims (B, H); got "
            f"q.shape={tuple(q.shape)}, k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}"
        )
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(
            f"q and k must share the head dim D; got q.shape[-1]={q.shape[-1]}, k.shape[-1]={k.shape[-1]}"
        )
    if k.shape[2:-1] != v.shape[2:-1]:
        raise ValueError(
            f"k and v must have the same key length S; got k.shape={tuple(k.shape)}, v.shape={tuple(v.shape)}"
        )


def check_broadcastable(name: str, t: Tensor, target: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``t`` broadcasts to ``target`` without growing its rank."""
    if t.dim() > len(target):
        raise ValueError(f"{name} must broadcast to {target} (B, H, L, S), got {name}.shape={tuple(t.shape)}")
    for have, want in zip(reversed(t.shape), reversed(target)):
        if have not in (1, want):
            raise ValueError(
                f"{name} must broadcast to {target} (B, H, L, S), got {name}.shape={tuple(t.shape)}"
            )


def check_mask(mask: Tensor | None, target: tuple[int, ...]) -> None:
    """Check a boolean pair mask broadcastable to ``target`` ``(B, H, L, S)``.

    Raises:
        TypeError: if ``mask`` is not a bool tensor.
        ValueError: if it does not broadcast to ``target``.
    """
    if mask is None:
        return
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        got = mask.dtype if isinstance(mask, Tensor) else type(mask).__name__
        raise TypeError(
            f"mask must be a torch.bool tensor (True = key takes part), got {got}; "
            "for an additive float mask pass it as bias="
        )
    try:
        check_broadcastable("mask", mask, target)
    except ValueError as err:
        if mask.dim() in (2, 3) and mask.shape[0] in (1, target[0]) and mask.shape[-1] == target[-1]:
            raise ValueError(f"{err}; a mask (B, S) or (B, H, S) of the keys that exist is a key mask: pass key_mask=") from None
        raise


def check_key_mask(op: str, key_mask: Tensor | None, batch: int, heads: int, keys: tuple[int, ...], *,
                   legend: str = "S") -> Tensor | None:
    """Check a key mask and return it as ``(B', H', *keys)`` with ``B'`` in ``{1, B}``, ``H'`` in ``{1, H}``.

    The one rule for every operator: a key mask says which keys exist, ``True`` = the key takes part
    (for every query), with shape ``(B, *keys)`` or ``(B, H, *keys)``; ``B`` and ``H`` may be 1 and
    the key axes ``*keys`` (``(S,)`` for sequences, ``*grid`` for grids) must be given in full.

    Args:
        op: operator name, for the messages.
        key_mask: the mask or None.
        batch, heads: ``B`` and ``H`` of the call.
        keys: the key token shape.
        legend: how ``*keys`` is written in messages (``"S"``, ``"*grid"``).

    Raises:
        TypeError: if ``key_mask`` is not a bool tensor.
        ValueError: if its shape does not follow the rule (naming the operator and the shapes it takes).
    """
    if key_mask is None:
        return None
    if not isinstance(key_mask, Tensor) or key_mask.dtype != torch.bool:
        got = key_mask.dtype if isinstance(key_mask, Tensor) else type(key_mask).__name__
        raise TypeError(f"operator {op!r}: key_mask must be a torch.bool tensor (True = key exists), got {got}")
    n = len(keys)
    km = key_mask.unsqueeze(1) if key_mask.dim() == n + 1 else key_mask  # (B', H', *keys)
    if km.dim() != n + 2 or km.shape[0] not in (1, batch) or km.shape[1] not in (1, heads) or tuple(km.shape[2:]) != tuple(keys):
        hint = "; a (B, H, L, S) mask of (query, key) pairs is a pair mask (mask=)" if key_mask.dim() == n + 3 else ""
        raise ValueError(
            f"operator {op!r}: key_mask must be (B, {legend}) = {(batch, *keys)} or (B, H, {legend}) = {(batch, heads, *keys)} "
            f"(B and H may be 1), got key_mask.shape={tuple(key_mask.shape)}{hint}"
        )
    return km


def key_mask_to_pairs(mask: Tensor | None, key_mask: Tensor | None) -> Tensor | None:
    """Combine a pair mask (broadcastable to ``(B, H, L, S)``) with a checked key mask ``(B', H', S)``."""
    if key_mask is None:
        return mask
    pairs = key_mask.unsqueeze(-2)  # (B', H', 1, S)
    return pairs if mask is None else mask & pairs


def check_bias(bias: Tensor | None, target: tuple[int, ...], dtype: torch.dtype) -> None:
    """Check an additive floating-point score bias broadcastable to ``target``.

    Raises:
        TypeError: if ``bias`` is not floating point.
        ValueError: if it does not broadcast to ``target``.
    """
    if bias is None:
        return
    if not isinstance(bias, Tensor) or not bias.is_floating_point():
        got = bias.dtype if isinstance(bias, Tensor) else type(bias).__name__
        raise TypeError(f"bias must be a floating-point tensor, got {got}; for a boolean mask pass mask=")
    check_broadcastable("bias", bias, target)

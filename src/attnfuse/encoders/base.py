"""Shared pieces of the input encoders: mask checks and encoding a whole batch of inputs.

Every encoder maps one raw input to a :class:`~attnfuse.tokens.TokenSet` of width ``dim``:
``encoder(x, mask) -> TokenSet``, where ``mask`` has the shape of ``x`` without its last axis (the
per-sample presence ``(B,)`` for fixed-size inputs, ``(B, L)`` for padded sequences; images
``(B, C, H, W)`` take the presence ``(B,)``). Tokens of absent samples are zeros and masked out,
so a missing input is exactly "not passed" for fusion.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor, nn

from attnfuse.tokens import TokenSet

__all__ = ["check_mask", "encode_inputs"]


def check_mask(name: str, x: Tensor, mask: Tensor | None) -> Tensor:
    """``mask`` as bool of shape ``x.shape[:-1]`` (all True if None).

    Raises:
        TypeError: non-bool mask.
        ValueError: wrong mask shape.
    """
    if mask is None:
        return torch.ones(x.shape[:-1], dtype=torch.bool, device=x.device)
    if mask.dtype != torch.bool:
        raise TypeError(f"{name}: mask must be torch.bool (True = present), got {mask.dtype}")
    if mask.shape != x.shape[:-1]:
        raise ValueError(f"{name}: mask must have shape x.shape[:-1]={tuple(x.shape[:-1])}, got {tuple(mask.shape)}")
    return mask


def encode_inputs(encoders: Mapping[str, nn.Module], inputs: Mapping[str, Mapping[str, Tensor]]) -> dict[str, TokenSet]:
    """Run each input's encoder: ``{name: {"x", "mask"}}`` (a collated batch's ``"inputs"``) -> ``{name: TokenSet}``.

    Inputs are visited in sorted name order. An input without an encoder, or an encoder without
    its input, raises: a model trained with an input must receive it (with an all-False mask
    when it is missing).

    Raises:
        KeyError: the names of ``encoders`` and ``inputs`` differ.
    """
    if set(encoders) != set(inputs):
        raise KeyError(
            f"encoders and inputs must name the same inputs; encoders without input: {sorted(set(encoders) - set(inputs))}, "
            f"inputs without encoder: {sorted(set(inputs) - set(encoders))}"
        )
    return {name: encoders[name](inputs[name]["x"], inputs[name].get("mask")) for name in sorted(inputs)}

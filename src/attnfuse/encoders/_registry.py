"""Encoder registry: input kind name -> encoder class, filled by ``@register_encoder`` in defining modules."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

__all__ = ["ENCODERS", "create_encoder", "get_encoder", "list_encoders", "register_encoder"]

ENCODERS: dict[str, type[nn.Module]] = {}


def register_encoder(name: str) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Register an encoder class under ``name``.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        if name in ENCODERS:
            raise ValueError(f"encoder {name!r} is already registered (by {ENCODERS[name].__module__})")
        ENCODERS[name] = cls
        return cls

    return decorator


def get_encoder(name: str) -> type[nn.Module]:
    """Look up an encoder class. Raises ``KeyError`` listing the registered names."""
    try:
        return ENCODERS[name]
    except KeyError:
        raise KeyError(f"unknown encoder {name!r}; registered encoders: {list_encoders()}") from None


def list_encoders() -> list[str]:
    """Sorted names of the registered encoders."""
    return sorted(ENCODERS)


def create_encoder(name: str, **kwargs: Any) -> nn.Module:
    """Construct the encoder ``name`` with ``kwargs``, e.g. ``create_encoder("numeric", num_features=3, dim=32)``."""
    return get_encoder(name)(**kwargs)

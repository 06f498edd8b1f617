"""Registry of the modules of :mod:`attnfuse.nn` (blocks with parameters: gates, attention layers, experts).

Every entry is declared once next to its class::

    @register_module("coord_attention", group="vision", example=_tiny_coord_attention)
    class CoordAttention(nn.Module): ...

``example`` builds a tiny instance and a batch of inputs, ``() -> (module, args)`` with ``args`` a tuple of
tensors; the registry-wide tests (``tests/nn/test_module_registry.py``) run every entry through it: forward
output finite, gradients reaching every trainable parameter (after a random perturbation, so zero-initialised
branches do not hide dead parameters), ``torch.compile`` equal to eager and ``torch.export``.
``attnfuse list`` shows the registry by group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from attnfuse._lookup import lookup

__all__ = ["GROUPS", "MODULES", "ModuleSpec", "get_module", "list_modules", "register_module"]

#: Allowed groups (what ``attnfuse list`` prints them under).
GROUPS = ("attention", "experts", "vision", "frequency")

Example = Callable[[], tuple[nn.Module, tuple[torch.Tensor, ...]]]


@dataclass(frozen=True)
class ModuleSpec:
    """One registered module: its name, class, group and the tiny example the generic tests run."""

    name: str
    cls: type
    group: str
    example: Example


MODULES: dict[str, ModuleSpec] = {}


def register_module(name: str, *, group: str, example: Example) -> Callable[[type], type]:
    """Register an ``nn.Module`` class under ``name``; returns the class unchanged.

    Args:
        name: registry name (snake_case), unique.
        group: one of :data:`GROUPS`.
        example: ``() -> (module, args)``: a tiny instance and a tuple of input tensors for ``module(*args)``.

    Raises:
        ValueError: duplicate name, unknown group, a class that is not an ``nn.Module``.
    """
    if group not in GROUPS:
        raise ValueError(f"register_module({name!r}): group must be one of {GROUPS}, got {group!r}")

    def decorator(cls: type) -> type:
        if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
            raise ValueError(f"register_module({name!r}): {cls!r} is not an nn.Module subclass")
        if name in MODULES:
            raise ValueError(f"module {name!r} is already registered by {MODULES[name].cls.__module__}")
        MODULES[name] = ModuleSpec(name=name, cls=cls, group=group, example=example)
        return cls

    return decorator


def get_module(name: str) -> ModuleSpec:
    """Look up a registered module (or its class name). Raises ``KeyError`` with a did-you-mean."""
    by_class = {spec.cls.__name__: spec for spec in MODULES.values()}
    if name in by_class and name not in MODULES:
        return by_class[name]
    return lookup(MODULES, name, "module", listing="registered modules")


def list_modules(group: str | None = None) -> list[str]:
    """Sorted names of the registered modules, optionally of one group."""
    return sorted(n for n, s in MODULES.items() if group is None or s.group == group)

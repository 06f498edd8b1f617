"""Fusion registry: name -> fusion module class, filled by ``@register_fusion`` in defining modules."""

from __future__ import annotations

from collections.abc import Callable

__all__ = ["FUSIONS", "SYMMETRIES", "get_fusion", "list_fusions", "register_fusion"]

#: Allowed symmetry declarations:
#: ``equivariant``: permuting a source's tokens permutes the corresponding output tokens;
#: ``invariant``: the fused output does not change when a source's tokens are permuted;
#: ``ordered``: token order matters (learned positions, index readouts).
SYMMETRIES = ("equivariant", "invariant", "ordered")

FUSIONS: dict[str, type] = {}


def register_fusion(name: str) -> Callable[[type], type]:
    """Register a fusion module class; it must declare ``symmetry`` and ``has_parameters``.

    Raises:
        ValueError: duplicate name or missing / invalid declarations.
    """

    def decorator(cls: type) -> type:
        if name in FUSIONS:
            raise ValueError(f"fusion {name!r} is already registered by {FUSIONS[name].__module__}")
        if getattr(cls, "symmetry", None) not in SYMMETRIES:
            raise ValueError(f"fusion {name!r} must declare symmetry in {SYMMETRIES}")
        if not isinstance(getattr(cls, "has_parameters", None), bool):
            raise ValueError(f"fusion {name!r} must declare has_parameters: bool")
        FUSIONS[name] = cls
        return cls

    return decorator


def get_fusion(name: str) -> type:
    """Look up a fusion class. Raises ``KeyError`` listing the registered names."""
    try:
        return FUSIONS[name]
    except KeyError:
        raise KeyError(f"unknown fusion {name!r}; registered fusions: {list_fusions()}") from None


def list_fusions() -> list[str]:
    """Sorted names of the registered fusion modules."""
    return sorted(FUSIONS)

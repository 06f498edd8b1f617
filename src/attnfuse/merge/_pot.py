"""Lazy import of POT (Python Optimal Transport), the optional ``merge`` extra."""

from __future__ import annotations

from types import ModuleType

__all__ = ["require_pot"]


def require_pot() -> ModuleType:
    """Import and return the ``ot`` module of POT.

    Raises:
        ModuleNotFoundError: POT is not installed; the message names the extra that installs it.
    """
    try:
        import ot
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            'optimal-transport fusion needs POT (module "ot"): pip install "attnfuse[merge]"', name="ot"
        ) from err
    return ot

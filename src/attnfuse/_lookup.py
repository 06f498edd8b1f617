"""One name lookup for every registry: an unknown name is a ``KeyError`` with a close match and the known names."""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import TypeVar

__all__ = ["lookup"]

T = TypeVar("T")


def lookup(registry: Mapping[str, T], name: str, what: str, *, listing: str, note: str = "") -> T:
    """``registry[name]``, or ``KeyError("unknown <what> 'x' (did you mean 'y'?); <listing>: [...]")``.

    Args:
        registry: the name map.
        name: the name asked for.
        what: what an entry is called in the message (``"fusion"``, ``"task"``).
        listing: the label of the list of known names (``"registered fusions"``).
        note: extra text after the name instead of the did-you-mean (e.g. "it is a building block").
    """
    try:
        return registry[name]
    except KeyError:
        if not note:
            close = difflib.get_close_matches(name, list(registry), n=1)
            note = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown {what} {name!r}{note}; {listing}: {sorted(registry)}") from None

"""Operator registry: a name -> operator map, filled by ``@register_operator`` in defining modules."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["OPERATORS", "OperatorSpec", "get_operator", "list_operators", "register_operator"]

#: Arguments every operator takes from the calling module (not user options).
CALL_ARGUMENTS = frozenset({"q", "k", "v", "mask", "bias", "is_causal", "return_weights", "return_lse"})


@dataclass(frozen=True)
class OperatorSpec:
    """What a module needs to know to call an operator.

    Attributes:
        name: registry name.
        fn: the functional, ``fn(q, k, v, *, mask=..., bias=..., return_weights=..., **options)``.
        layout: ``"sequence"`` if token axes are flattened into one ``L`` axis before the call,
            ``"grid"`` if the operator takes the token grid ``(B, H, *grid, D)`` as is.
        cross: whether keys may come from another token set than the queries.
        options: the operator's own keyword options (everything except the call arguments).
    """

    name: str
    fn: Callable
    layout: Literal["sequence", "grid"] = "sequence"
    cross: bool = True
    options: frozenset[str] = field(default_factory=frozenset)

    def check_options(self, options: dict) -> None:
        """Raise ``TypeError`` if ``options`` contains a keyword the operator does not take."""
        unknown = sorted(set(options) - self.options)
        if unknown:
            raise TypeError(
                f"operator {self.name!r} got unknown option(s) {unknown}; "
                f"it accepts {sorted(self.options) or 'no options'}"
            )


OPERATORS: dict[str, OperatorSpec] = {}


def register_operator(
    name: str, *, layout: Literal["sequence", "grid"] = "sequence", cross: bool = True
) -> Callable[[Callable], Callable]:
    """Register an attention functional under ``name``.

    Raises:
        ValueError: if ``name`` is already registered.
    """

    def decorator(fn: Callable) -> Callable:
        if name in OPERATORS:
            raise ValueError(f"operator {name!r} is already registered (by {OPERATORS[name].fn.__module__})")
        params = inspect.signature(fn).parameters
        options = frozenset(p for p in params if p not in CALL_ARGUMENTS)
        OPERATORS[name] = OperatorSpec(name=name, fn=fn, layout=layout, cross=cross, options=options)
        return fn

    return decorator


def get_operator(name: str) -> OperatorSpec:
    """Look up a registered operator.

    Raises:
        KeyError: listing the registered names if ``name`` is unknown.
    """
    try:
        return OPERATORS[name]
    except KeyError:
        raise KeyError(f"unknown attention operator {name!r}; registered operators: {list_operators()}") from None


def list_operators() -> list[str]:
    """Sorted names of the registered operators."""
    return sorted(OPERATORS)

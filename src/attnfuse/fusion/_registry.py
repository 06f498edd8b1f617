"""Fusion registries: fusion modules of named sources, and building blocks that are not fusions.

``FUSIONS`` lists every class that keeps the fusion protocol (see ``docs/fusion-modules.md``)::

    cls(sources: Sequence[str], dim: int, *, <keyword options with defaults>, device=None, dtype=None)
    module(inputs: Mapping[str, TokenSet], *, return_weights=False) -> FusionOutput   # fused width module.out_dim

``BLOCKS`` lists the pieces that do not (an injector into a host model, a router, Dempster's rule over
evidence): they keep their own documented APIs. A name lives in at most one of the two registries.
Both are filled by decorators in the defining modules and store nothing else.
"""

from __future__ import annotations

from collections.abc import Callable

from attnfuse._lookup import lookup

__all__ = [
    "BLOCKS", "FUSIONS", "OUTPUTS", "SYMMETRIES", "get_block", "get_fusion", "list_blocks", "list_fusions",
    "register_block", "register_fusion",
]

#: Allowed symmetry declarations:
#: ``equivariant``: permuting a source's tokens permutes the corresponding output tokens;
#: ``invariant``: the fused output does not change when a source's tokens are permuted;
#: ``ordered``: token order matters (learned positions, index readouts).
SYMMETRIES = ("equivariant", "invariant", "ordered")

#: Allowed ``output`` declarations: what ``FusionOutput.fused`` holds.
#: ``tokens``: fused tokens for a head (width ``out_dim``);
#: ``dirichlet``: Dirichlet parameters ``alpha (B, 1, K)`` a task reads directly (``out_dim = K``).
OUTPUTS = ("tokens", "dirichlet")

FUSIONS: dict[str, type] = {}
BLOCKS: dict[str, type] = {}


def register_fusion(name: str) -> Callable[[type], type]:
    """Register a fusion class; it must declare ``symmetry``, ``has_parameters`` and ``output``.

    Raises:
        ValueError: a name already in ``FUSIONS`` or ``BLOCKS``; missing / invalid declarations.
    """

    def decorator(cls: type) -> type:
        _check_free(name)
        if getattr(cls, "symmetry", None) not in SYMMETRIES:
            raise ValueError(f"fusion {name!r} must declare symmetry in {SYMMETRIES}")
        if not isinstance(getattr(cls, "has_parameters", None), bool):
            raise ValueError(f"fusion {name!r} must declare has_parameters: bool")
        if getattr(cls, "output", None) not in OUTPUTS:
            raise ValueError(f"fusion {name!r} must declare output in {OUTPUTS}")
        FUSIONS[name] = cls
        return cls

    return decorator


def register_block(name: str) -> Callable[[type], type]:
    """Register a building block (a module that does not keep the fusion protocol).

    Raises:
        ValueError: a name already in ``FUSIONS`` or ``BLOCKS``.
    """

    def decorator(cls: type) -> type:
        _check_free(name)
        BLOCKS[name] = cls
        return cls

    return decorator


def _check_free(name: str) -> None:
    for kind, registry in (("fusion", FUSIONS), ("block", BLOCKS)):
        if name in registry:
            raise ValueError(f"{name!r} is already registered as a {kind} by {registry[name].__module__}")


def get_fusion(name: str) -> type:
    """Look up a fusion class. Raises ``KeyError`` listing the registered names."""
    note = f" ({name!r} is a building block: attnfuse.fusion.get_block)" if name in BLOCKS else ""
    return lookup(FUSIONS, name, "fusion", listing="registered fusions", note=note)


def list_fusions() -> list[str]:
    """Sorted names of the registered fusion modules."""
    return sorted(FUSIONS)


def get_block(name: str) -> type:
    """Look up a building block class. Raises ``KeyError`` listing the registered names."""
    note = f" ({name!r} is a fusion: attnfuse.fusion.get_fusion)" if name in FUSIONS else ""
    return lookup(BLOCKS, name, "building block", listing="registered blocks", note=note)


def list_blocks() -> list[str]:
    """Sorted names of the registered building blocks."""
    return sorted(BLOCKS)

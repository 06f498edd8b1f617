"""Constructor checks shared by the attention modules of :mod:`attnfuse.nn`."""

from __future__ import annotations

__all__ = ["resolve_head_dim"]


def resolve_head_dim(dim: int, heads: int, head_dim: int | None) -> int:
    """The per-head width: ``head_dim`` if given, else ``dim // heads``.

    Raises:
        ValueError: ``dim`` or ``heads`` not positive, or ``head_dim`` None and ``dim`` not divisible by ``heads``.
    """
    if dim <= 0 or heads <= 0:
        raise ValueError(f"dim and heads must be positive, got {dim=}, {heads=}")
    if head_dim is None:
        if dim % heads:
            raise ValueError(f"dim must be divisible by heads (or pass head_dim=), got {dim=}, {heads=}")
        head_dim = dim // heads
    return head_dim

"""Tensor-in / tensor-out wrapper so a fusion pipeline can be traced by ``torch.export``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import Tensor, nn

from attnfuse.tokens import TokenSet

__all__ = ["TensorFusion"]


class TensorFusion(nn.Module):
    """Call ``fusion`` (and an optional ``head``) with plain tensors in a fixed source order.

    ``forward(x_1, mask_1, ..., x_n, mask_n)`` builds ``{name_i: TokenSet(x_i, mask_i)}`` and returns
    the head's output, or ``(fused.x, fused.mask)`` without a head. Every source is always passed
    (a missing one as an all-False mask), so the traced graph has no optional inputs; optional
    keyword arguments of the fusion's ``forward`` keep their defaults. Works for every registered
    fusion (tested over ``FUSIONS``).

    Args:
        fusion: a fusion module (``{name: TokenSet} -> FusionOutput``).
        sources: source names, in the order of the positional tensors (default: ``fusion.sources``,
            the sorted names).
        head: optional module applied to the fused :class:`TokenSet`.
        axes: token-axis names per source for multi-axis inputs (default ``("token",)``).

    Raises:
        ValueError: no ``sources`` and a fusion without ``sources``; at call time, a wrong number of
            tensors.

    Example:
        >>> model = TensorFusion(fusion, ["a", "b"], head=head)  # doctest: +SKIP
        >>> torch.export.export(model, (xa, ma, xb, mb))  # doctest: +SKIP
    """

    def __init__(self, fusion: nn.Module, sources: Sequence[str] | None = None, *, head: nn.Module | None = None,
                 axes: Mapping[str, Sequence[str]] | None = None) -> None:
        super().__init__()
        if sources is None:
            sources = getattr(fusion, "sources", None)
            if sources is None:
                raise ValueError(f"{type(fusion).__name__} has no .sources: pass sources= (the order of the tensors)")
        self.fusion, self.head, self.sources = fusion, head, tuple(sources)
        self.axes = {name: tuple((axes or {}).get(name, ("token",))) for name in self.sources}

    def forward(self, *tensors: Tensor) -> Tensor | tuple[Tensor, Tensor]:
        if len(tensors) != 2 * len(self.sources):
            raise ValueError(f"expected x and mask for each of {self.sources} ({2 * len(self.sources)} tensors), got {len(tensors)}")
        inputs = {name: TokenSet(tensors[2 * i], tensors[2 * i + 1], self.axes[name]) for i, name in enumerate(self.sources)}
        fused = self.fusion(inputs).fused
        return self.head(fused) if self.head is not None else (fused.x, fused.valid())

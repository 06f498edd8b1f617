"""Attention over the pixels of convolutional feature maps with any registered operator, by name.

Convolutional image modules hold ``(B, C, H, W)`` (or ``(B, C, D, H, W)``) feature maps, attention modules hold
channels-last tokens ``(B, *tokens, C)``. :class:`FeatureMapAttention` is the adapter between the two: it moves
the channels last once, runs :class:`attnfuse.nn.Attention` with the chosen operator (``"dense"``,
``"neighborhood"``, ``"halo"``, ``"routing"``, ``"axial"``, ... — sequence operators see the pixels flattened in
row-major order, grid operators the grid as is) and moves them back.

Padded batches: images of different sizes are batched by padding them to a common size (:func:`pad_images`,
bottom / right); the boolean ``mask`` ``(B, H, W)`` of valid pixels reaches the operator as its **key mask**, so
padded pixels are never attended, whatever they hold (their values are also replaced by zeros before the
projections, so NaN or inf padding cannot leak), and the outputs at padded pixels are zero.

What padding changes: no operator lets padded pixels *influence* a valid output. Whether the valid outputs
also equal those of the unpadded image alone depends on the operator's geometry (checked in
``tests/nn/test_feature_map.py``): yes for ``dense``, ``axial``, ``halo`` (blocks are anchored at the top-left
corner, and halo keys past the valid region are masked either way) and the kernelised ``silu_kernel`` /
``kernel``; no for ``neighborhood`` (windows shift inward at the border of the *padded* grid, not of the valid
region), ``routing`` (regions tile the padded grid) and ``combiner`` (its blocks follow the flattened order,
which changes with the padded width).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from attnfuse.nn._registry import register_module
from attnfuse.nn.attention import Attention
from attnfuse.ops import OpConfig, OperatorSpec

__all__ = ["FeatureMapAttention", "feature_map_support", "pad_images", "to_feature_map", "to_tokens", "valid_mask"]

#: Operator layouts that can take the pixels of a feature map.
GRID_LAYOUTS = ("sequence", "grid")


def feature_map_support(spec: OperatorSpec) -> str | None:
    """Why operator ``spec`` cannot run on a feature map, or None if it can.

    Sequence operators take the pixels flattened (row-major), grid operators take the pixel grid; any other
    layout cannot take a grid. (Every registered operator takes a key mask, which padded batches need.)
    """
    if spec.layout not in GRID_LAYOUTS:
        return f"operator {spec.name!r} has layout {spec.layout!r}; a feature map needs one of {GRID_LAYOUTS}"
    return None


def to_tokens(x: Tensor) -> Tensor:
    """``(B, C, *grid) -> (B, *grid, C)`` (a view-free permute; no copy until needed)."""
    if x.dim() < 3:
        raise ValueError(f"x must be a feature map (B, C, *grid), got shape {tuple(x.shape)}")
    return x.movedim(1, -1)


def to_feature_map(t: Tensor) -> Tensor:
    """``(B, *grid, C) -> (B, C, *grid)``; the inverse of :func:`to_tokens`."""
    if t.dim() < 3:
        raise ValueError(f"tokens must be (B, *grid, C), got shape {tuple(t.shape)}")
    return t.movedim(-1, 1)


def valid_mask(sizes: Tensor | Sequence[Sequence[int]], grid: Sequence[int], *, device: torch.device | None = None) -> Tensor:
    """Valid-pixel mask of a batch padded at the end of every axis (bottom / right).

    Args:
        sizes: ``(B, n)`` valid extent of every image per grid axis (``(h, w)`` in 2-D).
        grid: the padded grid ``(H, W)`` (or ``(D, H, W)``).

    Returns:
        ``(B, *grid)`` bool: True on the top-left ``sizes[b]`` block of image ``b``.
    """
    sizes = torch.as_tensor(sizes, dtype=torch.long, device=device)
    grid = tuple(int(g) for g in grid)
    if sizes.dim() != 2 or sizes.shape[1] != len(grid):
        raise ValueError(f"sizes must be (B, {len(grid)}) extents for grid {grid}, got shape {tuple(sizes.shape)}")
    if sizes.numel() and ((sizes < 0).any() or (sizes > torch.tensor(grid, device=sizes.device)).any()):
        raise ValueError(f"sizes must lie in [0, grid] = [0, {grid}] per axis, got {sizes.tolist()}")
    mask = torch.ones(sizes.shape[0], *grid, dtype=torch.bool, device=sizes.device)
    for axis, n in enumerate(grid):
        inside = torch.arange(n, device=sizes.device)[None, :] < sizes[:, axis : axis + 1]  # (B, n)
        shape = [sizes.shape[0]] + [1] * len(grid)
        shape[1 + axis] = n
        mask = mask & inside.reshape(shape)
    return mask


def pad_images(images: Sequence[Tensor], *, multiple: int | Sequence[int] = 1, value: float = 0.0) -> tuple[Tensor, Tensor]:
    """Batch images of different sizes: pad each at the end of every axis to a common size.

    Args:
        images: ``(C, *grid_i)`` tensors with one channel count and grid rank.
        multiple: round the common size up to a multiple of this (per axis), e.g. an operator's block size.
        value: the fill value of the padding (never attended).

    Returns:
        ``(x, mask)``: ``x (B, C, *grid)`` and ``mask (B, *grid)`` bool, True on valid pixels.
    """
    if not images:
        raise ValueError("images must hold at least one (C, *grid) tensor")
    rank = images[0].dim() - 1
    if rank < 1 or any(im.dim() != rank + 1 or im.shape[0] != images[0].shape[0] for im in images):
        raise ValueError(f"images must all be (C, *grid) with one C and grid rank, got {[tuple(im.shape) for im in images]}")
    mult = (multiple,) * rank if isinstance(multiple, int) else tuple(multiple)
    if len(mult) != rank or any(m < 1 for m in mult):
        raise ValueError(f"multiple must be a positive int or {rank} of them, got {multiple}")
    sizes = torch.tensor([list(im.shape[1:]) for im in images], dtype=torch.long)
    grid = [-(-int(sizes[:, a].max()) // mult[a]) * mult[a] for a in range(rank)]
    x = images[0].new_full((len(images), images[0].shape[0], *grid), value)
    for i, im in enumerate(images):
        x[(i, slice(None), *(slice(0, n) for n in im.shape[1:]))] = im
    return x, valid_mask(sizes, grid, device=x.device)


def _tiny_feature_map_attention() -> tuple[nn.Module, tuple[Tensor, ...]]:
    from attnfuse.ops.configs import Neighborhood

    module = FeatureMapAttention(8, 2, op=Neighborhood(kernel_size=3, backend="reference"))
    x = torch.randn(2, 8, 5, 6)
    mask = valid_mask([[5, 6], [4, 3]], (5, 6))
    return module, (x, mask)


@register_module("feature_map_attention", group="vision", example=_tiny_feature_map_attention)
class FeatureMapAttention(nn.Module):
    """Multi-head attention over the pixels of a feature map with any registered operator.

    Args:
        dim: channels ``C`` of the feature map (and of the output).
        heads: number of heads.
        op: the operator, by name (``"neighborhood"``) or typed options
            (``attnfuse.ops.configs.Neighborhood(kernel_size=7)``); see :class:`attnfuse.nn.Attention`.
        context_dim: channels of a ``context`` feature map (cross-attention; sequence operators only, or those
            declaring ``cross=True``).
        head_dim, qkv_bias, dropout, device, dtype: as in :class:`attnfuse.nn.Attention`.
        **op_kwargs: operator options in keyword form (``kernel_size=7``).

    Raises:
        ValueError: an operator whose layout cannot take a grid (:func:`feature_map_support`), bad shapes.
        KeyError / TypeError: unknown operator or options (from :class:`attnfuse.nn.Attention`).

    Shapes:
        x ``(B, C, *grid)`` with ``grid = (H, W)`` or ``(D, H, W)`` (grid operators: the rank they support);
        mask ``(B, *grid)`` bool, True on valid (not padded) pixels; context ``(B, Cc, *grid_c)``, context_mask
        ``(B, *grid_c)``; out ``(B, C, *grid)``, zero at masked pixels.

    Example:
        >>> attn = FeatureMapAttention(32, 4, op="neighborhood", kernel_size=3)
        >>> x, mask = pad_images([torch.randn(32, 7, 9), torch.randn(32, 5, 6)])
        >>> attn(x, mask).shape
        torch.Size([2, 32, 7, 9])
    """

    def __init__(self, dim: int, heads: int, *, op: str | OpConfig = "dense", context_dim: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = True, dropout: float = 0.0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None, **op_kwargs) -> None:
        super().__init__()
        self.attn = Attention(dim, heads, op=op, context_dim=context_dim, head_dim=head_dim, qkv_bias=qkv_bias,
                              dropout=dropout, device=device, dtype=dtype, **op_kwargs)
        reason = feature_map_support(self.attn.spec)
        if reason is not None:
            raise ValueError(f"FeatureMapAttention: {reason}")
        self.dim = dim

    @property
    def spec(self) -> OperatorSpec:
        """The operator's registry entry."""
        return self.attn.spec

    def extra_repr(self) -> str:
        return f"dim={self.dim}"

    def _tokens(self, x: Tensor, mask: Tensor | None, name: str, mask_name: str, channels: int | None) -> Tensor:
        if x.dim() not in (4, 5):
            raise ValueError(f"{name} must be a feature map (B, C, H, W) or (B, C, D, H, W), got shape {tuple(x.shape)}")
        if channels is not None and x.shape[1] != channels:
            raise ValueError(f"{name} must have {channels} channels, got shape {tuple(x.shape)}")
        tokens = to_tokens(x)  # (B, *grid, C)
        if mask is not None:
            want = (x.shape[0], *x.shape[2:])
            if mask.dtype != torch.bool or tuple(mask.shape) != want:
                raise ValueError(f"{mask_name} must be bool with shape {want} (B, *grid), got {mask.dtype} {tuple(mask.shape)}")
            tokens = torch.where(mask[..., None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))
        return tokens

    def forward(self, x: Tensor, mask: Tensor | None = None, *, context: Tensor | None = None,
                context_mask: Tensor | None = None, return_weights: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Attend over the pixels; returns ``out (B, C, *grid)`` or ``(out, weights)`` (weights in the operator's layout)."""
        tokens = self._tokens(x, mask, "x", "mask", self.dim)
        ctx = None
        if context is not None:
            ctx = self._tokens(context, context_mask, "context", "context_mask", self.attn.to_k.in_features)
        elif context_mask is not None:
            raise ValueError("context_mask needs context=")
        result = self.attn(tokens, mask=mask, context=ctx, context_mask=context_mask, return_weights=return_weights)
        out, weights = result if return_weights else (result, None)
        if mask is not None:
            out = torch.where(mask[..., None], out, torch.zeros((), dtype=out.dtype, device=out.device))
        out = to_feature_map(out)
        return (out, weights) if return_weights else out

"""Image encoder: a small image ``(B, C, H, W)`` -> a grid of patch tokens of width ``D``.

The image is zero-padded at the bottom and on the right to multiples of ``p = patch_size`` (a
standardised image is padded with its training mean), then a stem maps each ``p x p`` patch to
one token, giving ``ceil(H/p) x ceil(W/p)`` tokens:

* ``stem="patch"``: one ``Conv2d(C, D, kernel_size=p, stride=p)``, the patch embedding of ViT:
  Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021, https://arxiv.org/abs/2010.11929;
* ``stem="conv"`` (default): ``log2(p)`` 3x3 convolutions of stride 2 (padding 1) with GELU, then a
  1x1 convolution to ``D``: the convolutional stem of Xiao et al., "Early Convolutions Help
  Transformers See Better", NeurIPS 2021, https://arxiv.org/abs/2106.14881. ``p`` must be a power of
  two (``p = 1``: one 3x3 convolution of stride 1).

A learned 2-D position embedding ``row[i] + col[j]`` (factorised: ``(H' + W') * D`` parameters) is
added to token ``(i, j)``. Tokens come out row-major, flattened to ``(B, H'*W', D)`` with axes
``("token",)`` (every fusion takes these), or with ``grid=True`` as ``(B, H', W', D)`` with axes
``("h", "w")`` for grid fusions (``mutual``, ``parameter_free``).

Example: mfeat's ``pix`` digit is 16 high and 15 wide; with ``patch_size=4`` it is padded to
16 x 16 and gives 4 x 4 = 16 tokens::

    rows 0-3 | cols 0-3 -> token 0, cols 4-7 -> token 1, ..., cols 12-14 + 1 padding column -> token 3
    rows 4-7 | -> tokens 4..7   ...   rows 12-15 -> tokens 12..15

Status: implemented as described; the conv stem has no BatchNorm (an absent sample, all zeros,
would shift the batch statistics of the others).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from attnfuse.encoders._registry import register_encoder
from attnfuse.tokens import TokenSet, zero_invalid

__all__ = ["ImageEncoder"]

_STEMS = ("conv", "patch")


def _check_presence(x: Tensor, mask: Tensor | None) -> Tensor:
    """``mask`` as bool ``(B,)`` (all True if None)."""
    if mask is None:
        return torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
    if mask.dtype != torch.bool:
        raise TypeError(f"ImageEncoder: mask must be torch.bool (True = present), got {mask.dtype}")
    if mask.shape != x.shape[:1]:
        raise ValueError(f"ImageEncoder: mask must be the per-sample presence of shape (B,)=({x.shape[0]},), got {tuple(mask.shape)}")
    return mask


@register_encoder("image")
class ImageEncoder(nn.Module):
    """An image input -> one token per ``patch_size x patch_size`` patch (see the module docstring).

    Args:
        channels: image channels ``C``.
        height: image height ``H`` (rows).
        width: image width ``W`` (columns).
        dim: token width ``D``.
        patch_size: side ``p`` of the square patch one token covers; ``H`` and ``W`` are
            zero-padded up to multiples of ``p``. Must be a power of two for ``stem="conv"``.
        stem: ``"conv"`` (3x3 stride-2 convolutions, then 1x1) or ``"patch"`` (one p x p convolution).
        hidden: channels of the conv stem's 3x3 layers (default ``dim``); unused by ``"patch"``.
        grid: return the tokens as a ``(B, H', W', D)`` grid with axes ``("h", "w")`` instead of
            ``(B, H'*W', D)``.
        device, dtype: for the parameters.

    Shapes:
        x ``(B, C, H, W)`` float (values of absent samples are ignored, NaN allowed there); mask
        ``(B,)`` bool presence. Returns TokenSet ``x (B, N, D)``, ``mask (B, N)`` with
        ``N = ceil(H/p) * ceil(W/p)`` (``grid=True``: ``(B, H', W', D)``, ``(B, H', W')``), zero
        tokens and an all-False mask for absent samples.

    Raises:
        ValueError: non-positive sizes, an unknown stem, or a conv stem with ``patch_size`` not a
            power of two.

    Example:
        >>> enc = ImageEncoder(1, 16, 15, 32)                   # mfeat's pix digit, 4x4 patches
        >>> out = enc(torch.randn(2, 1, 16, 15), torch.tensor([True, False]))
        >>> out.x.shape, out.mask.sum(dim=1).tolist()
        (torch.Size([2, 16, 32]), [16, 0])
    """

    def __init__(
        self,
        channels: int,
        height: int,
        width: int,
        dim: int,
        *,
        patch_size: int = 4,
        stem: Literal["conv", "patch"] = "conv",
        hidden: int | None = None,
        grid: bool = False,
        device: torch.device | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        sizes = {"channels": channels, "height": height, "width": width, "dim": dim, "patch_size": patch_size}
        bad = {k: v for k, v in sizes.items() if not isinstance(v, int) or isinstance(v, bool) or v < 1}
        if bad:
            raise ValueError(f"ImageEncoder: sizes must be integers >= 1, got {bad}")
        if stem not in _STEMS:
            raise ValueError(f"ImageEncoder: stem must be one of {_STEMS}, got {stem!r}")
        if stem == "conv" and patch_size & (patch_size - 1):
            raise ValueError(f"ImageEncoder: stem='conv' downsamples by 2 per layer, so patch_size must be a power of two "
                             f"(1, 2, 4, 8, ...), got {patch_size}; or use stem='patch'")
        if hidden is not None and hidden < 1:
            raise ValueError(f"ImageEncoder: hidden must be >= 1, got {hidden}")
        dd = {"device": device, "dtype": dtype}
        self.channels, self.height, self.width, self.dim = channels, height, width, dim
        self.patch_size, self.stem_kind, self.grid = patch_size, stem, grid
        self.grid_size = (math.ceil(height / patch_size), math.ceil(width / patch_size))  # (H', W')
        self.padding = (self.grid_size[0] * patch_size - height, self.grid_size[1] * patch_size - width)  # bottom, right
        if stem == "patch":
            self.stem = nn.Conv2d(channels, dim, kernel_size=patch_size, stride=patch_size, **dd)
        else:
            h = hidden or dim
            layers: list[nn.Module] = []
            in_ch = channels
            for _ in range(max(1, int(math.log2(patch_size)))):
                layers += [nn.Conv2d(in_ch, h, kernel_size=3, stride=1 if patch_size == 1 else 2, padding=1, **dd), nn.GELU()]
                in_ch = h
            layers.append(nn.Conv2d(in_ch, dim, kernel_size=1, **dd))
            self.stem = nn.Sequential(*layers)
        self.row_pos = nn.Parameter(torch.empty(self.grid_size[0], dim, **dd))
        self.col_pos = nn.Parameter(torch.empty(self.grid_size[1], dim, **dd))
        nn.init.trunc_normal_(self.row_pos, std=0.02)
        nn.init.trunc_normal_(self.col_pos, std=0.02)

    @property
    def num_tokens(self) -> int:
        """Tokens per image, ``H' * W'``."""
        return self.grid_size[0] * self.grid_size[1]

    def tokens(self, x: Tensor) -> Tensor:
        """Tokens with positions, without masking. Shapes: ``(B, C, H, W) -> (B, H', W', D)``."""
        x = F.pad(x, (0, self.padding[1], 0, self.padding[0]))  # (B, C, p*H', p*W'), zeros bottom / right
        feat = self.stem(x).permute(0, 2, 3, 1)  # (B, H', W', D)
        return feat + self.row_pos[:, None, :] + self.col_pos[None, :, :]

    def forward(self, x: Tensor, mask: Tensor | None = None) -> TokenSet:
        shape = (self.channels, self.height, self.width)
        if x.dim() != 4 or tuple(x.shape[1:]) != shape or not x.is_floating_point():
            raise ValueError(f"ImageEncoder expects float images of shape (B, {', '.join(map(str, shape))}), "
                             f"got {x.dtype} {tuple(x.shape)}")
        present = _check_presence(x, mask)  # (B,)
        x = torch.where(present[:, None, None, None], x, torch.zeros_like(x))
        tok = self.tokens(x)  # (B, H', W', D)
        tok_mask = present[:, None, None].expand(tok.shape[:3])  # (B, H', W')
        tok = zero_invalid(tok, tok_mask)
        if self.grid:
            return TokenSet(tok, tok_mask, axes=("h", "w"))
        b = tok.shape[0]
        return TokenSet(tok.reshape(b, self.num_tokens, self.dim), tok_mask.reshape(b, self.num_tokens))

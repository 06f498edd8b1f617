"""ImageEncoder: token grid shapes, padding, absent samples, gradients, patch-stem reference, registry."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from attnfuse.encoders import ENCODERS, ImageEncoder, create_encoder

PRESENT = torch.tensor([True, False, True])


@pytest.mark.parametrize("stem", ["conv", "patch"])
@pytest.mark.parametrize(
    "shape,patch,grid",
    [((1, 16, 15), 4, (4, 4)), ((3, 8, 8), 2, (4, 4)), ((2, 5, 7), 4, (2, 2)), ((1, 6, 6), 1, (6, 6)), ((1, 3, 3), 8, (1, 1))],
)
def test_shapes_absent_samples_and_gradients(stem, shape, patch, grid):
    torch.manual_seed(0)
    enc = ImageEncoder(*shape, 8, patch_size=patch, stem=stem)
    assert enc.grid_size == grid and enc.num_tokens == grid[0] * grid[1]
    x = torch.randn(3, *shape)
    x[1] = float("nan")  # an absent sample may hold anything, NaN included
    x.requires_grad_()
    out = enc(x, PRESENT)
    n = grid[0] * grid[1]
    assert out.x.shape == (3, n, 8) and out.mask.shape == (3, n) and out.axes == ("token",)
    assert out.mask.tolist() == [[p] * n for p in PRESENT.tolist()]
    assert torch.isfinite(out.x).all() and (out.x[1] == 0).all()  # absent: exactly zero tokens
    out.x.square().sum().backward()
    assert torch.isfinite(x.grad).all() and (x.grad[1] == 0).all() and x.grad[0].abs().sum() > 0
    for p in enc.parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0  # NaN of absent rows never reaches the weights
    assert enc(torch.randn(2, *shape)).mask.all()  # mask=None: all present


def test_grid_output_has_h_w_axes_and_matches_flat():
    torch.manual_seed(0)
    flat = ImageEncoder(1, 16, 15, 8)
    grid = ImageEncoder(1, 16, 15, 8, grid=True)
    grid.load_state_dict(flat.state_dict())
    x = torch.randn(3, 1, 16, 15)
    g, f = grid(x, PRESENT), flat(x, PRESENT)
    assert g.x.shape == (3, 4, 4, 8) and g.axes == ("h", "w") and g.mask.shape == (3, 4, 4)
    torch.testing.assert_close(g.flatten().x, f.x)  # row-major: token 4*i + j is patch (i, j)
    assert torch.equal(g.flatten().mask, f.mask)


def test_patch_stem_matches_per_patch_linear_reference():
    """stem='patch' == zero-pad, cut p x p patches row-major, one shared linear map, + row/col positions."""
    torch.manual_seed(0)
    c, h, w, p, d = 2, 5, 7, 3, 4
    enc = ImageEncoder(c, h, w, d, patch_size=p, stem="patch").double()
    x = torch.randn(2, c, h, w, dtype=torch.float64, requires_grad=True)
    out = enc(x).x  # (2, 2*3, 4)
    padded = F.pad(x, (0, 3 * p - w, 0, 2 * p - h))  # (2, c, 6, 9)
    weight = enc.stem.weight.reshape(d, -1)  # (D, c*p*p)
    ref = []
    for i in range(2):
        for j in range(3):
            patch = padded[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(2, -1)  # (B, c*p*p)
            ref.append(patch @ weight.T + enc.stem.bias + enc.row_pos[i] + enc.col_pos[j])
    ref = torch.stack(ref, dim=1)
    torch.testing.assert_close(out, ref)
    g = torch.randn_like(out)
    torch.testing.assert_close(torch.autograd.grad(out, x, g)[0], torch.autograd.grad(ref, x, g)[0])


def test_padding_only_touches_the_last_patch_row_and_column():
    """16 x 15 with p=4: pixel (i, j) only affects the token of patch (i // 4, j // 4) under the patch stem."""
    torch.manual_seed(0)
    enc = ImageEncoder(1, 16, 15, 8, stem="patch", grid=True)
    x = torch.randn(1, 1, 16, 15)
    y = x.clone()
    y[0, 0, 13, 14] += 1.0  # bottom-right pixel, next to the padding column
    diff = (enc(y).x - enc(x).x).abs().sum(-1)[0]  # (4, 4)
    assert diff[3, 3] > 0 and diff.sum() == diff[3, 3]


def test_input_checks():
    enc = ImageEncoder(1, 16, 15, 8)
    with pytest.raises(ValueError, match=r"shape \(B, 1, 16, 15\)"):
        enc(torch.randn(2, 240))
    with pytest.raises(ValueError, match=r"shape \(B, 1, 16, 15\)"):
        enc(torch.randn(2, 1, 15, 16))
    with pytest.raises(ValueError, match="float"):
        enc(torch.zeros(2, 1, 16, 15, dtype=torch.long))
    with pytest.raises(TypeError, match=r"torch\.bool"):
        enc(torch.randn(2, 1, 16, 15), torch.ones(2))
    with pytest.raises(ValueError, match=r"presence of shape \(B,\)"):
        enc(torch.randn(2, 1, 16, 15), torch.ones(2, 16, dtype=torch.bool))
    with pytest.raises(ValueError, match="power of two"):
        ImageEncoder(1, 16, 15, 8, patch_size=3)
    with pytest.raises(ValueError, match="stem must be one of"):
        ImageEncoder(1, 16, 15, 8, stem="vit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="integers >= 1"):
        ImageEncoder(0, 16, 15, 8)
    ImageEncoder(1, 16, 15, 8, patch_size=3, stem="patch")  # any patch size for the patch stem


def test_registered_and_built_from_encoder_config():
    assert ENCODERS["image"] is ImageEncoder
    enc = create_encoder("image", dim=16, channels=3, height=8, width=6)
    assert isinstance(enc, ImageEncoder) and enc(torch.randn(2, 3, 8, 6)).x.shape == (2, 4, 16)
    assert enc.row_pos.dtype == torch.float32
    dd = ImageEncoder(1, 4, 4, 8, device=torch.device("cpu"), dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in dd.parameters())

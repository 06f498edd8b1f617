"""Dice and HD95 against hand-computed cases and a SciPy distance-transform reference (MONAI's method)."""

import math

import numpy as np
import pytest
import torch
from scipy import ndimage
from scipy.spatial.distance import directed_hausdorff

from attnfuse.metrics import HD95, Dice
from attnfuse.metrics.segmentation import brats_regions, dice, hd95, surface


def _blobs(b=2, r=2, shape=(20, 23), seed=0, p=0.5):
    """Random smooth blobs: thresholded Gaussian-filtered noise, (B, R, *shape) bool."""
    rng = np.random.default_rng(seed)
    noise = rng.standard_normal((b, r, *shape))
    smooth = ndimage.gaussian_filter(noise, sigma=(0, 0) + (2.0,) * len(shape))
    return torch.from_numpy(smooth > np.quantile(smooth, p))


def _hd_reference(p: np.ndarray, g: np.ndarray, spacing, q=95.0) -> float:
    """Surfaces by erosion; nearest-surface distances from the Euclidean distance transform of the other surface."""
    ps, gs = p & ~ndimage.binary_erosion(p), g & ~ndimage.binary_erosion(g)
    d_pg = ndimage.distance_transform_edt(~gs, sampling=spacing)[ps]
    d_gp = ndimage.distance_transform_edt(~ps, sampling=spacing)[gs]
    return max(np.percentile(d_pg, q), np.percentile(d_gp, q))


def test_dice_hand_case_and_conventions():
    pred = torch.zeros(1, 2, 4, 4)
    target = torch.zeros(1, 2, 4, 4, dtype=torch.bool)
    pred[0, 0, 0, :4] = 0.9  # 4 predicted pixels
    target[0, 0, 0, 1:4] = True
    target[0, 0, 1, 0:3] = True  # 6 true pixels, 3 shared
    got = dice(pred, target)
    assert got[0, 0].item() == pytest.approx(2 * 3 / (4 + 6))
    assert got[0, 1].item() == 1.0  # both empty: 1 (BraTS convention)
    assert math.isnan(dice(pred, target, empty=float("nan"))[0, 1].item())
    # the fixed threshold: p > 0.5
    assert dice(torch.full((1, 1, 2, 2), 0.5), torch.ones(1, 1, 2, 2, dtype=torch.bool)).item() == 0.0
    g = _blobs()
    torch.testing.assert_close(dice(g, g), torch.ones(2, 2))
    # against a direct count on random blobs
    p = _blobs(seed=1)
    inter = (p & g).flatten(2).sum(-1).float()
    torch.testing.assert_close(dice(p.float(), g), 2 * inter / (p.flatten(2).sum(-1) + g.flatten(2).sum(-1)).float())


def test_brats_regions():
    labels = torch.tensor([[[0, 1, 2, 4], [4, 2, 1, 0]]])  # (1, 2, 4)
    r = brats_regions(labels)
    assert r.shape == (1, 3, 2, 4)
    assert r[0, 0].tolist() == [[False, False, False, True], [True, False, False, False]]  # ET
    assert r[0, 1].tolist() == [[False, True, False, True], [True, False, True, False]]  # TC = 1 + 4
    assert r[0, 2].tolist() == [[False, True, True, True], [True, True, True, False]]  # WT = 1 + 2 + 4
    assert brats_regions(labels.clamp(max=3), et_label=3)[0, 0].sum() == 2  # BraTS 2023 labels
    with pytest.raises(ValueError, match="integer"):
        brats_regions(labels.float())


def test_surface_equals_scipy_erosion_in_2d_and_3d():
    for shape in ((13, 17), (7, 8, 9)):
        m = _blobs(b=1, r=3, shape=shape, seed=2)[0]
        ref = np.stack([x & ~ndimage.binary_erosion(x) for x in m.numpy()])
        assert (surface(m).numpy() == ref).all()


@pytest.mark.parametrize("shape,spacing", [((20, 23), (1.0, 1.0)), ((20, 23), (0.7, 1.9)), ((9, 10, 11), (1.0, 1.0, 2.5))])
def test_hd95_matches_the_distance_transform_reference(shape, spacing):
    p, g = _blobs(shape=shape, seed=3), _blobs(shape=shape, seed=4)
    got = hd95(p, g, spacing=spacing)
    for i in range(p.shape[0]):
        for j in range(p.shape[1]):
            assert got[i, j].item() == pytest.approx(_hd_reference(p[i, j].numpy(), g[i, j].numpy(), spacing), abs=1e-9)


def test_hd_percentile_100_is_scipy_directed_hausdorff_of_the_surfaces():
    p, g = _blobs(b=1, r=1, seed=5)[0, 0], _blobs(b=1, r=1, seed=6)[0, 0]
    sp, sg = surface(p[None])[0].nonzero().numpy(), surface(g[None])[0].nonzero().numpy()
    ref = max(directed_hausdorff(sp, sg)[0], directed_hausdorff(sg, sp)[0])
    assert hd95(p[None, None], g[None, None], percentile=100)[0, 0].item() == pytest.approx(ref, abs=1e-12)


def test_hd95_hand_cases_and_empty_conventions():
    p = torch.zeros(1, 3, 8, 8, dtype=torch.bool)
    g = torch.zeros(1, 3, 8, 8, dtype=torch.bool)
    p[0, 0, 1, 1] = True
    g[0, 0, 4, 5] = True  # single pixels 3 rows and 4 columns apart: 5
    g[0, 1, 2, 2] = True  # region 1: prediction empty; region 2: both empty
    got = hd95(p, g, spacing=(1.0, 1.0))
    assert got[0, 0].item() == pytest.approx(5.0)
    assert math.isinf(got[0, 1].item()) and got[0, 2].item() == 0.0
    assert hd95(p, g, one_empty=373.13)[0, 1].item() == pytest.approx(373.13)
    assert hd95(p, g, spacing=(2.0, 0.5))[0, 0].item() == pytest.approx(math.hypot(6.0, 2.0))
    blobs = _blobs()
    assert (hd95(blobs, blobs) == 0).all()


def test_metrics_accumulate_per_case_and_average_regions():
    p, g = _blobs(b=4, seed=7), _blobs(b=4, seed=8)
    m, per_region = Dice(), Dice(average="none")
    h = HD95(average="none")
    for sl in (slice(0, 1), slice(1, 4)):
        for metric in (m, per_region, h):
            metric.update(p[sl], g[sl])
    per_case = dice(p, g)  # (4, 2)
    torch.testing.assert_close(per_region.compute(), per_case.mean(0))
    assert m.compute().item() == pytest.approx(per_case.mean().item(), abs=1e-6)
    torch.testing.assert_close(h.compute(), hd95(p, g).mean(0).float())
    # NaN (both empty, empty=nan) cases are left out of the means
    d = Dice(empty=float("nan"), average="none")
    empty = torch.zeros(1, 2, 20, 23, dtype=torch.bool)
    d.update(empty, empty)
    d.update(p[:1], g[:1])
    torch.testing.assert_close(d.compute(), dice(p[:1], g[:1])[0])


def test_errors():
    a = torch.zeros(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(ValueError, match="same shape"):
        dice(a, torch.zeros(1, 1, 4, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"pred must be \(B, R, H, W\)"):
        dice(a[0], a[0])
    with pytest.raises(ValueError, match="spacing must be 2 positive"):
        hd95(a, a, spacing=(1.0,))
    with pytest.raises(ValueError, match="target must be binary"):
        dice(a.float(), torch.full((1, 1, 4, 4), 0.3))
    with pytest.raises(ValueError, match="average must be"):
        Dice(average="micro")


def test_forward_and_merged_states():
    p, g = _blobs(b=3, seed=9), _blobs(b=3, seed=10)
    left, right = Dice(average="none"), Dice(average="none")
    torch.testing.assert_close(left(p[:1], g[:1]), dice(p[:1], g[:1])[0])
    right.update(p[1:], g[1:])
    left.merge_state(right)
    torch.testing.assert_close(left.compute(), dice(p, g).mean(0))

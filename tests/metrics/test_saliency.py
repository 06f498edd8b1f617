"""Saliency metrics against hand-computed cases and pixel-level restatements of the published formulas.

The references below compute each threshold's binary map explicitly and apply the definitions pixel by pixel
(F_β from precision and recall; E-measure from the bias matrices φ; S-measure from Fan et al. 2017 with the
toolkit conventions: sample std, centroid split, eps = 2.2e-16), independently of the count-based code.
"""

import numpy as np
import pytest
import torch
from scipy import ndimage

from attnfuse.metrics import EMeasure, FMeasure, SaliencyMAE, SMeasure
from attnfuse.metrics.saliency import (
    adaptive_e_measure,
    adaptive_f_measure,
    e_measure_curve,
    f_measure_curve,
    s_measure,
    saliency_mae,
)

EPS = np.spacing(1)


def _case(b=3, h=30, w=37, seed=0):
    """Ellipse-ish ground truths and noisy, blurred predictions in [0, 1]; (B, 1, H, W)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    gts, preds = [], []
    for i in range(b):
        cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
        g = ((yy - cy) / (0.25 * h)) ** 2 + ((xx - cx) / (0.2 * w + i)) ** 2 < 1
        p = np.clip(ndimage.gaussian_filter(g.astype(float), 2) + 0.15 * rng.standard_normal((h, w)), 0, 1)
        gts.append(g)
        preds.append(p)
    return torch.from_numpy(np.stack(preds))[:, None], torch.from_numpy(np.stack(gts))[:, None]


def _f_direct(binary, g, beta2=0.3):
    tp = np.sum(binary & g)
    if tp == 0:
        return 0.0
    p, r = tp / binary.sum(), tp / g.sum()
    return (1 + beta2) * p * r / (beta2 * p + r)


def _e_direct(binary, g):
    fm, gt = binary.astype(float), g.astype(float)
    if gt.sum() == 0:
        enhanced = 1 - fm
    elif gt.sum() == gt.size:
        enhanced = fm
    else:
        a, b = fm - fm.mean(), gt - gt.mean()
        xi = 2 * a * b / (a * a + b * b + EPS)
        enhanced = (xi + 1) ** 2 / 4
    return enhanced.mean()


def _s_direct(p, g, alpha=0.5):
    y = g.mean()
    if y == 0:
        return 1 - p.mean()
    if y == 1:
        return p.mean()

    def obj(x):
        return 2 * x.mean() / (x.mean() ** 2 + 1 + x.std(ddof=1) + EPS)

    s_object = y * obj(p[g]) + (1 - y) * obj(1 - p[~g])
    h, w = g.shape
    rows, cols = np.nonzero(g)
    cy, cx = int(np.round(rows.mean())) + 1, int(np.round(cols.mean())) + 1
    s_region = 0.0
    for rs, cs in ((slice(0, cy), slice(0, cx)), (slice(0, cy), slice(cx, w)), (slice(cy, h), slice(0, cx)),
                   (slice(cy, h), slice(cx, w))):
        pb, gb = p[rs, cs], g[rs, cs].astype(float)
        n = pb.size
        mx, my = pb.mean(), gb.mean()
        vx, vy = ((pb - mx) ** 2).sum() / (n - 1), ((gb - my) ** 2).sum() / (n - 1)
        cxy = ((pb - mx) * (gb - my)).sum() / (n - 1)
        num, den = 4 * mx * my * cxy, (mx**2 + my**2) * (vx + vy)
        score = num / (den + EPS) if num != 0 else (1.0 if den == 0 else 0.0)
        s_region += n / (h * w) * score
    return max(0.0, alpha * s_object + (1 - alpha) * s_region)


def test_against_pixel_level_restatements():
    pred, gt = _case()
    f_curve, e_curve = f_measure_curve(pred, gt), e_measure_curve(pred, gt)
    f_adp, e_adp, s = adaptive_f_measure(pred, gt), adaptive_e_measure(pred, gt), s_measure(pred, gt)
    for i in range(pred.shape[0]):
        p, g = pred[i, 0].numpy(), gt[i, 0].numpy()
        q = np.floor(p * 255).astype(np.uint8)
        for t in (0, 1, 37, 128, 200, 255):
            assert f_curve[i, t].item() == pytest.approx(_f_direct(q >= t, g), abs=1e-12)
            assert e_curve[i, t].item() == pytest.approx(_e_direct(q >= t, g), abs=1e-12)
        binary = p >= min(2 * p.mean(), 1)
        assert f_adp[i].item() == pytest.approx(_f_direct(binary, g), abs=1e-12)
        assert e_adp[i].item() == pytest.approx(_e_direct(binary, g), abs=1e-12)
        assert s[i].item() == pytest.approx(_s_direct(p, g), abs=1e-12)
        assert saliency_mae(pred, gt)[i].item() == pytest.approx(np.abs(p - g).mean(), abs=1e-12)


def test_perfect_map_and_all_zero_map():
    _, gt = _case()
    perfect = gt.double()
    assert (saliency_mae(perfect, gt) == 0).all()
    torch.testing.assert_close(f_measure_curve(perfect, gt).amax(1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(e_measure_curve(perfect, gt).amax(1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(s_measure(perfect, gt), torch.ones(3, dtype=torch.float64))
    zero = torch.zeros_like(perfect)
    fg = gt.double().mean(dim=(1, 2, 3))
    torch.testing.assert_close(saliency_mae(zero, gt), fg)  # MAE = foreground share
    # S of the all-zero map by hand: S_object = (1 − fg)·1 (background perfectly dark, foreground score 0),
    # S_region = 0 (every quadrant around the centroid contains foreground, where the map has no structure)
    torch.testing.assert_close(s_measure(zero, gt), 0.5 * (1 - fg))
    # a lightly blurred truth stays close to perfect
    blurred = torch.from_numpy(ndimage.gaussian_filter(gt.double().numpy(), sigma=(0, 0, 1, 1)))
    assert f_measure_curve(blurred, gt).amax(1).min() > 0.95
    assert s_measure(blurred, gt).min() > 0.85 and e_measure_curve(blurred, gt).amax(1).min() > 0.9


def test_e_measure_hand_case_2x2():
    # truth [1 0; 0 0], map [1 1; 0 0]: φ_G = (3/4, -1/4, -1/4, -1/4), φ_S = (1/2, 1/2, -1/2, -1/2)
    gt = torch.tensor([[True, False], [False, False]])
    pred = torch.tensor([[1.0, 1.0], [0.0, 0.0]])

    def enhanced(a, b):
        return (2 * a * b / (a * a + b * b) + 1) ** 2 / 4

    expected = (enhanced(0.5, 0.75) + enhanced(0.5, -0.25) + 2 * enhanced(-0.5, -0.25)) / 4
    assert adaptive_e_measure(pred, gt).item() == pytest.approx(expected, abs=1e-12)
    # empty truth: the share of predicted background; full truth: the share of predicted foreground
    assert adaptive_e_measure(pred, torch.zeros(2, 2, dtype=torch.bool)).item() == pytest.approx(0.5)
    assert adaptive_e_measure(pred, torch.ones(2, 2, dtype=torch.bool)).item() == pytest.approx(0.5)


def test_s_measure_special_truths():
    p = torch.tensor([[0.2, 0.4], [0.6, 0.8]])
    assert s_measure(p, torch.zeros(2, 2, dtype=torch.bool)).item() == pytest.approx(0.5)  # 1 − mean
    assert s_measure(p, torch.ones(2, 2, dtype=torch.bool)).item() == pytest.approx(0.5)  # mean
    # foreground in the last row and column: empty quadrants contribute 0 instead of NaN
    g = torch.zeros(5, 5, dtype=torch.bool)
    g[4, 4] = True
    v = s_measure(torch.rand(5, 5, generator=torch.Generator().manual_seed(0)), g)
    assert torch.isfinite(v) and 0 <= v.item() <= 1


def test_metric_classes_accumulate_and_use_the_mean_curve():
    pred, gt = _case(b=4)
    metrics = {"mae": SaliencyMAE(), "s": SMeasure(), "fmax": FMeasure(), "fmean": FMeasure(variant="mean"),
               "fadp": FMeasure(variant="adaptive"), "emax": EMeasure(), "eadp": EMeasure(variant="adaptive")}
    for sl in (slice(0, 1), slice(1, 4)):
        for m in metrics.values():
            m.update(pred[sl], gt[sl])
    got = {k: m.compute().item() for k, m in metrics.items()}
    f_curve, e_curve = f_measure_curve(pred, gt), e_measure_curve(pred, gt)
    expected = {"mae": saliency_mae(pred, gt).mean(), "s": s_measure(pred, gt).mean(), "fmax": f_curve.mean(0).max(),
                "fmean": f_curve.mean(0).mean(), "fadp": adaptive_f_measure(pred, gt).mean(),
                "emax": e_curve.mean(0).max(), "eadp": adaptive_e_measure(pred, gt).mean()}
    for k, v in expected.items():
        assert got[k] == pytest.approx(v.item(), abs=1e-6), k
    # max of the mean curve, not the mean of per-image maxima (these differ here)
    assert f_curve.amax(1).mean().item() > got["fmax"] + 1e-4


def test_input_conventions_and_errors():
    pred, gt = _case(b=1)
    p8, g8 = (pred * 255).floor().to(torch.uint8), gt.to(torch.uint8) * 255
    torch.testing.assert_close(f_measure_curve(p8, g8), f_measure_curve(p8.double() / 255, gt))
    torch.testing.assert_close(s_measure(pred, gt.to(torch.uint8)), s_measure(pred, gt))  # a 0/1 label map
    # normalize=True: the toolkits' min–max normalisation
    scaled = pred * 0.5 + 0.2
    torch.testing.assert_close(s_measure(scaled, gt, normalize=True),
                               s_measure((scaled - scaled.min()) / (scaled.max() - scaled.min()), gt))
    with pytest.raises(ValueError, match=r"pred must lie in \[0, data_range=1\]"):
        saliency_mae(pred * 2, gt)
    with pytest.raises(ValueError, match="gt must have the shape of pred"):
        s_measure(pred, gt[..., :-1])
    with pytest.raises(ValueError, match="variant must be"):
        FMeasure(variant="best")


def test_forward_and_merged_states():
    pred, gt = _case(b=4)
    left, right = FMeasure(), FMeasure()
    value = left(pred[:2], gt[:2])  # forward: this batch's max-F
    assert value.item() == pytest.approx(f_measure_curve(pred[:2], gt[:2]).mean(0).max().item(), abs=1e-6)
    right.update(pred[2:], gt[2:])
    left.merge_state(right)
    assert left.compute().item() == pytest.approx(f_measure_curve(pred, gt).mean(0).max().item(), abs=1e-6)

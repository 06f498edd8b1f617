"""Image-fusion metrics against hand-computed cases and independent implementations on the same inputs.

References: scikit-image (entropy, SSIM), scikit-learn (mutual information, in nats), NumPy (std, gradient),
and SciPy re-statements of Qabf (Xydeas & Petrović) and pixel-domain VIF (Sheikh & Bovik) written from the
published formulas for this test.
"""

import math

import numpy as np
import pytest
import torch
from scipy.signal import convolve2d
from skimage.measure import shannon_entropy
from skimage.metrics import structural_similarity as sk_ssim
from sklearn.metrics import mutual_info_score

from attnfuse.metrics import AverageGradient, Entropy, FusionMI, FusionSSIM, FusionVIF, Qabf, SpatialFrequency, StandardDeviation
from attnfuse.metrics.image_fusion import (
    QABF_MAX,
    average_gradient,
    entropy,
    fusion_mi,
    fusion_psnr,
    fusion_ssim,
    fusion_vif,
    mutual_information,
    qabf,
    scd,
    spatial_frequency,
    standard_deviation,
)


def _scene(b=2, h=44, w=47, seed=0):
    """Two 8-bit sources with shared structure and a fused average, as uint8 tensors (B, 1, H, W)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = 120 + 80 * torch.sin(6 * xx) * torch.cos(4 * yy)
    a = (base + 30 * torch.rand(b, 1, h, w, generator=g)).clamp(0, 255).round().to(torch.uint8)
    bb = (255 - base + 25 * torch.rand(b, 1, h, w, generator=g)).clamp(0, 255).round().to(torch.uint8)
    f = ((a.double() + bb.double()) / 2).round().to(torch.uint8)
    return f, a, bb


def test_entropy_hand_cases_and_scikit_image():
    uniform = (torch.arange(32 * 32) % 256).reshape(32, 32).to(torch.uint8)  # every level 4 times
    assert entropy(uniform).item() == pytest.approx(8.0, abs=1e-12)
    assert entropy(torch.full((9, 9), 77, dtype=torch.uint8)).item() == 0.0
    two = torch.tensor([[0, 255], [0, 255]], dtype=torch.uint8)
    assert entropy(two).item() == pytest.approx(1.0, abs=1e-12)
    f, _, _ = _scene()
    got = entropy(f)
    for i in range(f.shape[0]):
        assert got[i].item() == pytest.approx(shannon_entropy(f[i, 0].numpy(), base=2), abs=1e-10)
    # float input in [0, 1] is rescaled to the 8-bit scale and rounded to levels
    torch.testing.assert_close(entropy(f.double() / 255), got)


def test_mutual_information_equals_entropy_on_itself_and_scikit_learn_in_bits():
    f, a, b = _scene()
    torch.testing.assert_close(mutual_information(a, a), entropy(a))
    got = fusion_mi(f, a, b)
    for i in range(f.shape[0]):
        ff, aa, bb = (t[i, 0].numpy().ravel() for t in (f, a, b))
        ref = (mutual_info_score(ff, aa) + mutual_info_score(ff, bb)) / math.log(2)  # nats -> bits
        assert got[i].item() == pytest.approx(ref, abs=1e-9)
    # independent images of a constant carry no information about each other
    assert mutual_information(torch.full((8, 8), 3, dtype=torch.uint8), a[0, 0, :8, :8]).item() == pytest.approx(0.0, abs=1e-12)


def test_sd_sf_ag_hand_case_and_numpy():
    x = torch.tensor([[0.0, 2.0, 4.0], [1.0, 1.0, 1.0], [3.0, 0.0, 6.0]], dtype=torch.float64)
    # SF by hand: row diffs (2, 2, 0, 0, -3, 6) -> RF² = 53/6; column diffs (1, -1, -3, 2, -1, 5) -> CF² = 41/6
    assert spatial_frequency(x, data_range=255).item() == pytest.approx(math.sqrt(53 / 6 + 41 / 6), abs=1e-12)
    assert standard_deviation(x, data_range=255).item() == pytest.approx(np.std(x.numpy()), abs=1e-12)
    gy, gx = np.gradient(x.numpy())
    assert average_gradient(x, data_range=255).item() == pytest.approx(np.mean(np.sqrt((gx**2 + gy**2) / 2)), abs=1e-12)
    f, _, _ = _scene()
    for i in range(2):
        img = f[i, 0].numpy().astype(np.float64)
        gy, gx = np.gradient(img)
        assert average_gradient(f)[i].item() == pytest.approx(np.mean(np.sqrt((gx**2 + gy**2) / 2)), abs=1e-10)
        assert standard_deviation(f)[i].item() == pytest.approx(img.std(), abs=1e-10)
    # a constant image has none of them
    c = torch.full((1, 1, 5, 5), 0.5)
    assert standard_deviation(c).item() == spatial_frequency(c).item() == average_gradient(c).item() == 0.0


def _qabf_reference(f, a, b):
    """Xydeas & Petrović Qabf with NumPy/SciPy: Sobel via convolve2d('same'), arctan orientation."""
    sx = np.array([[-1, 0, 1], [-2, 0, 2], [-1, 0, 1]], dtype=np.float64)
    sy = sx.T

    def edges(img):
        gx, gy = convolve2d(img, sx, mode="same"), convolve2d(img, sy, mode="same")
        strength = np.hypot(gx, gy)
        with np.errstate(divide="ignore", invalid="ignore"):
            angle = np.where(gx == 0, np.pi / 2, np.arctan(gy / gx))
        return strength, angle

    def preserved(gs, as_, gf, af):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(np.maximum(gs, gf) > 0, np.minimum(gs, gf) / np.maximum(gs, gf), 0.0)
        agree = 1 - np.abs(as_ - af) / (np.pi / 2)
        return 0.9994 / (1 + np.exp(-15 * (ratio - 0.5))) * 0.9879 / (1 + np.exp(-22 * (agree - 0.8)))

    (gf, af), (ga, aa), (gb, ab) = edges(f), edges(a), edges(b)
    return np.sum(preserved(ga, aa, gf, af) * ga + preserved(gb, ab, gf, af) * gb) / np.sum(ga + gb)


def test_qabf_perfect_transfer_is_0_9748_not_1_and_matches_a_numpy_restatement():
    assert QABF_MAX == pytest.approx(0.97479, abs=1e-5)
    f, a, b = _scene()
    torch.testing.assert_close(qabf(a, a, a), torch.full((2,), QABF_MAX, dtype=torch.float64))
    got = qabf(f, a, b)
    for i in range(2):
        ref = _qabf_reference(*(t[i, 0].numpy().astype(np.float64) for t in (f, a, b)))
        assert got[i].item() == pytest.approx(ref, abs=1e-10)
    assert 0 < got.min() and got.max() < QABF_MAX
    # copying one source keeps its edges but not the other's: strictly between the average and the maximum
    assert (qabf(a, a, b) < QABF_MAX).all()
    # no edges anywhere (black: with zero padding a constant grey has edges on its border): 0, not NaN
    black = torch.zeros(1, 1, 6, 6)
    assert qabf(black, black, black).item() == 0.0
    grey = torch.full((1, 1, 6, 6), 0.3)
    assert qabf(grey, grey, grey).item() == pytest.approx(QABF_MAX)


def _vif_reference(ref, dist, sigma_n_sq=2.0):
    """Pixel-domain VIF (Sheikh & Bovik): 4 scales, Gaussian windows N = 2^(5-s)+1, sd N/5, 'valid' filtering."""
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        ax = np.arange(n) - (n - 1) / 2
        win = np.exp(-(ax[:, None] ** 2 + ax[None, :] ** 2) / (2 * (n / 5.0) ** 2))
        win /= win.sum()

        def filt(x, win=win):  # the window is symmetric: convolution = correlation
            return convolve2d(x, win, mode="valid")

        if scale > 1:
            ref, dist = filt(ref)[::2, ::2], filt(dist)[::2, ::2]
        mr, md = filt(ref), filt(dist)
        vr = np.maximum(filt(ref * ref) - mr * mr, 0)
        vd = np.maximum(filt(dist * dist) - md * md, 0)
        cov = filt(ref * dist) - mr * md
        gain = cov / (vr + 1e-10)
        noise = vd - gain * cov
        flat_ref = vr < 1e-10
        gain[flat_ref], noise[flat_ref], vr[flat_ref] = 0, vd[flat_ref], 0
        flat_dist = vd < 1e-10
        gain[flat_dist], noise[flat_dist] = 0, 0
        neg = gain < 0
        noise[neg], gain[neg] = vd[neg], 0
        noise = np.maximum(noise, 1e-10)
        num += np.sum(np.log10(1 + gain**2 * vr / (noise + sigma_n_sq)))
        den += np.sum(np.log10(1 + vr / sigma_n_sq))
    return num / den


def test_vif_of_identical_images_and_against_a_scipy_restatement():
    f, a, b = _scene()
    torch.testing.assert_close(fusion_vif(a, a, a), torch.full((2,), 2.0, dtype=torch.float64))
    got = fusion_vif(f, a, b)
    for i in range(2):
        ff, aa, bb = (t[i, 0].numpy().astype(np.float64) for t in (f, a, b))
        assert got[i].item() == pytest.approx(_vif_reference(aa, ff) + _vif_reference(bb, ff), abs=1e-9)
    torch.testing.assert_close(fusion_vif(f, a, b, reduce="mean"), got / 2)


def test_fusion_ssim_is_the_sum_of_scikit_image_gaussian_ssims():
    f, a, b = _scene()
    got = fusion_ssim(f, a, b)
    for i in range(2):
        ff, aa, bb = (t[i, 0].numpy().astype(np.float64) for t in (f, a, b))
        kw = {"data_range": 255, "gaussian_weights": True, "sigma": 1.5, "use_sample_covariance": False}
        assert got[i].item() == pytest.approx(sk_ssim(aa, ff, **kw) + sk_ssim(bb, ff, **kw), abs=1e-9)
    torch.testing.assert_close(fusion_ssim(f, a, b, reduce="mean"), got / 2)
    torch.testing.assert_close(fusion_ssim(a, a, a), torch.full((2,), 2.0, dtype=torch.float64))


def test_psnr_and_scd_hand_cases():
    a = torch.zeros(1, 1, 4, 4, dtype=torch.uint8)
    b = torch.full((1, 1, 4, 4), 20, dtype=torch.uint8)
    f = torch.full((1, 1, 4, 4), 10, dtype=torch.uint8)
    assert fusion_psnr(f, a, b).item() == pytest.approx(10 * math.log10(255**2 / 100), abs=1e-12)
    ff, aa, bb = _scene()
    got = scd(ff, aa, bb)
    for i in range(2):
        F, A, B = (t[i, 0].numpy().astype(np.float64).ravel() for t in (ff, aa, bb))
        ref = np.corrcoef(F - B, A)[0, 1] + np.corrcoef(F - A, B)[0, 1]
        assert got[i].item() == pytest.approx(ref, abs=1e-10)


def test_metrics_accumulate_the_mean_over_images_across_batches():
    f, a, b = _scene(b=3)
    cases = [(Entropy(), entropy, False), (StandardDeviation(), standard_deviation, False),
             (SpatialFrequency(), spatial_frequency, False), (AverageGradient(), average_gradient, False),
             (FusionMI(), fusion_mi, True), (Qabf(), qabf, True), (FusionSSIM(), fusion_ssim, True),
             (FusionVIF(), fusion_vif, True)]
    for metric, fn, sources in cases:
        for sl in (slice(0, 1), slice(1, 3)):
            metric.update(f[sl], a[sl], b[sl]) if sources else metric.update(f[sl])
        expected = (fn(f, a, b) if sources else fn(f)).mean()
        assert metric.compute().item() == pytest.approx(expected.item(), rel=1e-6), type(metric).__name__


def test_errors_name_the_argument():
    f, a, b = _scene(b=1)
    with pytest.raises(ValueError, match=r"fused must lie in \[0, data_range=1\]"):
        entropy(f.double())  # 8-bit values given as floats without data_range=255
    with pytest.raises(ValueError, match="must have 1 channel"):
        entropy(f.expand(1, 3, -1, -1))
    with pytest.raises(ValueError, match="b must have the shape of fused"):
        qabf(f, a, b[..., :-1])
    with pytest.raises(ValueError, match="at least 41x41"):
        fusion_vif(f[..., :40, :40], a[..., :40, :40], b[..., :40, :40])
    with pytest.raises(ValueError, match="reduce must be"):
        fusion_ssim(f, a, b, reduce="max")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\) or \(H, W\)"):
        entropy(f[0])


def test_a_metric_collection_of_all_fusion_metrics_with_forward_and_merged_states():
    from torchmetrics import MetricCollection

    f, a, b = _scene(b=2)
    metrics = {"en": Entropy(), "sd": StandardDeviation(), "sf": SpatialFrequency(), "ag": AverageGradient(),
               "mi": FusionMI(), "qabf": Qabf(), "ssim": FusionSSIM(), "vif": FusionVIF()}
    coll = MetricCollection(metrics)
    batch = coll(f[:1], a[:1], b[:1])  # forward: the value of this batch, and accumulated
    assert batch["qabf"].item() == pytest.approx(qabf(f[:1], a[:1], b[:1]).item(), rel=1e-6)
    coll.update(f[1:], a[1:], b[1:])
    assert coll.compute()["en"].item() == pytest.approx(entropy(f).mean().item(), rel=1e-6)
    # states merge as DDP would combine two processes
    left, right = Qabf(), Qabf()
    left.update(f[:1], a[:1], b[:1])
    right.update(f[1:], a[1:], b[1:])
    left.merge_state(right)
    assert left.compute().item() == pytest.approx(qabf(f, a, b).mean().item(), rel=1e-6)

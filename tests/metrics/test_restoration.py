"""PSNR / SSIM against scikit-image on the same inputs (RGB, Y, crop border, uint8), accumulation, errors."""

import numpy as np
import pytest
import torch
from skimage.color import rgb2ycbcr
from skimage.metrics import peak_signal_noise_ratio as sk_psnr
from skimage.metrics import structural_similarity as sk_ssim

from attnfuse.metrics import PSNR, SSIM
from attnfuse.metrics.restoration import psnr, rgb_to_y, ssim


def _pair(b=3, c=3, h=24, w=29, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    target = torch.rand(b, c, h, w, generator=g, dtype=dtype)
    pred = (target + 0.08 * torch.randn(b, c, h, w, generator=g, dtype=dtype)).clamp(0, 1)
    return pred, target


def _sk_ssim(x: np.ndarray, y: np.ndarray, data_range: float) -> float:
    kw = {"channel_axis": 0} if x.ndim == 3 else {}
    return sk_ssim(y, x, data_range=data_range, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, **kw)


@pytest.mark.parametrize("crop", [0, 4])
def test_psnr_and_ssim_match_scikit_image_per_image(crop):
    pred, target = _pair()
    got_p = psnr(pred, target, crop_border=crop)
    got_s = ssim(pred, target, crop_border=crop)
    sl = (slice(None), slice(crop, -crop or None), slice(crop, -crop or None))
    for i in range(pred.shape[0]):
        x, y = pred[i].numpy()[sl], target[i].numpy()[sl]
        assert got_p[i].item() == pytest.approx(sk_psnr(y, x, data_range=1.0), abs=1e-5)  # torchmetrics: float32 ln(10)
        assert got_s[i].item() == pytest.approx(_sk_ssim(x, y, 1.0), abs=1e-10)


def test_y_channel_matches_scikit_image_rgb2ycbcr():
    pred, target = _pair(b=2)
    y = rgb_to_y(target)  # in units of data_range = 1
    ref = np.stack([rgb2ycbcr(t.permute(1, 2, 0).numpy())[..., 0] for t in target]) / 255.0
    torch.testing.assert_close(y[:, 0], torch.from_numpy(ref), atol=1e-10, rtol=0)
    got = psnr(pred, target, color="y", crop_border=2)
    refp = [sk_psnr(ref[i][2:-2, 2:-2], (rgb2ycbcr(pred[i].permute(1, 2, 0).numpy())[..., 0] / 255.0)[2:-2, 2:-2],
                    data_range=1.0) for i in range(2)]
    torch.testing.assert_close(got, torch.tensor(refp, dtype=got.dtype), atol=1e-5, rtol=0)
    got_s = ssim(pred, target, color="y")
    ref_s = [_sk_ssim(rgb2ycbcr(pred[i].permute(1, 2, 0).numpy())[..., 0] / 255.0, ref[i], 1.0) for i in range(2)]
    torch.testing.assert_close(got_s, torch.tensor(ref_s, dtype=got_s.dtype), atol=1e-8, rtol=0)


def test_uint8_inputs_use_255_and_equal_the_float_result():
    pred, target = _pair(b=2, c=1)
    p8, t8 = (pred * 255).round().to(torch.uint8), (target * 255).round().to(torch.uint8)
    got = ssim(p8, t8)
    ref = [_sk_ssim(p8[i, 0].numpy().astype(np.float64), t8[i, 0].numpy().astype(np.float64), 255.0) for i in range(2)]
    torch.testing.assert_close(got.double(), torch.tensor(ref, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(psnr(p8, t8).double(), psnr(p8.double() / 255, t8.double() / 255), atol=1e-4, rtol=0)


def test_identical_images():
    _, target = _pair(b=2)
    assert torch.isinf(psnr(target, target)).all()
    torch.testing.assert_close(ssim(target, target), torch.ones(2, dtype=torch.float64))


def test_ssim_is_differentiable():
    pred, target = _pair(b=1, dtype=torch.float32)
    pred.requires_grad_(True)
    (1 - ssim(pred, target)).sum().backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0


def test_metrics_average_per_image_values_over_batches():
    pred, target = _pair(b=5)
    for cls, fn in ((PSNR, psnr), (SSIM, ssim)):
        m = cls(crop_border=1)
        m.update(pred[:2], target[:2])
        m.update(pred[2:], target[2:])
        expected = fn(pred, target, crop_border=1).mean()
        assert m.compute().item() == pytest.approx(expected.item(), abs=1e-5)
        m.reset()
        assert torch.isnan(m.compute())


def test_psnr_metric_is_the_mean_of_per_image_psnr_not_pooled_mse():
    pred, target = _pair(b=2)
    pred[1] = target[1] + 0.001  # one almost perfect image
    m = PSNR()
    m.update(pred, target)
    per_image = [sk_psnr(target[i].numpy(), pred[i].numpy(), data_range=1.0) for i in range(2)]
    assert m.compute().item() == pytest.approx(np.mean(per_image), abs=1e-4)


def test_errors_name_the_argument():
    pred, target = _pair(b=1)
    with pytest.raises(ValueError, match="target must have the shape of pred"):
        psnr(pred, target[..., :-1])
    with pytest.raises(ValueError, match=r"pred must be \(B, C, H, W\)"):
        psnr(pred[0], target[0])
    with pytest.raises(ValueError, match="color must be"):
        psnr(pred, target, color="lab")
    with pytest.raises(ValueError, match="color='y' needs RGB"):
        psnr(pred[:, :1], target[:, :1], color="y")
    with pytest.raises(ValueError, match="at least 11x11 pixels after crop_border=8"):
        ssim(pred, target, crop_border=8)
    with pytest.raises(ValueError, match="data_range must be > 0"):
        psnr(pred, target, data_range=0)


def test_logged_from_a_lightning_module_over_several_batches():
    lightning = pytest.importorskip("lightning")
    pred, target = _pair(b=5, dtype=torch.float32)

    class Module(lightning.LightningModule):
        def __init__(self):
            super().__init__()
            self.psnr, self.ssim = PSNR(), SSIM()

        def validation_step(self, batch, _):
            p, t = batch
            self.psnr.update(p, t)
            self.ssim.update(p, t)
            self.log_dict({"val/psnr": self.psnr, "val/ssim": self.ssim}, on_epoch=True, batch_size=p.shape[0])

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(pred, target), batch_size=2)
    trainer = lightning.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                                enable_checkpointing=False)
    (logged,) = trainer.validate(Module(), loader, verbose=False)
    assert logged["val/psnr"] == pytest.approx(psnr(pred, target).mean().item(), abs=1e-4)  # batches of 2, 2, 1
    assert logged["val/ssim"] == pytest.approx(ssim(pred, target).mean().item(), abs=1e-5)

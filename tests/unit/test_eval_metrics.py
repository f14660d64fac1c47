"""The evaluation's metrics on known images, and the additivity of the synthetic ground truth they score against."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from iclight_ds.data.imageio import linear_to_srgb, srgb_to_linear
from iclight_ds.infer import eval as ev
from iclight_ds.infer import metrics


def _images(seed: int = 0, b: int = 2, h: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 3, h, h, generator=g)
    mask = torch.zeros(b, 1, h, h)
    mask[:, :, 8:24, 8:24] = 1
    return img, mask


def test_psnr_counts_only_the_mask():
    img, mask = _images()
    off = img + 0.1 * mask  # 0.1 inside the mask
    assert torch.allclose(metrics.masked_psnr(off, img, mask), torch.full((2,), 20.0), atol=1e-3)
    outside = img.clone()
    outside[:, :, :4] = 0  # changes outside the mask do not count
    assert (metrics.masked_psnr(outside, img, mask) > 99).all()


def test_ssim_is_one_for_equal_images_and_lower_for_noise():
    img, mask = _images()
    assert torch.allclose(metrics.masked_ssim(img, img, mask), torch.ones(2), atol=1e-5)
    noisy = (img + 0.2 * torch.randn_like(img)).clamp(0, 1)
    assert (metrics.masked_ssim(noisy, img, mask) < 0.9).all()


def test_ssim_luminance_term_in_closed_form():
    """Flat images (no variance): SSIM is the luminance term alone, (2 mu_x mu_y + C1) / (mu_x^2 + mu_y^2 + C1) with
    C1 = (0.01 * peak)^2, everywhere, so the mask changes nothing."""
    x, y = torch.full((1, 3, 32, 32), 0.5), torch.full((1, 3, 32, 32), 0.6)
    c1 = 0.01 ** 2
    expected = (2 * 0.5 * 0.6 + c1) / (0.5 ** 2 + 0.6 ** 2 + c1)
    _, mask = _images(b=1)
    assert metrics.masked_ssim(x, y, mask).item() == pytest.approx(expected, rel=1e-5)


def test_ssim_window_is_wang_et_al_11x11():
    """The window reaches exactly 5 pixels (11x11): a point change lowers the SSIM of the pixels 5 away from it (a
    7x7 window would not see it there) and leaves those 6 away at exactly 1."""
    img = torch.full((1, 1, 32, 32), 0.5)
    img[..., 8::4, :] = 0.7  # texture, so the structure term is defined
    changed = img.clone()
    changed[..., 16, 16] = 0.0
    ring = torch.zeros(1, 1, 32, 32)
    ring[..., 11:22, 11:22] = 1
    ring[..., 12:21, 12:21] = 0  # the pixels 5 away (Chebyshev) from the change
    assert metrics.masked_ssim(changed, img, ring).item() < 0.999
    far = ring.clone()
    far[..., 10:23, 10:23] = 1
    far[..., 11:22, 11:22] = 0  # 6 away: outside even the 11x11 window
    assert metrics.masked_ssim(changed, img, far).item() == pytest.approx(1.0, abs=1e-6)


def test_chroma_drift_ignores_brightness_but_not_colour():
    img, mask = _images()
    lin = srgb_to_linear(img) + 0.01
    assert metrics.chroma_drift(0.3 * lin, lin, mask).max() < 1e-5  # same albedo, dimmer light
    swapped = lin[:, [2, 0, 1]]
    assert (metrics.chroma_drift(swapped, lin, mask) > 0.05).all()


def test_additivity_error_zero_for_exact_transport_one_for_ignoring_light():
    img, mask = _images()
    r1, r2 = srgb_to_linear(img), srgb_to_linear(img.flip(-1))
    assert metrics.additivity_error(r1 + r2, r1, r2, mask).max() < 1e-6
    assert torch.allclose(metrics.additivity_error(r1, r1, r1, mask), torch.ones(2))  # same answer for every light


def test_synthetic_ground_truth_is_additive_up_to_clipping(tmp_path):
    """The generator's linear parts sum to the target; clipped to displayable values they still nearly do."""
    from iclight_ds.data.synth import generate
    from iclight_ds.model.tokenizer import build_char_tokenizer

    generate(tmp_path, 4, size=32, seed=3)
    items = ev.load_eval_samples(tmp_path, 32, build_char_tokenizer(), (16, 32))
    assert len(items) == 4 and all("parts_linear" in it for it in items)
    for it in items:
        parts = it["parts_linear"]
        target = torch.from_numpy(np.load(tmp_path / "linear" / f"{it['id']}.npy")).permute(2, 0, 1)
        assert torch.allclose(parts.sum(0), target, atol=1e-5)
        clip = srgb_to_linear(linear_to_srgb(parts))
        target_png = srgb_to_linear((it["target"] + 1) / 2)
        floor = metrics.additivity_error(target_png[None], clip[:1], clip[1:], it["mask"][None])
        assert floor.item() < 0.1

"""The evaluation: its metrics on known images, the shipped tiny VAE, and the CLI on a short run."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from iclight_ds import eval as ev
from iclight_ds.data.imageio import linear_to_srgb, srgb_to_linear

REPO = Path(__file__).resolve().parents[1]


def _images(seed: int = 0, b: int = 2, h: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    img = torch.rand(b, 3, h, h, generator=g)
    mask = torch.zeros(b, 1, h, h)
    mask[:, :, 8:24, 8:24] = 1
    return img, mask


def test_psnr_counts_only_the_mask():
    img, mask = _images()
    off = img + 0.1 * mask  # 0.1 inside the mask
    assert torch.allclose(ev.masked_psnr(off, img, mask), torch.full((2,), 20.0), atol=1e-3)
    outside = img.clone()
    outside[:, :, :4] = 0  # changes outside the mask do not count
    assert (ev.masked_psnr(outside, img, mask) > 99).all()


def test_ssim_is_one_for_equal_images_and_lower_for_noise():
    img, mask = _images()
    assert torch.allclose(ev.masked_ssim(img, img, mask), torch.ones(2), atol=1e-5)
    noisy = (img + 0.2 * torch.randn_like(img)).clamp(0, 1)
    assert (ev.masked_ssim(noisy, img, mask) < 0.9).all()


def test_chroma_drift_ignores_brightness_but_not_colour():
    img, mask = _images()
    lin = srgb_to_linear(img) + 0.01
    assert ev.chroma_drift(0.3 * lin, lin, mask).max() < 1e-5  # same albedo, dimmer light
    swapped = lin[:, [2, 0, 1]]
    assert (ev.chroma_drift(swapped, lin, mask) > 0.05).all()


def test_additivity_error_zero_for_exact_transport_one_for_ignoring_light():
    img, mask = _images()
    r1, r2 = srgb_to_linear(img), srgb_to_linear(img.flip(-1))
    assert ev.additivity_error(r1 + r2, r1, r2, mask).max() < 1e-6
    assert torch.allclose(ev.additivity_error(r1, r1, r1, mask), torch.ones(2))  # same answer for every light


def test_synthetic_ground_truth_is_additive_up_to_clipping(tmp_path):
    """The generator's linear parts sum to the target; clipped to displayable values they still nearly do."""
    from iclight_ds.data.synth import generate
    from iclight_ds.data.tokenizer import build_char_tokenizer

    generate(tmp_path, 4, size=32, seed=3)
    items = ev.load_eval_samples(tmp_path, 32, build_char_tokenizer(), (16, 32))
    assert len(items) == 4 and all("parts_linear" in it for it in items)
    for it in items:
        parts = it["parts_linear"]
        target = torch.from_numpy(np.load(tmp_path / "linear" / f"{it['id']}.npy")).permute(2, 0, 1)
        assert torch.allclose(parts.sum(0), target, atol=1e-5)
        clip = srgb_to_linear(linear_to_srgb(parts))
        target_png = srgb_to_linear((it["target"] + 1) / 2)
        floor = ev.additivity_error(target_png[None], clip[:1], clip[1:], it["mask"][None])
        assert floor.item() < 0.1


def test_shipped_tiny_vae_reconstructs_synthetic_images(tmp_path):
    """The trained tiny VAE (iclight_ds/assets) is small, loads by its metadata and beats a random one by far."""
    from iclight_ds.data.synth import generate
    from iclight_ds.models import build_vae
    from iclight_ds.tiny_vae import ASSET, evaluate, load_vae_file, training_images

    assert ASSET.is_file() and ASSET.stat().st_size < 5e6
    vae = load_vae_file(ASSET)
    generate(tmp_path, 8, size=64, seed=4242, extras=False)  # scenes it never saw
    images = training_images(tmp_path, 64)
    trained_psnr, std = evaluate(vae, images)
    torch.manual_seed(0)
    random_psnr, _ = evaluate(build_vae("tiny"), images)
    assert trained_psnr > 24 and trained_psnr > random_psnr + 10, (trained_psnr, random_psnr)
    assert 0.5 < std * vae.config.scaling_factor < 2  # the scaling factor makes latents ~unit variance


def test_shipped_4x_tiny_vae_reconstructs_far_above_the_8x_one(tmp_path):
    """iclight_ds/assets/tiny_vae_4x.safetensors: small, 16x16 latents at 64 px, and on unseen scenes well above the
    8x VAE's reconstruction (its point: a ceiling the issue's +6 dB target fits under)."""
    from iclight_ds.data.synth import generate
    from iclight_ds.tiny_vae import ASSET, ASSET_4X, evaluate, load_vae_file, training_images

    assert ASSET_4X.is_file() and ASSET_4X.stat().st_size < 5e6
    vae4 = load_vae_file(ASSET_4X)
    generate(tmp_path, 8, size=64, seed=4242, extras=False)
    images = training_images(tmp_path, 64)
    with torch.no_grad():
        assert vae4.encode(images[:1]).latent_dist.mode().shape == (1, 4, 16, 16)
    psnr4, std = evaluate(vae4, images)
    psnr8, _ = evaluate(load_vae_file(ASSET), images)
    assert psnr4 > 32 and psnr4 > psnr8 + 5, (psnr4, psnr8)
    assert 0.5 < std * vae4.config.scaling_factor < 2


def test_tiny_vae_script_makes_a_4x_vae_from_three_widths(tmp_path):
    """`--channels` with three widths trains a VAE that downsamples 4x (diffusers' 2 ** (levels - 1)), and the
    file it writes loads with that layout and its scaling factor."""
    from iclight_ds.tiny_vae import load_vae_file, main

    out = tmp_path / "vae4.safetensors"
    main(["--out", str(out), "--channels", "16", "32", "32", "--steps", "2", "--samples", "8", "--batch", "4",
          "--resolution", "32", "--crop", "16"])
    vae = load_vae_file(out)
    assert tuple(vae.config.block_out_channels) == (16, 32, 32)
    with torch.no_grad():
        z = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
    assert z.shape == (1, 4, 8, 8)
    assert vae.config.scaling_factor != 4.0  # measured (1 / std), not the random tiny VAE's default
    from safetensors import safe_open

    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["channels"]) == [16, 32, 32] and meta["device"] == "cpu" and meta["steps"] == "2"


def test_tiny_vae_script_refuses_a_device_it_does_not_have(tmp_path, capsys):
    """Checked before any data is generated, by the same rule as the eval and relight CLIs."""
    from iclight_ds.tiny_vae import main

    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(SystemExit, match=f"error: --device {missing}"):
        main(["--out", str(tmp_path / "v.safetensors"), "--device", missing])
    assert not (tmp_path / "v.safetensors").exists()


def test_vae_file_errors_name_the_file(tmp_path):
    from iclight_ds.tiny_vae import TinyVaeError, load_vae_file

    with pytest.raises(TinyVaeError, match="missing.safetensors does not exist"):
        load_vae_file(tmp_path / "missing.safetensors")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(TinyVaeError, match="bad.safetensors: not a readable safetensors"):
        load_vae_file(bad)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(TinyVaeError, match="foreign.safetensors: no 'iclight-ds tiny vae v1' metadata"):
        load_vae_file(tmp_path / "foreign.safetensors")


def test_eval_cli_scores_a_run_and_its_baseline(tmp_path):
    """A short default-style run, then `python -m iclight_ds.eval`: JSON and table, baseline computed right."""
    from iclight_ds.data.synth import generate

    run, held = tmp_path / "run", tmp_path / "held"
    generate(held, 6, size=64, seed=777)
    env = {"HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(REPO)}
    import os

    train = [sys.executable, "-m", "iclight_ds.train", "--train.ds_config", "cpu", "--train.output_dir", str(run),
             "--train.steps", "3", "--data.synth_samples", "16", "--logging.preview_every", "0",
             "--logging.eval_every", "0", "--logging.progress", "false", "--logging.wandb", "false",
             "--data.num_workers", "0"]
    subprocess.run(train, check=True, cwd=REPO, env={**os.environ, **env}, capture_output=True, timeout=600)
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "iclight_ds.eval", "--run", str(run), "--data", str(held),
                           "--samples", "4", "--steps", "3", "--batch-size", "2", "--out", str(out),
                           "--grid", str(tmp_path / "grid.png"), "--grid-samples", "3"],
                          cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "PSNR (dB, fg)" in proc.stdout and "copy input" in proc.stdout
    result = json.loads(out.read_text())
    summary, rows = result["summary"], result["samples"]
    assert summary["samples"] == 4 == len(rows) and summary["samples_with_parts"] == 4
    for key in ("psnr", "baseline_psnr", "ssim", "chroma_drift", "additivity_error", "additivity_floor", "vae_psnr"):
        assert math.isfinite(summary[key]), key
    assert summary["psnr_gain_db"] == pytest.approx(summary["psnr"] - summary["baseline_psnr"])
    assert result["settings"]["device"] == "cpu"
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (5 * 64, 3 * 64)  # input | target | relit L, L1, L2
    # the baseline is the degraded input itself: recompute it from the files
    from iclight_ds.data.tokenizer import build_char_tokenizer

    items = ev.load_eval_samples(held, 64, build_char_tokenizer(), (16, 32), count=4)
    target = torch.stack([(it["target"] + 1) / 2 for it in items])
    degraded = torch.stack([((it["foreground"] + 1) * 127 / 255).clamp(0, 1) for it in items])
    mask = torch.stack([it["mask"] for it in items])
    expected = ev.masked_psnr(degraded, target, mask)
    assert [r["baseline_psnr"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-4)
    # --strength < 1 starts each relight from the degraded input's noised latent: other relit scores, same baseline
    img2img = tmp_path / "img2img.json"
    proc = subprocess.run([sys.executable, "-m", "iclight_ds.eval", "--run", str(run), "--data", str(held),
                           "--samples", "4", "--steps", "3", "--batch-size", "2", "--strength", "0.5", "--out",
                           str(img2img)], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr
    started = json.loads(img2img.read_text())
    assert started["settings"]["strength"] == 0.5 and result["settings"]["strength"] == 1.0
    assert started["summary"]["baseline_psnr"] == pytest.approx(summary["baseline_psnr"])
    assert abs(started["summary"]["psnr"] - summary["psnr"]) > 1e-3
    # errors name what is missing
    bad = subprocess.run([sys.executable, "-m", "iclight_ds.eval", "--run", str(tmp_path / "nope"), "--data",
                          str(held)], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    assert bad.returncode == 2 and "no config.json" in bad.stderr
    missing = f"cuda:{torch.cuda.device_count()}"  # a GPU this machine does not have
    bad = subprocess.run([sys.executable, "-m", "iclight_ds.eval", "--run", str(run), "--data", str(held), "--device",
                          missing], cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True)
    assert bad.returncode == 2 and f"--device {missing}" in bad.stderr

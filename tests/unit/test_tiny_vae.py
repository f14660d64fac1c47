"""The shipped tiny VAEs (8x and 4x) on unseen synthetic scenes, the script that trains them, and its file format."""

from __future__ import annotations

import json

import pytest
import torch


def test_shipped_tiny_vae_reconstructs_synthetic_images(synthetic):
    """The trained tiny VAE (iclight_ds/model/assets) is small, loads by its metadata and beats a random one by far."""
    from iclight_ds.model.arch import build_vae
    from iclight_ds.model.frozen import ASSET, load_vae_file
    from iclight_ds.tools.tiny_vae import evaluate, training_images

    assert ASSET.is_file() and ASSET.stat().st_size < 5e6
    vae = load_vae_file(ASSET)
    images = training_images(synthetic(8, size=64, seed=4242, extras=False), 64)  # scenes it never saw
    trained_psnr, std = evaluate(vae, images)
    torch.manual_seed(0)
    random_psnr, _ = evaluate(build_vae("tiny"), images)
    assert trained_psnr > 24 and trained_psnr > random_psnr + 10, (trained_psnr, random_psnr)
    assert 0.5 < std * vae.config.scaling_factor < 2  # the scaling factor makes latents ~unit variance


def test_shipped_4x_tiny_vae_reconstructs_far_above_the_8x_one(synthetic):
    """iclight_ds/model/assets/tiny_vae_4x.safetensors: small, 16x16 latents at 64 px, and on unseen scenes well above
    the 8x VAE's reconstruction (its point: a ceiling the issue's +6 dB target fits under)."""
    from iclight_ds.model.frozen import ASSET, ASSET_4X, load_vae_file
    from iclight_ds.tools.tiny_vae import evaluate, training_images

    assert ASSET_4X.is_file() and ASSET_4X.stat().st_size < 5e6
    vae4 = load_vae_file(ASSET_4X)
    images = training_images(synthetic(8, size=64, seed=4242, extras=False), 64)
    with torch.no_grad():
        assert vae4.encode(images[:1]).latent_dist.mode().shape == (1, 4, 16, 16)
    psnr4, std = evaluate(vae4, images)
    psnr8, _ = evaluate(load_vae_file(ASSET), images)
    assert psnr4 > 32 and psnr4 > psnr8 + 5, (psnr4, psnr8)
    assert 0.5 < std * vae4.config.scaling_factor < 2


def test_tiny_vae_script_makes_a_4x_vae_from_three_widths(tmp_path):
    """`--channels` with three widths trains a VAE that downsamples 4x (diffusers' 2 ** (levels - 1)), and the
    file it writes loads with that layout and its scaling factor."""
    from iclight_ds.model.frozen import load_vae_file
    from iclight_ds.tools.tiny_vae import main

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
    from iclight_ds.tools.tiny_vae import main

    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(SystemExit, match=f"error: --device {missing}"):
        main(["--out", str(tmp_path / "v.safetensors"), "--device", missing])
    assert not (tmp_path / "v.safetensors").exists()


def test_vae_file_errors_name_the_file(tmp_path):
    from iclight_ds.model.frozen import TinyVaeError, load_vae_file

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

"""The shipped tiny pretrained base (iclight_ds/model/assets/tiny_base.safetensors): its file, what it learnt, and
the script that pretrains it."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import safetensors_metadata


def test_shipped_tiny_base_loads_with_its_recipe_and_is_the_default_run_s_unet_before_widening():
    """Small, its recipe and scores in the metadata, loaded by load_base as a tiny 4-channel UNet of the CPU default
    run's shape, with its text encoder, the shipped tiny VAE and the char tokenizer; `model.base: tiny` names it."""
    from iclight_ds.config import load_config
    from iclight_ds.model.arch import TINY_UNET
    from iclight_ds.model.base import base_unet_size, load_base
    from iclight_ds.model.frozen import ASSET, file_sha256, load_vae_file
    from iclight_ds.model.tinybase import FORMAT, TINY_BASE_ASSET
    from iclight_ds.train.cli import CPU_DEFAULT_PRESET

    assert TINY_BASE_ASSET.is_file() and TINY_BASE_ASSET.stat().st_size < 5 * 2**20  # no tracked file over 5 MB
    meta = safetensors_metadata(TINY_BASE_ASSET)
    assert meta["format"] == FORMAT and meta["vae_sha256"] == file_sha256(ASSET)
    for key in ("trained_on", "objective", "steps", "batch", "lr", "seed", "train_seconds", "device", "torch"):
        assert meta[key], key
    scores = json.loads(meta["heldout_scores"])
    assert set(scores) >= {"eps_mse_t999", "x0_mse_t500"}
    assert "seed 30000" in meta["trained_on"]  # not the default run's scenes (seed 0) nor the held-out ones (20000)

    base = load_base(TINY_BASE_ASSET)
    config = dict(base.unet.config)
    for key, value in TINY_UNET.items():
        if key != "sample_size":
            assert tuple(config[key]) == value if isinstance(value, tuple) else config[key] == value, key
    assert base.unet.conv_in.weight.shape[1] == 4
    shipped_vae = load_vae_file(ASSET)
    assert base.vae.config.scaling_factor == shipped_vae.config.scaling_factor
    assert torch.equal(base.vae.encoder.conv_in.weight, shipped_vae.encoder.conv_in.weight)
    assert base.text_encoder.config.hidden_size == TINY_UNET["cross_attention_dim"] and not base.real_tokenizer
    assert base_unet_size(TINY_BASE_ASSET) == "tiny"
    assert load_config(CPU_DEFAULT_PRESET).model.base == str(TINY_BASE_ASSET)


def test_the_tiny_base_denoises_unseen_renders_far_better_than_its_random_init(synthetic):
    """What pretraining taught it, on scenes of a seed it never saw: the x0 error at t=500 and t=900, against the
    same UNet freshly initialised (the starting point of a run without a base) and against the mean latent."""
    from diffusers import UNet2DConditionModel

    from iclight_ds.model.base import load_base
    from iclight_ds.model.schedule import alphas_cumprod
    from iclight_ds.model.tinybase import TINY_BASE_ASSET
    from iclight_ds.tools.tiny_base import encode_scenes, score

    base = load_base(TINY_BASE_ASSET)
    latents, text = encode_scenes(synthetic(16, size=64, seed=4243, extras=False), 64, base.vae, base.text_encoder,
                                  base.tokenizer)
    trained = score(base.unet, latents, text, alphas_cumprod())
    torch.manual_seed(0)
    fresh = score(UNet2DConditionModel.from_config(base.unet.config), latents, text, alphas_cumprod())
    for t in (500, 900):
        assert trained[f"x0_mse_t{t}"] < 0.5 * fresh[f"x0_mse_t{t}"], (t, trained, fresh)
    # against predicting the mean latent (x0 error = the latents' variance): far below at t=500, below at t=900,
    # where only the prompt says what the object is (a 5-step base scores 1.2 and 28 here)
    variance = latents.var().item()
    assert trained["x0_mse_t500"] < 0.25 * variance and trained["x0_mse_t900"] < variance, (trained, variance)


def test_pretraining_script_runs_and_its_loss_falls(tmp_path):
    """A tiny setting (16 scenes at 32 px, 40 steps): the loss falls and the file it writes loads as a base."""
    from iclight_ds.model.base import load_base
    from iclight_ds.tools.tiny_base import main

    out = tmp_path / "base.safetensors"
    main(["--out", str(out), "--samples", "16", "--held", "4", "--resolution", "32", "--steps", "40", "--batch", "8",
          "--warmup", "5", "--data-seed", "77", "--workers", "1"])
    meta = safetensors_metadata(out)
    first, last = float(meta["loss_first"]), float(meta["loss_last"])
    assert last < 0.7 * first, (first, last)
    assert meta["steps"] == "40" and meta["seed"] == "0" and "seed 77" in meta["trained_on"]
    base = load_base(out, unet_only=True)
    assert base.unet.conv_in.weight.shape[1] == 4 and base.unet.config.sample_size == 4  # 32 px / 8
    # the scores are of the stored (int8) weights, and the rounding costs little against the fp32 ones
    stored, fp32 = json.loads(meta["heldout_scores"]), json.loads(meta["heldout_scores_fp32"])
    assert stored.keys() == fp32.keys() and stored != fp32
    for key in stored:
        assert abs(stored[key] - fp32[key]) <= 0.05 * fp32[key] + 1e-3, (key, stored, fp32)


def test_the_unet_is_stored_int8_per_output_channel_and_reads_back_within_half_a_step(tmp_path):
    """Every UNet tensor of 2+ dims is int8 in the file with one scale per output channel; a load gives each weight
    back within half a quantisation step; norms and biases are fp16; a missing scale is refused by key."""
    from diffusers import UNet2DConditionModel
    from safetensors import safe_open
    from safetensors.torch import save_file

    from iclight_ds.model.arch import TINY_UNET, build_text_encoder
    from iclight_ds.model.tinybase import SCALE_PREFIX, TinyBaseError, load_tiny_base, save_tiny_base
    from iclight_ds.model.tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**dict(TINY_UNET, sample_size=4))
    with torch.no_grad():
        unet.conv_in.weight[0].mul_(100)  # one output channel far larger: per-channel scales keep the others fine
    path = save_tiny_base(unet, build_text_encoder("tiny", build_char_tokenizer()), tmp_path / "b.safetensors", {})
    with safe_open(str(path), framework="pt") as f:
        stored = {k: f.get_tensor(k) for k in f.keys()}
    original = unet.state_dict()
    loaded = load_tiny_base(path, unet_only=True)[0].state_dict()
    for key, value in original.items():
        if value.ndim >= 2:
            scale = stored[SCALE_PREFIX + key]
            assert stored[f"unet.{key}"].dtype == torch.int8 and scale.shape == (value.shape[0],), key
            step = scale.reshape(-1, *[1] * (value.ndim - 1))
            assert torch.all((loaded[key] - value).abs() <= step / 2 + 1e-7), key
        else:
            assert stored[f"unet.{key}"].dtype == torch.float16, key
            assert torch.equal(loaded[key], value.half().float()), key
    conv_in_scale = stored[SCALE_PREFIX + "conv_in.weight"]
    assert conv_in_scale[0] > 50 * conv_in_scale[1:].max()  # the large channel did not coarsen the others
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    del stored[SCALE_PREFIX + "conv_in.weight"]
    save_file(stored, str(tmp_path / "c.safetensors"), metadata=meta)
    with pytest.raises(TinyBaseError, match="unet.conv_in.weight has no unet_scale.conv_in.weight"):
        load_tiny_base(tmp_path / "c.safetensors", unet_only=True)


def test_a_file_that_is_not_a_tiny_base_is_refused(tmp_path):
    from safetensors.torch import save_file

    from iclight_ds.model.tinybase import TinyBaseError, is_tiny_base_file, read_tiny_base

    other = tmp_path / "other.safetensors"
    save_file({"x": torch.zeros(1)}, str(other), metadata={"format": "something else"})
    assert not is_tiny_base_file(other) and not is_tiny_base_file(tmp_path / "missing.safetensors")
    with pytest.raises(TinyBaseError, match="not a tiny base file"):
        read_tiny_base(other)

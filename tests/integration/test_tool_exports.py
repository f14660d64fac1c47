"""Exports for third-party tools, read back the way those tools read them (tiny models, in-process):

- `ldm` writes bare LDM keys by default; adding each file key, as the ComfyUI / Forge IC-Light nodes do, to the base
  model's own LDM weights gives back the trained UNet (no key dropped, none unknown);
- an FC with an environment encoder exported to a tool format warns that the tool will not run the encoder;
- `checkpoint` is one original-layout file that diffusers' single-file loaders read offline with a local config
  folder, conv_in of 8 (FC) or 12 (FBC) input channels, weights equal to ours.
"""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from iclight_ds.config import ModelConfig
from iclight_ds.model import formats as fmt
from iclight_ds.model.arch import build_text_encoder, build_vae
from iclight_ds.model.base import BaseModel, unet_hash
from iclight_ds.model.iclight import build_iclight_model, build_unet
from iclight_ds.model.schedule import make_scheduler
from iclight_ds.model.tokenizer import build_char_tokenizer
from iclight_ds.train.export import FORMATS, TOOL_FORMATS, export_formatted, split_state_dict


def _config(variant: str) -> dict:
    return {"model": {"variant": variant, "env_shape": [16, 32]}, "train": {"seed": 0}}


def _trained(variant: str, seed: int = 0):
    """(a tiny base with VAE and text encoder, the UNet and small modules 'trained' away from it)."""
    torch.manual_seed(seed)
    tokenizer = build_char_tokenizer()
    base_unet = build_unet("tiny", 4).eval()
    vae, text_encoder = build_vae("tiny").eval(), build_text_encoder("tiny", tokenizer).eval()
    model = build_iclight_model(ModelConfig(variant=variant), unet=copy.deepcopy(base_unet))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))  # conv_in's new channels too: they are no longer zero
    base = BaseModel(base_unet, vae, text_encoder, tokenizer, "tiny test base", unet_hash(base_unet.state_dict()))
    return base, split_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})


@pytest.mark.parametrize("variant", ["fc", "fbc"])
def test_ldm_default_patches_every_key_of_the_model(tmp_path, variant):
    base, (trained, small) = _trained(variant)
    path = export_formatted(trained, small, fmt_name="ldm", out=tmp_path, config=_config(variant), step=1,
                            base=base)[0]
    got = load_file(str(path))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["ldm_prefix"] == ""
    assert "input_blocks.0.0.weight" in got  # the key kijai's node reads for the channel count
    # What the nodes do: prefix every file key with 'diffusion_model.' and add it to the model weight of that name
    # (conv_in zero-padded first). The ComfyUI model's own names are the base UNet's LDM keys.
    model = {"diffusion_model." + k: v for k, v in
             fmt.unet_to_ldm(fmt.padded_base(base.unet.state_dict(), trained), base.unet.config).items()}
    patches = {"diffusion_model." + k: v for k, v in got.items()}
    assert set(patches) == set(model)
    merged = {k: model[k] + patches[k] for k in model}
    want = fmt.unet_to_ldm(trained, base.unet.config, prefix="diffusion_model.")
    for k, v in want.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("fmt_name", FORMATS)
def test_env_conditioned_fc_warns_for_tool_formats(tmp_path, caplog, fmt_name):
    base, (trained, small) = _trained("fc")
    assert any(k.startswith("env_encoder.") for k in small)
    with caplog.at_level(logging.WARNING, logger="iclight_ds.train.export"):
        export_formatted(trained, small, fmt_name=fmt_name, out=tmp_path / "env", config=_config("fc"), step=1,
                         base=base)
    warned = [r.getMessage() for r in caplog.records if "environment-map encoder" in r.getMessage()]
    if fmt_name not in TOOL_FORMATS:  # unet and diffusers: our own loaders and the documented snippet read the modules
        assert warned == []
        return
    assert len(warned) == 1, warned
    for what in (fmt_name, "never run", "iclight-relight", "diffusers snippet", "model.light_input: text"):
        assert what in warned[0]
    caplog.clear()
    text_only = {k: v for k, v in small.items() if not k.startswith("env_encoder.")}  # an FC that reads the light
    with caplog.at_level(logging.WARNING, logger="iclight_ds.train.export"):  # from the prompt, as the official one
        export_formatted(trained, text_only, fmt_name=fmt_name, out=tmp_path / "text", config=_config("fc"), step=1,
                         base=base)
    assert not [r for r in caplog.records if "environment-map encoder" in r.getMessage()]


def _config_folder(base, path):
    """What a user passes as `config=`: an SD pipeline folder without weights, its UNet config the base's (4 inputs)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer,
                                   unet=base.unet, scheduler=make_scheduler("ddim"), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(path))
    for weights in list(path.rglob("*.safetensors")) + list(path.rglob("*.bin")):
        weights.unlink()
    assert json.loads((path / "unet" / "config.json").read_text())["in_channels"] == 4
    return path


@pytest.mark.parametrize("variant, channels", [("fc", 8), ("fbc", 12)])
def test_checkpoint_loads_with_diffusers_from_single_file(tmp_path, variant, channels):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    base, (trained, small) = _trained(variant)
    path = export_formatted(trained, small, fmt_name="checkpoint", out=tmp_path, config=_config(variant), step=3,
                            base=base)[0]
    assert path.name == f"iclight_{variant}_checkpoint.safetensors"
    keys = load_file(str(path))
    assert keys["model.diffusion_model.input_blocks.0.0.weight"].shape[1] == channels
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["format"] == fmt.FORMAT_TAGS["checkpoint"] and f.metadata()["in_channels"] == str(channels)

    config = _config_folder(base, tmp_path / "sd_config")
    unet = UNet2DConditionModel.from_single_file(str(path), config=str(config), subfolder="unet",
                                                 local_files_only=True, in_channels=channels)
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(config), local_files_only=True, unet=unet,
                                                    safety_checker=None)
    assert pipe.unet.config.in_channels == channels and pipe.unet.conv_in.weight.shape[1] == channels
    for loaded, want in ((pipe.unet.state_dict(), trained), (pipe.vae.state_dict(), base.vae.state_dict()),
                         (pipe.text_encoder.state_dict(), base.text_encoder.state_dict())):
        assert set(loaded) == set(want)
        assert [k for k in want if not torch.equal(loaded[k], want[k])] == []


def test_checkpoint_needs_the_base_vae_and_text_encoder(tmp_path):
    base, (trained, small) = _trained("fbc")
    unet_only = BaseModel(base.unet, None, None, None, base.source, base.unet_hash)
    with pytest.raises(ValueError, match="VAE and text encoder"):
        export_formatted(trained, small, fmt_name="checkpoint", out=tmp_path, config=_config("fbc"), step=1,
                         base=unet_only)


@pytest.mark.parametrize("variant", ["fc", "fbc"])
def test_checkpoint_relights_through_our_own_loader(tmp_path, variant):
    """iclight-relight --weights takes the single file too: its UNet keys are the trained UNet, loaded as is (not
    added to the base as an offset), and its VAE and text encoder keys are left to the base."""
    from iclight_ds.infer.weights import load_trained_unet

    base, (trained, small) = _trained(variant)
    path = export_formatted(trained, small, fmt_name="checkpoint", out=tmp_path, config=_config(variant), step=3,
                            base=base)[0]
    unet, _, meta = load_trained_unet(copy.deepcopy(base), path)
    assert meta["format"] == fmt.FORMAT_TAGS["checkpoint"]
    loaded = unet.state_dict()
    assert set(loaded) == set(trained)
    assert [k for k in trained if not torch.equal(loaded[k], trained[k].to(loaded[k].dtype))] == []

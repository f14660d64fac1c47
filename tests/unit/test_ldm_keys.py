"""The LDM (original SD1.5 single-file) key mapping of the UNet, VAE and text encoder, checked against diffusers'
own converters."""

from __future__ import annotations

import pytest
import torch

from iclight_ds.model import formats as fmt
from iclight_ds.model.arch import SD15_UNET, TINY_UNET, build_vae
from iclight_ds.model.iclight import build_unet


def _meta_unet_config(arch: dict) -> dict:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return dict(UNet2DConditionModel(**arch).config)


@pytest.mark.parametrize("arch", [TINY_UNET, SD15_UNET], ids=["tiny", "sd15"])
def test_unet_ldm_mapping_agrees_with_diffusers_converter(arch):
    """Our diffusers->LDM names, read back by diffusers' own LDM->diffusers converter, land on the same keys."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    config = _meta_unet_config(arch)
    keys = fmt.unet_keys(config)
    marked = {k: torch.tensor(float(i)) for i, k in enumerate(keys)}  # each value names its key
    ldm = fmt.unet_to_ldm(marked, config, prefix=fmt.LDM_UNET_PREFIX)
    assert len(ldm) == len(marked)
    back = convert_ldm_unet_checkpoint(ldm, config)
    assert set(back) == set(keys)
    assert all(back[k].item() == marked[k].item() for k in keys)
    ours = fmt.unet_from_ldm(ldm, config)
    assert all(ours[k].item() == marked[k].item() for k in keys)


def test_sd15_ldm_names_are_the_original_ones():
    config = _meta_unet_config(SD15_UNET)
    expected = {
        "conv_in.weight": "input_blocks.0.0.weight",
        "time_embedding.linear_2.bias": "time_embed.2.bias",
        "down_blocks.0.resnets.0.norm1.weight": "input_blocks.1.0.in_layers.0.weight",
        "down_blocks.0.resnets.1.time_emb_proj.weight": "input_blocks.2.0.emb_layers.1.weight",
        "down_blocks.0.downsamplers.0.conv.weight": "input_blocks.3.0.op.weight",
        "down_blocks.1.resnets.0.conv_shortcut.weight": "input_blocks.4.0.skip_connection.weight",
        "down_blocks.1.attentions.1.proj_in.weight": "input_blocks.5.1.proj_in.weight",
        "down_blocks.3.resnets.1.conv2.weight": "input_blocks.11.0.out_layers.3.weight",
        "mid_block.resnets.1.norm2.bias": "middle_block.2.out_layers.0.bias",
        "mid_block.attentions.0.transformer_blocks.0.attn1.to_q.weight":
            "middle_block.1.transformer_blocks.0.attn1.to_q.weight",
        "up_blocks.0.upsamplers.0.conv.weight": "output_blocks.2.1.conv.weight",
        "up_blocks.1.upsamplers.0.conv.weight": "output_blocks.5.2.conv.weight",
        "up_blocks.3.attentions.2.transformer_blocks.0.ff.net.2.weight":
            "output_blocks.11.1.transformer_blocks.0.ff.net.2.weight",
        "conv_norm_out.weight": "out.0.weight",
        "conv_out.bias": "out.2.bias",
    }
    assert {k: fmt.unet_key_to_ldm(k, config) for k in expected} == expected
    names = [fmt.unet_key_to_ldm(k, config) for k in fmt.unet_keys(config)]
    assert len(set(names)) == len(names) == 686


@pytest.mark.parametrize("prefix", ["", "diffusion_model.", "model.diffusion_model."])
def test_unet_ldm_round_trip_with_every_prefix(prefix):
    torch.manual_seed(0)
    unet = build_unet("tiny", 8)
    state = unet.state_dict()
    ldm = fmt.unet_to_ldm(state, unet.config, prefix=prefix)
    assert f"{prefix}input_blocks.0.0.weight" in ldm and ldm[f"{prefix}input_blocks.0.0.weight"].shape[1] == 8
    assert fmt.detect_unet_ldm_prefix(ldm) == prefix
    back = fmt.unet_from_ldm(ldm, unet.config)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_unet_from_ldm_names_unknown_keys():
    config = _meta_unet_config(TINY_UNET)
    ldm = fmt.unet_to_ldm({k: torch.zeros(1) for k in fmt.unet_keys(config)}, config)
    ldm["input_blocks.9.0.in_layers.0.weight"] = torch.zeros(1)
    with pytest.raises(fmt.FormatError, match="input_blocks.9.0"):
        fmt.unet_from_ldm(ldm, config)
    with pytest.raises(fmt.FormatError, match="no LDM UNet keys"):
        fmt.unet_from_ldm({"conv_in.weight": torch.zeros(1)}, config)


def test_vae_and_text_encoder_ldm_mapping_read_back_by_diffusers():
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint, convert_ldm_vae_checkpoint

    from iclight_ds.model.arch import build_text_encoder
    from iclight_ds.model.tokenizer import build_char_tokenizer

    torch.manual_seed(0)
    vae, te = build_vae("tiny"), build_text_encoder("tiny", build_char_tokenizer())
    vs, ts = vae.state_dict(), te.state_dict()
    ldm = fmt.vae_to_ldm(vs)
    assert ldm["first_stage_model.encoder.mid.attn_1.q.weight"].shape[-2:] == (1, 1)  # conv 1x1 in the original
    assert "first_stage_model.decoder.up.3.upsample.conv.weight" in ldm  # decoder blocks run in reverse order
    back = convert_ldm_vae_checkpoint(ldm, dict(vae.config))
    assert set(back) == set(vs) and all(torch.equal(back[k], vs[k]) for k in vs)
    text = convert_ldm_clip_checkpoint(fmt.text_encoder_to_ldm(ts))
    text = {k.removeprefix("text_model."): v for k, v in text.items()}
    assert set(text) == set(ts) and all(torch.equal(text[k], ts[k]) for k in ts)

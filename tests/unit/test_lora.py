"""LoRA through peft on the UNet (iclight_ds/model/lora.py): what trains, the merge, the kohya / ComfyUI key layout
and the refusals, on the tiny UNet and on the full SD1.5 UNet on the meta device."""

from __future__ import annotations

import copy

import pytest
import torch
from diffusers import UNet2DConditionModel

from iclight_ds.config import DEFAULT_LORA_TARGETS, ConfigError, load_config
from iclight_ds.model import formats as fmt
from iclight_ds.model import lora
from iclight_ds.model.arch import SD15_UNET
from iclight_ds.model.iclight import build_unet

TARGETS = list(DEFAULT_LORA_TARGETS)


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, unet.config.in_channels, 8, 8, generator=g)
    text = torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)
    return x, torch.tensor([10, 900]), text


def _lora_unet(rank=4, alpha=8.0, seed=0):
    torch.manual_seed(seed)
    base = build_unet("tiny", 8).eval()
    unet = copy.deepcopy(base)
    lora.add_lora(unet, rank=rank, alpha=alpha, targets=TARGETS)
    return base, unet


def _randomise_lora(unet, seed=1):
    """LoRA up weights start at zero; give them values so that the update is not trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if ".lora_B." in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


def test_lora_starts_as_the_base_and_trains_only_lora_and_conv_in():
    base, unet = _lora_unet()
    with torch.no_grad():
        torch.testing.assert_close(unet(*_inputs(unet)).sample, base(*_inputs(base)).sample, rtol=0, atol=0)
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert {"conv_in.weight", "conv_in.bias"} <= trainable
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable - {"conv_in.weight", "conv_in.bias"})
    counted = lora.lora_parameter_count(build_unet("tiny", 8), rank=4, targets=TARGETS)
    assert sum(p.numel() for n, p in unet.named_parameters() if ".lora_" in n) == counted
    # every default target selects layers: attention, transformer projections, feed-forward, resnets
    layers = lora.target_modules(base, TARGETS)
    for target in TARGETS:
        assert any(n == target or n.endswith("." + target) for n in layers), target
    assert "conv_in" not in layers and not any(n.startswith("conv_out") or "time_embedding" in n for n in layers)


def test_the_full_sd15_unet_gets_272_lora_layers():
    """16 transformer blocks x (4 self- + 4 cross-attention projections, 2 feed-forward, proj_in, proj_out) = 192;
    22 resnets x (conv1, conv2, time_emb_proj) = 66; 14 of them change width and have conv_shortcut: 272."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(SD15_UNET, in_channels=8))
    assert len(lora.target_modules(unet, TARGETS)) == 192 + 66 + 14
    # rank 64: 63.8M LoRA parameters, 7.4% of the UNet's 866M
    assert lora.lora_parameter_count(unet, rank=64, targets=TARGETS) == 63_770_624


def test_merge_equals_the_lora_forward_and_an_independent_delta():
    base, unet = _lora_unet(rank=4, alpha=8.0)
    _randomise_lora(unet)
    state = unet.state_dict()
    merged = lora.merge_lora(state, alpha=8.0)
    assert set(merged) == set(base.state_dict())
    plain = copy.deepcopy(base)
    plain.load_state_dict(merged, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(plain(*_inputs(plain)).sample, unet(*_inputs(unet)).sample, rtol=1e-5, atol=1e-5)
    # independently: W + (alpha / r) * B @ A, with a 3x3 convolution's down matrix flattened over (in, kh, kw)
    name = "down_blocks.0.resnets.0.conv1"
    a, b = state[f"{name}.lora_A.default.weight"], state[f"{name}.lora_B.default.weight"]
    assert a.shape[2:] == (3, 3) and b.shape[2:] == (1, 1)
    want = state[f"{name}.base_layer.weight"] + 2.0 * torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a)
    torch.testing.assert_close(merged[f"{name}.weight"], want, rtol=0, atol=1e-6)
    assert (merged[f"{name}.weight"] - base.state_dict()[f"{name}.weight"]).abs().max() > 1e-3


def test_kohya_keys_map_onto_the_ldm_unet_as_comfyui_maps_them():
    """ComfyUI (comfy/lora.py, model_lora_keys_unet) names each UNet weight `diffusion_model.<k>.weight` of its LDM
    model `lora_unet_<k with dots as underscores>`: every key of the file must land on one, with fitting shapes."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(SD15_UNET, in_channels=8))
    lora.add_lora(unet, rank=16, alpha=8.0, targets=TARGETS)
    file = lora.to_kohya(unet.state_dict(), unet.config, alpha=8.0)
    with torch.device("meta"):
        plain = UNet2DConditionModel(**dict(SD15_UNET, in_channels=8))
    ldm = fmt.unet_to_ldm(plain.state_dict(), plain.config)  # bare LDM keys (tests/unit/test_ldm_layout.py)
    comfy = {"lora_unet_" + k[: -len(".weight")].replace(".", "_"): k for k in ldm if k.endswith(".weight")}
    names = {k.split(".", 1)[0] for k in file}
    assert len(names) == 272 and len(file) == 3 * 272
    for name in names:
        weight = ldm[comfy[name]]
        down, up = file[f"{name}.lora_down.weight"], file[f"{name}.lora_up.weight"]
        assert down.shape[0] == up.shape[1] == 16
        assert up.shape[0] == weight.shape[0] and down.shape[1:] == weight.shape[1:], name
        assert float(file[f"{name}.alpha"]) == 8.0
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q" in names
    assert "lora_unet_output_blocks_3_0_skip_connection" in names  # a resnet's 1x1 shortcut
    assert "lora_unet_middle_block_0_in_layers_2" in names  # conv1 of the middle block's first resnet
    assert not any(n.startswith("lora_unet_input_blocks_0_0") for n in names)  # conv_in trains in full


@pytest.mark.parametrize("layout", lora.LAYOUTS)
def test_kohya_round_trip_gives_the_merged_unet(layout):
    base, unet = _lora_unet(rank=4, alpha=2.0)
    _randomise_lora(unet)
    file = lora.to_kohya(unet.state_dict(), unet.config, alpha=2.0, layout=layout)
    if layout == "diffusers":
        assert "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight" in file
    modules = lora.from_kohya(file, base.config)
    applied = lora.apply_kohya(base.state_dict(), modules)
    merged = lora.merge_lora(unet.state_dict(), alpha=2.0)
    for k, v in merged.items():
        torch.testing.assert_close(applied[k].float(), v.float(), rtol=0, atol=1e-6)


def test_lora_keys_that_do_not_match_the_unet_are_refused_by_name():
    base, unet = _lora_unet()
    file = lora.to_kohya(unet.state_dict(), unet.config, alpha=4.0)
    bad = dict(file, **{"lora_unet_input_blocks_99_1_proj_in.lora_down.weight": torch.zeros(4, 64, 1, 1)})
    with pytest.raises(lora.LoraError, match="lora_unet_input_blocks_99_1_proj_in"):
        lora.from_kohya(bad, base.config)
    with pytest.raises(lora.LoraError, match="lora_te_text_model"):
        lora.from_kohya(dict(file, lora_te_text_model_encoder_layers_0_mlp_fc1=torch.zeros(1)), base.config)
    name = "lora_unet_input_blocks_1_1_proj_in"
    wrong = dict(file, **{f"{name}.lora_down.weight": torch.zeros(4, 32, 1, 1)})  # proj_in takes 64 channels
    with pytest.raises(lora.LoraError, match="down_blocks.0.attentions.0.proj_in"):
        lora.apply_kohya(base.state_dict(), lora.from_kohya(wrong, base.config))
    with pytest.raises(lora.LoraError, match="lora_up.weight"):
        lora.from_kohya({k: v for k, v in file.items() if k != f"{name}.lora_up.weight"}, base.config)


def test_targets_and_settings_are_checked_by_name():
    unet = build_unet("tiny", 8)
    with pytest.raises(lora.LoraError, match="to_qq"):
        lora.target_modules(unet, ["to_q", "to_qq"])
    with pytest.raises(lora.LoraError, match="conv_in"):
        lora.target_modules(unet, ["conv_in"])
    with pytest.raises(ConfigError, match="model.lora_rank=-1"):
        load_config(None, {"model.lora_rank": "-1"})
    with pytest.raises(ConfigError, match="model.lora_alpha"):
        load_config(None, {"model.lora_rank": "8", "model.lora_alpha": "0"})
    with pytest.raises(ConfigError, match="conv_in"):
        load_config(None, {"model.lora_rank": "8", "model.lora_targets": "to_q,conv_in"})
    cfg = load_config(None, {"model.lora_rank": "8"})
    assert cfg.model.lora_scale_alpha == 8.0 and cfg.model.lora_targets == TARGETS
    assert load_config(None, {"model.lora_rank": "8", "model.lora_alpha": "4"}).model.lora_scale_alpha == 4.0


def test_lora_learns_a_batch_while_the_base_stays_frozen():
    """A few AdamW steps on one fixed batch: the loss falls and only LoRA layers and conv_in move."""
    base, unet = _lora_unet(rank=4, alpha=4.0)
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2)
    x, t, text = _inputs(unet)
    target = torch.randn(x.shape[0], 4, 8, 8, generator=torch.Generator().manual_seed(5))
    frozen = {n: p.detach().clone() for n, p in unet.named_parameters() if not p.requires_grad}
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.mse_loss(unet(x, t, text).sample, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
    assert all(torch.equal(p, frozen[n]) for n, p in unet.named_parameters() if n in frozen)
    assert unet.conv_in.weight[:, 4:].abs().max() > 0  # the condition channels, zero at the start, learnt

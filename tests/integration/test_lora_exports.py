"""The `lora` export read by the tools, on a tiny LoRA model: diffusers itself (the snippet of
docs/weights-and-export.md, run as written, for both layer-name layouts) and the ComfyUI path (its LoRA key mapping
plus the key-by-key conv_in patch of kijai's IC-Light node), each giving the merged UNet the other formats hold."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import tiny_parts, write_pipeline_folder

from iclight_ds.config import ModelConfig
from iclight_ds.model import formats as fmt
from iclight_ds.model.base import BaseModel, unet_hash
from iclight_ds.model.iclight import build_iclight_model
from iclight_ds.model.lora import add_lora
from iclight_ds.train.export import export_formatted, split_state_dict

DOC = Path(__file__).resolve().parents[2] / "docs" / "weights-and-export.md"
CONFIG = {"model": {"variant": "fbc", "lora_rank": 4, "lora_alpha": 2.0}}


def doc_snippet(name: str) -> str:
    m = re.search(rf"<!-- snippet: {re.escape(name)} -->\n```python\n(.*?)\n```", DOC.read_text(), re.S)
    assert m, f"no snippet {name!r} in {DOC}"
    return m[1]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny base saved as a diffusers pipeline folder; an FBC LoRA model trained away from it (LoRA up weights,
    conv_in with its condition channels, the merger), exported as `lora` in both layouts and as the merged `unet`."""
    tmp = tmp_path_factory.mktemp("lora_export")
    base_unet, vae, text_encoder, tokenizer = parts = tiny_parts(seed=0)
    for module in (base_unet, vae, text_encoder):
        module.eval()
    write_pipeline_folder(tmp / "base", parts)
    model = build_iclight_model(ModelConfig(variant="fbc"), unet=copy.deepcopy(base_unet))
    add_lora(model.unet, rank=4, alpha=2.0, targets=ModelConfig().lora_targets)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (p for p in model.parameters() if p.requires_grad):
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    trained, small = split_state_dict({k: v.detach().clone() for k, v in model.state_dict().items()})
    base = BaseModel(base_unet, vae, text_encoder, tokenizer, "tiny test base", unet_hash(base_unet.state_dict()))
    for layout in ("ldm", "diffusers"):
        export_formatted(trained, small, fmt_name="lora", out=tmp / layout, base=base, step=1, config=CONFIG,
                         lora_layout=layout)
    export_formatted(trained, small, fmt_name="unet", out=tmp / "merged", step=1, config=CONFIG)
    merged = copy.deepcopy(base_unet)
    merged.conv_in = torch.nn.Conv2d(12, 64, 3, padding=1)
    merged.register_to_config(in_channels=12)
    merged.load_state_dict(load_file(str(tmp / "merged" / fmt.UNET_FILE)), strict=True)
    return tmp, merged.eval(), model.eval()


def _outputs(unet):
    g = torch.Generator().manual_seed(2)
    x, text = torch.randn(2, 12, 8, 8, generator=g), torch.randn(2, 77, 32, generator=g)
    with torch.no_grad():
        return unet(x, torch.tensor([20, 700]), text).sample


def test_the_merged_export_is_the_lora_model(exported):
    _, merged, model = exported
    torch.testing.assert_close(_outputs(merged), _outputs(model.unet), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_diffusers_snippet_loads_the_lora_export(exported, layout):
    tmp, merged, _ = exported
    namespace = dict(lora_file=str(tmp / layout / "iclight_fbc_lora.safetensors"), base_dir=str(tmp / "base"))
    exec(doc_snippet("diffusers-lora"), namespace)
    unet = namespace["pipe"].unet
    assert unet.config.in_channels == 12
    assert any("lora" in n for n, _ in unet.named_parameters())  # loaded as diffusers' own LoRA layers
    torch.testing.assert_close(_outputs(unet), _outputs(merged), rtol=1e-5, atol=1e-5)
    assert len([line for line in doc_snippet("diffusers-lora").splitlines() if line.strip()]) <= 16


def test_comfyui_lora_mapping_and_kijai_conv_in_patch_give_the_merged_unet(exported):
    """ComfyUI's LoRA loader: `lora_unet_<ldm path>` -> `diffusion_model.<ldm path>.weight`, patched with
    weight + (alpha / rank) * up @ down (comfy/lora.py); kijai's "Load And Apply IC-Light" adds each key of a bare
    LDM file as a diff patch under `diffusion_model.<key>`, zero-padding conv_in to the patch's width (nodes.py)."""
    tmp, merged, _ = exported
    from diffusers import UNet2DConditionModel

    base_unet = UNet2DConditionModel.from_pretrained(str(tmp / "base"), subfolder="unet")
    model = {"diffusion_model." + k: v.clone() for k, v in fmt.unet_to_ldm(base_unet.state_dict(),
                                                                            base_unet.config).items()}
    for key, diff in load_file(str(tmp / "ldm" / "iclight_fbc_lora.conv_in.safetensors")).items():
        weight = model["diffusion_model." + key]
        padded = torch.zeros_like(diff)
        padded[tuple(slice(0, n) for n in weight.shape)] = weight
        model["diffusion_model." + key] = padded + diff
    lora_file = load_file(str(tmp / "ldm" / "iclight_fbc_lora.safetensors"))
    key_map = {"lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_"): k
               for k in model if k.endswith(".weight")}
    for name in {k.split(".", 1)[0] for k in lora_file}:
        up, down = lora_file[f"{name}.lora_up.weight"], lora_file[f"{name}.lora_down.weight"]
        alpha = float(lora_file[f"{name}.alpha"]) / down.shape[0]
        target = key_map[name]
        model[target] = model[target] + alpha * (up.flatten(1) @ down.flatten(1)).reshape(model[target].shape)
    want = fmt.unet_to_ldm(merged.state_dict(), merged.config, prefix="diffusion_model.")
    assert set(model) == set(want)
    assert max(float((model[k] - v).abs().max()) for k, v in want.items()) < 1e-6

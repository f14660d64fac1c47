"""Export formats: IC-Light offsets merged the official way, every format read back, the trainer's own layout, and
the fp32 masters of a ZeRO stage-0 checkpoint."""

from __future__ import annotations

import copy
import json
import os
import stat

import pytest
import torch
from safetensors.torch import load_file

from helpers import safetensors_metadata
from iclight_ds.config import ModelConfig
from iclight_ds.model import formats as fmt
from iclight_ds.model.arch import TINY_UNET
from iclight_ds.model.base import BaseModel, unet_hash
from iclight_ds.model.iclight import build_iclight_model, build_unet, widen_conv_in
from iclight_ds.train.export import export_formatted, split_state_dict


def _trained(variant: str, seed: int = 0):
    """(base: BaseModel with a 4-channel tiny UNet, ICLightModel state dict 'trained' away from that base)."""
    torch.manual_seed(seed)
    base_unet = build_unet("tiny", 4).eval()
    model = build_iclight_model(ModelConfig(variant=variant), unet=copy.deepcopy(base_unet))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn(p.shape, generator=g))
    base = BaseModel(base_unet, None, None, None, "test base", unet_hash(base_unet.state_dict()))
    return base, {k: v.detach().clone() for k, v in model.state_dict().items()}


CONFIG = {"model": {"variant": "fc", "env_shape": [16, 32]}, "train": {"seed": 0}}


# ---------------------------------------------------------------------------------------------------------
# Offsets


@pytest.mark.parametrize("variant,channels", [("fc", 8), ("fbc", 12)])
def test_offset_merged_the_official_way_equals_the_trained_unet(tmp_path, variant, channels):
    base, state = _trained(variant)
    trained, small = split_state_dict(state)
    paths = export_formatted(trained, small, fmt_name="iclight-offset", out=tmp_path, config=CONFIG, step=7,
                             base=base)
    offset = load_file(str(paths[0]))
    assert offset["conv_in.weight"].shape == (TINY_UNET["block_out_channels"][0], channels, 3, 3)
    # the new channels started at zero: their offset is the trained value itself
    assert torch.equal(offset["conv_in.weight"][:, 4:], trained["conv_in.weight"][:, 4:])

    # The official demo: a fresh base UNet, conv_in widened with zeros, merged = base + offset, strict load.
    unet = widen_conv_in(copy.deepcopy(base.unet), channels)
    sd_origin = unet.state_dict()
    sd_merged = {k: sd_origin[k] + offset[k] for k in sd_origin.keys()}
    unet.load_state_dict(sd_merged, strict=True)
    merged = unet.state_dict()
    assert set(merged) == set(trained)
    for k in trained:
        torch.testing.assert_close(merged[k], trained[k], rtol=0, atol=1e-6)
    assert max((offset[k]).abs().max().item() for k in offset) > 0.01  # the offset is not empty


def test_make_offset_refuses_another_architecture():
    base, state = _trained("fc")
    trained, _ = split_state_dict(state)
    del trained["conv_out.bias"]
    with pytest.raises(fmt.FormatError, match="conv_out.bias"):
        fmt.make_offset(trained, base.unet.state_dict())


# ---------------------------------------------------------------------------------------------------------
# Every format, read back


@pytest.mark.parametrize("fmt_name", ["unet", "iclight-offset", "ldm", "diffusers"])
def test_every_format_round_trips(tmp_path, fmt_name):
    from diffusers import UNet2DConditionModel

    base, state = _trained("fc")
    trained, small = split_state_dict(state)
    old_umask = os.umask(0o022)
    try:
        paths = export_formatted(trained, small, fmt_name=fmt_name, out=tmp_path / "out", config=CONFIG, step=7,
                                 base=base)
    finally:
        os.umask(old_umask)
    weights = sorted((tmp_path / "out").rglob("*.safetensors"))
    assert len(weights) == 2  # readable by other users (a shared models folder), not safetensors' own 0600
    assert all(stat.S_IMODE(w.stat().st_mode) == 0o644 for w in weights), [oct(w.stat().st_mode) for w in weights]
    modules = paths[-1]
    assert modules.name == {"unet": "iclight_modules.safetensors", "diffusers": "iclight_modules.safetensors",
                            "iclight-offset": "iclight_fc_offset.modules.safetensors",
                            "ldm": "iclight_fc_unet_ldm.modules.safetensors"}[fmt_name]
    assert modules.parent == paths[0] if fmt_name == "diffusers" else modules.parent == paths[0].parent
    got_small = load_file(str(modules))
    assert set(got_small) == set(small) and all(torch.equal(got_small[k], small[k]) for k in small)
    assert safetensors_metadata(modules)["format"] == "iclight-ds/training-modules"

    if fmt_name == "diffusers":
        unet = UNet2DConditionModel.from_pretrained(str(paths[0]), local_files_only=True)
        assert unet.config.in_channels == 8
        got = unet.state_dict()
        assert set(got) == set(trained) and all(torch.equal(got[k], trained[k]) for k in trained)
        info = json.loads((paths[0] / "iclight_export.json").read_text())
        assert info["base_hash"] == base.unet_hash and info["variant"] == "fc"
        return

    meta = safetensors_metadata(paths[0])
    assert meta["format"] == fmt.FORMAT_TAGS[fmt_name]
    assert (meta["variant"], meta["in_channels"], meta["step"]) == ("fc", "8", "7")
    assert json.loads(meta["config"]) == CONFIG
    assert meta["modules_file"] == modules.name
    got = load_file(str(paths[0]))
    if fmt_name == "unet":
        assert set(got) == set(trained) and all(torch.equal(got[k], trained[k]) for k in trained)
        return
    assert meta["base_hash"] == base.unet_hash
    if fmt_name == "ldm":
        assert paths[0].name == "iclight_fc_unet_ldm.safetensors"
        assert got["input_blocks.0.0.weight"].shape == (TINY_UNET["block_out_channels"][0], 8, 3, 3)  # bare keys, the community LDM layout
        got = fmt.unet_from_ldm(got, base.unet.config)
    merged = fmt.apply_offset(base.unet.state_dict(), got)
    assert set(merged) == set(trained)
    for k in trained:
        torch.testing.assert_close(merged[k], trained[k], rtol=0, atol=1e-6)


def test_file_outputs_dtype_and_ldm_prefix(tmp_path):
    base, state = _trained("fbc")
    trained, small = split_state_dict(state)
    out = tmp_path / "my_light.safetensors"
    paths = export_formatted(trained, small, fmt_name="ldm", out=out, dtype="fp16", config=CONFIG, step=3,
                             base=base, ldm_prefix="diffusion_model.")
    assert paths == [out, tmp_path / "my_light.modules.safetensors"]
    got = load_file(str(out))
    assert all(v.dtype == torch.float16 for v in got.values())
    assert got["diffusion_model.input_blocks.0.0.weight"].shape[1] == 12
    meta = safetensors_metadata(out)
    assert meta["ldm_prefix"] == "diffusion_model." and meta["modules_file"] == "my_light.modules.safetensors"
    assert all(v.dtype == torch.float16 for v in load_file(str(paths[1])).values())


def test_export_state_dict_keeps_the_trainer_layout(tmp_path):
    from iclight_ds.train.export import export_state_dict

    _, state = _trained("fc")
    paths = export_state_dict(state, tmp_path, dtype="fp32", config=CONFIG, step=5)
    assert [p.name for p in paths] == ["unet.safetensors", "iclight_modules.safetensors"]
    got = load_file(str(paths[0]))
    assert all(torch.equal(got[k[5:]], v) for k, v in state.items() if k.startswith("unet."))


# ---------------------------------------------------------------------------------------------------------
# A stage-0 checkpoint


def test_stage0_checkpoint_exports_the_fp32_masters(tmp_path):
    """ZeRO stage 0 writes no ZeRO files (zero_to_fp32 cannot read it): the export takes the module from its one
    model-states file and swaps in the optimizer's fp32 masters, each checked against the weight it rounds to."""
    from iclight_ds.train import engine as eng

    g = torch.Generator().manual_seed(0)
    masters = [torch.randn(4, 3, generator=g), torch.randn(4, 3, generator=g), torch.randn(5, generator=g)]
    module = {"a.weight": masters[0].bfloat16(), "b.weight": masters[1].bfloat16(),
              "frozen.weight": torch.randn(4, 3, generator=g).bfloat16(), "c.bias": masters[2].bfloat16()}
    folder = tmp_path / "checkpoints" / "step_00000002"
    folder.mkdir(parents=True)
    torch.save({"module": module, "optimizer": {"fp32_groups": [masters[:2], masters[2:]]}},
               folder / eng.STAGE0_STATES)
    state = eng.fp32_state_dict_from_checkpoint(tmp_path / "checkpoints", "step_00000002")
    assert list(state) == list(module)
    for name, master in zip(("a.weight", "b.weight", "c.bias"), masters):
        assert state[name].dtype == torch.float32 and torch.equal(state[name], master)
        assert not torch.equal(state[name], module[name].float())  # more precise than the bf16 weight
    assert torch.equal(state["frozen.weight"], module["frozen.weight"])  # no master: kept as saved

    # masters that do not line up with the module (here: two of the same shape swapped) are refused, not exported
    torch.save({"module": module, "optimizer": {"fp32_groups": [[masters[1], masters[0], masters[2]]]}},
               folder / eng.STAGE0_STATES)
    with pytest.raises(ValueError, match="fp32 master copies match no module weight"):
        eng.fp32_state_dict_from_checkpoint(tmp_path / "checkpoints", "step_00000002")
    (folder / eng.STAGE0_STATES).unlink()
    with pytest.raises(FileNotFoundError, match="not a DeepSpeed checkpoint"):
        eng.fp32_state_dict_from_checkpoint(tmp_path / "checkpoints", "step_00000002")

"""Export formats: the LDM key mapping, IC-Light offsets merged the official way, every format read back, and the
export CLI on a real (tiny, 2-step) trainer run."""

from __future__ import annotations

import copy
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from iclight_ds import formats as fmt
from iclight_ds.base_model import BaseModel, unet_hash
from iclight_ds.config import ModelConfig
from iclight_ds.export import export_formatted, split_state_dict
from iclight_ds.models import SD15_UNET, TINY_UNET, build_iclight_model, build_unet, build_vae, widen_conv_in

REPO = Path(__file__).resolve().parent.parent


def _meta_unet_config(arch: dict) -> dict:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return dict(UNet2DConditionModel(**arch).config)


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
# LDM keys


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

    from iclight_ds.data.tokenizer import build_char_tokenizer
    from iclight_ds.models import build_text_encoder

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


def _meta(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


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
    assert _meta(modules)["format"] == "iclight-ds/training-modules"

    if fmt_name == "diffusers":
        unet = UNet2DConditionModel.from_pretrained(str(paths[0]), local_files_only=True)
        assert unet.config.in_channels == 8
        got = unet.state_dict()
        assert set(got) == set(trained) and all(torch.equal(got[k], trained[k]) for k in trained)
        info = json.loads((paths[0] / "iclight_export.json").read_text())
        assert info["base_hash"] == base.unet_hash and info["variant"] == "fc"
        return

    meta = _meta(paths[0])
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
    meta = _meta(out)
    assert meta["ldm_prefix"] == "diffusion_model." and meta["modules_file"] == "my_light.modules.safetensors"
    assert all(v.dtype == torch.float16 for v in load_file(str(paths[1])).values())


def test_export_state_dict_keeps_the_trainer_layout(tmp_path):
    from iclight_ds.export import export_state_dict

    _, state = _trained("fc")
    paths = export_state_dict(state, tmp_path, dtype="fp32", config=CONFIG, step=5)
    assert [p.name for p in paths] == ["unet.safetensors", "iclight_modules.safetensors"]
    got = load_file(str(paths[0]))
    assert all(torch.equal(got[k[5:]], v) for k, v in state.items() if k.startswith("unet."))


# ---------------------------------------------------------------------------------------------------------
# A real run: the trainer's checkpoint, the export CLI, the random base rebuilt from the run's seed


def _env() -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(args: list[str], log: Path) -> None:
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, *args], cwd=REPO, env=_env(), stdout=f, stderr=subprocess.STDOUT,
                              timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}:\n{log.read_text()[-4000:]}")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """Two optimizer steps of the default tiny FC run (random base), single process."""
    run = tmp_path_factory.mktemp("run")
    _run(["-m", "iclight_ds.train", "--train.steps", "2", "--train.output_dir", str(run), "--data.synth_samples",
          "16", "--data.num_workers", "0", "--logging.wandb", "false", "--logging.progress", "false"],
         run.parent / f"{run.name}-train.log")
    return run


def test_export_cli_from_a_real_run(trained_run, tmp_path):
    from diffusers import UNet2DConditionModel

    from iclight_ds.base_model import base_for_run, load_base
    from iclight_ds.export import main

    full = load_file(str(trained_run / "unet.safetensors"))  # the trainer's own end-of-run export
    for name in ("iclight-offset", "ldm", "diffusers"):
        main(["--run", str(trained_run), "--format", name, "--out", str(tmp_path / name)])
    offset = load_file(str(tmp_path / "iclight-offset" / "iclight_fc_offset.safetensors"))
    # The random base is rebuilt from the run's seed: after 2 warm-up steps (lr <= 1e-4) every weight is within a
    # few 1e-4 of it. A wrong rebuild would differ by ~0.1 (the init scale).
    assert max(v.abs().max().item() for v in offset.values()) < 1e-3
    assert max(v.abs().max().item() for v in offset.values()) > 0
    base = base_for_run(trained_run / "config.json")
    merged = fmt.apply_offset(base.unet.state_dict(), offset)
    for k, v in full.items():
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)
    ldm = fmt.unet_from_ldm(load_file(str(tmp_path / "ldm" / "iclight_fc_unet_ldm.safetensors")), base.unet.config)
    assert all(torch.equal(ldm[k], offset[k]) for k in offset)
    unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "diffusers"), local_files_only=True)
    assert all(torch.equal(unet.state_dict()[k], v) for k, v in full.items())
    assert _meta(tmp_path / "iclight-offset" / "iclight_fc_offset.safetensors")["base_hash"] == base.unet_hash
    # the run folder itself is accepted as a base (its random base, VAE and text encoder)
    run_base = load_base(trained_run)
    assert run_base.unet_hash == base.unet_hash and run_base.vae is not None and not run_base.real_tokenizer


def test_export_refuses_a_base_other_than_the_recorded_one(trained_run, tmp_path):
    import shutil

    from iclight_ds.export import export_run_checkpoint

    run = tmp_path / "run"
    shutil.copytree(trained_run / "checkpoints", run / "checkpoints")
    shutil.copy(trained_run / "config.json", run / "config.json")
    (run / "base.json").write_text(json.dumps({"source": "elsewhere", "unet_hash": "sha256:" + "0" * 64}))
    with pytest.raises(ValueError, match="would not give back the trained UNet"):
        export_run_checkpoint(run / "checkpoints", None, tmp_path / "out", fmt_name="iclight-offset")


def test_stage0_checkpoint_exports_the_fp32_masters(tmp_path):
    """ZeRO stage 0 writes no ZeRO files (zero_to_fp32 cannot read it): the export takes the module from its one
    model-states file and swaps in the optimizer's fp32 masters, each checked against the weight it rounds to."""
    from iclight_ds import engine as eng

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

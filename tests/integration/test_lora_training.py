"""LoRA runs of the tiny model in-process on the CPU (model.lora_rank > 0): what changes, exact resume at ZeRO stages
0, 2 and 3, an EMA, the merged and the LoRA exports of a checkpoint, and the refusals (a LoRA checkpoint resumed as a full
fine-tune and the reverse, a LoRA export of a full fine-tune)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from iclight_ds.config import ConfigError, load_config, save_config
from iclight_ds.infer.weights import load_trained_unet
from iclight_ds.model import formats as fmt
from iclight_ds.model.base import load_base
from iclight_ds.model.iclight import build_initial_model
from iclight_ds.model.lora import add_lora
from iclight_ds.train import checkpoint as ckpt
from iclight_ds.train.export import ExportError, checkpoint_state, export_run_checkpoint, main as export_main
from iclight_ds.train.trainer import Trainer

QUIET = {"logging.wandb": False, "logging.progress": False, "logging.every": 1, "logging.preview_every": 0,
         "logging.eval_every": 0, "logging.tensorboard": False, "data.num_workers": 0, "train.ds_config": "cpu-1rank",
         "train.checkpoint_every": 0, "train.optimizer": "adamw"}
LORA = {"model.lora_rank": 4, "model.lora_alpha": 8}


@pytest.fixture(scope="module")
def data(synthetic):
    return synthetic(16, size=64, seed=3)


def _cfg(out, data, **over):
    return load_config(None, {**QUIET, "train.output_dir": str(out), "data.path": str(data), **over})


@pytest.fixture(scope="module")
def lora_run(data, tmp_path_factory):
    """Three fp32 steps at ZeRO stage 0, a checkpoint after each."""
    out = tmp_path_factory.mktemp("lora") / "run"
    Trainer(_cfg(out, data, **LORA, **{"train.steps": 3, "train.checkpoint_every": 1, "train.keep": 0,
                                       "train.precision": "fp32", "train.lr": 1e-2, "train.warmup_steps": 0})).train()
    return out


def _initial(cfg) -> dict[str, torch.Tensor]:
    """The run's initial trainable model as the trainer builds it: seeded build, then LoRA from the same stream."""
    model = build_initial_model(cfg.model, seed=cfg.train.seed, dtype=torch.float32)
    add_lora(model.unet, rank=cfg.model.lora_rank, alpha=cfg.model.lora_scale_alpha, targets=cfg.model.lora_targets)
    return model.state_dict()


def test_a_lora_run_changes_only_lora_conv_in_and_the_small_modules(lora_run, data):
    cfg = load_config(lora_run / "config.json")
    start, end = _initial(cfg), checkpoint_state(lora_run / "checkpoints" / "step_00000003", "raw")
    assert set(start) == set(end)
    moved = {k for k in start if not torch.equal(start[k], end[k].to(start[k].dtype))}
    trainable = {k for k in start if ".lora_" in k or k.startswith(("unet.conv_in.", "merger.", "env_encoder."))}
    assert moved <= trainable
    assert {"unet.conv_in.weight", "unet.conv_in.bias"} <= moved
    assert any(k.startswith("merger.") for k in moved) and any(k.startswith("env_encoder.") for k in moved)
    assert sum(".lora_B." in k for k in moved) > 50  # the up matrices leave zero
    assert end["unet.conv_in.weight"][:, 4:].abs().max() > 0  # the condition channels learnt from zero
    assert sum(".base_layer." in k for k in start) > 50 and not any(".base_layer." in k for k in moved)


def _merged_independently(state: dict, alpha: float) -> dict[str, torch.Tensor]:
    """base_layer + (alpha / r) up @ down per LoRA layer, written out here with einsum; other UNet keys as saved."""
    unet = {k[len("unet."):]: v.double() for k, v in state.items() if k.startswith("unet.")}
    out = {k.replace(".base_layer.", "."): v for k, v in unet.items() if ".lora_" not in k}
    for key in unet:
        if ".lora_A." not in key:
            continue
        module = key.split(".lora_A.")[0]
        down, up = unet[key], unet[f"{module}.lora_B.default.weight"]
        scale = alpha / down.shape[0]
        if down.dim() == 2:
            delta = torch.einsum("or,ri->oi", up, down)
        else:
            delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
        out[f"{module}.weight"] = out[f"{module}.weight"] + scale * delta
    return out


def test_merged_exports_equal_the_base_plus_the_lora_update(lora_run, tmp_path):
    state = checkpoint_state(lora_run / "checkpoints" / "step_00000003", "raw")
    want = _merged_independently(state, alpha=8.0)
    exported = load_file(str(lora_run / "unet.safetensors"))  # the end-of-run export
    assert set(exported) == set(want)
    assert max(float((exported[k].double() - v).abs().max()) for k, v in want.items()) < 1e-6
    # the offsets: merged - the run's random base (conv_in zero-padded)
    export_run_checkpoint(lora_run / "checkpoints", None, tmp_path / "o.safetensors", fmt_name="iclight-offset")
    offset, base = load_file(str(tmp_path / "o.safetensors")), load_base(lora_run, unet_only=True)
    padded = fmt.padded_base(base.unet.state_dict(), exported)
    assert max(float((offset[k] + padded[k] - exported[k]).abs().max()) for k in exported) < 1e-5
    # a frozen layer's offset is zero: LoRA moved only its layers and conv_in
    assert float(offset["conv_norm_out.weight"].abs().max()) == 0.0
    assert float(offset["down_blocks.0.attentions.0.proj_in.weight"].abs().max()) > 0


@pytest.mark.parametrize("layout", ["ldm", "diffusers"])
def test_the_lora_export_relights_as_the_merged_unet(lora_run, tmp_path, layout):
    paths = export_run_checkpoint(lora_run / "checkpoints", None, tmp_path, fmt_name="lora", lora_layout=layout)
    assert [p.name for p in paths] == ["iclight_fc_lora.safetensors", "iclight_fc_lora.conv_in.safetensors",
                                       "iclight_fc_lora.modules.safetensors"]
    meta = fmt.read_metadata(paths[0])
    assert (meta["format"], meta["lora_rank"], meta["ss_network_dim"], meta["lora_alpha"], meta["lora_layout"]) == (
        "iclight-ds/lora", "4", "4", "8.0", layout)
    keys = load_file(str(paths[0]))
    assert all(k.startswith("lora_unet_") and k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))
               for k in keys)
    assert set(load_file(str(paths[1]))) == {"input_blocks.0.0.weight", "input_blocks.0.0.bias"}
    relit, _, _ = load_trained_unet(load_base(lora_run, unet_only=True), paths[0])
    merged = load_file(str(lora_run / "unet.safetensors"))
    got = relit.state_dict()
    assert max(float((got[k].float() - v.float()).abs().max()) for k, v in merged.items()) < 1e-5


def test_a_lora_checkpoint_resumed_as_a_full_fine_tune_is_refused(lora_run, data):
    over = {"train.steps": 4, "train.precision": "fp32", "train.resume": str(lora_run / "checkpoints" /
                                                                             "step_00000002")}
    with pytest.raises(ConfigError, match=r"LoRA checkpoint \(model.lora_rank=4\) resumed as a full fine-tune"):
        Trainer(_cfg(lora_run.parent / "other", data, **over))


def test_a_full_fine_tune_resumed_as_lora_and_exported_as_lora_is_refused(data, tmp_path):
    """Both are refused from the checkpoint's config.json, before anything is built or unpickled: a stand-in
    checkpoint folder with a full fine-tune's config (and a manifest, which the export checks first) is enough."""
    full = tmp_path / "full"
    folder = full / "checkpoints" / "step_00000001"
    folder.mkdir(parents=True)
    save_config(_cfg(full, data), folder / "config.json")
    ckpt.write_manifest(folder)
    (folder.parent / "latest").write_text(folder.name)
    with pytest.raises(ConfigError, match=r"full fine-tune checkpoint \(model.lora_rank=0\) resumed as a LoRA"):
        Trainer(_cfg(full, data, **LORA, **{"train.steps": 2, "train.resume": "latest"}))
    with pytest.raises(ExportError, match="full fine-tune .*model.lora_rank=0"):
        export_run_checkpoint(full / "checkpoints", None, tmp_path / "x", fmt_name="lora")
    assert export_main(["--run", str(full), "--format", "lora", "--out", str(tmp_path / "y")]) == 2


@pytest.mark.parametrize("ds_config", ["cpu-1rank", "cpu", "cpu-zero3"], ids=["stage0", "zero2", "zero3"])
def test_lora_resumes_exactly(data, tmp_path, ds_config):
    over = {**LORA, "train.ds_config": ds_config}
    straight, split = tmp_path / "straight", tmp_path / "split"
    Trainer(_cfg(straight, data, **over, **{"train.steps": 3})).train()
    Trainer(_cfg(split, data, **over, **{"train.steps": 1, "train.export": False})).train()
    Trainer(_cfg(split, data, **over, **{"train.steps": 3, "train.resume": "latest"})).train()
    losses = [[json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
              for run in (straight, split)]
    assert len(losses[0]) == 3 and losses[0] == losses[1]
    a, b = (load_file(str(run / "unet.safetensors")) for run in (straight, split))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_trains_under_zero3(data, tmp_path):
    """One rank of cpu-zero3.json: the LoRA layers are added with the partitioned weights gathered, and the merged
    export still equals the base plus the update."""
    out = tmp_path / "z3"
    Trainer(_cfg(out, data, **LORA, **{"train.ds_config": "cpu-zero3", "train.steps": 2, "train.precision": "fp32",
                                       "train.lr": 1e-2, "train.warmup_steps": 0})).train()
    state = checkpoint_state(out / "checkpoints" / "step_00000002", "raw")
    start = _initial(load_config(out / "config.json"))
    assert all(torch.equal(start[k], state[k]) for k in start if ".base_layer." in k)
    assert max(float(state[k].detach().abs().max()) for k in state if ".lora_B." in k) > 0
    want = _merged_independently(state, alpha=8.0)
    exported = load_file(str(out / "unet.safetensors"))
    assert max(float((exported[k].double() - v).abs().max()) for k, v in want.items()) < 1e-6


def test_lora_with_ema_averages_the_trained_layers_and_exports_them_merged(data, tmp_path):
    """train.ema_decay with LoRA: the EMA holds the LoRA layers, conv_in and the small modules (the frozen base layers
    are not averaged: they do not move), differs from the raw weights, and the export merges the averaged layers."""
    out = tmp_path / "ema"
    Trainer(_cfg(out, data, **LORA, **{"train.steps": 3, "train.ema_decay": 0.5, "train.precision": "fp32",
                                       "train.lr": 1e-2, "train.warmup_steps": 0})).train()
    folder = out / "checkpoints" / "step_00000003"
    raw, ema = checkpoint_state(folder, "raw"), checkpoint_state(folder, "ema")
    lora_b = [k for k in raw if ".lora_B." in k]
    assert lora_b and any(not torch.equal(raw[k], ema[k]) for k in lora_b)
    assert all(torch.equal(raw[k], ema[k]) for k in raw if ".base_layer." in k)
    want = _merged_independently(ema, alpha=8.0)
    exported = load_file(str(out / "unet.safetensors"))  # weights auto: the EMA where the run kept one
    assert max(float((exported[k].double() - v).abs().max()) for k, v in want.items()) < 1e-6

"""Typed configuration: files, dotted overrides, and errors that name the key."""

import json
import re

import pytest

from iclight_ds.config import ConfigError, load_config, parse_overrides, save_config, to_dict
from iclight_ds.train.engine import EngineConfigError, batch_geometry, read_ds_config


def test_defaults_file_and_overrides(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  variant: fbc\ntrain:\n  lr: 2.0e-5\n  betas: [0.8, 0.99]\n")
    cfg = load_config(f, parse_overrides(["--train.lr", "1e-5", "--data.resolution=128", "--logging.wandb", "false"]))
    assert cfg.model.variant == "fbc" and cfg.model.in_channels == 12
    assert cfg.train.lr == 1e-5  # the command line wins over the file
    assert cfg.train.betas == (0.8, 0.99)
    assert cfg.data.resolution == 128 and cfg.logging.wandb is False
    assert cfg.objective.lambda_vanilla == 1.0 and cfg.objective.lambda_consistency == 0.1


def test_json_file_and_saved_config_round_trip(tmp_path):
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"objective": {"lambda_consistency": 0.5}, "data": {"path": None}}))
    cfg = load_config(f)
    save_config(cfg, tmp_path / "resolved.json")
    saved = json.loads((tmp_path / "resolved.json").read_text())
    assert saved == to_dict(cfg)
    assert load_config(tmp_path / "resolved.json") == cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["--train.lrr", "1"], "unknown config key 'train.lrr'"),
        (["--trian.lr", "1"], "unknown config key 'trian.lr'"),
        (["--train.lr", "fast"], "train.lr: expected a number"),
        (["--train.steps", "1.5"], "train.steps: expected an integer"),
        (["--model.variant", "fcb"], "model.variant: 'fcb' is not one of"),
        (["--logging.wandb", "maybe"], "logging.wandb: expected true/false"),
        (["--model.gradient_checkpointing", "maybe"],
         "model.gradient_checkpointing: 'maybe' is not one of ['auto']; or expected true/false"),
        (["--train.betas", "0.9"], "train.betas: expected 2 values"),
        (["--data.resolution", "60"], "data.resolution=60"),
        (["--objective.lambda_vanilla", "0", "--objective.lambda_consistency", "0"], "nothing to train"),
        (["--train.lr"], "has no value"),
        (["--objective.consistency", "linear", "--data.cache", "/some/latent_cache"],
         "objective.consistency=linear decodes with the frozen VAE, which a run from the latent cache "
         "data.cache=/some/latent_cache does not build"),
        (["--objective.linear_samples", "-1"], "objective.linear_samples=-1: must be >= 0"),
        (["--objective.consistency_min_timestep", "1000"],
         "objective.consistency_min_timestep=1000: must be in [0, 1000)"),
        (["--objective.consistency_min_timestep", "-1"], "objective.consistency_min_timestep=-1: must be in [0, 1000)"),
        (["--objective.consistency_weighting", "flat"], "objective.consistency_weighting: 'flat' is not one of"),
        (["lr", "1"], "unexpected argument 'lr'"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(None, parse_overrides(overrides))


def test_a_setting_that_is_auto_or_a_bool(tmp_path):
    """model.gradient_checkpointing takes auto (the default) or a boolean, from a file or the command line."""
    assert load_config(None).model.gradient_checkpointing == "auto"
    for text, value in (("auto", "auto"), ("true", True), ("off", False)):
        cfg = load_config(None, parse_overrides(["--model.gradient_checkpointing", text]))
        assert cfg.model.gradient_checkpointing == value
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  gradient_checkpointing: false\n")
    assert load_config(f).model.gradient_checkpointing is False


def test_unknown_key_in_file_is_named(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  stepz: 10\n")
    with pytest.raises(ConfigError, match="train.stepz"):
        load_config(f)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_ds_config_is_the_source_of_batch_numbers(tmp_path):
    f = tmp_path / "ds.json"
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2,
                             "_comment": "ignored", "bf16": {"enabled": True}}))
    geo = batch_geometry(read_ds_config(f), world_size=4)
    assert (geo.micro_batch, geo.accumulation, geo.effective_batch) == (3, 2, 24)
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2,
                             "train_batch_size": 7}))
    with pytest.raises(EngineConfigError, match="train_batch_size=7"):
        batch_geometry(read_ds_config(f), world_size=1)
    f.write_text(json.dumps({"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                             "optimizer": {"type": "Adam"}}))
    with pytest.raises(EngineConfigError, match="'optimizer' is set by the trainer"):
        read_ds_config(f)
    f.write_text(json.dumps({"gradient_accumulation_steps": 1}))
    with pytest.raises(EngineConfigError, match="train_micro_batch_size_per_gpu"):
        read_ds_config(f)


def test_every_shipped_ds_config_reads(tmp_path):
    from iclight_ds.train.engine import REPO_DS_CONFIGS, training_dtype

    names = sorted(p.name for p in REPO_DS_CONFIGS.glob("*.json"))
    assert {"cpu.json", "zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"} <= set(names)
    for name in names:  # bf16 but the CPU default run's, fp32 for its tiny UNet on a CPU (docs/performance.md)
        cfg = read_ds_config(REPO_DS_CONFIGS / name)
        want = "torch.float32" if name == "default-cpu.json" else "torch.bfloat16"
        assert str(training_dtype(cfg)) == want, name


def test_optimizer_param_groups_are_bounded():
    import torch

    from iclight_ds.train.engine import param_groups

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (30, 30, 50, 200, 10)]
    groups = param_groups(params, max_elements=64)
    sizes = [[p.numel() for p in g["params"]] for g in groups]
    assert sizes == [[30, 30], [50], [200], [10]]  # order kept, each group <= 64 unless one tensor is larger
    assert sum(len(g["params"]) for g in groups) == len(params)


def test_the_shipped_4x_vae_by_name(tmp_path):
    from iclight_ds.model.frozen import ASSET, ASSET_4X, vae_source

    assert vae_source("tiny", "tiny-4x") == str(ASSET_4X) and ASSET_4X.is_file()
    assert vae_source("tiny", "auto") == str(ASSET)
    assert load_config(None, parse_overrides(["--model.vae", "tiny-4x"])).model.vae == "tiny-4x"
    with pytest.raises(ConfigError, match="model.vae=tiny-4x: .* needs model.size=tiny"):
        load_config(None, parse_overrides(["--model.vae", "tiny-4x", "--model.size", "full",
                                           "--data.resolution", "256"]))
    with pytest.raises(ConfigError, match="model.vae=nope.safetensors: no such file \\(auto, tiny-4x"):
        load_config(None, parse_overrides(["--model.vae", "nope.safetensors"]))


def test_missing_base_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"model.base=.*nowhere: no such file"):
        load_config(None, {"model.base": str(tmp_path / "nowhere")})
    with pytest.raises(ConfigError, match="model.iclight_weights needs model.base"):
        load_config(None, {"model.iclight_weights": str(tmp_path)})

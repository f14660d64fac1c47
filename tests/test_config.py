"""Typed configuration: files, dotted overrides, and errors that name the key."""

import json

import pytest

from iclight_ds.config import ConfigError, load_config, parse_overrides, save_config, to_dict
from iclight_ds.engine import EngineConfigError, batch_geometry, read_ds_config


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
        (["lr", "1"], "unexpected argument 'lr'"),
    ],
)
def test_bad_overrides_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
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
    from iclight_ds.engine import REPO_DS_CONFIGS, training_dtype

    names = sorted(p.name for p in REPO_DS_CONFIGS.glob("*.json"))
    assert {"cpu.json", "zero2.json", "zero2_offload.json", "zero3.json", "zero3_offload.json"} <= set(names)
    for name in names:
        cfg = read_ds_config(REPO_DS_CONFIGS / name)
        assert str(training_dtype(cfg)) == "torch.bfloat16", name


def test_optimizer_param_groups_are_bounded():
    import torch

    from iclight_ds.engine import param_groups

    params = [torch.nn.Parameter(torch.zeros(n)) for n in (30, 30, 50, 200, 10)]
    groups = param_groups(params, max_elements=64)
    sizes = [[p.numel() for p in g["params"]] for g in groups]
    assert sizes == [[30, 30], [50], [200], [10]]  # order kept, each group <= 64 unless one tensor is larger
    assert sum(len(g["params"]) for g in groups) == len(params)


def test_the_shipped_4x_vae_by_name(tmp_path):
    from iclight_ds.conditioning import vae_source
    from iclight_ds.tiny_vae import ASSET, ASSET_4X

    assert vae_source("tiny", "tiny-4x") == str(ASSET_4X) and ASSET_4X.is_file()
    assert vae_source("tiny", "auto") == str(ASSET)
    assert load_config(None, parse_overrides(["--model.vae", "tiny-4x"])).model.vae == "tiny-4x"
    with pytest.raises(ConfigError, match="model.vae=tiny-4x: .* needs model.size=tiny"):
        load_config(None, parse_overrides(["--model.vae", "tiny-4x", "--model.size", "full",
                                           "--data.resolution", "256"]))
    with pytest.raises(ConfigError, match="model.vae=nope.safetensors: no such file \\(auto, tiny-4x"):
        load_config(None, parse_overrides(["--model.vae", "nope.safetensors"]))


def test_the_gpu_default_run_preset():
    """What a GPU machine's default run trains: the tiny model in batches of 512 through the 4x VAE."""
    from iclight_ds.engine import resolve_ds_config_path
    from iclight_ds.train import GPU_DEFAULT_PRESET

    cfg = load_config(GPU_DEFAULT_PRESET)
    plain = load_config(None)
    assert (cfg.model.size, cfg.model.vae, cfg.model.variant) == ("tiny", "tiny-4x", plain.model.variant)
    assert (cfg.data.synth_samples, cfg.train.steps, cfg.train.output_dir) == (12288, 1500, "runs/default-gpu")
    assert cfg.data.validate is True  # a --data.path given with the preset is still checked
    assert (cfg.train.lr, cfg.train.schedule, cfg.objective) == (plain.train.lr, plain.train.schedule,
                                                                 plain.objective)
    ds = read_ds_config(resolve_ds_config_path(cfg.train.ds_config))
    assert batch_geometry(ds, world_size=1).effective_batch == 512
    assert ds["zero_optimization"]["stage"] == 0 and ds["bf16"]["enabled"] is True


@pytest.mark.parametrize("config,overrides,gpu_gib,expected", [
    (None, {}, None, None),  # CPU: the plain defaults
    (None, {}, 80.0, "preset"),
    (None, {}, 16.0, "preset"),
    (None, {}, 11.9, None),  # a GPU too small for micro-batch 512: the planner's config, as before
    (None, {"train.output_dir": "x", "train.resume": "latest"}, 80.0, "preset"),  # launch/train.sh's own options
    (None, {"train.steps": "5"}, 80.0, None),  # any other override: the plain defaults
    ("mine.yaml", {}, 80.0, "mine.yaml"),
])
def test_which_config_the_default_run_reads(config, overrides, gpu_gib, expected):
    from iclight_ds.train import GPU_DEFAULT_PRESET, default_config_file

    chosen = default_config_file(config, overrides, gpu_gib)
    assert chosen == (str(GPU_DEFAULT_PRESET) if expected == "preset" else expected)


def test_the_trainer_s_command_line_uses_the_gpu_preset(monkeypatch, capsys):
    """`python -m iclight_ds.train` (what launch/train.sh starts) with a GPU visible trains the preset's config."""
    import iclight_ds.train as train

    seen = []

    class Recorder:
        def __init__(self, cfg):
            seen.append(cfg)

        def train(self):
            pass

    monkeypatch.setattr(train, "Trainer", Recorder)
    monkeypatch.setattr(train.eng, "shutdown", lambda: None)  # keep the process group other in-process tests share
    monkeypatch.setattr(train, "_gpu_memory_gib", lambda: 80.0)
    assert train.main(["--train.output_dir", "elsewhere"]) == 0
    assert seen[-1].model.vae == "tiny-4x" and seen[-1].train.output_dir == "elsewhere"
    assert "default-gpu.yaml, into elsewhere" in capsys.readouterr().err
    assert train.main(["--train.steps", "7"]) == 0
    assert seen[-1].model.vae == "auto" and seen[-1].train.steps == 7
    monkeypatch.setattr(train, "_gpu_memory_gib", lambda: None)
    assert train.main([]) == 0
    assert seen[-1] == load_config(None)


def test_wandb_mode_disabled_needs_no_wandb(monkeypatch, tmp_path):
    """WANDB_MODE=disabled turns wandb off without an override (which would leave the default run's preset)."""
    import sys

    from iclight_ds.train import MetricsWriter

    monkeypatch.setitem(sys.modules, "wandb", None)  # as on a machine without it: `import wandb` fails
    cfg = load_config(None)
    assert cfg.logging.wandb is True
    monkeypatch.setenv("WANDB_MODE", "disabled")
    writer = MetricsWriter(tmp_path / "metrics.jsonl", cfg, enabled=True)
    writer.write({"step": 1, "loss": 0.5})
    writer.close()
    assert writer.wandb is None and json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 1, "loss": 0.5}
    monkeypatch.setenv("WANDB_MODE", "offline")
    with pytest.raises(ImportError):  # asked for and missing: not silently dropped
        MetricsWriter(tmp_path / "m2.jsonl", cfg, enabled=True)

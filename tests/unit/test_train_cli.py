"""The trainer's command line: the default runs' presets, which config file a run reads, and the metrics writer
without wandb."""

import json

import pytest

from iclight_ds.config import load_config
from iclight_ds.train.engine import batch_geometry, read_ds_config


def test_the_gpu_default_run_preset():
    """What a GPU machine's default run trains: the tiny model in batches of 512 through the 4x VAE."""
    from iclight_ds.train.cli import GPU_DEFAULT_PRESET
    from iclight_ds.train.engine import resolve_ds_config_path

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
    (None, {}, None, "cpu"),  # no GPU: the CPU default run's preset
    (None, {"train.output_dir": "x"}, None, "cpu"),
    (None, {"train.steps": "5"}, None, None),
    (None, {}, 80.0, "preset"),
    (None, {}, 16.0, "preset"),
    (None, {}, 11.9, None),  # a GPU too small for micro-batch 512: the planner's config, as before
    (None, {"train.output_dir": "x", "train.resume": "latest"}, 80.0, "preset"),  # launch/train.sh's own options
    (None, {"train.steps": "5"}, 80.0, None),  # any other override: the plain defaults
    ("mine.yaml", {}, 80.0, "mine.yaml"),
])
def test_which_config_the_default_run_reads(config, overrides, gpu_gib, expected):
    from iclight_ds.train.cli import CPU_DEFAULT_PRESET, GPU_DEFAULT_PRESET, default_config_file

    chosen = default_config_file(config, overrides, gpu_gib)
    presets = {"preset": str(GPU_DEFAULT_PRESET), "cpu": str(CPU_DEFAULT_PRESET)}
    assert chosen == presets.get(expected, expected)


def test_the_trainer_s_command_line_uses_the_gpu_preset(monkeypatch, capsys):
    """`python -m iclight_ds.train` (what launch/train.sh starts) with a GPU visible trains the preset's config."""
    import iclight_ds.train.cli as train

    seen = []

    class Recorder:
        def __init__(self, cfg, preset=None):
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
    assert seen[-1] == load_config(train.CPU_DEFAULT_PRESET) and seen[-1].model.base.endswith("tiny_base.safetensors")
    assert "no CUDA GPU is visible" in capsys.readouterr().err
    assert train.main(["--train.steps", "7"]) == 0
    assert seen[-1].model.base is None


def test_wandb_mode_disabled_needs_no_wandb(monkeypatch, tmp_path):
    """WANDB_MODE=disabled turns wandb off without an override (which would leave the default run's preset)."""
    import sys

    from iclight_ds.train.metrics import MetricsWriter

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

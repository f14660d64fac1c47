"""The engine's choices and refusals made before any rank starts: optimizers per device and ZeRO stage, a CPU Adam
that cannot be built, batch numbers that do not add up, and the malloc threshold a user set."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import REPO


def test_optimizer_combinations_refused():
    from iclight_ds.train.checks import DeviceCheckError, check_optimizer

    with pytest.raises(DeviceCheckError, match="cpu_adam keeps its states on the CPU.*zero2.json"):
        check_optimizer("cpu_adam", accelerator="cuda", stage=2, offload_optimizer=False, ds_path="zero2.json")
    with pytest.raises(DeviceCheckError, match="needs ZeRO"):
        check_optimizer("cpu_adam", accelerator="cpu", stage=0, offload_optimizer=False, ds_path="x.json")
    check_optimizer("cpu_adam", accelerator="cuda", stage=2, offload_optimizer=True, ds_path="zero2_offload.json")
    check_optimizer("adamw8bit", accelerator="cuda", stage=3, offload_optimizer=False, ds_path="zero3.json")


def test_optimizer_auto_follows_where_the_step_runs():
    """auto: a fast fp32 optimizer where the step runs on the host (DeepSpeed's CPU Adam with offload, torch's AdamW on
    a CPU-only machine); 8-bit AdamW on a GPU."""
    from iclight_ds.train import engine as eng

    offload = eng.read_ds_config(eng.REPO_DS_CONFIGS / "1gpu-8gb.json")
    plain = eng.read_ds_config(eng.REPO_DS_CONFIGS / "zero2.json")
    cpu = eng.read_ds_config(eng.REPO_DS_CONFIGS / "cpu-1rank.json")
    assert eng.resolve_optimizer("auto", offload, on_gpu=True) == "cpu_adam"
    assert eng.resolve_optimizer("auto", plain, on_gpu=True) == "adamw8bit"
    assert eng.resolve_optimizer("auto", cpu, on_gpu=False) == "adamw"
    assert eng.resolve_optimizer("auto", plain, on_gpu=False) == "adamw"
    assert eng.resolve_optimizer("adamw8bit", offload, on_gpu=True) == "adamw8bit"  # an explicit choice is kept
    assert eng.resolve_optimizer("adamw8bit", cpu, on_gpu=False) == "adamw8bit"


def test_cpu_adam_that_cannot_be_built_says_what_to_do(monkeypatch):
    """DeepSpeed compiles its CPU Adam at first use: a machine without a compiler gets a message, not a traceback."""
    import deepspeed.ops.adam

    from iclight_ds.train import engine as eng

    class Unbuildable:
        def __init__(self, *args, **kwargs):
            raise RuntimeError("Ninja is required to load C++ extensions")

    monkeypatch.setattr(deepspeed.ops.adam, "DeepSpeedCPUAdam", Unbuildable)
    with pytest.raises(eng.EngineConfigError, match="cpu_adam.*Ninja is required.*train.optimizer=adamw8bit"):
        eng.build_optimizer("cpu_adam", [torch.nn.Parameter(torch.zeros(3))], lr=1e-3, weight_decay=0.0,
                            betas=(0.9, 0.999))


def test_refused_configurations(tmp_path):
    from iclight_ds.config import ConfigError, load_config
    from iclight_ds.train.engine import EngineConfigError, batch_geometry, read_ds_config

    with pytest.raises(ConfigError, match="train.keep"):
        load_config(None, {"train.keep": -1})
    ds = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    ds["train_batch_size"] = 5
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    with pytest.raises(EngineConfigError, match="train_batch_size=5 != train_micro_batch_size_per_gpu x "
                                                 "gradient_accumulation_steps x world size"):
        batch_geometry(read_ds_config(tmp_path / "ds.json"), world_size=1)


def test_user_setting_wins(monkeypatch):
    from iclight_ds.train.engine import pin_malloc_mmap_threshold

    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1048576")
    assert pin_malloc_mmap_threshold() is False

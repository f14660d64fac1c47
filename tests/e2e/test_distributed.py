"""End to end on real DeepSpeed ranks (2 CPU processes over gloo): every shipped config, resume, export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import helpers
from helpers import REPO, run_logged
from iclight_ds.config import TrainConfig
from iclight_ds.train import engine as eng

SHIPPED = helpers.shipped_ds_configs()
NVME = helpers.nvme_ds_configs()
AIO_PROBLEM = helpers.nvme_aio_problem()


def _runs_here(name: str) -> None:
    if name in NVME and AIO_PROBLEM is not None:
        pytest.skip(f"{name}.json offloads to NVMe, and DeepSpeed's async_io op cannot be built here: {AIO_PROBLEM}")


def test_no_shared_memory_op_and_nothing_left_behind(worker_results):
    """DeepSpeed's CPU shared-memory all-reduce (a C++ build at first use, a /dev/shm buffer of about 66 MB a rank,
    used only by DeepSpeed inference) is not built on 2 CPU ranks, and no buffer file is left in /dev/shm."""
    assert worker_results["shm_comm_op_built"] is False
    assert worker_results["shm_left"] == []


def test_every_process_group_has_the_collective_timeout(worker_results):
    """DeepSpeed's own groups (its clone of the world group, the data-parallel groups) wait train.collective_timeout_s
    for a stuck rank, as the world group does, not torch's default of 30 minutes."""
    timeouts = worker_results["group_timeouts"]
    assert len(timeouts) > 1 and set(timeouts) == {TrainConfig.collective_timeout_s}, timeouts


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_trains_on_two_ranks(worker_results, name):
    _runs_here(name)
    r = worker_results[name]
    assert r["finite"], r["trace"]
    # train.optimizer=auto: DeepSpeed's CPU Adam where the optimizer is offloaded to the host, torch's AdamW for the
    # CPU configs; GPU configs without offload run what auto picks on a GPU, 8-bit AdamW (ds_worker.optimizer_for)
    offloaded = eng.offloads_optimizer(eng.read_ds_config(REPO / "ds_configs" / f"{name}.json"))
    expected = (["cpu_adam", "DeepSpeedCPUAdam"] if offloaded else ["adamw", "AdamW"] if name.startswith("cpu")
                else ["adamw8bit", "AdamW8bit"])
    assert r["optimizer"] == expected
    assert r["checkpointing"] is True  # set explicitly: auto would leave it off for the tiny UNet
    # every trainable tensor's fp32 master moved, biases, norm scales, the zero-initialised conv_in channels and
    # merger layer included: no exemption
    assert r["params"] > 100
    assert r["unchanged"] == []
    # the exported safetensors hold exactly the engine's weights (fp32 master rounds to the bf16 params)
    assert r["n_mismatched"] == 0, r["mismatched"]
    assert r["init_zero"]["conv_in_new_channels"] == 0 and r["init_zero"]["merger_last"] == 0, r["init_zero"]
    assert r["init_zero"]["conv_in_old_channels"] > 0
    assert r["exported_keys"] == r["params"]
    assert [m["step"] for m in r["metrics"]] == [1, 2]
    assert all(k in m for m in r["metrics"] for k in ("loss", "loss_vanilla", "loss_consistency", "lr",
                                                        "samples_per_s"))
    assert r["checkpoint"][:2] == ["latest", "step_00000002"]
    assert r["previews"] == ["step_00000002.png"]  # the final preview, under this ZeRO stage, on 2 ranks


@pytest.mark.parametrize("name", SHIPPED)
def test_accumulation_boundary_and_one_backward(worker_results, name):
    _runs_here(name)
    r = worker_results[name]
    accum, trace = r["accumulation"], r["trace"]
    assert len(trace) == 2 * accum
    assert all(t["backward_calls"] == 1 for t in trace)  # exactly one backward per combined micro-step
    # DeepSpeed's optimizer step happens at every accum-th micro-step and nowhere else
    assert [t["global_steps"] for t in trace] == [(i + 1) // accum for i in range(len(trace))]
    sums = [t["checksum"] for t in trace]  # conv_out's weights after each micro-step, gathered under ZeRO-3
    moved = [i for i in range(1, len(sums)) if sums[i] != sums[i - 1]]
    assert moved == [i for i in range(1, len(sums)) if (i + 1) % accum == 0], sums


def test_resume_with_other_world_size_is_refused(worker_results, synth_data, tmp_path):
    """The worker's 2-rank ZeRO-2 checkpoint, resumed by a Trainer of one rank (this process)."""
    from iclight_ds.train.trainer import Trainer

    saved = Path(worker_results["out"]) / "cpu" / "checkpoints" / "step_00000002"
    with pytest.raises(RuntimeError, match="written by 2 rank"):
        Trainer(helpers.run_config(tmp_path / "r", synth_data, {"train.steps": 3, "train.resume": str(saved)}))


def test_fp16_refused_on_cpu(synth_data, tmp_path):
    ds = json.loads((REPO / "ds_configs" / "cpu.json").read_text())
    ds.pop("bf16")
    ds["fp16"] = {"enabled": True}
    (tmp_path / "fp16.json").write_text(json.dumps(ds))
    cmd = [sys.executable, "-m", "iclight_ds.train", "--train.ds_config", str(tmp_path / "fp16.json"),
           "--data.path", str(synth_data), "--train.output_dir", str(tmp_path / "o"), "--logging.wandb", "false"]
    with pytest.raises(AssertionError, match="fp16.enabled is true but the cpu accelerator"):
        run_logged(cmd, tmp_path / "log.txt")

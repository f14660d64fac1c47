"""Fixtures of the e2e tier: one 2-rank launch through the deepspeed launcher that steps every shipped DeepSpeed
config (tests/e2e/test_distributed.py checks it; test_zero_to_fp32.py reads its ZeRO-2 and ZeRO-3 checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import helpers
from helpers import REPO, find_free_port, run_logged

SHIPPED = helpers.shipped_ds_configs()
# the NVMe-offload configs need DeepSpeed's async_io op (libaio); .ci/run installs libaio-dev where apt works
NVME = helpers.nvme_ds_configs()
AIO_PROBLEM = helpers.nvme_aio_problem()


@pytest.fixture(scope="session")
def synth_data(synthetic) -> Path:
    return synthetic(32, size=64, seed=3)


@pytest.fixture(scope="session")
def worker_results(synth_data, tmp_path_factory) -> dict:
    """One 2-rank launch stepping every shipped DeepSpeed config with train.optimizer=auto."""
    out = tmp_path_factory.mktemp("ds")
    configs = []
    for name in SHIPPED:
        if name in NVME and AIO_PROBLEM is not None:
            continue  # each of its tests skips with the reason
        ds = json.loads((REPO / "ds_configs" / f"{name}.json").read_text())
        if ds["train_micro_batch_size_per_gpu"] * 2 > 32:  # default-gpu's 512: a copy that fits 32 scenes on 2 ranks
            print(f"{name}.json runs with micro-batch 4 instead of {ds['train_micro_batch_size_per_gpu']} here")
            ds["train_micro_batch_size_per_gpu"] = 4
            (out / "small").mkdir(exist_ok=True)
            (out / "small" / f"{name}.json").write_text(json.dumps(ds))
            name = str(out / "small" / f"{name}.json")
        configs.append(name)
    port = find_free_port()
    cmd = [
        "deepspeed", "--num_gpus", "2", "--master_port", str(port), "--no_local_rank",
        str(Path(__file__).with_name("ds_worker.py")),
        "--configs", ",".join(configs), "--data", str(synth_data), "--out", str(out), "--steps", "2",
    ]
    run_logged(cmd, out / "log.txt", timeout=500)
    results = json.loads((out / "results.json").read_text())
    results["out"] = str(out)
    results["shm_left"] = sorted(p.name for p in Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return results

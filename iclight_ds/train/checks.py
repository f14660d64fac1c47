"""Checks before step 1: accelerator, ranks, dtype support, module placement. Clear messages, not tracebacks."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn


class DeviceCheckError(RuntimeError):
    """The run cannot start on this machine as configured; the message says what to change."""


def check_precision(accelerator: str, dtype: torch.dtype, *, bf16_ok: bool, fp16_ok: bool, ds_path) -> None:
    if dtype == torch.float16 and (accelerator == "cpu" or not fp16_ok):
        raise DeviceCheckError(
            f"{ds_path}: fp16.enabled is true but the {accelerator} accelerator cannot train in fp16; "
            "use a config with bf16 (ds_configs/cpu.json on CPU)"
        )
    if dtype == torch.bfloat16 and not bf16_ok:
        raise DeviceCheckError(
            f"{ds_path}: bf16.enabled is true but this {accelerator} device has no bf16 support "
            "(e.g. pre-Ampere NVIDIA GPUs); switch the config to fp16 ('fp16': {'enabled': true}) and bf16 off"
        )


def check_optimizer(name: str, *, accelerator: str, stage: int, offload_optimizer: bool, ds_path) -> None:
    """Optimizer / ZeRO combinations that cannot run, refused before anything is built."""
    if name == "cpu_adam" and accelerator != "cpu" and not offload_optimizer:
        raise DeviceCheckError(
            f"train.optimizer=cpu_adam keeps its states on the CPU, but {ds_path} has no "
            "zero_optimization.offload_optimizer.device=cpu: use an *_offload config or train.optimizer=adamw8bit"
        )
    if name == "cpu_adam" and stage == 0:
        raise DeviceCheckError(f"train.optimizer=cpu_adam needs ZeRO (stage >= 1) in {ds_path}")


# What inductor may call to build its kernels (C++ on a CPU; on CUDA, Triton's launcher stub in C)
COMPILERS = ("g++", "c++", "clang++", "gcc", "cc", "clang")


def check_compile(backend: str, *, accelerator: str) -> None:
    """model.compile with inductor needs a C/C++ compiler here (and Triton on CUDA): refuse before step 1 rather than
    fail inside the first step's compilation."""
    if backend != "inductor":
        return
    missing = []
    if not any(shutil.which(c) for c in (os.environ.get("CXX"), os.environ.get("CC"), *COMPILERS) if c):
        missing.append(f"a C/C++ compiler ({', '.join(COMPILERS)}, or $CXX)")
    if accelerator == "cuda" and importlib.util.find_spec("triton") is None:
        missing.append("Triton (pip install triton)")
    if missing:
        raise DeviceCheckError(
            f"model.compile=true with model.compile_backend=inductor needs {' and '.join(missing)} on this machine; "
            "set model.compile=false (or model.compile_backend=aot_eager, which captures the same graphs without "
            "generating kernels)")


def check_offload_ram(*, needed_gib: float, ranks_here: int, ram_gib: float, ds_path) -> None:
    """Offload moves model states into host RAM: refuse a config whose states cannot fit there at all."""
    if needed_gib * ranks_here > 0.95 * ram_gib:
        raise DeviceCheckError(
            f"{ds_path}: zero_optimization.offload_optimizer/offload_param put ~{needed_gib:.1f} GiB per rank in host "
            f"RAM ({ranks_here} rank(s) here: {needed_gib * ranks_here:.1f} GiB) but this machine has {ram_gib:.1f} "
            "GiB; use fewer ranks per machine, a config without offload, or see `python -m iclight_ds.plan`"
        )


def check_nvme_folder(path: str | None, *, key: str, needed_gib: float, ranks_here: int, aio_problem: str | None,
                      ds_path) -> None:
    """NVMe offload: the folder `key` names must exist, be a writable folder, and have room for what the ranks on this
    machine swap (`needed_gib` each, the planner's count); DeepSpeed's async_io op must build here. Refused by name
    before step 1, not halfway through the first optimizer step."""
    if path is None:
        raise DeviceCheckError(f"{ds_path} offloads to NVMe but sets no nvme_path: set train.nvme_path to a folder on "
                               "a fast local SSD")
    folder = Path(path)
    if not folder.exists():
        raise DeviceCheckError(f"{key}={path}: no such folder (NVMe offload swaps the optimizer states there); create "
                               "it on a fast local SSD, or point train.nvme_path elsewhere")
    if not folder.is_dir():
        raise DeviceCheckError(f"{key}={path}: not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise DeviceCheckError(f"{key}={path}: not writable by this user")
    try:  # the permission bits do not tell for root, a read-only mount or a full inode table
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".iclight-ds-write-test-"):
            pass
    except OSError as e:
        raise DeviceCheckError(f"{key}={path}: not writable (creating a file there failed: {e.strerror or e})") from e
    free_gib = shutil.disk_usage(folder).free / 2**30
    need = needed_gib * ranks_here
    if need > free_gib:
        raise DeviceCheckError(f"{key}={path}: NVMe offload needs {need:.1f} GiB there ({needed_gib:.1f} GiB per rank x "
                               f"{ranks_here} rank(s), `python -m iclight_ds.plan`), the disk has {free_gib:.1f} GiB "
                               "free")
    if aio_problem is not None:
        raise DeviceCheckError(f"{ds_path}: NVMe offload needs DeepSpeed's async_io op, which cannot be built here: "
                               f"{aio_problem}")


def check_module_devices(modules: dict[str, nn.Module], device: torch.device) -> None:
    """Every parameter and buffer of every module on `device` (ZeRO-3 partitions are placeholders: skipped)."""
    wrong = []
    for name, module in modules.items():
        for pname, t in list(module.named_parameters()) + list(module.named_buffers()):
            if hasattr(t, "ds_id"):  # a ZeRO-3 partitioned parameter; DeepSpeed places it
                continue
            if t.device.type != device.type:
                wrong.append(f"{name}.{pname} on {t.device}")
    if wrong:
        head = ", ".join(wrong[:5]) + (f" and {len(wrong) - 5} more" if len(wrong) > 5 else "")
        raise DeviceCheckError(f"modules not on the training device {device}: {head}")


def describe(accelerator: str, world_size: int, dtype: torch.dtype, stage: int, geometry) -> str:
    return (
        f"accelerator={accelerator} ranks={world_size} dtype={str(dtype).replace('torch.', '')} zero_stage={stage} "
        f"micro_batch={geometry.micro_batch} accumulation={geometry.accumulation} "
        f"effective_batch={geometry.effective_batch}"
    )

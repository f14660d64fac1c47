"""DeepSpeed engine setup: the only module that imports deepspeed.

Everything DeepSpeed decides (micro-batch, accumulation, precision, ZeRO stage, offload, clipping) is read
from the DeepSpeed JSON; `batch_geometry` derives the effective batch from it in one place.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from datetime import timedelta
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

log = logging.getLogger(__name__)

# The shipped DeepSpeed JSONs: the copy packaged as iclight_ds/ds_configs/ in an installed wheel, else the repository's
# top-level ds_configs/ (a checkout, or an editable install of one)
_PACKAGED_DS_CONFIGS = Path(__file__).resolve().parents[1] / "ds_configs"
REPO_DS_CONFIGS = (_PACKAGED_DS_CONFIGS if _PACKAGED_DS_CONFIGS.is_dir()
                   else Path(__file__).resolve().parents[2] / "ds_configs")
# Keys the trainer owns: a DeepSpeed JSON that sets them would give one number two sources of truth.
_TRAINER_OWNED = {
    "optimizer": "train.optimizer / train.lr / train.weight_decay / train.betas",
    "scheduler": "train.warmup_steps / train.schedule",
}
_REQUIRED = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


class EngineConfigError(ValueError):
    """The DeepSpeed JSON cannot drive this trainer; the message names the file and key."""


@dataclass(frozen=True)
class BatchGeometry:
    micro_batch: int  # samples per rank per forward/backward
    accumulation: int  # micro-batches per optimizer step
    world_size: int

    @property
    def effective_batch(self) -> int:
        """Samples per optimizer step across all ranks."""
        return self.micro_batch * self.accumulation * self.world_size


def resolve_ds_config_path(name: str) -> Path:
    """'auto' -> cpu.json or zero2.json by accelerator; a bare name -> ds_configs/<name>(.json); else a path."""
    if name == "auto":
        name = "zero2.json" if torch.cuda.is_available() else "cpu.json"
    path = Path(name)
    if not path.is_file():
        for candidate in (REPO_DS_CONFIGS / name, REPO_DS_CONFIGS / f"{name}.json"):
            if candidate.is_file():
                return candidate
        shipped = sorted(p.name for p in REPO_DS_CONFIGS.glob("*.json"))
        raise EngineConfigError(f"train.ds_config: {name} not found (shipped configs: {shipped})")
    return path


def read_ds_config(path: str | Path) -> dict:
    """Load and check a DeepSpeed JSON. Keys starting with '_' (comments) are dropped."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EngineConfigError(f"{path}: not valid JSON: {e}") from e
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    for key, owner in _TRAINER_OWNED.items():
        if key in cfg:
            raise EngineConfigError(f"{path}: key '{key}' is set by the trainer's config ({owner}); remove it here")
    for key in _REQUIRED:
        if key not in cfg:
            raise EngineConfigError(f"{path}: missing required key '{key}'")
    if cfg.get("bf16", {}).get("enabled") and cfg.get("fp16", {}).get("enabled"):
        raise EngineConfigError(f"{path}: bf16.enabled and fp16.enabled are both true; choose one")
    _check_offload_stage(cfg, path)
    return cfg


def _check_offload_stage(cfg: dict, path: Path) -> None:
    """Offload settings DeepSpeed would not honour, refused by name: parameter offload exists at ZeRO-3 only, and only
    ZeRO-3 swaps optimizer states to NVMe (stage 1-2 treat offload_optimizer.device 'nvme' as 'cpu': the states would
    fill the RAM the config was chosen to spare)."""
    stage = zero_stage(cfg)
    if stage == 3:
        return
    zero = cfg.get("zero_optimization", {})
    if offload_device(zero, "offload_param") != "none":
        raise EngineConfigError(f"{path}: zero_optimization.offload_param needs ZeRO stage 3 (this config has stage "
                                f"{stage}); DeepSpeed offloads parameters at stage 3 only")
    if offload_device(zero, "offload_optimizer") == "nvme":
        raise EngineConfigError(f"{path}: zero_optimization.offload_optimizer.device 'nvme' needs ZeRO stage 3 (this "
                                f"config has stage {stage}): at stages 1-2 DeepSpeed keeps the optimizer states in "
                                "host RAM whatever the device says. Use stage 3 (ds_configs/1gpu-nvme.json) or "
                                "device 'cpu'")


def offload_device(zero: dict, section: str) -> str:
    """'none', 'cpu' or 'nvme': where `section` (offload_optimizer / offload_param) of zero_optimization puts it."""
    return str((zero.get(section) or {}).get("device") or "none")


NVME_SECTIONS = ("offload_optimizer", "offload_param")


def nvme_paths(ds_cfg: dict) -> dict[str, str | None]:
    """{section: its nvme_path} for the zero_optimization sections that offload to NVMe (empty: no NVMe offload)."""
    zero = ds_cfg.get("zero_optimization", {})
    return {k: zero[k].get("nvme_path") for k in NVME_SECTIONS if offload_device(zero, k) == "nvme"}


def with_nvme_path(ds_cfg: dict, path: str | None) -> dict:
    """The DeepSpeed config with `path` as the nvme_path of every section that offloads to NVMe (train.nvme_path);
    None returns it as it is."""
    if path is None or not nvme_paths(ds_cfg):
        return ds_cfg
    out = json.loads(json.dumps(ds_cfg))
    for section in nvme_paths(ds_cfg):
        out["zero_optimization"][section]["nvme_path"] = str(path)
    return out


def aio_problem() -> str | None:
    """Why DeepSpeed's async_io op (NVMe offload's reads and writes) cannot be built here, or None when it can."""
    try:
        from deepspeed.ops.op_builder import AsyncIOBuilder

        if AsyncIOBuilder().is_compatible(verbose=False):
            return None
    except Exception as e:  # an op builder that fails to import says why
        return f"{type(e).__name__}: {e}"
    return ("it needs the libaio development files (Debian/Ubuntu: apt-get install libaio-dev; Fedora: dnf install "
            "libaio-devel) and a C++ compiler; DeepSpeed builds the op at first use")


def batch_geometry(ds_cfg: dict, world_size: int) -> BatchGeometry:
    """The one place the effective batch is derived: micro x accumulation x world size."""
    geo = BatchGeometry(
        micro_batch=int(ds_cfg["train_micro_batch_size_per_gpu"]),
        accumulation=int(ds_cfg["gradient_accumulation_steps"]),
        world_size=world_size,
    )
    if "train_batch_size" in ds_cfg and int(ds_cfg["train_batch_size"]) != geo.effective_batch:
        raise EngineConfigError(
            f"train_batch_size={ds_cfg['train_batch_size']} != train_micro_batch_size_per_gpu x "
            f"gradient_accumulation_steps x world size = {geo.micro_batch} x {geo.accumulation} x {world_size}"
        )
    return geo


def training_dtype(ds_cfg: dict) -> torch.dtype:
    if ds_cfg.get("bf16", {}).get("enabled"):
        return torch.bfloat16
    if ds_cfg.get("fp16", {}).get("enabled"):
        return torch.float16
    return torch.float32


# fp16 needs a loss scale: DeepSpeed's dynamic one, as the shipped fp16-capable configs would set it
FP16_SECTION = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                "hysteresis": 2, "min_loss_scale": 1}


def with_precision(ds_cfg: dict, precision: str) -> dict:
    """The DeepSpeed config with only its precision switched (train.precision): bf16, fp16 (dynamic loss scale) or
    fp32; 'auto' returns it as it is."""
    if precision == "auto":
        return ds_cfg
    out = {k: v for k, v in ds_cfg.items() if k not in ("bf16", "fp16")}
    out["bf16"] = {"enabled": precision == "bf16"}
    out["fp16"] = dict(FP16_SECTION) if precision == "fp16" else {"enabled": False}
    return out


def zero_stage(ds_cfg: dict) -> int:
    return int(ds_cfg.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(ds_cfg: dict) -> bool:
    return offload_device(ds_cfg.get("zero_optimization", {}), "offload_optimizer") != "none"


def resolve_optimizer(name: str, ds_cfg: dict, *, on_gpu: bool) -> str:
    """train.optimizer=auto -> where the optimizer step runs on the host, a fast fp32 one; on a GPU, 8-bit AdamW.

    bitsandbytes' 8-bit AdamW costs 12 ns per parameter on the host, DeepSpeedCPUAdam 0.24 and torch's fused AdamW
    0.41 (bench/host_optimizer.py). So: DeepSpeed's CPU Adam where the config offloads the optimizer (on an H200 the
    8-bit step made the offload configs' step 28x the no-offload one: bench/results/memory-cuda.json); torch's AdamW
    on a CPU-only machine (no compiler needed; the 8-bit step was 1/4 of the default run's step time there); 8-bit
    AdamW on a GPU, where its states save device memory. The fp32 moments take 6 more bytes per parameter of host
    RAM than 8-bit ones: plan.optimizer_for falls back to adamw8bit where they would not fit."""
    if name != "auto":
        return name
    if offloads_optimizer(ds_cfg):
        return "cpu_adam"
    return "adamw8bit" if on_gpu else "adamw"


# ---------------------------------------------------------------------------------------------------------
# Process group and accelerator


@dataclass(frozen=True)
class Accelerator:
    name: str  # "cuda", "cpu", ...
    device: torch.device  # this rank's device
    rank: int
    local_rank: int
    world_size: int
    bf16: bool
    fp16: bool


# glibc's malloc starts by serving blocks >= 128 KiB with mmap (returned to the OS on free), but raises that
# threshold up to 32 MiB each time such a block is freed. A training step frees and re-allocates thousands of
# layer-sized tensors (ZeRO-3's gathered weights, recomputed activations, gradient buckets), which then come from
# the heap arenas, where freed memory stays in the process: 1.5 GiB per rank for the full UNet under ZeRO-3 on
# CPU (bench/memory.py). Pinning the threshold keeps RSS at what the tensors hold, at the price of a page fault
# per fresh block: the ZeRO-3 CPU step got 20-25% slower. The trainer pins it where RAM is what the config was
# chosen for, ZeRO-3 on CPU; elsewhere the gain is small (5% of a 1-rank ZeRO-2 peak) and the cost is not.
MALLOC_MMAP_THRESHOLD = 128 * 1024
_M_MMAP_THRESHOLD = -3  # mallopt parameter number, from glibc's malloc.h


def pin_malloc_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at 128 KiB (no dynamic raise); True if set. A user's MALLOC_MMAP_THRESHOLD_
    environment variable wins; other C libraries (macOS, musl) are left alone."""
    import ctypes
    import ctypes.util

    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MALLOC_MMAP_THRESHOLD))


def init_distributed(timeout_s: float = 600.0) -> Accelerator:
    """Join (or create, for a plain single process) the process group on DeepSpeed's accelerator. A collective that
    waits longer than `timeout_s` for another rank fails (train.collective_timeout_s) instead of waiting forever."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    for var, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(var, default)
    # A plain single process (no launcher) gets a private rendezvous on a free port; the address is only needed
    # to form the group, so it is removed again: child processes (data workers, tools) must not inherit it.
    own_rendezvous = "MASTER_PORT" not in os.environ
    if own_rendezvous:
        os.environ.update(MASTER_ADDR=os.environ.get("MASTER_ADDR", "127.0.0.1"), MASTER_PORT=str(_free_port()))
    acc = get_accelerator()
    timeout = timedelta(seconds=timeout_s)
    _skip_shm_comm_op()
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), timeout=timeout)
    _default_group_timeout(timeout)
    if own_rendezvous:
        os.environ.pop("MASTER_PORT")
    local_rank = int(os.environ["LOCAL_RANK"])
    name = acc.device_name()
    device = torch.device(acc.device_name(local_rank)) if name != "cpu" else torch.device("cpu")
    if name != "cpu":
        acc.set_device(local_rank)
    return Accelerator(
        name=name,
        device=device,
        rank=torch.distributed.get_rank(),
        local_rank=local_rank,
        world_size=torch.distributed.get_world_size(),
        bf16=bool(acc.is_bf16_supported()),
        fp16=bool(acc.is_fp16_supported()),
    )


def _default_group_timeout(timeout: timedelta) -> None:
    """The timeout of every process group created from now on. DeepSpeed runs its gradient and parameter collectives
    on groups of its own (a clone of the world group, the data-parallel groups), made by `new_group` without a
    timeout, which gives torch's default (30 minutes for gloo, 10 for NCCL): a rank stuck there would hold the others
    that long whatever train.collective_timeout_s says."""
    from torch.distributed import distributed_c10d

    distributed_c10d.default_pg_timeout = timeout
    distributed_c10d.default_pg_nccl_timeout = timeout


def _skip_shm_comm_op() -> None:
    """DeepSpeed's backend builds its shared-memory all-reduce op when it starts on a CPU (a C++ build of about 25 s
    on a machine that has not built it before) and maps a /dev/shm buffer of about 66 MB a rank (RAM, never removed).
    Only `inference_all_reduce` (DeepSpeed inference's tensor parallelism) uses it; training's collectives go
    through torch.distributed (gloo on a CPU). Marking the op incompatible, in the table DeepSpeed consults and keeps
    for the process, makes its backend start without it."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def _all_reduce(values: torch.Tensor, op) -> torch.Tensor:
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return values
    from deepspeed.accelerator import get_accelerator

    # NCCL reduces device tensors only; gloo (CPU) host tensors
    out = values.detach().to(get_accelerator().current_device_name(), copy=True)
    torch.distributed.all_reduce(out, op=op)
    return out.to(values.device)


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    return _all_reduce(values.float(), torch.distributed.ReduceOp.SUM) / max(1, _world_size())


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Collective OR / MAX, e.g. 'did any rank see a problem?' (every rank must call it)."""
    return _all_reduce(values.float(), torch.distributed.ReduceOp.MAX)


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def shutdown() -> None:
    """Destroy the process group; without it a rank may abort at interpreter teardown (gloo)."""
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


# ---------------------------------------------------------------------------------------------------------
# Optimizer and engine


def model_init_context(ds_cfg: dict):
    """Where to build the trainable model: under ZeRO-3, partitioned at construction (no rank ever holds it all)."""
    if zero_stage(ds_cfg) == 3:
        import deepspeed
        import torch._dynamo  # noqa: F401  first import must not happen under zero.Init's patched tensor constructors

        return deepspeed.zero.Init(config_dict_or_path=ds_cfg, dtype=training_dtype(ds_cfg))
    return contextlib.nullcontext()


def whole_params(ds_cfg: dict):
    """A `modify(params)` context for model surgery: under ZeRO-3 it gathers, lets rank 0 write, re-partitions."""
    if zero_stage(ds_cfg) != 3:
        return lambda params: contextlib.nullcontext()
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=0)


def gathered_params(ds_cfg: dict):
    """A `gather(params)` context for reading whole parameters: under ZeRO-3 it gathers them (read-only), else
    nothing."""
    if zero_stage(ds_cfg) != 3:
        return lambda params: contextlib.nullcontext()
    import deepspeed

    return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)


# Elements per optimizer parameter group. ZeRO gives the client optimizer one flat fp32 partition per group, and
# bitsandbytes' CPU 8-bit step needs ~20 transient bytes per element of the tensor it updates: one group for the
# whole SD1.5 UNet would spike ~17 GB in the step (measured: OOM-killed on a 24 GB machine); 20M-element groups
# bound the spike near 0.4 GB. ZeRO-3 configs set the same bound as `sub_group_size`.
MAX_GROUP_ELEMENTS = 20_000_000


def param_groups(params, max_elements: int = MAX_GROUP_ELEMENTS) -> list[dict]:
    """Consecutive parameters packed into groups of at most `max_elements` (a larger tensor gets its own group)."""
    groups: list[list] = [[]]
    count = 0
    for p in params:
        n = p.ds_numel if hasattr(p, "ds_numel") else p.numel()
        if groups[-1] and count + n > max_elements:
            groups.append([])
            count = 0
        groups[-1].append(p)
        count += n
    return [{"params": g} for g in groups if g]


def build_optimizer(name: str, params, *, lr: float, weight_decay: float, betas: tuple[float, float]):
    params = param_groups(params)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=betas, weight_decay=weight_decay)
    if name == "adamw":
        # fused where every parameter is on the host: 0.41 ns per parameter there against 2.25 for foreach
        on_host = all(p.device.type == "cpu" for g in params for p in g["params"])
        return torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=weight_decay, fused=on_host or None)
    if name == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        try:  # DeepSpeed compiles its CPU Adam op on first use (C++ compiler + ninja)
            return DeepSpeedCPUAdam(params, lr=lr, betas=betas, weight_decay=weight_decay, adamw_mode=True)
        except Exception as e:
            raise EngineConfigError(
                f"train.optimizer: DeepSpeed's CPU Adam (cpu_adam, what 'auto' picks for a config that offloads the "
                f"optimizer) could not be built or loaded: {type(e).__name__}: {e}. It needs a C++ compiler and "
                f"ninja at first use; or set train.optimizer=adamw8bit (slower optimizer step on the host)") from e
    raise EngineConfigError(f"train.optimizer: unknown optimizer {name!r}")


def initialize(model: torch.nn.Module, optimizer, lr_scheduler, ds_cfg: dict, *, optimizer_name: str):
    """`deepspeed.initialize` on the trainable model only (frozen encoders never enter ZeRO)."""
    import deepspeed

    ds_cfg = dict(ds_cfg)
    if optimizer_name != "cpu_adam":
        # A client optimizer is the user's explicit choice (train.optimizer); these flags only let DeepSpeed accept it.
        ds_cfg.setdefault("zero_allow_untested_optimizer", True)
        ds_cfg.setdefault("zero_force_ds_cpu_optimizer", False)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lr_scheduler,
        config=ds_cfg,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
    )
    return engine


def save_checkpoint(engine, save_dir: str | Path, tag: str, client_state: dict) -> None:
    """Every rank must call this (each saves its own partition). With the optimizer swapped to NVMe, DeepSpeed copies
    the swap files into the checkpoint (offloaded_tensors/) and leaves their sub-groups empty in its optimizer files;
    rank 0 then records which parameters each swap file holds (NVME_GROUPS), which is what the export needs."""
    engine.save_checkpoint(str(save_dir), tag=tag, client_state=client_state, save_latest=False)
    groups = _nvme_groups(engine)
    if groups is not None and torch.distributed.get_rank() == 0:
        (Path(save_dir) / tag / NVME_GROUPS).write_text(json.dumps(groups, indent=1) + "\n")


NVME_GROUPS = "nvme_groups.json"  # in a checkpoint of an NVMe-offloaded run: [{file, params}] per optimizer sub-group


def _nvme_groups(engine) -> list[dict] | None:
    """[{"file": swap file of the sub-group's fp32 master weights, "params": their names}] per ZeRO-3 sub-group, or
    None when the optimizer is not swapped to NVMe (DeepSpeed names a sub-group's file after the ds_ids of its first
    and last parameters)."""
    opt = engine.optimizer
    if not getattr(opt, "swap_optimizer", False):
        return None
    names = {id(p): n for n, p in engine.module.named_parameters()}
    return [{"file": f"{opt.fp32_partitioned_groups_flat[i].ds_id}.tensor.swp", "params": [names[id(p)] for p in group]}
            for i, group in enumerate(opt.fp16_groups)]


def load_checkpoint(engine, load_dir: str | Path, tag: str) -> dict:
    """Our own checkpoints only: DeepSpeed unpickles its optimizer files (trusted, written by this trainer)."""
    path, client_state = engine.load_checkpoint(str(load_dir), tag=tag)
    if path is None:
        raise FileNotFoundError(f"checkpoint {Path(load_dir) / tag} could not be loaded")
    _restore_swapped_optimizer_states(engine, Path(load_dir) / tag)
    return client_state or {}


def _restore_swapped_optimizer_states(engine, folder: Path) -> None:
    """NVMe offload: DeepSpeed (0.19) skips loading the optimizer's state under NVMe swapping. It copies a
    checkpoint's swap files back under their saved names, which are the ds_ids of that process's parameters (another
    process, or another engine in the same one, numbers them differently); it never tells its swapper that the saved
    Adam moments are there, nor restores the optimizer's step count or its param groups' hyperparameters. Left so,
    the first step after a resume would restart Adam from zero moments at step 1, at the learning rate the schedule
    gave the optimizer when it was made (0 at the start of a warm-up). So each swapped sub-group's master weights and
    moments are copied to this engine's swap names (NVME_GROUPS says which file holds which sub-group), its step and
    the param groups' hyperparameters (lr, betas, weight decay) are restored from the checkpoint's optimizer file, and
    the moments are registered with the swapper as its own swap-out leaves them: placeholders whose data is in the
    swap files, read in at the sub-group's next step. The resumed run then equals the uninterrupted one
    (tests/integration/test_nvme_offload.py)."""
    opt = engine.optimizer
    if not getattr(opt, "swap_optimizer", False):
        return
    rank = torch.distributed.get_rank()
    optim_file = next(folder.glob(f"*zero_pp_rank_{rank}_*optim_states.pt"))
    inner = torch.load(optim_file, map_location="cpu", weights_only=False)  # our own checkpoint (load_checkpoint)
    inner = inner["optimizer_state_dict"]["optimizer_state_dict"]
    saved = inner["state"]
    groups = json.loads((folder / NVME_GROUPS).read_text())
    now = _nvme_groups(engine)
    if [g["params"] for g in groups] != [g["params"] for g in now] or \
            len(inner["param_groups"]) != len(opt.optimizer.param_groups):
        raise EngineConfigError(f"{folder}: its NVMe-swapped optimizer sub-groups or param groups differ from this "
                                "run's (another model, sub_group_size or optimizer)")
    for group, saved_group in zip(opt.optimizer.param_groups, inner["param_groups"]):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    source = next(folder.glob(f"offloaded_tensors/rank*{rank}"))
    swapper = opt.optimizer_swapper
    for i, flat in enumerate(opt.fp32_partitioned_groups_flat):
        if i not in saved or not opt._swappable_optimizer_subgroup(i):
            continue
        old_id, new_id = groups[i]["file"][: -len(".tensor.swp")], flat.ds_id
        for name in [""] + [f"{k}-" for k, v in saved[i].items() if torch.is_tensor(v)]:
            shutil.copyfile(source / f"{name}{old_id}.tensor.swp", Path(swapper.swap_folder) / f"{name}{new_id}.tensor.swp")
        numel = int(opt.fp16_partitioned_groups_flat_numel[i])
        state = opt.optimizer.state[flat]
        for name, value in saved[i].items():
            state[name] = torch.empty(numel, dtype=flat.dtype) if torch.is_tensor(value) else value
        swap_info = swapper._get_param_swap_info(flat)  # registers the moments, named as their swap files
        swap_info.release_memory()


def gathered_state_dict(engine) -> dict[str, torch.Tensor]:
    """Full module state dict (training dtype) on every rank, ZeRO-3 partitions gathered."""
    import deepspeed

    module = engine.module
    params = list(module.parameters())
    if engine.zero_optimization_stage() == 3:
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def fp32_state_dict_from_checkpoint(checkpoint_dir: str | Path, tag: str) -> dict[str, torch.Tensor]:
    """Consolidate a checkpoint's fp32 master weights into one state dict: ZeRO-1/2/3 (any world size) through
    DeepSpeed's zero_to_fp32, stage 0 from its single model-states file (zero_to_fp32 cannot read those)."""
    folder = Path(checkpoint_dir) / tag
    if not any(folder.glob("*optim_states.pt")):
        return stage0_fp32_state_dict(folder / STAGE0_STATES)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    if (folder / "offloaded_tensors").is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            _unswapped_copy(folder, Path(tmp) / tag)
            return get_fp32_state_dict_from_zero_checkpoint(tmp, tag=tag)
    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def _unswapped_copy(folder: Path, out: Path) -> None:
    """A copy of an NVMe-offloaded ZeRO-3 checkpoint that zero_to_fp32 reads: each rank's optimizer file with its
    swapped sub-groups filled from offloaded_tensors/rank<R>/ (the first elements of each swap file are the
    sub-group's fp32 master partition; the rest is alignment), the model-state files linked."""
    record = folder / NVME_GROUPS
    if not record.is_file():
        raise FileNotFoundError(f"{folder}: an NVMe-offloaded checkpoint without {NVME_GROUPS} (which parameters "
                                "each swap file holds): written by another tool? DeepSpeed's zero_to_fp32 cannot "
                                "read NVMe-offloaded optimizer states either")
    groups = json.loads(record.read_text())
    out.mkdir(parents=True)
    numels = {}
    for f in sorted(folder.glob("*model_states.pt")):
        (out / f.name).symlink_to(f.resolve())
        for shapes in torch.load(f, map_location="cpu", weights_only=False)["param_shapes"]:
            numels.update({name: shape.numel() for name, shape in shapes.items()})
    for f in sorted(folder.glob("*optim_states.pt")):
        rank = int(re.search(r"zero_pp_rank_(\d+)_", f.name)[1])
        state = torch.load(f, map_location="cpu", weights_only=False)
        world = state["optimizer_state_dict"]["partition_count"]
        world = world[0] if isinstance(world, (list, tuple)) else int(world)
        flat = state["optimizer_state_dict"]["fp32_flat_groups"]
        swap_dir = next(folder.glob(f"offloaded_tensors/rank*{rank}"))
        for i, group in enumerate(groups):
            if flat[i].numel() == 0:
                count = sum(math.ceil(numels[name] / world) for name in group["params"])
                flat[i] = torch.from_numpy(np.fromfile(swap_dir / group["file"], dtype=np.float32, count=count))
        torch.save(state, out / f.name)


STAGE0_STATES = "mp_rank_00_model_states.pt"  # stage 0: every rank holds the whole model; rank 0 saves it here


def stage0_fp32_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The module of a stage-0 checkpoint with its trainable weights replaced by the optimizer's fp32 masters.

    DeepSpeed saves the module in its training dtype and, for bf16/fp16, the precision wrapper's fp32 master
    copies as `optimizer.fp32_groups`: one tensor per trainable parameter, in the optimizer's order, which is the
    module's parameter order (param_groups keeps it). Each master is matched to the next module tensor of its
    shape whose value it rounds to, so a mismatched file is refused instead of exported scrambled.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no ZeRO optimizer files and no {path.name}: not a DeepSpeed "
                                "checkpoint of this trainer")
    saved = torch.load(path, map_location="cpu", weights_only=True)
    module = saved["module"]
    masters = [t for group in (saved.get("optimizer") or {}).get("fp32_groups") or [] for t in group]
    if not masters:  # fp32 training: the module is the master copy
        low = [k for k, v in module.items() if v.is_floating_point() and v.dtype != torch.float32]
        if low:
            raise ValueError(f"{path}: module weights are {module[low[0]].dtype} but the file holds no fp32 master "
                             "copies (optimizer.fp32_groups)")
        return dict(module)
    state, pending = {}, iter(masters)
    master = next(pending, None)
    for name, value in module.items():
        if (master is not None and master.shape == value.shape and value.is_floating_point()
                and torch.equal(master.to(value.dtype), value)):
            state[name], master = master, next(pending, None)
        else:  # a frozen parameter or a buffer: saved as it was
            state[name] = value
    if master is not None:
        left = 1 + sum(1 for _ in pending)
        raise ValueError(f"{path}: {left} of {len(masters)} fp32 master copies match no module weight "
                         "(shape and value): the file is not one this trainer wrote")
    return state

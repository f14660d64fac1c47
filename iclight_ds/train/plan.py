"""Memory planner: which DeepSpeed config fits this machine?

`python -m iclight_ds.plan [--gpu-mem GB] [--gpus N] [--ram GB] [--resolution R] [--variant fc|fbc]
                           [--consistency on|off] [--size full|tiny] [--optimizer auto|adamw8bit|adamw|cpu_adam]
                           [--checkpointing auto|on|off] [--json]`

Per rank, for each config in ds_configs/: model states counted from the parameter count and the config's
stage, offload, precision and the optimizer (train.optimizer; auto: DeepSpeed's CPU Adam where the config
offloads the optimizer, torch's AdamW on a CPU-only machine, 8-bit AdamW on a GPU; see optimizer_for);
activations measured by running the UNet on PyTorch's meta device (no memory, no compute) and summing the tensors
autograd saves, with gradient checkpointing (model.gradient_checkpointing; auto: on for the full UNet) the
checkpoint inputs plus the largest block recomputed in backward, times the batch (3x with the consistency
objective). It prints a table and names the fastest config that fits with headroom.
"""

from __future__ import annotations

import argparse
import functools
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import shutil

import psutil
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from ..config import DEFAULT_LORA_TARGETS
from ..model.arch import ARCHS, wants_checkpointing
from ..model.lora import add_lora, lora_parameter_count
from . import engine as eng

GiB = 2**30
HEADROOM = 0.85  # use at most 85% of a device: allocator fragmentation, CUDA context, kernels' workspaces
CUDA_CONTEXT = 0.6 * GiB  # CUDA context + cuBLAS/cuDNN workspaces, roughly, per GPU process
# One rank's host RAM besides model states and activations. GPU: Python + torch + deepspeed with the CUDA
# libraries loaded, data workers (not measured here: no GPU was lent). CPU: measured 0.7 GiB for Python + torch +
# deepspeed + diffusers (bench/memory.py, ZeRO-3 rank minus its tensors) plus the frozen VAE and text encoder in
# bf16 (0.4 GiB at full size; a run from a latent cache does not build them).
HOST_BASE = 2.5 * GiB
HOST_BASE_CPU = 1.1 * GiB
# Fastest first: what to prefer when several fit (offload moves optimizer work to the CPU; ZeRO-3 gathers).
# NVMe offload comes last among the GPU configs: each step reads and writes the optimizer states on the SSD.
SPEED_ORDER = ["1gpu-24gb", "multi-gpu", "zero2", "zero3", "1gpu-12gb", "1gpu-8gb", "zero2_offload", "1gpu-6gb",
               "zero3_offload", "1gpu-nvme", "1gpu-6gb-nvme", "cpu-1rank", "cpu", "cpu-zero3"]
# configs the planner never picks: they are named where they belong
BY_NAME_ONLY = {"multi-node": "for several machines (pick it by name with --hostfile)",
                "default-gpu": "the tiny GPU default run's (iclight_ds/train/presets/default-gpu.yaml)",
                "default-cpu": "the tiny CPU default run's (iclight_ds/train/presets/default-cpu.yaml)"}
# `*-1rank` configs (ZeRO stage 0) are the fastest with one rank only: with several, every rank would repeat the
# whole optimizer step that ZeRO-2 splits between them (the order was measured with AdamW8bit, whose CPU step is most
# of a full-size step; with fused AdamW, auto's CPU choice, that step is cheaper, so the margin is smaller).
ONE_RANK_SUFFIX = "-1rank"
OPTIMIZER_STATE_BYTES = {"adamw8bit": 2.0, "adamw": 8.0, "cpu_adam": 8.0}  # m and v per parameter
# Offload with pin_memory on a GPU: torch's pinned-memory allocator rounds every block up to a power of two, and
# DeepSpeed pins an fp32 master, an fp32 gradient and (ZeRO-1/2) a bf16 buffer per parameter group. For the full
# UNet's 48 groups of <= 20M elements the rounded sizes sum to 1.46x the exact ones. With it the count gives
# 14.2 GiB of host RAM for 1gpu-8gb.json after init; an H200 measured 14.3 (bench/results/memory-cuda.json).
PINNED_ROUNDUP = 1.46


@dataclass
class Estimate:
    config: str
    stage: int
    offload: str
    micro_batch: int
    device_gib: float  # per rank, on the accelerator
    host_gib: float  # per rank, in host RAM
    fits: bool
    why: str
    optimizer: str = "adamw8bit"  # what train.optimizer resolves to with this config (auto: see optimizer_for)
    disk_gib: float = 0.0  # per rank, on the NVMe offload folder
    lora_rank: int = 0  # the workload's model.lora_rank (0: full fine-tune)


@functools.lru_cache(maxsize=None)
def unet_parameters(size: str, in_channels: int) -> int:
    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(ARCHS[size][0], in_channels=in_channels))
    return sum(p.numel() for p in unet.parameters())


@functools.lru_cache(maxsize=None)
def parameter_counts(size: str, in_channels: int, lora_rank: int = 0,
                     lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS) -> tuple[int, int]:
    """(trainable, frozen) UNet parameters: all trainable for a full fine-tune; with LoRA, its layers and the widened
    conv_in train and the rest of the UNet is frozen (model/lora.py)."""
    total = unet_parameters(size, in_channels)
    if not lora_rank:
        return total, 0
    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(ARCHS[size][0], in_channels=in_channels))
    conv_in = sum(p.numel() for p in unet.conv_in.parameters())
    lora = lora_parameter_count(unet, rank=lora_rank, targets=list(lora_targets))
    return lora + conv_in, total - conv_in


class _FlashLikeAttention(torch.autograd.Function):
    """Stands in for SDPA during measurement with what fused attention kernels keep for backward (xformers,
    FlashAttention on CUDA, PyTorch's flash kernel on CPU): q, k, v, the output and a row logsumexp; never the
    (L x L) score matrix that the unfused math path would save."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # never called: the measurement does no backward
        raise NotImplementedError


def _flash_like_sdpa(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    return _FlashLikeAttention.apply(q, k, v)


@functools.lru_cache(maxsize=None)
def activation_bytes(size: str, in_channels: int, resolution: int, tokens: int = 81,
                     checkpointing: bool = True, lora_rank: int = 0) -> float:
    """Bytes one sample's activations need (bf16), with or without gradient checkpointing, measured on the meta
    device; with LoRA layers of `lora_rank` on the default targets where it is not 0 (each saves its input and its
    rank-r intermediate: +25% at 256 px for rank 64)."""
    with mock.patch.object(F, "scaled_dot_product_attention", _flash_like_sdpa):
        return _measure_saved(UNet2DConditionModel, AttnProcessor2_0, dict(ARCHS[size][0], in_channels=in_channels),
                              resolution, tokens, checkpointing, lora_rank)


def activations_per_sample(size: str, in_channels: int, resolution: int, params: int, *,
                           checkpointing: str | bool, consistency: bool, lora_rank: int = 0) -> float:
    """Bytes of activations per sample of a micro-batch: the UNet's (`params` parameters; with gradient checkpointing
    as model.gradient_checkpointing resolves for it), times its rows (3 with the consistency objective)."""
    per_row = activation_bytes(size, in_channels, resolution, checkpointing=wants_checkpointing(checkpointing, params),
                               lora_rank=lora_rank)
    return per_row * (3 if consistency else 1)


def _measure_saved(UNet2DConditionModel, AttnProcessor2_0, spec: dict, resolution: int, tokens: int,
                   checkpointing: bool, lora_rank: int = 0) -> float:
    in_channels = spec["in_channels"]

    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec)
        if lora_rank:
            add_lora(unet, rank=lora_rank, alpha=lora_rank, targets=list(DEFAULT_LORA_TARGETS))
        unet.to(torch.bfloat16)  # after peft, which keeps LoRA layers in fp32: DeepSpeed's engine casts them too
    unet.set_attn_processor(AttnProcessor2_0())
    unet.train()
    saved = [0]
    per_block: dict[int, int] = {}
    weights = {id(p) for p in unet.parameters()}

    held = []  # what autograd saved so far in this forward; a tensor saved twice (a frozen convolution and the
    # LoRA layer beside it both keep their input) is held once

    def pack(t):
        if id(t) not in weights and id(t._base) not in weights and not any(t is h for h in held[-64:]):
            saved[0] += t.numel() * t.element_size()  # weights are model states, counted elsewhere
            held.append(t)
        return t

    blocks = list(unet.down_blocks) + [unet.mid_block] + list(unet.up_blocks)
    for i, block in enumerate(blocks):
        block.register_forward_pre_hook(lambda m, a, i=i: per_block.__setitem__(i, -saved[0]))
        block.register_forward_hook(lambda m, a, o, i=i: per_block.__setitem__(i, per_block[i] + saved[0]))
    lat = resolution // 8
    x = torch.empty(1, in_channels, lat, lat, device="meta", dtype=torch.bfloat16)
    text = torch.empty(1, tokens, spec["cross_attention_dim"], device="meta", dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, torch.zeros(1, device="meta", dtype=torch.long), text)  # no checkpointing: every block's cost
    full, largest = saved[0], max(per_block.values())
    if not checkpointing:
        return full
    unet.enable_gradient_checkpointing()
    saved[0] = 0
    held.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, torch.zeros(1, device="meta", dtype=torch.long), text)
    return saved[0] + min(full, largest)


def model_state_bytes(params: int, ds_cfg: dict, world: int, optimizer: str, pinned: bool = False,
                      frozen: int = 0) -> tuple[float, float]:
    """(device, host) bytes per rank for weights, gradients, fp32 master and optimizer states.

    `params`: trainable parameters; `frozen`: parameters that do not train (a LoRA run's frozen UNet), which cost
    their weights only. `optimizer`: a train.optimizer value; auto is resolved for this config
    (engine.resolve_optimizer). `pinned`: the accelerator is a GPU, so offloaded buffers with pin_memory pay the
    pinned allocator's rounding. What NVMe offload swaps out is on the disk (nvme_bytes); the host keeps its
    buffers."""
    optimizer = eng.resolve_optimizer(optimizer, ds_cfg, on_gpu=pinned)
    stage = eng.zero_stage(ds_cfg)
    zero = ds_cfg.get("zero_optimization", {})
    opt_dev, param_dev = (eng.offload_device(zero, k) for k in ("offload_optimizer", "offload_param"))
    roundup = lambda key: PINNED_ROUNDUP if pinned and zero.get(key, {}).get("pin_memory") else 1.0  # noqa: E731
    half = 2 if eng.training_dtype(ds_cfg) != torch.float32 else 4
    shard = lambda n: n / world if world > 1 else n  # noqa: E731
    weights = half * (shard(params + frozen) if stage == 3 else params + frozen)
    grads = half * (shard(params) if stage >= 2 else params)
    if stage == 0 and half == 2:
        # the precision wrapper's step builds an fp32 copy of every gradient while the bf16 ones are still held
        # (measured, full UNet on 1 CPU rank: 13.1 GiB peak; counting only the fp32 copy said 11.1)
        grads = (half + 4) * params
    buckets = half * min(params, float(zero.get("reduce_bucket_size", 5e8))) if stage >= 2 else 0.0
    if stage == 3:
        buckets += half * min(params + frozen, float(zero.get("stage3_prefetch_bucket_size", 5e7)))
    master = (4 * shard(params) if stage >= 1 else 4 * params) if half == 2 else 0
    states = OPTIMIZER_STATE_BYTES[optimizer] * (shard(params) if stage >= 1 else params)
    device, host = grads + buckets, 0.0
    if stage == 3 and opt_dev != "none":
        # ZeRO-3 with optimizer offload reduces the gradients into one flat host buffer of the training dtype
        # (pinned; DeepSpeed's grad_partitions_flat_buffer): only the buckets stay on the device. Counting it puts
        # 1gpu-6gb.json at 18.3 GiB of host RAM against 18.5 measured on an H200 (bench/results/memory-cuda.json)
        device -= grads
        host += half * shard(params) * roundup("offload_optimizer")
    if param_dev == "none":
        device += weights
    elif param_dev == "cpu":
        host += weights * roundup("offload_param")
    else:  # nvme: a pool of buffer_count buffers of buffer_size elements each
        pool = zero["offload_param"]
        host += half * pool.get("buffer_count", 5) * float(pool.get("buffer_size", 1e8)) * roundup("offload_param")
    if opt_dev == "cpu":
        # offload keeps an fp32 copy of the gradient partition on the host too (measured on an H200: 3.2 GiB of
        # fp32 gradients for the full UNet with 1gpu-8gb.json) and, at ZeRO-1/2, a bf16 buffer for the weights'
        # way back to the GPU; the optimizer's own states are not pinned
        copy_back = half * shard(params) if stage < 3 else 0
        host += states + (master + 4 * shard(params) + copy_back) * roundup("offload_optimizer")
    elif opt_dev == "nvme":
        host += _nvme_optimizer_host(zero, shard(params), roundup("offload_optimizer"))
    else:
        device += master + states
    return device, host


def _nvme_optimizer_host(zero: dict, partition: float, roundup: float) -> float:
    """Host bytes of ZeRO-3's optimizer swapping to NVMe besides the gradient buffer: the swap buffers (buffer_count of
    them, each a sub-group of fp32 elements) that the step reads the master weights, moments and gradients into."""
    group = min(partition, float(zero.get("sub_group_size", 1e9)))
    return zero["offload_optimizer"].get("buffer_count", 4) * group * 4 * roundup


def nvme_bytes(params: int, ds_cfg: dict, world: int, optimizer: str, frozen: int = 0) -> float:
    """Bytes per rank that NVMe offload writes to its nvme_path: for the optimizer, the fp32 master weights, the
    optimizer's states and the fp32 gradients of the rank's partition; for the parameters, their training-dtype
    partition (the frozen ones too). 0 without NVMe offload."""
    optimizer = eng.resolve_optimizer(optimizer, ds_cfg, on_gpu=True)
    zero = ds_cfg.get("zero_optimization", {})
    shard = lambda n: n / world if world > 1 else n  # noqa: E731
    total = 0.0
    if eng.offload_device(zero, "offload_optimizer") == "nvme":
        total += (4 + OPTIMIZER_STATE_BYTES[optimizer] + 4) * shard(params)
    if eng.offload_device(zero, "offload_param") == "nvme":
        half = 2 if eng.training_dtype(ds_cfg) != torch.float32 else 4
        total += half * shard(params + frozen)
    return total


def optimizer_for(optimizer: str, params: int, ds_cfg: dict, *, world: int, ranks_here: int, ram_gib: float,
                  on_gpu: bool, activations: float = 0.0, frozen: int = 0) -> str:
    """train.optimizer as it will run with this config on this machine: auto is a fast fp32 optimizer where its step
    runs on the host (DeepSpeed's CPU Adam with offload, torch's AdamW on a CPU-only machine; engine.resolve_optimizer)
    unless its moments (6 bytes per parameter more than 8-bit states) would not fit this machine's RAM with the
    planner's headroom; then 8-bit AdamW, slower on the host but 2 bytes. `activations`: bytes per rank of a CPU-only
    machine's activations, which share that RAM."""
    name = eng.resolve_optimizer(optimizer, ds_cfg, on_gpu=on_gpu)
    if optimizer != "auto" or name == "adamw8bit":
        return name
    device, host = model_state_bytes(params, ds_cfg, world, name, pinned=on_gpu, frozen=frozen)
    if not on_gpu:  # everything lives in host RAM
        host += device + activations
    host += HOST_BASE if on_gpu else HOST_BASE_CPU
    return name if host * ranks_here <= HEADROOM * ram_gib * GiB else "adamw8bit"


@dataclass(frozen=True)
class Workload:
    """What is trained, as the planner sees it (the model and data keys that move memory)."""

    resolution: int = 512
    variant: str = "fc"
    consistency: bool = True
    size: str = "full"
    optimizer: str = "auto"
    checkpointing: str | bool = "auto"  # model.gradient_checkpointing (auto: on for the full UNet)
    lora_rank: int = 0  # model.lora_rank (0: full fine-tune)
    lora_targets: tuple[str, ...] = DEFAULT_LORA_TARGETS

    @property
    def in_channels(self) -> int:
        return 8 if self.variant == "fc" else 12


def plan(*, gpu_mem_gib: float | None, gpus: int, ram_gib: float, resolution: int = 512, variant: str = "fc",
         consistency: bool = True, size: str = "full", optimizer: str = "auto", checkpointing: str | bool = "auto",
         lora_rank: int = 0, nvme_gib: float | None = None) -> tuple[list[Estimate], str | None]:
    """Every shipped config's estimate for this machine and workload, and the fastest that fits. `nvme_gib`: free
    space at the NVMe offload folder (train.nvme_path); None: there is none, so the NVMe configs do not fit."""
    work = Workload(resolution, variant, consistency, size, optimizer, checkpointing, lora_rank)
    on_cpu = gpu_mem_gib is None
    estimates = [_estimate(path, work, gpu_mem_gib=gpu_mem_gib, gpus=gpus, ram_gib=ram_gib, nvme_gib=nvme_gib)
                 for path in sorted(eng.REPO_DS_CONFIGS.glob("*.json"))]
    fitting = {e.config for e in estimates if e.fits}
    order = (["multi-gpu"] if gpus > 1 else []) + SPEED_ORDER  # one config per rank count: prefer its own
    if on_cpu and optimizer == "auto":
        # SPEED_ORDER was measured with AdamW8bit everywhere; on a CPU its step is 2.8x the fused AdamW one
        # (bench/results/memory-cpu-adamw.json), so a config that keeps fused AdamW goes before one that fell back
        fell_back = {e.config for e in estimates if e.optimizer == "adamw8bit"}
        order = [n for n in order if n not in fell_back] + [n for n in order if n in fell_back]
    choice = next((name for name in order if name in fitting), None)
    if choice is None and fitting:
        choice = sorted(fitting)[0]
    return estimates, choice


def _estimate(path: Path, work: Workload, *, gpu_mem_gib: float | None, gpus: int, ram_gib: float,
              nvme_gib: float | None) -> Estimate:
    """One config's per-rank memory for `work` on this machine, and whether it fits (with the reasons if not)."""
    on_cpu = gpu_mem_gib is None
    params, frozen = parameter_counts(work.size, work.in_channels, work.lora_rank, work.lora_targets)
    per_sample = activations_per_sample(work.size, work.in_channels, work.resolution, params + frozen,
                                        checkpointing=work.checkpointing, consistency=work.consistency,
                                        lora_rank=work.lora_rank)
    ds_cfg = eng.read_ds_config(path)
    micro = int(ds_cfg["train_micro_batch_size_per_gpu"])
    activations = per_sample * micro
    opt = optimizer_for(work.optimizer, params, ds_cfg, world=gpus, ranks_here=gpus, ram_gib=ram_gib,
                        on_gpu=not on_cpu, activations=activations, frozen=frozen)
    device, host = model_state_bytes(params, ds_cfg, gpus, opt, pinned=not on_cpu, frozen=frozen)
    disk = nvme_bytes(params, ds_cfg, gpus, opt, frozen=frozen)
    zero = ds_cfg.get("zero_optimization", {})
    offload = "+".join(f"{k.split('_')[1]}:{eng.offload_device(zero, k)}" for k in ("offload_param",
                       "offload_optimizer") if eng.offload_device(zero, k) != "none") or "none"
    if on_cpu:  # everything lives in host RAM
        host, device = host + device + activations, 0.0
    else:
        device += activations + CUDA_CONTEXT
    host += HOST_BASE_CPU if on_cpu else HOST_BASE
    reasons = []
    if not on_cpu and device > HEADROOM * gpu_mem_gib * GiB:
        reasons.append(f"needs {device / GiB:.1f} of {gpu_mem_gib:.0f} GiB GPU")
    if host * gpus > HEADROOM * ram_gib * GiB:
        reasons.append(f"needs {host * gpus / GiB:.1f} of {ram_gib:.0f} GiB RAM")
    if disk and nvme_gib is None:
        reasons.append(f"needs an NVMe folder (train.nvme_path) with {disk * gpus / GiB:.0f} GiB free")
    elif disk and disk * gpus > nvme_gib * GiB:
        reasons.append(f"needs {disk * gpus / GiB:.0f} GiB on the NVMe folder, {nvme_gib:.0f} free")
    cpu_config = path.stem.startswith("cpu")
    if on_cpu != cpu_config:
        reasons.append("for CPU-only machines" if cpu_config else "needs a GPU")
    if path.stem == "multi-gpu" and gpus == 1:
        reasons.append("for several GPUs (zero2.json is its one-GPU twin)")
    if path.stem.endswith(ONE_RANK_SUFFIX) and gpus > 1:
        reasons.append("for one rank (with several, ZeRO-2 splits the optimizer step)")
    if path.stem in BY_NAME_ONLY:
        reasons.append(BY_NAME_ONLY[path.stem])
    return Estimate(path.stem, eng.zero_stage(ds_cfg), offload, micro, device / GiB, host / GiB, not reasons,
                    "; ".join(reasons) or "fits", opt, disk_gib=disk / GiB, lora_rank=work.lora_rank)


def detect() -> dict:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu_mem = torch.cuda.get_device_properties(0).total_memory / GiB if gpus else None
    return {"gpus": gpus, "gpu_mem_gib": gpu_mem, "ram_gib": psutil.virtual_memory().total / GiB}


def choose_config(resolution: int, variant: str, consistency: bool, size: str, optimizer: str,
                  ranks: int | None = None, checkpointing: str | bool = "auto", lora_rank: int = 0,
                  nvme_gib: float | None = None) -> Path:
    """What `--ds-config auto` uses: the planner's choice for this machine with `ranks` processes on it (default:
    one per detected GPU, at least one). CPU ranks are not detected, so the trainer passes its own count.
    `nvme_gib`: free space at train.nvme_path (None: no NVMe offload)."""
    found = detect()
    _, choice = plan(gpu_mem_gib=found["gpu_mem_gib"], gpus=ranks or max(1, found["gpus"]), ram_gib=found["ram_gib"],
                     resolution=resolution, variant=variant, consistency=consistency, size=size,
                     optimizer=optimizer, checkpointing=checkpointing, lora_rank=lora_rank, nvme_gib=nvme_gib)
    if choice is None:
        hint = "" if lora_rank else "; a LoRA (model.lora_rank 64) or NVMe offload (train.nvme_path) may fit"
        raise eng.EngineConfigError(
            f"no shipped DeepSpeed config fits this machine at {resolution} px ({size} model{hint}); "
            "see `python -m iclight_ds.plan` for the numbers"
        )
    return eng.REPO_DS_CONFIGS / f"{choice}.json"


# ---------------------------------------------------------------------------------------------------------
# The consumer grid: what each common machine trains with

GRID_GPU_GIB = (6, 8, 12, 16, 24)
GRID_RAM_GIB = (16, 32, 64)
GRID_MULTI_GPU = (2, 12)  # and 2 x 12 GB GPUs
GRID_NVME_GIB = 64.0  # the grid's machines have an NVMe SSD with this much free (the full UNet swaps 13-15 GiB)
GRID_LORA_RANK = 64  # what the grid trains where no full fine-tune fits


@dataclass
class Cell:
    gpus: int
    gpu_gib: float
    ram_gib: float
    config: str
    lora_rank: int
    device_gib: float
    host_gib: float
    disk_gib: float
    optimizer: str
    trades: str
    without_nvme: str  # the answer on the same machine without an NVMe SSD


def answer(*, gpus: int, gpu_gib: float, ram_gib: float, work: Workload,
           nvme_gib: float | None) -> Estimate | None:
    """The fastest full fine-tune that fits (RAM offload, else NVMe offload where there is an SSD), else the fastest
    LoRA (rank GRID_LORA_RANK, or the workload's own) that fits; None if nothing does."""
    for rank in ((work.lora_rank,) if work.lora_rank else (0, GRID_LORA_RANK)):
        estimates, choice = plan(gpu_mem_gib=gpu_gib, gpus=gpus, ram_gib=ram_gib, resolution=work.resolution,
                                 variant=work.variant, consistency=work.consistency, size=work.size,
                                 optimizer=work.optimizer, checkpointing=work.checkpointing, lora_rank=rank,
                                 nvme_gib=nvme_gib)
        if choice is not None:
            return next(e for e in estimates if e.config == choice)
    return None


def trades(e: Estimate, *, gpus: int = 1, size: str = "full", in_channels: int = 8) -> str:
    """What a config gives up against everything on the GPU, in words."""
    parts = []
    if e.lora_rank:
        trained, _ = parameter_counts(size, in_channels, e.lora_rank)
        parts.append(f"LoRA rank {e.lora_rank}: trains {trained / 1e6:.0f}M parameters (rank-{e.lora_rank} updates of "
                     f"the attention and resnet layers, conv_in in full) instead of the UNet's "
                     f"{unet_parameters(size, in_channels) / 1e6:.0f}M")
    if "param:nvme" in e.offload:
        parts.append("weights and optimizer states on the SSD: every layer is read from it in forward and backward")
    elif "optimizer:nvme" in e.offload:
        parts.append(f"optimizer states on the SSD ({e.disk_gib * gpus:.0f} GiB): read and written every step")
    if "param:cpu" in e.offload:
        parts.append("weights in RAM: every layer crosses PCIe in forward and backward")
    if "optimizer:cpu" in e.offload:
        parts.append(f"the optimizer step on the CPU ({e.optimizer})")
    if gpus > 1 and e.stage >= 2:
        parts.append(f"optimizer states and gradients sharded over the {gpus} GPUs")
    return "; ".join(parts) or "nothing: the whole model on the GPU"


def grid(work: Workload = Workload(), nvme_gib: float = GRID_NVME_GIB) -> list[Cell]:
    """Every machine of the consumer grid with its answer (full fine-tune where one fits)."""
    machines = [(1, g, r) for g in GRID_GPU_GIB for r in GRID_RAM_GIB]
    machines += [(GRID_MULTI_GPU[0], GRID_MULTI_GPU[1], r) for r in GRID_RAM_GIB]
    cells = []
    for gpus, gpu_gib, ram_gib in machines:
        best = answer(gpus=gpus, gpu_gib=gpu_gib, ram_gib=ram_gib, work=work, nvme_gib=nvme_gib)
        if best is None:
            cells.append(Cell(gpus, gpu_gib, ram_gib, "nothing fits", 0, 0, 0, 0, "", "", ""))
            continue
        plain = best
        if best.disk_gib:
            plain = answer(gpus=gpus, gpu_gib=gpu_gib, ram_gib=ram_gib, work=work, nvme_gib=None)
        without = "same" if plain is best else (
            f"{plain.config}" + (f", LoRA rank {plain.lora_rank}" if plain.lora_rank else "") if plain else "nothing")
        cells.append(Cell(gpus, gpu_gib, ram_gib, best.config, best.lora_rank, best.device_gib, best.host_gib,
                          best.disk_gib * gpus, best.optimizer,
                          trades(best, gpus=gpus, size=work.size, in_channels=work.in_channels), without))
    return cells


def grid_table(cells: list[Cell]) -> str:
    """The grid as a Markdown table."""
    lines = ["| GPU | RAM | config | LoRA rank | GPU GiB | host GiB | SSD GiB | what it trades | without an SSD |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        gpu = f"{c.gpus} x {c.gpu_gib:.0f} GB" if c.gpus > 1 else f"{c.gpu_gib:.0f} GB"
        lines.append(f"| {gpu} | {c.ram_gib:.0f} GB | `{c.config}` | {c.lora_rank or '-'} | {c.device_gib:.1f} | "
                     f"{c.host_gib:.1f} | {c.disk_gib:.0f} | {c.trades} | {c.without_nvme} |")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpu-mem", type=float, default=None, help="GiB per GPU (default: detected; none = CPU)")
    p.add_argument("--gpus", type=int, default=None, help="GPUs (ranks) per machine (default: detected, >= 1)")
    p.add_argument("--ram", type=float, default=None, help="host RAM in GiB (default: detected)")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--variant", choices=["fc", "fbc"], default="fc")
    p.add_argument("--consistency", choices=["on", "off"], default="on")
    p.add_argument("--size", choices=["full", "tiny"], default="full")
    p.add_argument("--optimizer", choices=["auto", *sorted(OPTIMIZER_STATE_BYTES)], default="auto",
                   help="train.optimizer (auto, where RAM allows: cpu_adam for configs that offload the optimizer, "
                        "adamw on a CPU-only machine; else adamw8bit)")
    p.add_argument("--checkpointing", choices=["auto", "on", "off"], default="auto",
                   help="model.gradient_checkpointing (auto: on for the full UNet, off for the tiny one)")
    p.add_argument("--lora-rank", type=int, default=0, help="model.lora_rank (default 0: a full fine-tune)")
    nvme = p.add_mutually_exclusive_group()
    nvme.add_argument("--nvme-path", default=None, help="train.nvme_path: its free space decides the NVMe configs")
    nvme.add_argument("--nvme-gib", type=float, default=None, help="free GiB on an NVMe SSD (instead of --nvme-path)")
    p.add_argument("--grid", action="store_true",
                   help="the consumer grid: 6-24 GB GPUs x 16/32/64 GB RAM (and 2 x 12 GB), an NVMe SSD with "
                        f"{GRID_NVME_GIB:.0f} GiB free; a full fine-tune where one fits, else LoRA rank "
                        f"{GRID_LORA_RANK}")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    checkpointing = {"on": True, "off": False}.get(args.checkpointing, "auto")
    if args.grid:
        work = Workload(args.resolution, args.variant, args.consistency == "on", args.size, args.optimizer,
                        checkpointing, args.lora_rank)
        cells = grid(work)
        print(json.dumps([asdict(c) for c in cells], indent=1) if args.json else grid_table(cells))
        return 0 if all(c.config != "nothing fits" for c in cells) else 1
    found = detect()
    gpu_mem = args.gpu_mem if args.gpu_mem is not None else found["gpu_mem_gib"]
    gpus = args.gpus or max(1, found["gpus"])
    ram = args.ram or found["ram_gib"]
    nvme_gib = args.nvme_gib
    if args.nvme_path is not None:
        nvme_gib = shutil.disk_usage(args.nvme_path).free / GiB
    estimates, choice = plan(gpu_mem_gib=gpu_mem, gpus=gpus, ram_gib=ram, resolution=args.resolution,
                             variant=args.variant, consistency=args.consistency == "on", size=args.size,
                             optimizer=args.optimizer, checkpointing=checkpointing, lora_rank=args.lora_rank,
                             nvme_gib=nvme_gib)
    if args.json:
        print(json.dumps({"choice": choice, "estimates": [asdict(e) for e in estimates]}, indent=1))
        return 0
    where = f"{gpus} x {gpu_mem:.0f} GiB GPU" if gpu_mem else f"CPU only, {gpus} rank(s)"
    lora = f", LoRA rank {args.lora_rank}" if args.lora_rank else ""
    print(f"machine: {where}, {ram:.0f} GiB RAM; {args.size} UNet {args.variant}{lora}, {args.resolution} px, "
          f"consistency {args.consistency}, {args.optimizer}")
    print(f"{'config':<16}{'stage':>6} {'offload':<27}{'micro':>6} {'optimizer':<10}{'GPU GiB/rank':>13}"
          f"{'host GiB/rank':>15}{'SSD GiB/rank':>14}  verdict")
    for e in estimates:
        print(f"{e.config:<16}{e.stage:>6} {e.offload:<27}{e.micro_batch:>6} {e.optimizer:<10}{e.device_gib:>13.2f}"
              f"{e.host_gib:>15.2f}{e.disk_gib:>14.1f}  {e.why}")
    print(f"choice: {choice or 'nothing fits'}")
    return 0 if choice else 1


if __name__ == "__main__":
    raise SystemExit(main())

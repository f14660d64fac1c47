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
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from unittest import mock

import psutil
import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor2_0

from ..model.arch import ARCHS, wants_checkpointing
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
SPEED_ORDER = ["1gpu-24gb", "multi-gpu", "zero2", "zero3", "1gpu-12gb", "1gpu-8gb", "zero2_offload", "1gpu-6gb",
               "zero3_offload", "cpu-1rank", "cpu", "cpu-zero3"]
# configs the planner never picks: they are named where they belong
BY_NAME_ONLY = {"multi-node": "for several machines (pick it by name with --hostfile)",
                "default-gpu": "the tiny GPU default run's (iclight_ds/train/presets/default-gpu.yaml)"}
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


def unet_parameters(size: str, in_channels: int) -> int:


    with torch.device("meta"):
        unet = UNet2DConditionModel(**dict(ARCHS[size][0], in_channels=in_channels))
    return sum(p.numel() for p in unet.parameters())


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


def activation_bytes(size: str, in_channels: int, resolution: int, tokens: int = 81,
                     checkpointing: bool = True) -> float:
    """Bytes one sample's activations need (bf16), with or without gradient checkpointing, measured on the meta
    device."""
    with mock.patch.object(F, "scaled_dot_product_attention", _flash_like_sdpa):
        return _measure_saved(UNet2DConditionModel, AttnProcessor2_0, dict(ARCHS[size][0], in_channels=in_channels),
                              resolution, tokens, checkpointing)


def activations_per_sample(size: str, in_channels: int, resolution: int, params: int, *,
                           checkpointing: str | bool, consistency: bool) -> float:
    """Bytes of activations per sample of a micro-batch: the UNet's (`params` parameters; with gradient checkpointing
    as model.gradient_checkpointing resolves for it), times its rows (3 with the consistency objective)."""
    per_row = activation_bytes(size, in_channels, resolution, checkpointing=wants_checkpointing(checkpointing, params))
    return per_row * (3 if consistency else 1)


def _measure_saved(UNet2DConditionModel, AttnProcessor2_0, spec: dict, resolution: int, tokens: int,
                   checkpointing: bool) -> float:
    in_channels = spec["in_channels"]

    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec).to(torch.bfloat16)
    unet.set_attn_processor(AttnProcessor2_0())
    unet.train()
    saved = [0]
    per_block: dict[int, int] = {}
    weights = {id(p) for p in unet.parameters()}

    def pack(t):
        if id(t) not in weights and id(t._base) not in weights:  # weights are model states, counted elsewhere
            saved[0] += t.numel() * t.element_size()
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
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        unet(x, torch.zeros(1, device="meta", dtype=torch.long), text)
    return saved[0] + min(full, largest)


def model_state_bytes(params: int, ds_cfg: dict, world: int, optimizer: str,
                      pinned: bool = False) -> tuple[float, float]:
    """(device, host) bytes per rank for weights, gradients, fp32 master and optimizer states.

    `optimizer`: a train.optimizer value; auto is resolved for this config (engine.resolve_optimizer).
    `pinned`: the accelerator is a GPU, so offloaded buffers with pin_memory pay the pinned allocator's rounding."""
    optimizer = eng.resolve_optimizer(optimizer, ds_cfg, on_gpu=pinned)
    stage = eng.zero_stage(ds_cfg)
    zero = ds_cfg.get("zero_optimization", {})
    off_opt = eng.offloads_optimizer(ds_cfg)
    off_param = zero.get("offload_param", {}).get("device", "none") not in (None, "none")
    roundup = lambda key: PINNED_ROUNDUP if pinned and zero.get(key, {}).get("pin_memory") else 1.0  # noqa: E731
    half = 2 if eng.training_dtype(ds_cfg) != torch.float32 else 4
    shard = lambda n: n / world if world > 1 else n  # noqa: E731
    weights = half * (shard(params) if stage == 3 else params)
    grads = half * (shard(params) if stage >= 2 else params)
    if stage == 0 and half == 2:
        # the precision wrapper's step builds an fp32 copy of every gradient while the bf16 ones are still held
        # (measured, full UNet on 1 CPU rank: 13.1 GiB peak; counting only the fp32 copy said 11.1)
        grads = (half + 4) * params
    buckets = half * min(params, float(zero.get("reduce_bucket_size", 5e8))) if stage >= 2 else 0.0
    if stage == 3:
        buckets += half * min(params, float(zero.get("stage3_prefetch_bucket_size", 5e7)))
    master = (4 * shard(params) if stage >= 1 else 4 * params) if half == 2 else 0
    states = OPTIMIZER_STATE_BYTES[optimizer] * (shard(params) if stage >= 1 else params)
    device = host = 0.0
    device += 0 if off_param else weights
    host += weights * roundup("offload_param") if off_param else 0
    device += grads + buckets
    if off_opt:
        # offload keeps an fp32 copy of the gradient partition on the host too (measured on an H200: 3.2 GiB of
        # fp32 gradients for the full UNet with 1gpu-8gb.json) and, at ZeRO-1/2, a bf16 buffer for the weights'
        # way back to the GPU; the optimizer's own states are not pinned
        copy_back = half * shard(params) if stage < 3 else 0
        host += states + (master + 4 * shard(params) + copy_back) * roundup("offload_optimizer")
    else:
        device += master + states
    return device, host


def optimizer_for(optimizer: str, params: int, ds_cfg: dict, *, world: int, ranks_here: int, ram_gib: float,
                  on_gpu: bool, activations: float = 0.0) -> str:
    """train.optimizer as it will run with this config on this machine: auto is a fast fp32 optimizer where its step
    runs on the host (DeepSpeed's CPU Adam with offload, torch's AdamW on a CPU-only machine; engine.resolve_optimizer)
    unless its moments (6 bytes per parameter more than 8-bit states) would not fit this machine's RAM with the
    planner's headroom; then 8-bit AdamW, slower on the host but 2 bytes. `activations`: bytes per rank of a CPU-only
    machine's activations, which share that RAM."""
    name = eng.resolve_optimizer(optimizer, ds_cfg, on_gpu=on_gpu)
    if optimizer != "auto" or name == "adamw8bit":
        return name
    device, host = model_state_bytes(params, ds_cfg, world, name, pinned=on_gpu)
    if not on_gpu:  # everything lives in host RAM
        host += device + activations
    host += HOST_BASE if on_gpu else HOST_BASE_CPU
    return name if host * ranks_here <= HEADROOM * ram_gib * GiB else "adamw8bit"


def plan(*, gpu_mem_gib: float | None, gpus: int, ram_gib: float, resolution: int, variant: str,
         consistency: bool, size: str = "full", optimizer: str = "auto",
         checkpointing: str | bool = "auto") -> tuple[list[Estimate], str | None]:
    """`checkpointing`: model.gradient_checkpointing (auto: on for the full UNet, off for the tiny one)."""
    in_channels = 8 if variant == "fc" else 12
    params = unet_parameters(size, in_channels)
    per_sample = activations_per_sample(size, in_channels, resolution, params, checkpointing=checkpointing,
                                        consistency=consistency)
    estimates = []
    on_cpu = gpu_mem_gib is None
    for path in sorted(eng.REPO_DS_CONFIGS.glob("*.json")):
        ds_cfg = eng.read_ds_config(path)
        micro = int(ds_cfg["train_micro_batch_size_per_gpu"])
        activations = per_sample * micro
        opt = optimizer_for(optimizer, params, ds_cfg, world=gpus, ranks_here=gpus, ram_gib=ram_gib, on_gpu=not on_cpu,
                            activations=activations)
        device, host = model_state_bytes(params, ds_cfg, gpus, opt, pinned=not on_cpu)
        zero = ds_cfg.get("zero_optimization", {})
        offload = "+".join(k.split("_")[1] for k in ("offload_param", "offload_optimizer")
                           if zero.get(k, {}).get("device", "none") not in (None, "none")) or "none"
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
        cpu_config = path.stem.startswith("cpu")
        if on_cpu != cpu_config:
            reasons.append("for CPU-only machines" if cpu_config else "needs a GPU")
        if path.stem.endswith(ONE_RANK_SUFFIX) and gpus > 1:
            reasons.append("for one rank (with several, ZeRO-2 splits the optimizer step)")
        if path.stem in BY_NAME_ONLY:
            reasons.append(BY_NAME_ONLY[path.stem])
        estimates.append(Estimate(path.stem, eng.zero_stage(ds_cfg), offload, micro, device / GiB, host / GiB,
                                  not reasons, "; ".join(reasons) or "fits", opt))
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


def detect() -> dict:
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    gpu_mem = torch.cuda.get_device_properties(0).total_memory / GiB if gpus else None
    return {"gpus": gpus, "gpu_mem_gib": gpu_mem, "ram_gib": psutil.virtual_memory().total / GiB}


def choose_config(resolution: int, variant: str, consistency: bool, size: str, optimizer: str,
                  ranks: int | None = None, checkpointing: str | bool = "auto") -> Path:
    """What `--ds-config auto` uses: the planner's choice for this machine with `ranks` processes on it (default:
    one per detected GPU, at least one). CPU ranks are not detected, so the trainer passes its own count."""
    found = detect()
    _, choice = plan(gpu_mem_gib=found["gpu_mem_gib"], gpus=ranks or max(1, found["gpus"]), ram_gib=found["ram_gib"],
                     resolution=resolution, variant=variant, consistency=consistency, size=size,
                     optimizer=optimizer, checkpointing=checkpointing)
    if choice is None:
        raise eng.EngineConfigError(
            f"no shipped DeepSpeed config fits this machine at {resolution} px ({size} model); "
            "see `python -m iclight_ds.plan` for the numbers"
        )
    return eng.REPO_DS_CONFIGS / f"{choice}.json"


def main(argv: list[str] | None = None) -> int:
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
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = p.parse_args(argv)
    found = detect()
    gpu_mem = args.gpu_mem if args.gpu_mem is not None else found["gpu_mem_gib"]
    gpus = args.gpus or max(1, found["gpus"])
    ram = args.ram or found["ram_gib"]
    estimates, choice = plan(gpu_mem_gib=gpu_mem, gpus=gpus, ram_gib=ram, resolution=args.resolution,
                             variant=args.variant, consistency=args.consistency == "on", size=args.size,
                             optimizer=args.optimizer,
                             checkpointing={"on": True, "off": False}.get(args.checkpointing, "auto"))
    if args.json:
        print(json.dumps({"choice": choice, "estimates": [asdict(e) for e in estimates]}, indent=1))
        return 0
    where = f"{gpus} x {gpu_mem:.0f} GiB GPU" if gpu_mem else f"CPU only, {gpus} rank(s)"
    print(f"machine: {where}, {ram:.0f} GiB RAM; {args.size} UNet {args.variant}, {args.resolution} px, "
          f"consistency {args.consistency}, {args.optimizer}")
    print(f"{'config':<16}{'stage':>6} {'offload':<16}{'micro':>6} {'optimizer':<10}{'GPU GiB/rank':>13}"
          f"{'host GiB/rank':>15}  verdict")
    for e in estimates:
        print(f"{e.config:<16}{e.stage:>6} {e.offload:<16}{e.micro_batch:>6} {e.optimizer:<10}{e.device_gib:>13.2f}"
              f"{e.host_gib:>15.2f}  {e.why}")
    print(f"choice: {choice or 'nothing fits'}")
    return 0 if choice else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""Run resolution: config + machine + checkpoint -> one resolved-run record.

Every `auto` of a run (the DeepSpeed config, the optimizer, gradient checkpointing, the frozen encoders' dtype) is
decided here, once, on rank 0, and broadcast, so that every rank and node builds the same thing. A resumed run takes
what its checkpoint recorded. The record is saved in the run folder and beside every checkpoint (RESOLVED_FILE), and
the run's saved config.json shows what `auto` became.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from ..config import RESOLVED_FILE, ConfigError, RunConfig, to_dict, trains_consistency
from ..dtypes import DTYPES, dtype_name
from ..model.arch import wants_checkpointing
from ..model.base import base_unet_size
from . import checkpoint as ckpt
from . import engine as eng
from .checks import check_compile, check_nvme_folder, check_offload_ram, check_optimizer, check_precision
from .plan import (
    GiB,
    activations_per_sample,
    choose_config,
    model_state_bytes,
    nvme_bytes,
    optimizer_for,
    parameter_counts,
    unet_parameters,
)

log = logging.getLogger("iclight_ds")

# What a resume may not change (the weights may load, but the run would go on as something else); data.synth_* only
# for runs on synthetic data
RESUME_FIXED_KEYS = ("model.size", "model.base", "model.variant", "model.light_input", "model.vae",
                     "model.iclight_weights", "model.env_tokens", "model.env_shape", "model.merger_hidden",
                     "model.merger_layers", "model.merger_init", "data.resolution", "data.buckets",
                     "data.synth_samples", "data.synth_seed", "data.synth_target_shift", "train.precision",
                     "model.lora_rank", "model.lora_alpha", "model.lora_targets")


@dataclass
class ResolvedRun:
    """What a run is, with every `auto` decided. Saved as RESOLVED_FILE; `from_dict(to_dict())` round-trips."""

    ds_config: str  # path of the DeepSpeed JSON the run trains with
    ds: dict  # its contents (comment keys dropped; train.precision applied): micro-batch, accumulation, precision,
    # ZeRO stage, offload
    world_size: int
    micro_batch: int
    accumulation: int
    effective_batch: int  # micro_batch x accumulation x world_size
    dtype: str  # training dtype, from the DeepSpeed JSON: bf16 / fp16 / fp32
    frozen_dtype: str  # the frozen VAE's and text encoder's
    zero_stage: int
    optimizer: str  # adamw8bit / adamw / cpu_adam
    plan_size: str  # the UNet size the planner counted: the base's own, else model.size
    gradient_checkpointing: bool
    attention: str = "auto"  # the kernel actually used (xformers / sdpa), set when the UNet is built
    nvme_swap: str | None = None  # NVMe offload: the folder this run swaps into (under train.nvme_path)
    preset: str | None = None  # the default run's preset file (CPU or GPU), when the run took it

    @property
    def geometry(self) -> eng.BatchGeometry:
        return eng.BatchGeometry(self.micro_batch, self.accumulation, self.world_size)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def torch_frozen_dtype(self) -> torch.dtype:
        return DTYPES[self.frozen_dtype]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, record: dict) -> "ResolvedRun":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in record.items() if k in names})

    def config(self, cfg: RunConfig) -> RunConfig:
        """`cfg` with its `auto` values replaced by what they became: the config a run saves."""
        out = copy.deepcopy(cfg)
        out.train.ds_config, out.train.optimizer = self.ds_config, self.optimizer
        out.model.gradient_checkpointing, out.model.frozen_dtype = self.gradient_checkpointing, self.frozen_dtype
        if self.attention != "auto":
            out.model.attention = self.attention
        return out

    def save(self, folder: Path) -> None:
        tmp = folder / (RESOLVED_FILE + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, folder / RESOLVED_FILE)


def resume_folder(cfg: RunConfig) -> Path:
    root, tag = ckpt.resolve(cfg.train.resume, Path(cfg.train.output_dir) / "checkpoints")
    return root / tag


def ranks_here(world_size: int) -> int:
    """Ranks on this machine: the deepspeed launcher says LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE."""
    return int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or world_size)


def resolve_run(cfg: RunConfig, acc: eng.Accelerator, *, preset: str | None = None) -> ResolvedRun:
    """Collective: rank 0 decides the record and broadcasts it (or the error that stopped it) to every rank."""
    result, error = None, None
    if acc.rank == 0:
        try:
            result = _Resolver(cfg, acc).resolve(preset).to_dict()
        except Exception as e:  # every rank raises it, instead of the others waiting for a broadcast forever
            error = e
    box = [result, error]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise box[1]
    return ResolvedRun.from_dict(box[0])


class _Resolver:
    """The decisions of `resolve_run`, on rank 0."""

    def __init__(self, cfg: RunConfig, acc: eng.Accelerator):
        self.cfg, self.acc = cfg, acc
        self.on_gpu = acc.name == "cuda"
        self.ranks_here = ranks_here(acc.world_size)
        self.resumed: dict = {}  # the checkpoint's resolved record
        self.resumed_config: dict = {}  # and its config.json
        if cfg.train.resume:
            folder = resume_folder(cfg)
            self.resumed = ckpt.read_resolved(folder)
            self.resumed_config = _read_json(folder / "config.json")
            check_resume_config(cfg, self.resumed_config, folder / "config.json")

    def resolve(self, preset: str | None) -> ResolvedRun:
        cfg = self.cfg
        self.plan_size = planning_size(cfg)
        if cfg.train.ds_config != "auto":
            self.ds_path = eng.resolve_ds_config_path(cfg.train.ds_config)
        else:
            self.ds_path = self._recorded_ds_config() or self._planned_ds_config()
        self.ds_cfg = eng.with_precision(eng.read_ds_config(self.ds_path), cfg.train.precision)
        nvme_swap = self._nvme_swap()
        geometry = eng.batch_geometry(self.ds_cfg, self.acc.world_size)
        dtype = dtype_name(eng.training_dtype(self.ds_cfg))
        params = unet_parameters(self.plan_size, cfg.model.in_channels)
        return ResolvedRun(
            ds_config=str(self.ds_path), ds=self.ds_cfg, world_size=geometry.world_size,
            micro_batch=geometry.micro_batch, accumulation=geometry.accumulation,
            effective_batch=geometry.effective_batch, dtype=dtype,
            frozen_dtype=dtype if cfg.model.frozen_dtype == "auto" else cfg.model.frozen_dtype,
            zero_stage=eng.zero_stage(self.ds_cfg), optimizer=self._optimizer(geometry.micro_batch),
            plan_size=self.plan_size, gradient_checkpointing=wants_checkpointing(cfg.model.gradient_checkpointing,
                                                                                 params),
            preset=preset, nvme_swap=nvme_swap)

    def _nvme_swap(self) -> str | None:
        """NVMe offload: the run's own swap folder under train.nvme_path (else under the config's nvme_path), one per
        run folder, so that two runs on one SSD never share swap files; it goes into the config's nvme_path."""
        paths = eng.nvme_paths(self.ds_cfg)
        if not paths:
            return None
        root = self.cfg.train.nvme_path or next(iter(paths.values()))
        if root is None:
            return None  # check_run names the missing path
        tag = hashlib.sha1(str(Path(self.cfg.train.output_dir).resolve()).encode()).hexdigest()[:12]
        swap = str(Path(root) / f"iclight-ds-swap-{tag}")
        self.ds_cfg = eng.with_nvme_path(self.ds_cfg, swap)
        return swap

    def _planned_ds_config(self) -> Path:
        cfg = self.cfg
        nvme = cfg.train.nvme_path
        nvme_gib = shutil.disk_usage(nvme).free / GiB if nvme and Path(nvme).is_dir() else None
        choice = choose_config(cfg.data.resolution, cfg.model.variant, trains_consistency(cfg),
                               self.plan_size, cfg.train.optimizer, ranks=self.ranks_here,
                               checkpointing=cfg.model.gradient_checkpointing, lora_rank=cfg.model.lora_rank,
                               nvme_gib=nvme_gib)
        log.info("train.ds_config=auto: the planner chose %s", choice)
        return Path(choice)

    def _recorded_ds_config(self) -> Path | None:
        """train.ds_config=auto on resume: the config the checkpoint was trained with (the planner could answer
        differently on another machine, and exact resume needs the same batch geometry and ZeRO stage)."""
        saved = self.resumed.get("ds_config")
        if saved is None:
            return None
        for path in (Path(saved), eng.REPO_DS_CONFIGS / Path(saved).name):  # the repo may have moved
            if path.is_file():
                log.info("train.ds_config=auto: %s, as recorded in the checkpoint being resumed", path)
                return path
        raise FileNotFoundError(f"the checkpoint being resumed was trained with {saved}, which no longer exists; "
                                "pass that DeepSpeed config with --ds-config")

    def _optimizer(self, micro_batch: int) -> str:
        """train.optimizer as plan.optimizer_for resolves it for this config and machine (where the step runs on the
        host, the RAM decides). A resumed run builds the optimizer its checkpoint was written with (its states are
        that optimizer's)."""
        cfg = self.cfg
        saved = self.resumed.get("optimizer")
        if saved is None and cfg.train.resume and cfg.train.optimizer == "auto":
            saved = self._older_checkpoint_optimizer()
        if saved is not None:
            if cfg.train.optimizer not in ("auto", saved):
                raise eng.EngineConfigError(
                    f"train.optimizer={cfg.train.optimizer}, but the checkpoint being resumed ({cfg.train.resume}) "
                    f"holds {saved} states; resume with train.optimizer={saved} (or auto)")
            log.info("train.optimizer: %s, as recorded in the checkpoint being resumed", saved)
            return saved
        params, frozen = trained_parameters(cfg, self.plan_size)
        activations = 0.0  # on a GPU they live in device memory, not in the RAM this decides on
        if cfg.train.optimizer == "auto" and not self.on_gpu:
            activations = micro_batch * activations_per_sample(
                self.plan_size, cfg.model.in_channels, cfg.data.resolution, params + frozen,
                checkpointing=cfg.model.gradient_checkpointing, consistency=trains_consistency(cfg),
                lora_rank=cfg.model.lora_rank)
        name = optimizer_for(cfg.train.optimizer, params, self.ds_cfg, world=self.acc.world_size,
                             ranks_here=self.ranks_here, ram_gib=psutil.virtual_memory().total / GiB,
                             on_gpu=self.on_gpu, activations=activations, frozen=frozen)
        wanted = eng.resolve_optimizer(cfg.train.optimizer, self.ds_cfg, on_gpu=self.on_gpu)
        if name != wanted:
            log.warning("train.optimizer=auto: %s's fp32 moments would not fit this machine's RAM with %s; using %s "
                        "(8-bit states, a slower step on the host)", wanted, self.ds_path, name)
        return name

    def _older_checkpoint_optimizer(self) -> str:
        """The optimizer of a checkpoint written without a resolved record: its config's train.optimizer, with `auto`
        as it resolved then (CPU Adam where the optimizer was offloaded, else AdamW8bit, on a CPU too)."""
        named = self.resumed_config.get("train", {}).get("optimizer", "adamw8bit")
        if named != "auto":
            return named
        return "cpu_adam" if eng.offloads_optimizer(self.ds_cfg) else "adamw8bit"


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ckpt.CheckpointError(f"{path}: unreadable ({e}); it records the run this checkpoint continues (its "
                                   "model, data and optimizer)") from e


def check_resume_config(cfg: RunConfig, saved: dict, path: Path) -> None:
    """Refuse to resume a checkpoint into another model or another synthetic set (e.g. a GPU default run resumed
    with the plain defaults, or back), naming the keys that differ and the --config that resumes it as it was."""
    now = json.loads(json.dumps(to_dict(cfg)))
    check_resume_lora(now["model"].get("lora_rank", 0), saved.get("model", {}).get("lora_rank", 0), cfg.train.resume,
                      path)
    differ = []
    for key in RESUME_FIXED_KEYS:
        section, name = key.split(".")
        if section == "data" and name.startswith("synth") and now["data"]["path"] is not None:
            continue
        if name in saved.get(section, {}) and saved[section][name] != now[section][name]:
            differ.append(f"{key}={saved[section][name]!r} there, {now[section][name]!r} here")
    if differ:
        raise ConfigError(f"--resume {cfg.train.resume}: {path} was trained with another setup: "
                          + "; ".join(differ) + f". Resume it with its own config: --config {path} (plus the "
                          "overrides you want, e.g. --train.resume latest --train.steps N)")


def check_resume_lora(rank_now: int, rank_saved: int, resume: str, path: Path) -> None:
    """A LoRA checkpoint resumed as a full fine-tune, or the reverse, is refused by name (a checkpoint written before
    LoRA existed is a full fine-tune)."""
    if bool(rank_now) == bool(rank_saved):
        return
    if rank_saved:
        raise ConfigError(f"--resume {resume}: {path} is a LoRA checkpoint (model.lora_rank={rank_saved}) resumed as a "
                          "full fine-tune (model.lora_rank=0): its optimizer holds the LoRA layers' states only. "
                          f"Resume it with --model.lora_rank {rank_saved}, or train the full fine-tune as a new run "
                          "(another train.output_dir)")
    raise ConfigError(f"--resume {resume}: {path} is a full fine-tune checkpoint (model.lora_rank=0) resumed as a LoRA "
                      f"(model.lora_rank={rank_now}): it has no LoRA layers to continue. Resume it with "
                      "--model.lora_rank 0, or train the LoRA as a new run (another train.output_dir)")


def planning_size(cfg: RunConfig) -> str:
    """The UNet size the planner counts (train.ds_config=auto, train.optimizer=auto, the offload RAM check): the
    base's own, read from its config before its weights are loaded, else model.size."""
    size = cfg.model.size
    if cfg.model.base:
        found = base_unet_size(cfg.model.base)
        if found is not None and found != size:
            log.info("model.base %s has a %s UNet: planning for that, not model.size=%s", cfg.model.base, found, size)
        size = found or size
    return size


def check_run(run: ResolvedRun, cfg: RunConfig, acc: eng.Accelerator) -> None:
    """On every rank: can this machine train the resolved run? (precision, optimizer, EMA, host RAM under offload)"""
    if cfg.train.ema_decay and run.zero_stage == 3:
        raise ConfigError(f"train.ema_decay={cfg.train.ema_decay} with ZeRO-3 ({run.ds_config}): the EMA would need "
                          "every rank's whole weights, which ZeRO-3 partitions; use a ZeRO-2 config (with offload "
                          "for memory) or train.ema_decay=0")
    check_precision(acc.name, run.torch_dtype, bf16_ok=acc.bf16, fp16_ok=acc.fp16, ds_path=run.ds_config)
    if cfg.model.compile:
        check_compile(cfg.model.compile_backend, accelerator=acc.name)
    check_optimizer(run.optimizer, accelerator=acc.name, stage=run.zero_stage,
                    offload_optimizer=eng.offloads_optimizer(run.ds), ds_path=run.ds_config)
    zero = run.ds.get("zero_optimization", {})
    params, frozen = trained_parameters(cfg, run.plan_size)
    if any(eng.offload_device(zero, k) != "none" for k in ("offload_optimizer", "offload_param")):
        _, host = model_state_bytes(params, run.ds, acc.world_size, run.optimizer, pinned=acc.name == "cuda",
                                    frozen=frozen)
        check_offload_ram(needed_gib=host / GiB, ranks_here=ranks_here(acc.world_size),
                          ram_gib=psutil.virtual_memory().total / GiB, ds_path=run.ds_config)
    if eng.nvme_paths(run.ds):
        _check_nvme(run, cfg, acc, nvme_bytes(params, run.ds, acc.world_size, run.optimizer, frozen=frozen))
    if acc.name == "cpu" and run.zero_stage == 3 and eng.pin_malloc_mmap_threshold():
        log.info("glibc malloc: mmap threshold pinned at %d KiB for ZeRO-3 on CPU (see engine.py)",
                 eng.MALLOC_MMAP_THRESHOLD // 1024)


def _check_nvme(run: ResolvedRun, cfg: RunConfig, acc: eng.Accelerator, needed: float) -> None:
    """The NVMe folder (train.nvme_path, else the config's nvme_path) and DeepSpeed's async_io op, before step 1."""
    root = cfg.train.nvme_path
    key = "train.nvme_path"
    if root is None:
        section, root = next(iter(eng.nvme_paths(eng.read_ds_config(run.ds_config)).items()))
        key = f"{run.ds_config}: zero_optimization.{section}.nvme_path"
    check_nvme_folder(root, key=key, needed_gib=needed / GiB, ranks_here=ranks_here(acc.world_size),
                      aio_problem=eng.aio_problem(), ds_path=run.ds_config)


def trained_parameters(cfg: RunConfig, size: str) -> tuple[int, int]:
    """(trainable, frozen) UNet parameters of the run, as the planner counts them (LoRA: its layers + conv_in)."""
    return parameter_counts(size, cfg.model.in_channels, cfg.model.lora_rank, tuple(cfg.model.lora_targets))


def warn_if_unusual(cfg: RunConfig, run: ResolvedRun) -> None:
    """A full-size UNet (a real SD1.5 base) trained with the tiny default run's resolution or LR: say so."""
    if run.plan_size != "full":
        return
    if cfg.data.resolution < 256:
        log.warning("a full-size UNet at data.resolution=%d: SD1.5 is trained at 512 px (set --data.resolution 512)",
                    cfg.data.resolution)
    if cfg.train.lr > 1e-4:
        log.warning("a full-size UNet with train.lr=%g: fine-tuning SD1.5 wants about 1e-5 (set --train.lr 1e-5); "
                    "the default is the tiny default run's", cfg.train.lr)

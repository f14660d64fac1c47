"""The builders of a run, from its config and resolved record: the base, the dataset (and the trainer's own synthetic
scenes), the frozen encoders, the trainable model with its optimizer and LR schedule, inside DeepSpeed's engine."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_with_min_lr_schedule_with_warmup,
)

from ..config import AUTO_CACHE_DIR, RunConfig, builds_frozen_encoders, encodes_once
from ..data.cache import CachedDataset, FrozenModels, build_cache, frozen_identity, run_expectations
from ..data.dataset import MANIFEST, DatasetError, RelightDataset
from ..data.synth import generate, target_shift_of
from ..data.validate import validate_dataset
from ..dtypes import dtype_name
from ..model.arch import (
    compile_unet,
    configure_attention,
    count_parameters,
    freeze,
    unet_size_of,
    use_channels_last,
)
from ..model.base import BaseModel, load_base, load_iclight_offset
from ..model.formats import BASE_RECORD
from ..model.frozen import build_frozen
from ..model.iclight import build_initial_model
from ..model.lora import add_lora
from ..model.tokenizer import build_char_tokenizer
from . import engine as eng
from .checks import check_module_devices
from .plan import unet_parameters
from .resolve import ResolvedRun

log = logging.getLogger("iclight_ds")

# The trainer renders a synthetic set with one process per this many scenes (up to the cores and 16)
SCENES_PER_RENDER_PROCESS = 1024
# The LR after warm-up decays (cosine) to this share of the peak at train.steps
MIN_LR_RATE = 0.1


def load_run_base(cfg: RunConfig, run: ResolvedRun, out_dir: Path, *, is_main: bool) -> BaseModel | None:
    """model.base: real SD1.5 weights (offline), optionally with IC-Light offsets added; None: random models."""
    model_cfg = cfg.model
    if not model_cfg.base:
        return None
    # fp32 first: offsets are added at full precision, then everything goes to the training dtype
    base = load_base(model_cfg.base, tokenizer_fallback=model_cfg.tokenizer, dtype=torch.float32,
                     unet_only=not builds_frozen_encoders(cfg))
    if model_cfg.iclight_weights:
        load_iclight_offset(base.unet, model_cfg.iclight_weights)
        log.info("added IC-Light offsets %s to the base", model_cfg.iclight_weights)
    base.unet.to(run.torch_dtype)
    if is_main:
        record = {"base": model_cfg.base, "source": base.source, "unet_hash": base.unet_hash,
                  "iclight_weights": model_cfg.iclight_weights}
        (out_dir / BASE_RECORD).write_text(json.dumps(record, indent=2) + "\n")
    return base


def build_dataset(cfg: RunConfig, run: ResolvedRun, out_dir: Path, tokenizer, *, is_main: bool):
    """The training set: a latent cache, the user's dataset folder (validated first), or the trainer's own synthetic
    scenes. Collective (a barrier after rank 0 writes or checks). `tokenizer` is None for a cache."""
    data_cfg, model_cfg = cfg.data, cfg.model
    if data_cfg.cache and not encodes_once(cfg):  # made by `python -m iclight_ds.cache`, checked against this run
        return CachedDataset(data_cfg.cache, run_expectations(cfg, run.torch_dtype))
    root = data_root(cfg, out_dir)
    if data_cfg.path is None and is_main:
        make_synthetic(root, data_cfg.synth_samples, seed=data_cfg.synth_seed, resolution=data_cfg.resolution,
                       env_shape=model_cfg.env_shape, target_shift=data_cfg.synth_target_shift)
    if data_cfg.validate and data_cfg.path is not None and is_main:
        check_dataset(root, cfg)
    eng.barrier()
    return RelightDataset(root, data_cfg.resolution, tokenizer, env_shape=model_cfg.env_shape,
                          require_background=model_cfg.variant == "fbc", require_env=model_cfg.env_input,
                          skip_bad=data_cfg.skip_bad, buckets=data_cfg.buckets)


def data_root(cfg: RunConfig, out_dir: Path) -> Path:
    """The folder of the training set's images: data.path, or the trainer's own synthetic scenes."""
    return Path(cfg.data.path) if cfg.data.path else out_dir / "data"


# FBC with the consistency term from data.cache=auto: light splits cached per sample (python -m iclight_ds.cache's
# --split-variants default)
AUTO_SPLIT_VARIANTS = 4


def encode_once(cfg: RunConfig, run: ResolvedRun, out_dir: Path, device: torch.device, frozen: FrozenModels | None,
                *, is_main: bool) -> CachedDataset:
    """data.cache=auto: rank 0 encodes the training set into <output_dir>/latent_cache with the run's own frozen
    encoders (`frozen`, rank 0's: what `python -m iclight_ds.cache` writes for this run; a complete one from an
    earlier launch is checked and reused), then every rank reads it. Collective."""
    cache_dir = out_dir / AUTO_CACHE_DIR
    if is_main:
        frozen_dtype = dtype_name(run.torch_frozen_dtype)
        fbc_splits = cfg.model.variant == "fbc" and cfg.objective.lambda_consistency > 0
        stats = build_cache(
            data_root(cfg, out_dir), cache_dir, base=cfg.model.base, size=cfg.model.size, vae=cfg.model.vae,
            seed=cfg.train.seed, frozen_dtype=frozen_dtype, variant=cfg.model.variant,
            light_input=cfg.model.light_input, resolution=cfg.data.resolution, env_shape=tuple(cfg.model.env_shape),
            split_variants=AUTO_SPLIT_VARIANTS if fbc_splits else 0, split_cells=cfg.objective.split_cells,
            dtype=frozen_dtype, batch_size=run.geometry.micro_batch, num_workers=cfg.data.num_workers,
            device=str(device), validate=False,  # data.path was validated as the dataset was built
            progress=cfg.logging.progress, frozen=frozen)
        log.info("latent cache %s: %d samples encoded in %.1f s (%d shard(s) already complete)", cache_dir,
                 stats["samples"], stats["encode_s"] + stats["build_s"], stats["skipped_shards"])
    eng.barrier()
    return CachedDataset(cache_dir, run_expectations(cfg, run.torch_dtype))


def run_tokenizer(cfg: RunConfig, base: BaseModel | None):
    """The base's tokenizer, the char tokenizer of the random models, or None for a latent cache made beforehand
    (no text)."""
    if not builds_frozen_encoders(cfg):
        return None
    return base.tokenizer if base is not None else build_char_tokenizer()


def make_synthetic(root: Path, n: int, *, seed: int, resolution: int, env_shape: tuple[int, int],
                   target_shift: float = 0.0) -> None:
    """Write `n` synthetic scenes into `root` unless it holds them already (rank 0; callers barrier after).

    The folder is the trainer's own: one holding another number of scenes or another target shift (a run folder
    reused with another data.synth_samples or data.synth_target_shift) is rewritten; scene i depends only on
    (seed, i), so the common ones stay the same."""
    manifest = root / MANIFEST
    if manifest.is_file():
        held = sum(1 for line in manifest.read_text().splitlines() if line.strip())
        if held == n and target_shift_of(root) == target_shift:
            return
        log.info("%s holds %d synthetic scenes with target shift %g, not %d with %g: writing them again", root, held,
                 target_shift_of(root), n, target_shift)
    # ~50 scenes/s per process at 64 px; a pool's start costs seconds, so only large sets get one
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    workers = min(cores, max(1, n // SCENES_PER_RENDER_PROCESS), 16)
    log.info("generating %d synthetic relighting samples into %s (%d process(es))", n, root, workers)
    # the ground-truth light parts (for evaluation) cost ~9 MB a sample at 512 px: only small sizes keep them
    extras = resolution <= 128
    if workers == 1:
        generate(root, n, size=resolution, seed=seed, env_shape=env_shape, extras=extras, target_shift=target_shift)
        return
    # the generator's own CLI in a fresh interpreter: pool workers spawned from here would each import this
    # process's __main__ (torch, deepspeed, diffusers) before rendering a scene
    h, w = env_shape
    cmd = [sys.executable, "-m", "iclight_ds.data.synth", "--out", str(root), "--n", str(n), "--size",
           str(resolution), "--seed", str(seed), "--env-shape", str(h), str(w), "--workers", str(workers),
           "--target-shift", str(target_shift)]
    package_root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    subprocess.run(cmd + ([] if extras else ["--no-extras"]), check=True, env=env, stdout=subprocess.DEVNULL)


def check_dataset(root: Path, cfg: RunConfig) -> None:
    """Decode and check every sample of a user's dataset; refuse it with the problems listed unless data.skip_bad."""
    model_cfg = cfg.model
    problems = validate_dataset(root, env_shape=model_cfg.env_shape, require_background=model_cfg.variant == "fbc",
                                require_env=model_cfg.env_input)
    if not problems:
        return
    listing = "\n  ".join(p.format() for p in problems[:20]) + (
        f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
    whole = [p for p in problems if p.line == 0]  # the manifest as a whole: skipping sample lines cannot help
    if whole:
        raise DatasetError(f"{root}: " + "; ".join(p.message for p in whole))
    if not cfg.data.skip_bad:
        raise DatasetError(f"{root}: {len(problems)} problem(s); fix them or set data.skip_bad=true:\n  {listing}")
    lines = len({p.line for p in problems})
    log.warning("%s: %d sample line(s) have problems and will be skipped as met:\n  %s", root, lines, listing)


def lr_scheduler(optimizer: torch.optim.Optimizer, train_cfg) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up over train.warmup_steps, then constant, or cosine decay to MIN_LR_RATE of the peak at
    train.steps (transformers' schedules)."""
    if train_cfg.schedule == "constant":
        return get_constant_schedule_with_warmup(optimizer, train_cfg.warmup_steps)
    return get_cosine_with_min_lr_schedule_with_warmup(optimizer, num_warmup_steps=train_cfg.warmup_steps,
                                                       num_training_steps=train_cfg.steps, min_lr_rate=MIN_LR_RATE)


@dataclass
class Models:
    engine: Any  # DeepSpeed's engine around the ICLightModel
    vae: Any | None  # frozen; None when training from a latent cache made beforehand
    text_encoder: Any | None


def build_frozen_encoders(cfg: RunConfig, run: ResolvedRun, base: BaseModel | None, tokenizer, device, *,
                          is_main: bool) -> FrozenModels | None:
    """The run's frozen VAE and text encoder in the frozen dtype on `device`: the base's own (cast in place), or
    random ones of model.size; None when a latent cache made beforehand holds their outputs. With data.cache=auto,
    rank 0's carry their cache identity (hashed before the cast; other ranks: empty) and encode the trainer's cache,
    so the run holds one copy of the base."""
    if not builds_frozen_encoders(cfg):
        return None
    identity = {}
    if base is not None:
        if encodes_once(cfg) and is_main:
            identity = frozen_identity(base=cfg.model.base, vae_model=base.vae, text_encoder=base.text_encoder,
                                       real_tokenizer=base.real_tokenizer, size=cfg.model.size)
        vae = freeze(base.vae, run.torch_frozen_dtype, device)
        text_encoder = freeze(base.text_encoder, run.torch_frozen_dtype, device)
    else:  # built outside model_init_context: ZeRO-3 never partitions them
        vae, text_encoder = build_frozen(cfg.model.size, seed=cfg.train.seed, tokenizer=tokenizer,
                                         dtype=run.torch_frozen_dtype, device=device, vae=cfg.model.vae)
        identity = frozen_identity(base=None, vae_model=vae, text_encoder=text_encoder, real_tokenizer=False,
                                   size=cfg.model.size, vae=cfg.model.vae)
    return FrozenModels(vae, text_encoder, tokenizer, identity)


def build_models(cfg: RunConfig, run: ResolvedRun, base: BaseModel | None, frozen: FrozenModels | None,
                 device) -> Models:
    """The trainable model inside DeepSpeed's engine (with its optimizer and LR schedule), beside the frozen
    encoders (`build_frozen_encoders`). Sets run.attention to the kernel the UNet uses."""
    dtype = run.torch_dtype
    if base is not None:  # the UNet exists already: deepspeed.initialize partitions it (ZeRO-3)
        model = build_initial_model(cfg.model, seed=cfg.train.seed, dtype=dtype, unet=base.unet)
        _warn_if_planned_for_another_size(cfg, run, count_parameters(model.unet))
    else:
        with eng.model_init_context(run.ds):
            model = build_initial_model(cfg.model, seed=cfg.train.seed, dtype=dtype,
                                        modify=eng.whole_params(run.ds))
    if cfg.model.lora_rank:  # after the seeded build: the LoRA down matrices draw from the same seeded stream
        layers = add_lora(model.unet, rank=cfg.model.lora_rank, alpha=cfg.model.lora_scale_alpha,
                          targets=cfg.model.lora_targets, gather=eng.gathered_params(run.ds))
        log.info("LoRA rank %d (alpha %g) on %d UNet layers; conv_in, the merger and the environment encoder train "
                 "in full", cfg.model.lora_rank, cfg.model.lora_scale_alpha, len(layers))
    if run.gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    run.attention = configure_attention(model.unet, cfg.model.attention, device.type)
    if cfg.model.channels_last:
        use_channels_last(model.unet)
    if cfg.model.compile:  # last: the graph is captured with the attention kernel and memory format set above
        compile_unet(model.unet, cfg.model.compile_backend)
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters() if p.requires_grad)
    log.info("attention: %s; gradient checkpointing: %s; channels-last: %s; torch.compile: %s; trainable parameters: "
             "%.2fM of %.2fM", run.attention, "on" if run.gradient_checkpointing else "off",
             "on" if cfg.model.channels_last else "off", cfg.model.compile_backend if cfg.model.compile else "off",
             trainable / 1e6, count_parameters(model) / 1e6)
    optimizer = eng.build_optimizer(run.optimizer, [p for p in model.parameters() if p.requires_grad],
                                    lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, betas=cfg.train.betas)
    engine = eng.initialize(model, optimizer, lambda opt: lr_scheduler(opt, cfg.train), run.ds,
                            optimizer_name=run.optimizer)
    vae, text_encoder = (frozen.vae, frozen.text_encoder) if frozen else (None, None)
    modules = {"model": engine.module, "vae": vae, "text_encoder": text_encoder}
    check_module_devices({k: m for k, m in modules.items() if m is not None}, device)
    return Models(engine, vae, text_encoder)


def _warn_if_planned_for_another_size(cfg: RunConfig, run: ResolvedRun, unet_params: int) -> None:
    """A base whose size could not be read from its config was planned as model.size: say so if that was wrong."""
    planned = unet_parameters(run.plan_size, cfg.model.in_channels)
    if not 0.5 < unet_params / planned < 2:
        log.warning("model.base has a %.1fM-parameter UNet but was planned as size %s (%.1fM): train.ds_config="
                    "auto and train.optimizer=auto may not fit; set model.size=%s", unet_params / 1e6,
                    run.plan_size, planned / 1e6, unet_size_of(unet_params))

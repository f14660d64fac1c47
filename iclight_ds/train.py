"""The training loop: train() (cadence) -> train_step() (one optimizer step) -> forward_backward() (one micro-batch).

`python -m iclight_ds.train [--config FILE] [--section.key VALUE ...]`, normally started by launch/train.sh
under the deepspeed launcher (or torchrun, or a plain single process).
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler

from . import checkpoint as ckpt
from . import engine as eng
from .checks import check_module_devices, check_offload_ram, check_optimizer, check_precision, describe
from .conditioning import build_frozen, condition_batch, condition_cached_batch
from .config import ConfigError, RunConfig, load_config, parse_overrides, save_config, to_dict
from .models import (build_iclight_model, configure_attention, count_parameters, default_dtype, freeze,
                     unet_size_of, wants_checkpointing)
from .objectives import iclight_losses

log = logging.getLogger("iclight_ds")

# The SD1.5 noise schedule (IC-Light keeps it): 1000 steps, scaled_linear, beta 0.00085 -> 0.012, epsilon.
NUM_TIMESTEPS = 1000


def alphas_cumprod() -> torch.Tensor:
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(
        num_train_timesteps=NUM_TIMESTEPS, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    return sched.alphas_cumprod.clone()


def lr_lambda(train_cfg):
    """Multiplier of the peak LR at optimizer step s: linear warm-up, then constant or cosine to 10%."""

    def f(s: int) -> float:
        if s < train_cfg.warmup_steps:
            return (s + 1) / (train_cfg.warmup_steps + 1)
        if train_cfg.schedule == "constant":
            return 1.0
        progress = min(1.0, (s - train_cfg.warmup_steps) / max(1, train_cfg.steps - train_cfg.warmup_steps))
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class ResumableSampler(DistributedSampler):
    """DistributedSampler that can start mid-epoch (exact resume: no sample seen twice or skipped)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0  # index into this rank's shard for the current epoch

    def __iter__(self):
        indices = list(super().__iter__())
        start, self.start = self.start, 0
        return iter(indices[start:])


def leave_stop_signals_to_main(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers ignore SIGINT/SIGTERM; stopping is the main process's job (it saves, then
    shuts them down). Otherwise a signal that reaches them too killed them first (Ctrl-C and `timeout` signal the
    whole process group; the deepspeed launcher sends SIGTERM to every process under each rank), and the main process
    died on "DataLoader worker ... is killed by signal" without saving. A worker whose main process is gone exits by
    itself (the DataLoader's watchdog)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _shut_workers_down(loader_ref: "weakref.ref[DataLoader]") -> None:
    """atexit, registered after torch's and multiprocessing's handlers, so it runs before them: end the persistent
    workers the DataLoader way. Left to multiprocessing, they would get SIGTERM, which they ignore, and the exit would
    wait for them forever."""
    loader = loader_ref()
    iterator = getattr(loader, "_iterator", None)  # the persistent workers' iterator (torch DataLoader internals)
    if iterator is not None and hasattr(iterator, "_shutdown_workers"):
        iterator._shutdown_workers()
        for worker in getattr(iterator, "_workers", []):  # one stuck past the DataLoader's timeouts ignores SIGTERM
            if worker.is_alive():
                worker.kill()


def generator_seed(seed: int, rank: int) -> int:
    """Per-rank stream for noise, timesteps and light splits, derived from the one run seed."""
    return seed * 1_000_003 + rank


class Trainer:
    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.acc = eng.init_distributed()
        self.is_main = self.acc.rank == 0
        self._setup_logging()
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        # what the checkpoint being resumed recorded of its `auto` choices, and its config ({} when not resuming)
        self.resumed = ckpt.read_resolved(self._resume_folder()) if cfg.train.resume else {}
        self.resumed_config = self._read_resumed_config() if cfg.train.resume else {}
        if cfg.train.resume:
            self._check_resume_config()
        self.plan_size = self._planning_size()

        if cfg.train.ds_config != "auto":
            self.ds_path = eng.resolve_ds_config_path(cfg.train.ds_config)
        else:
            self.ds_path = self._recorded_ds_config() or self._choose_ds_config()
        self.ds_cfg = eng.read_ds_config(self.ds_path)
        self.geometry = eng.batch_geometry(self.ds_cfg, self.acc.world_size)
        self.dtype = eng.training_dtype(self.ds_cfg)
        stage = eng.zero_stage(self.ds_cfg)
        self.optimizer_name = self._choose_optimizer()
        check_precision(self.acc.name, self.dtype, bf16_ok=self.acc.bf16, fp16_ok=self.acc.fp16, ds_path=self.ds_path)
        check_optimizer(self.optimizer_name, accelerator=self.acc.name, stage=stage,
                        offload_optimizer=eng.offloads_optimizer(self.ds_cfg), ds_path=self.ds_path)
        self._check_offload_ram()
        if self.acc.name == "cpu" and stage == 3 and eng.pin_malloc_mmap_threshold():
            log.info("glibc malloc: mmap threshold pinned at %d KiB for ZeRO-3 on CPU (see engine.py)",
                     eng.MALLOC_MMAP_THRESHOLD // 1024)
        log.info("%s (ds_config=%s, optimizer=%s)", describe(self.acc.name, self.acc.world_size, self.dtype, stage,
                                                             self.geometry), self.ds_path, self.optimizer_name)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(cfg, self.out_dir / "config.json")
            record = {"_source": str(self.ds_path), **self.ds_cfg}  # what `auto` resolved to, for export and audit
            (self.out_dir / "ds_config.json").write_text(json.dumps(record, indent=2) + "\n")

        self.base = self._load_base()
        self.dataset = self._build_dataset()
        self._build_models()
        self.loader, self.sampler = self._build_loader()
        self.alphas_cumprod = alphas_cumprod().to(self.acc.device)
        self.generator = torch.Generator().manual_seed(generator_seed(cfg.train.seed, self.acc.rank))
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self._batches = None
        self.bad_steps = 0  # non-finite losses in a row
        self.skipped_total = 0
        self.stop_signal: int | None = None
        self._decode_warnings: set[str] = set()  # see _can_decode
        self._eval_items: list[dict] | None = None  # see _eval_set
        if cfg.train.resume:
            self._resume(cfg.train.resume)

    # ----------------------------------------------------------------------------------------------------- setup

    def _choose_ds_config(self) -> Path:
        """train.ds_config=auto: the planner's choice on rank 0, broadcast so every rank (node) agrees."""
        from .plan import choose_config

        cfg = self.cfg
        choice = self._rank0_decides(lambda: str(choose_config(
            cfg.data.resolution, cfg.model.variant, cfg.objective.lambda_consistency > 0, self.plan_size,
            cfg.train.optimizer, ranks=self._ranks_here(), checkpointing=cfg.model.gradient_checkpointing)))
        log.info("train.ds_config=auto: the planner chose %s", choice)
        return Path(choice)

    def _rank0_decides(self, decide):
        """`decide()` on rank 0 only, its answer broadcast: every rank (node) must build the same thing."""
        choice = [decide() if self.is_main else None]
        if torch.distributed.is_initialized():
            torch.distributed.broadcast_object_list(choice, src=0)
        return choice[0]

    def _choose_optimizer(self) -> str:
        """train.optimizer, with auto resolved for this config and machine (plan.optimizer_for); where the step runs
        on the host (offload, or a CPU-only machine) the RAM decides, so rank 0 decides and broadcasts, as for the
        config: every rank must build the same one.
        A resumed run builds the optimizer its checkpoint was written with (its states are that optimizer's)."""
        on_gpu = self.acc.name == "cuda"
        wanted = eng.resolve_optimizer(self.cfg.train.optimizer, self.ds_cfg, on_gpu=on_gpu)
        saved = self.resumed.get("optimizer")
        if saved is None and self.cfg.train.resume and self.cfg.train.optimizer == "auto":
            saved = self._older_checkpoint_optimizer()
        if saved is not None:
            if self.cfg.train.optimizer != "auto" and wanted != saved:
                raise eng.EngineConfigError(
                    f"train.optimizer={wanted}, but the checkpoint being resumed ({self.cfg.train.resume}) holds "
                    f"{saved} states; resume with train.optimizer={saved} (or auto)")
            log.info("train.optimizer: %s, as recorded in the checkpoint being resumed", saved)
            return saved
        if self.cfg.train.optimizer != "auto" or wanted == "adamw8bit":
            return wanted
        import psutil

        from .plan import GiB, activations_per_sample, optimizer_for, unet_parameters

        def decide() -> str:
            cfg = self.cfg
            params = unet_parameters(self.plan_size, cfg.model.in_channels)
            activations = 0.0  # on a GPU they live in device memory, not in the RAM this decides on
            if not on_gpu:
                activations = self.geometry.micro_batch * activations_per_sample(
                    self.plan_size, cfg.model.in_channels, cfg.data.resolution, params,
                    checkpointing=cfg.model.gradient_checkpointing, consistency=cfg.objective.lambda_consistency > 0)
            name = optimizer_for("auto", params, self.ds_cfg, world=self.acc.world_size, ranks_here=self._ranks_here(),
                                 ram_gib=psutil.virtual_memory().total / GiB, on_gpu=on_gpu, activations=activations)
            if name != wanted:
                log.warning("train.optimizer=auto: %s's fp32 moments would not fit this machine's RAM with %s; "
                            "using %s (8-bit states, a slower step on the host)", wanted, self.ds_path, name)
            return name

        return self._rank0_decides(decide)

    def _planning_size(self) -> str:
        """The UNet size the planner counts (train.ds_config=auto, train.optimizer=auto, the offload RAM check): the
        base's own, read from its config before its weights are loaded, else model.size."""
        size = self.cfg.model.size
        if self.cfg.model.base:
            from .base_model import base_unet_size

            found = base_unet_size(self.cfg.model.base)
            if found is not None and found != size:
                log.info("model.base %s has a %s UNet: planning for that, not model.size=%s", self.cfg.model.base,
                         found, size)
            size = found or size
        return size

    def _warn_if_planned_for_another_size(self, unet_params: int) -> None:
        """A base whose size could not be read from its config was planned as model.size: say so if that was wrong."""
        from .plan import unet_parameters

        planned = unet_parameters(self.plan_size, self.cfg.model.in_channels)
        if not 0.5 < unet_params / planned < 2:
            log.warning("model.base has a %.1fM-parameter UNet but was planned as size %s (%.1fM): train.ds_config="
                        "auto and train.optimizer=auto may not fit; set model.size=%s", unet_params / 1e6,
                        self.plan_size, planned / 1e6, unet_size_of(unet_params))

    def _check_resume_config(self) -> None:
        """Refuse to resume a checkpoint into another model or another synthetic set: the weights may load, but the
        run would go on as something else (e.g. a GPU default run resumed with the plain defaults, or back)."""
        path = self._resume_folder() / "config.json"
        saved, now = self.resumed_config, json.loads(json.dumps(to_dict(self.cfg)))
        differ = []
        for key in RESUME_FIXED_KEYS:
            section, name = key.split(".")
            if section == "data" and name.startswith("synth") and now["data"]["path"] is not None:
                continue
            if name in saved.get(section, {}) and saved[section][name] != now[section][name]:
                differ.append(f"{key}={saved[section][name]!r} there, {now[section][name]!r} here")
        if differ:
            raise ConfigError(f"--resume {self.cfg.train.resume}: {path} was trained with another setup: "
                              + "; ".join(differ) + f". Resume it with its own config: --config {path} (plus the "
                              "overrides you want, e.g. --train.resume latest --train.steps N)")

    def _read_resumed_config(self) -> dict:
        """The config.json of the checkpoint being resumed, read once: what a resume may not change, and the optimizer
        of a checkpoint older than resolved.json."""
        path = self._resume_folder() / "config.json"
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ckpt.CheckpointError(f"{path}: unreadable ({e}); it records the run this checkpoint continues (its "
                                       "model, data and optimizer)") from e

    def _older_checkpoint_optimizer(self) -> str:
        """The optimizer of a checkpoint written before resolved.json existed: its config's train.optimizer, with
        `auto` as it resolved then (CPU Adam where the optimizer was offloaded, else AdamW8bit, on a CPU too)."""
        named = self.resumed_config.get("train", {}).get("optimizer", "adamw8bit")
        if named != "auto":
            return named
        return "cpu_adam" if eng.offloads_optimizer(self.ds_cfg) else "adamw8bit"

    def _resume_folder(self) -> Path:
        root, tag = ckpt.resolve(self.cfg.train.resume, self.ckpt_root)
        return root / tag

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

    def _ranks_here(self) -> int:
        """Ranks on this machine: the deepspeed launcher says LOCAL_SIZE, torchrun LOCAL_WORLD_SIZE."""
        return int(os.environ.get("LOCAL_SIZE") or os.environ.get("LOCAL_WORLD_SIZE") or self.acc.world_size)

    def _check_offload_ram(self) -> None:
        """With offload, the planner's count of host-side model states must fit this machine's RAM."""
        zero = self.ds_cfg.get("zero_optimization", {})
        if not any(zero.get(k, {}).get("device", "none") not in (None, "none")
                   for k in ("offload_optimizer", "offload_param")):
            return
        import psutil

        from .plan import GiB, model_state_bytes, unet_parameters

        params = unet_parameters(self.plan_size, self.cfg.model.in_channels)
        _, host = model_state_bytes(params, self.ds_cfg, self.acc.world_size, self.optimizer_name,
                                    pinned=self.acc.name == "cuda")
        check_offload_ram(needed_gib=host / GiB, ranks_here=self._ranks_here(),
                          ram_gib=psutil.virtual_memory().total / GiB, ds_path=self.ds_path)

    def _setup_logging(self) -> None:
        level = logging.INFO if self.is_main else logging.WARNING
        logging.basicConfig(level=level, format=f"[rank{self.acc.rank}] %(asctime)s %(levelname)s %(message)s")
        log.setLevel(level)

    def _load_base(self):
        """model.base: real SD1.5 weights (offline), optionally with IC-Light offsets added; None: random models."""
        model_cfg = self.cfg.model
        if not model_cfg.base:
            return None
        from .base_model import load_base, load_iclight_offset

        # fp32 first: offsets are added at full precision, then everything goes to the training dtype
        base = load_base(model_cfg.base, tokenizer_fallback=model_cfg.tokenizer, dtype=torch.float32,
                         unet_only=bool(self.cfg.data.cache))
        if model_cfg.iclight_weights:
            load_iclight_offset(base.unet, model_cfg.iclight_weights)
            log.info("added IC-Light offsets %s to the base", model_cfg.iclight_weights)
        base.unet.to(self.dtype)
        if self.is_main:
            record = {"base": model_cfg.base, "source": base.source, "unet_hash": base.unet_hash,
                      "iclight_weights": model_cfg.iclight_weights}
            (self.out_dir / "base.json").write_text(json.dumps(record, indent=2) + "\n")
        return base

    def _build_dataset(self):
        from .data.dataset import RelightDataset
        from .data.tokenizer import build_char_tokenizer

        data_cfg, model_cfg = self.cfg.data, self.cfg.model
        if data_cfg.cache:  # latents and text made by `python -m iclight_ds.cache`, checked against this run
            from .cache import CachedDataset, run_expectations

            self.tokenizer = None
            return CachedDataset(data_cfg.cache, run_expectations(self.cfg, self.dtype))
        root = Path(data_cfg.path) if data_cfg.path else self.out_dir / "data"
        if data_cfg.path is None:
            self._make_synthetic(root, data_cfg.synth_samples, seed=data_cfg.synth_seed)
        if data_cfg.validate and data_cfg.path is not None and self.is_main:
            self._validate_dataset(root)
        eng.barrier()
        self.tokenizer = self.base.tokenizer if self.base is not None else build_char_tokenizer()
        return RelightDataset(
            root,
            data_cfg.resolution,
            self.tokenizer,
            env_shape=model_cfg.env_shape,
            require_background=model_cfg.variant == "fbc",
            require_env=model_cfg.variant == "fc",
            skip_bad=data_cfg.skip_bad,
        )

    def _make_synthetic(self, root: Path, n: int, *, seed: int) -> None:
        """Rank 0 writes `n` synthetic scenes into `root` unless it holds them already (callers barrier after).

        The folder is the trainer's own: one holding another number of scenes (a run folder reused with another
        data.synth_samples) is rewritten; scene i depends only on (seed, i), so the common ones stay the same."""
        manifest = root / "manifest.jsonl"
        if not self.is_main:
            return
        if manifest.is_file():
            held = sum(1 for line in manifest.read_text().splitlines() if line.strip())
            if held == n:
                return
            log.info("%s holds %d synthetic scenes, not %d: writing them again", root, held, n)
        from .data.synth import generate

        cfg = self.cfg
        # ~50 scenes/s per process at 64 px; a pool's start costs seconds, so only large sets get one
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        workers = min(cores, max(1, n // SCENES_PER_RENDER_PROCESS), 16)
        log.info("generating %d synthetic relighting samples into %s (%d process(es))", n, root, workers)
        # the ground-truth light parts (for evaluation) cost ~9 MB a sample at 512 px: only small sizes keep them
        extras = cfg.data.resolution <= 128
        if workers == 1:
            generate(root, n, size=cfg.data.resolution, seed=seed, env_shape=cfg.model.env_shape, extras=extras)
            return
        # the generator's own CLI in a fresh interpreter: pool workers spawned from here would each import this
        # module's __main__ (torch, deepspeed, diffusers) before rendering a scene
        h, w = cfg.model.env_shape
        cmd = [sys.executable, "-m", "iclight_ds.data.synth", "--out", str(root), "--n", str(n), "--size",
               str(cfg.data.resolution), "--seed", str(seed), "--env-shape", str(h), str(w), "--workers", str(workers)]
        package_root = str(Path(__file__).resolve().parent.parent)
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
        subprocess.run(cmd + ([] if extras else ["--no-extras"]), check=True, env=env, stdout=subprocess.DEVNULL)

    def _validate_dataset(self, root: Path) -> None:
        from .data.dataset import DatasetError
        from .data.validate import validate_dataset

        model_cfg = self.cfg.model
        problems = validate_dataset(root, env_shape=model_cfg.env_shape, require_background=model_cfg.variant == "fbc",
                                    require_env=model_cfg.variant == "fc")
        if not problems:
            return
        listing = "\n  ".join(p.format() for p in problems[:20]) + (
            f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else "")
        if not self.cfg.data.skip_bad:
            raise DatasetError(f"{root}: {len(problems)} problem(s); fix them or set data.skip_bad=true:\n  {listing}")
        lines = len({p.line for p in problems})
        log.warning("%s: %d sample line(s) have problems and will be skipped as met:\n  %s", root, lines, listing)

    def _build_models(self) -> None:
        cfg, device = self.cfg, self.acc.device
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        if self.base is not None:  # the UNet exists already: deepspeed.initialize partitions it (ZeRO-3)
            with default_dtype(self.dtype):
                model = build_iclight_model(cfg.model, unet=self.base.unet)
        else:
            with eng.model_init_context(self.ds_cfg), default_dtype(self.dtype):
                model = build_iclight_model(cfg.model, modify=eng.whole_params(self.ds_cfg))
        unet_params = count_parameters(model.unet)
        if self.base is not None:
            self._warn_if_planned_for_another_size(unet_params)
        self.checkpointing = wants_checkpointing(cfg.model.gradient_checkpointing, unet_params)
        if self.checkpointing:
            model.unet.enable_gradient_checkpointing()
        self.attention = configure_attention(model.unet, cfg.model.attention, self.acc.name)
        log.info("attention: %s; gradient checkpointing: %s; trainable parameters: %.2fM", self.attention,
                 "on" if self.checkpointing else "off", count_parameters(model) / 1e6)
        frozen_dtype = self.dtype if cfg.model.frozen_dtype == "auto" else _DTYPES[cfg.model.frozen_dtype]
        if cfg.data.cache:  # the cache holds their outputs: not built at all
            self.vae = self.text_encoder = None
        elif self.base is not None:
            self.vae = freeze(self.base.vae, frozen_dtype, device)
            self.text_encoder = freeze(self.base.text_encoder, frozen_dtype, device)
        else:  # outside model_init_context: ZeRO-3 never partitions them
            self.vae, self.text_encoder = build_frozen(cfg.model.size, seed=cfg.train.seed, tokenizer=self.tokenizer,
                                                       dtype=frozen_dtype, device=device, vae=cfg.model.vae)

        optimizer = eng.build_optimizer(
            self.optimizer_name,
            [p for p in model.parameters() if p.requires_grad],
            lr=cfg.train.lr,
            weight_decay=cfg.train.weight_decay,
            betas=cfg.train.betas,
        )
        schedule = lr_lambda(cfg.train)
        self.engine = eng.initialize(
            model,
            optimizer,
            lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            self.ds_cfg,
            optimizer_name=self.optimizer_name,
        )
        modules = {"model": self.engine.module, "vae": self.vae, "text_encoder": self.text_encoder}
        check_module_devices({k: m for k, m in modules.items() if m is not None}, device)

    def _build_loader(self):
        sampler = ResumableSampler(
            self.dataset,
            num_replicas=self.acc.world_size,
            rank=self.acc.rank,
            shuffle=True,
            seed=self.cfg.train.seed,
            drop_last=True,
        )
        if len(sampler) < self.geometry.micro_batch:
            raise ValueError(
                f"dataset has {len(self.dataset)} samples: fewer than one micro-batch "
                f"({self.geometry.micro_batch}) per rank over {self.acc.world_size} rank(s)"
            )
        loader = DataLoader(
            self.dataset,
            batch_size=self.geometry.micro_batch,
            sampler=sampler,
            num_workers=self.cfg.data.num_workers,
            drop_last=True,
            persistent_workers=self.cfg.data.num_workers > 0,
            worker_init_fn=leave_stop_signals_to_main,
        )
        if self.cfg.data.num_workers > 0:
            atexit.register(_shut_workers_down, weakref.ref(loader))
        return loader, sampler

    def _resume(self, resume: str) -> None:
        root, tag = ckpt.resolve(resume, self.ckpt_root)
        state = ckpt.load(self.engine, root, tag, generator=self.generator, rank=self.acc.rank)
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        log.info("resumed from %s at step %d (epoch %d, batch %d)", root / tag, self.step, self.epoch,
                 self.batch_in_epoch)
        if self.is_main:
            truncate_metrics(self.out_dir / "metrics.jsonl", self.step)

    # ------------------------------------------------------------------------------------------------ the loop

    def _next_batch(self) -> dict:
        """Endless iteration over epochs, tracking the sampler position for exact resume."""
        while True:
            if self._batches is None:
                self.sampler.set_epoch(self.epoch)
                self.sampler.start = self.batch_in_epoch * self.geometry.micro_batch
                self._batches = iter(self.loader)
            batch = next(self._batches, None)
            if batch is not None:
                self.batch_in_epoch += 1
                return batch
            self._batches, self.epoch, self.batch_in_epoch = None, self.epoch + 1, 0

    def forward_backward(self, batch: dict) -> dict[str, torch.Tensor]:
        """One micro-batch: conditions, noise, losses, ONE backward and ONE engine step (DeepSpeed accumulates)."""
        cfg = self.cfg
        how = dict(variant=cfg.model.variant, split_cells=cfg.objective.split_cells,
                   with_split=cfg.objective.lambda_consistency > 0, generator=self.generator, device=self.acc.device)
        if cfg.data.cache:
            cond = condition_cached_batch(batch, **how)
        else:
            cond = condition_batch(batch, vae=self.vae, text_encoder=self.text_encoder, **how)
        shape = cond.latents.shape  # (B, 4, h, w)
        noise = torch.randn(shape, generator=self.generator)
        if cfg.objective.noise_offset > 0:
            noise += cfg.objective.noise_offset * torch.randn(shape[0], shape[1], 1, 1, generator=self.generator)
        timesteps = torch.randint(0, NUM_TIMESTEPS, (shape[0],), generator=self.generator)
        terms = iclight_losses(
            self.engine,
            cond,
            noise.to(self.acc.device),
            timesteps.to(self.acc.device),
            alphas_cumprod=self.alphas_cumprod,
            lambda_vanilla=cfg.objective.lambda_vanilla,
            lambda_consistency=cfg.objective.lambda_consistency,
            snr_gamma=cfg.objective.snr_gamma,
        )
        if not self._all_finite(terms["loss"], batch):
            return {}
        self.engine.backward(terms["loss"])
        self.engine.step()
        return {k: v.detach() for k, v in terms.items()}

    def _all_finite(self, loss: torch.Tensor, batch: dict) -> bool:
        """NaN/inf guard, decided by all ranks together (a lone rank skipping its backward would hang the rest).

        A non-finite micro-batch is skipped (no backward, no step: the weights stay as they were) and reported;
        after `train.max_bad_steps` in a row the run stops with a checkpoint of the last good weights.
        """
        bad = eng.all_reduce_max((~torch.isfinite(loss.detach())).float()).item() > 0
        if not bad:
            self.bad_steps = 0
            return True
        self.bad_steps += 1
        self.skipped_total += 1
        ids = batch["index"].tolist() if "index" in batch else "?"
        log.warning("step %d: non-finite loss (%s on this rank; sample indices %s): micro-batch skipped (%d in a "
                    "row, limit %d)", self.step + 1, loss.item(), ids, self.bad_steps, self.cfg.train.max_bad_steps)
        if self.bad_steps > self.cfg.train.max_bad_steps:
            raise NonFiniteError(
                f"{self.bad_steps} non-finite losses in a row at step {self.step + 1}; stopping. The last good "
                "weights are saved. Look for corrupt samples (python -m iclight_ds.data.validate), lower train.lr, "
                "or use bf16 instead of fp16."
            )
        return False

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step's worth of micro-batches; returns the mean of each loss term (on device)."""
        totals: dict[str, torch.Tensor] = {}
        done = 0
        while done < self.geometry.accumulation:  # a skipped (non-finite) micro-batch is replaced by the next one
            terms = self.forward_backward(self._next_batch())
            if terms:
                done += 1
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0) + v / self.geometry.accumulation
        self._check_fp16_scale()
        return totals

    def _check_fp16_scale(self) -> None:
        """fp16 only: a loss scale that collapsed means every step overflows; say so instead of training on."""
        scale = getattr(self.engine.optimizer, "cur_scale", None) if self.dtype == torch.float16 else None
        if scale is not None and scale < 1.0:
            raise NonFiniteError(
                f"fp16 loss scale collapsed to {scale} at step {self.step + 1}: gradients overflow at every step. "
                "Use a bf16 config (GPUs since Ampere) or lower train.lr."
            )

    def train(self) -> None:
        cfg = self.cfg
        writer = MetricsWriter(self.out_dir / "metrics.jsonl", cfg, enabled=self.is_main)
        progress = None
        if self.is_main and cfg.logging.progress:
            from tqdm import tqdm

            progress = tqdm(total=cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True)
        window: list[dict[str, torch.Tensor]] = []
        t_last, steps_last = time.perf_counter(), self.step
        saved_at = None
        self._install_signal_handlers()
        while self.step < cfg.train.steps:
            try:
                window.append(self.train_step())
            except NonFiniteError:
                self.save()  # the skipped micro-batches never reached the weights: this is the last good state
                raise
            self.step += 1
            if progress is not None:
                progress.update(1)
            if self.step % cfg.logging.every == 0 or self.step == cfg.train.steps:
                now = time.perf_counter()
                rate = self.geometry.effective_batch * (self.step - steps_last) / (now - t_last)
                record = self._reduce(window, rate)
                writer.write(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                window, t_last, steps_last = [], now, self.step
            if cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0:
                try:
                    self.save()
                    saved_at = self.step
                except ckpt.CheckpointError as e:  # keep training: the next save may succeed
                    log.error("%s", e)
            if cfg.logging.preview_every and self.step % cfg.logging.preview_every == 0:
                self.preview(writer)
            if cfg.logging.eval_every and self.step % cfg.logging.eval_every == 0:
                self.evaluate(writer)
            if self._stop_requested():
                log.warning("signal %s: saving at step %d and exiting", self.stop_signal, self.step)
                break
        if progress is not None:
            progress.close()
        if saved_at != self.step:
            self.save()
        if self.skipped_total:
            log.warning("%d non-finite micro-batch(es) were skipped in this run", self.skipped_total)
        if self.stop_signal is not None:
            writer.close()
            return
        if cfg.logging.preview_every and self.step % cfg.logging.preview_every != 0:
            self.preview(writer)  # the final weights always get one
        if cfg.logging.eval_every and self.step % cfg.logging.eval_every != 0:
            self.evaluate(writer)
        if cfg.train.export and self.is_main:
            from .export import export_checkpoint

            for path in export_checkpoint(self.ckpt_root, ckpt.tag_for(self.step), self.out_dir):
                log.info("exported %s", path)
        eng.barrier()
        writer.close()

    def _can_decode(self, warning: str) -> bool:
        """Previews and evaluations decode through the VAE, which a run from a latent cache never builds: False then,
        with `warning` logged once (rank 0)."""
        if self.vae is not None:
            return True
        if self.is_main and warning not in self._decode_warnings:
            log.warning("%s", warning)
            self._decode_warnings.add(warning)
        return False

    def _samples_here(self) -> bool:
        """Does this rank run the sampling of a preview or evaluation? ZeRO-3 gathers each layer's weights inside its
        forward, a collective: every rank runs the (identical, fixed-seed) sampling then, and rank 0 alone saves.
        Otherwise rank 0 runs it alone."""
        return self.is_main or eng.zero_stage(self.ds_cfg) == 3

    def preview(self, writer: "MetricsWriter") -> Path | None:
        """Collective: relight the first `preview_samples` samples with a fixed seed; rank 0 saves the grid."""
        if not self._can_decode("no previews when training from a cache (data.cache): the VAE is not loaded"):
            return None
        from .relight import make_preview_grid

        cfg, module = self.cfg, self.engine.module
        path = self.out_dir / "previews" / f"step_{self.step:08d}.png"
        if self._samples_here():
            n = min(cfg.logging.preview_samples, len(self.dataset))
            samples = [self.dataset[i] for i in range(n)]
            grid = make_preview_grid(module.unet, self.vae, self.text_encoder, self.tokenizer, module.env_encoder,
                                     samples, seed=cfg.train.seed, steps=cfg.logging.preview_steps)
            if self.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                grid.save(path)
                writer.image("preview", path, self.step)
                log.info("preview %s", path)
        eng.barrier()
        return path

    def _eval_set(self) -> list[dict]:
        """The training-time evaluation's scenes (loaded once): logging.eval_data, held-out synthetic scenes, or the
        last training samples (said so in the log)."""
        if self._eval_items is not None:
            return self._eval_items
        from .eval import load_eval_samples

        cfg = self.cfg
        n = cfg.logging.eval_samples
        root = Path(cfg.logging.eval_data) if cfg.logging.eval_data else None
        if root is None and cfg.data.path is None:
            root = self.out_dir / "eval_data"
            self._make_synthetic(root, n, seed=cfg.data.synth_seed + 1000)
            eng.barrier()
        if root is not None:
            self._eval_items = load_eval_samples(root, cfg.data.resolution, self.tokenizer, cfg.model.env_shape,
                                                 count=n, require_background=cfg.model.variant == "fbc")
        else:
            log.info("evaluation on the last %d training samples (set logging.eval_data to held-out scenes)", n)
            self._eval_items = [self.dataset[i] for i in range(max(0, len(self.dataset) - n), len(self.dataset))]
        return self._eval_items

    def evaluate(self, writer: "MetricsWriter") -> dict | None:
        """Collective: score the model on the evaluation scenes (iclight_ds.eval); rank 0 logs eval/* metrics."""
        if not self._can_decode("no training-time evaluation when training from a cache (data.cache): no VAE loaded"):
            return None
        from .eval import evaluate_samples

        cfg, module = self.cfg, self.engine.module
        summary = None
        scenes = self._eval_set()  # on every rank: making the held-out scenes ends with a barrier
        if self._samples_here():
            result = evaluate_samples(module.unet, self.vae, self.text_encoder, module.env_encoder, scenes,
                                      steps=cfg.logging.eval_steps, seed=cfg.train.seed, tokenizer=self.tokenizer)
            summary = result["summary"]
            if self.is_main:
                record = {"step": self.step, **{f"eval/{k}": v for k, v in summary.items()}}
                writer.write(record)
                log.info("eval at step %d: PSNR %.2f dB (copy input %.2f), SSIM %.3f, additivity error %s",
                         self.step, summary["psnr"], summary["baseline_psnr"], summary["ssim"],
                         f"{summary['additivity_error']:.3f}" if "additivity_error" in summary else "-")
        eng.barrier()
        return summary

    def _install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT: finish the current step, save, exit 0. A second signal exits at once.

        Signals within 3 s of the first count as the same request: Ctrl-C reaches the ranks directly AND through
        the deepspeed launcher, which forwards it as SIGTERM a moment later.
        """
        first_at: list[float] = []

        def handler(signum, frame):
            if self.stop_signal is not None and time.monotonic() - first_at[0] > 3.0:
                os._exit(128 + signum)
            if self.stop_signal is None:
                self.stop_signal = signum
                first_at.append(time.monotonic())

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, handler)

    def _stop_requested(self) -> bool:
        """Did any rank get a signal? One scalar all-reduce per step, so that all ranks stop at the same step."""
        mine = torch.tensor(0.0 if self.stop_signal is None else float(self.stop_signal))
        any_signal = int(eng.all_reduce_max(mine).item())
        if any_signal and self.stop_signal is None:
            self.stop_signal = any_signal
        return bool(any_signal)

    def _reduce(self, window: list[dict[str, torch.Tensor]], samples_per_s: float) -> dict:
        """Average the window over steps and ranks: the only device synchronisation in the loop."""
        keys = ["loss", "loss_vanilla", "loss_consistency"]
        stacked = torch.stack([torch.stack([w[k].float() for k in keys]) for w in window]).mean(0)
        values = eng.all_reduce_mean(stacked).tolist()
        record = {"step": self.step, **dict(zip(keys, values))}
        record.update(lr=self.engine.get_lr()[0], samples_per_s=samples_per_s, epoch=self.epoch,
                      skipped_micro_batches=self.skipped_total)
        return record

    def save(self) -> Path:
        client_state = {
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.acc.world_size,
        }
        path = ckpt.save(
            self.engine,
            self.ckpt_root,
            step=self.step,
            client_state=client_state,
            config=to_dict(self.cfg),
            generator=self.generator,
            rank=self.acc.rank,
            keep=self.cfg.train.keep,
            resolved={"optimizer": self.optimizer_name, "ds_config": str(self.ds_path)},
        )
        log.info("checkpoint %s", path)
        return path


_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _user_errors() -> tuple[type[Exception], ...]:
    from .base_model import BaseModelError
    from .cache import CacheError
    from .checkpoint import CheckpointError
    from .checks import DeviceCheckError
    from .data.dataset import DatasetError
    from .eval import EvalError
    from .tiny_vae import TinyVaeError

    return (BaseModelError, CacheError, CheckpointError, DeviceCheckError, DatasetError, eng.EngineConfigError,
            EvalError, TinyVaeError, FileNotFoundError, ConfigError)


class NonFiniteError(RuntimeError):
    """Training cannot go on: losses or the fp16 loss scale stopped being finite."""


def truncate_metrics(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint's step (they will be logged again) and any torn last line."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(k + "\n" for k in kept))
    os.replace(tmp, path)


class MetricsWriter:
    """metrics.jsonl (one JSON object per logged step) and wandb, rank 0 only."""

    def __init__(self, path: Path, cfg: RunConfig, *, enabled: bool):
        self.enabled = enabled
        self.file = path.open("a") if enabled else None
        self.wandb = None
        # WANDB_MODE=disabled (wandb's own switch) turns it off without a config override, so a default run stays
        # the default run (train.default_config_file), and needs no wandb installed
        if enabled and cfg.logging.wandb and os.environ.get("WANDB_MODE", "").lower() != "disabled":
            os.environ.setdefault("WANDB_MODE", "offline")  # never phone home unless the user asks for it
            import wandb

            self.wandb = wandb.init(
                project=cfg.logging.wandb_project, dir=str(path.parent), config=to_dict(cfg), reinit=True
            )

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log(record, step=record["step"])

    def image(self, key: str, path: Path, step: int) -> None:
        if self.enabled and self.wandb is not None:
            import wandb

            self.wandb.log({key: wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


# The trainer renders a synthetic set with one process per this many scenes (up to the cores and 16)
SCENES_PER_RENDER_PROCESS = 1024
# The default run on a GPU (a bigger recipe for the same tiny model), and the overrides that leave a run the default
# run: launch/train.sh's own --output-dir and --resume
GPU_DEFAULT_PRESET = Path(__file__).parent / "presets" / "default-gpu.yaml"
DEFAULT_RUN_KEYS = {"train.output_dir", "train.resume"}
# its micro-batch of 512 took 10.7 GiB of an H200 (nvidia-smi, CUDA context included); smaller GPUs keep the planner's
GPU_DEFAULT_MIN_GIB = 16
# what a resume may not change (Trainer._check_resume_config); data.synth_* only for runs on synthetic data
RESUME_FIXED_KEYS = ("model.size", "model.base", "model.variant", "model.vae", "model.iclight_weights",
                     "model.env_tokens", "model.env_shape", "model.merger_hidden", "model.merger_layers",
                     "data.resolution", "data.synth_samples", "data.synth_seed")


def default_config_file(config_path: str | None, overrides: dict, gpu_mem_gib: float | None) -> str | None:
    """The config file a run reads: the one given; else, on a machine whose first CUDA GPU has GPU_DEFAULT_MIN_GIB
    or more, the GPU default run's preset when nothing but DEFAULT_RUN_KEYS is overridden (any other override starts
    from the plain defaults)."""
    if (config_path is not None or gpu_mem_gib is None or gpu_mem_gib < GPU_DEFAULT_MIN_GIB
            or not set(overrides) <= DEFAULT_RUN_KEYS):
        return config_path
    return str(GPU_DEFAULT_PRESET)


def _gpu_memory_gib() -> float | None:
    """Memory of the first visible CUDA GPU in GiB, None without one."""
    if not torch.cuda.is_available():
        return None
    return torch.cuda.get_device_properties(0).total_memory / 2**30


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path = None
    if "--config" in argv:
        i = argv.index("--config")
        config_path = argv[i + 1]
        del argv[i : i + 2]
    # the deepspeed launcher appends --local_rank=N; LOCAL_RANK in the environment carries the same
    argv = [a for a in argv if not a.startswith("--local_rank")]
    try:
        overrides = parse_overrides(argv)
        chosen = default_config_file(config_path, overrides, _gpu_memory_gib())
        cfg = load_config(chosen, overrides)
        if chosen != config_path and os.environ.get("RANK", "0") == "0":
            print(f"iclight_ds.train: a CUDA GPU of {GPU_DEFAULT_MIN_GIB} GiB or more is visible and no config or "
                  f"override but the run folder / resume was given: the default run uses {chosen}, into "
                  f"{cfg.train.output_dir}", file=sys.stderr)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        Trainer(cfg).train()
    except NonFiniteError as e:
        log.error("%s", e)
        return 3
    except _user_errors() as e:  # bad input: the message says what and where; no traceback needed
        log.error("%s: %s", type(e).__name__, e)
        return 2
    finally:
        eng.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())

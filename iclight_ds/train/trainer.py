"""The training loop: train() (cadence) -> train_step() (one optimizer step) -> forward_backward() (one micro-batch).

What the run is (every `auto` decided) comes from train/resolve.py, what it is built of from train/build.py; the
command line is train/cli.py.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..config import RunConfig, consistency_off_reason, encodes_once, save_config, to_dict, trains_consistency
from ..model.frozen import decode_to_linear
from ..model.schedule import NUM_TIMESTEPS, alphas_cumprod
from . import checkpoint as ckpt
from . import engine as eng
from .build import build_dataset, build_frozen_encoders, build_models, encode_once, load_run_base, run_tokenizer
from .checks import describe
from .conditioning import condition_batch, condition_cached_batch
from .ema import EMA_FILE, WeightsEMA
from .export import export_checkpoint
from .loader import build_loader
from .metrics import MetricsWriter, truncate_metrics
from .monitor import Monitor
from .objectives import ConditionedBatch, iclight_losses
from .resolve import check_run, resolve_run, warn_if_unusual
from .signals import StopSignals

log = logging.getLogger("iclight_ds")


def generator_seed(seed: int, rank: int) -> int:
    """Per-rank stream for noise, timesteps and light splits, derived from the one run seed."""
    return seed * 1_000_003 + rank


class NonFiniteError(RuntimeError):
    """Training cannot go on: losses or the fp16 loss scale stopped being finite."""


class Trainer:
    def __init__(self, cfg: RunConfig, *, preset: str | None = None):
        self.cfg = cfg
        self.phase = "start-up"  # what the run is doing, for the message when a collective fails
        self.acc = eng.init_distributed(cfg.train.collective_timeout_s)
        self.is_main = self.acc.rank == 0
        _setup_logging(self.acc.rank)
        self.out_dir = Path(cfg.train.output_dir)
        self.ckpt_root = self.out_dir / "checkpoints"
        self.run = resolve_run(cfg, self.acc, preset=preset)
        check_run(self.run, cfg, self.acc)
        warn_if_unusual(cfg, self.run)
        if self.is_main and (reason := consistency_off_reason(cfg)) is not None:
            log.warning("the consistency term is off: %s", reason)
        self.geometry, self.dtype = self.run.geometry, self.run.torch_dtype
        log.info("%s (ds_config=%s, optimizer=%s)", describe(self.acc.name, self.acc.world_size, self.dtype,
                                                             self.run.zero_stage, self.geometry),
                 self.run.ds_config, self.run.optimizer)
        if self.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
        self.base = load_run_base(cfg, self.run, self.out_dir, is_main=self.is_main)
        self.tokenizer = run_tokenizer(cfg, self.base)
        self.dataset = build_dataset(cfg, self.run, self.out_dir, self.tokenizer, is_main=self.is_main)
        frozen = build_frozen_encoders(cfg, self.run, self.base, self.tokenizer, self.acc.device, is_main=self.is_main)
        # what the steps read: the dataset, or its latent cache (data.cache=auto) encoded by those frozen encoders;
        # previews and evaluations decode the dataset's own samples
        self.train_set = (encode_once(cfg, self.run, self.out_dir, self.acc.device, frozen, is_main=self.is_main)
                          if encodes_once(cfg) else self.dataset)
        models = build_models(cfg, self.run, self.base, frozen, self.acc.device)
        self.engine, self.vae, self.text_encoder = models.engine, models.vae, models.text_encoder
        self._write_run_records()
        self.ema = self._build_ema()
        self.monitor = Monitor(cfg, out_dir=self.out_dir, is_main=self.is_main, zero_stage=self.run.zero_stage,
                               dataset=self.dataset, vae=self.vae, text_encoder=self.text_encoder,
                               tokenizer=self.tokenizer, ema=self.ema)
        self.loader, self.sampler = build_loader(self.train_set, self.geometry, rank=self.acc.rank, seed=cfg.train.seed,
                                                 num_workers=cfg.data.num_workers,
                                                 buckets=cfg.data.buckets and not cfg.data.cache)
        self.alphas_cumprod = alphas_cumprod().to(self.acc.device)
        self.generator = torch.Generator().manual_seed(generator_seed(cfg.train.seed, self.acc.rank))
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self._batches = None
        self.bad_steps = 0  # non-finite losses in a row
        self.skipped_total = 0
        self.signals = StopSignals()
        if cfg.train.resume:
            self._resume(cfg.train.resume)

    def _write_run_records(self) -> None:
        """Rank 0: the resolved record, the config as it resolved, and the DeepSpeed JSON used (for audit)."""
        if not self.is_main:
            return
        save_config(self.run.config(self.cfg), self.out_dir / "config.json")
        self.run.save(self.out_dir)
        record = {"_source": self.run.ds_config, **self.run.ds}
        (self.out_dir / "ds_config.json").write_text(json.dumps(record, indent=2) + "\n")

    def _build_ema(self) -> WeightsEMA | None:
        """train.ema_decay: rank 0's average of the trainable weights, on the host where the config offloads."""
        if not self.cfg.train.ema_decay or not self.is_main:
            return None
        zero = self.run.ds.get("zero_optimization", {})
        offloads = any(zero.get(k, {}).get("device", "none") not in (None, "none")
                       for k in ("offload_optimizer", "offload_param"))
        device = torch.device("cpu") if offloads else self.acc.device
        log.info("EMA of the trainable weights (decay %g) in fp32 on %s", self.cfg.train.ema_decay, device)
        return WeightsEMA(self.engine.module, self.cfg.train.ema_decay, device=device)

    def _resume(self, resume: str) -> None:
        root, tag = ckpt.resolve(resume, self.ckpt_root)
        state = ckpt.load(self.engine, root, tag, generator=self.generator, rank=self.acc.rank,
                          unverified_ok=self.cfg.train.resume_unverified)
        if self.ema is not None and (root / tag / EMA_FILE).is_file():
            self.ema.load(root / tag / EMA_FILE)
        elif self.ema is not None:
            log.warning("%s holds no EMA weights: the EMA starts from the resumed weights", root / tag)
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

    def condition(self, batch: dict) -> ConditionedBatch:
        """One loader batch -> the UNet's inputs: through the frozen encoders, or read from a latent cache."""
        cfg = self.cfg
        consistency = trains_consistency(cfg)
        how = dict(variant=cfg.model.variant, split_cells=cfg.objective.split_cells, with_split=consistency,
                   generator=self.generator, device=self.acc.device, light_input=cfg.model.light_input)
        if cfg.data.cache:
            return condition_cached_batch(batch, **how)
        return condition_batch(batch, vae=self.vae, text_encoder=self.text_encoder, **how)

    def forward_backward(self, batch: dict) -> dict[str, torch.Tensor]:
        """One micro-batch: conditions, noise, losses, ONE backward and ONE engine step (DeepSpeed accumulates)."""
        cfg = self.cfg
        cond = self.condition(batch)
        shape = cond.latents.shape  # (B, 4, h, w)
        noise = torch.randn(shape, generator=self.generator)
        if cfg.objective.noise_offset > 0:
            noise += cfg.objective.noise_offset * torch.randn(shape[0], shape[1], 1, 1, generator=self.generator)
        timesteps = torch.randint(0, NUM_TIMESTEPS, (shape[0],), generator=self.generator)
        terms = iclight_losses(self.engine, cond, noise.to(self.acc.device), timesteps.to(self.acc.device),
                               alphas_cumprod=self.alphas_cumprod, lambda_vanilla=cfg.objective.lambda_vanilla,
                               lambda_consistency=cfg.objective.lambda_consistency if trains_consistency(cfg) else 0.0,
                               snr_gamma=cfg.objective.snr_gamma, consistency=cfg.objective.consistency,
                               to_linear=self._to_linear, linear_samples=cfg.objective.linear_samples,
                               consistency_min_timestep=cfg.objective.consistency_min_timestep,
                               consistency_weighting=cfg.objective.consistency_weighting)
        if not self._all_finite(terms["loss"], batch):
            return {}
        self.engine.backward(terms["loss"])
        self.engine.step()
        return {k: v.detach() for k, v in terms.items()}

    def _to_linear(self, latents: torch.Tensor) -> torch.Tensor:
        """objective.consistency linear: latents -> linear-light images through the run's frozen VAE."""
        return decode_to_linear(self.vae, latents)

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
                "or use bf16 instead of fp16.")
        return False

    def train_step(self) -> dict[str, torch.Tensor]:
        """One optimizer step's worth of micro-batches; returns the mean of each loss term (on device)."""
        totals: dict[str, torch.Tensor] = {}
        done = 0
        while done < self.geometry.accumulation:  # a skipped (non-finite) micro-batch is replaced by the next one
            self.phase = f"step {self.step + 1}: forward, backward and the gradient all-reduce"
            terms = self.forward_backward(self._next_batch())
            if terms:
                done += 1
                for k, v in terms.items():
                    totals[k] = totals.get(k, 0) + v / self.geometry.accumulation
        self._check_fp16_scale()
        if self.ema is not None:  # the optimizer stepped at the last micro-batch
            self.ema.update(self.engine.module)
        return totals

    def _check_fp16_scale(self) -> None:
        """fp16 only: a loss scale that collapsed means every step overflows; say so instead of training on."""
        scale = getattr(self.engine.optimizer, "cur_scale", None) if self.dtype == torch.float16 else None
        if scale is not None and scale < 1.0:
            raise NonFiniteError(
                f"fp16 loss scale collapsed to {scale} at step {self.step + 1}: gradients overflow at every step. "
                "Use a bf16 config (GPUs since Ampere) or lower train.lr.")

    def train(self) -> None:
        cfg, log_cfg = self.cfg, self.cfg.logging
        writer = MetricsWriter(self.out_dir / "metrics.jsonl", cfg, enabled=self.is_main, start_step=self.step)
        progress = None
        if self.is_main and log_cfg.progress:
            progress = tqdm(total=cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True)
        window: list[dict[str, torch.Tensor]] = []
        t_last, steps_last = time.perf_counter(), self.step
        saved_at, self.saved_time = None, time.monotonic()
        self.signals.install()
        if log_cfg.eval_at_start and self.step == 0:
            self.phase = "step 0: evaluating the starting weights"
            self.monitor.evaluate(self.engine.module, 0, writer)
        while self.step < cfg.train.steps:
            try:
                window.append(self.train_step())
            except NonFiniteError:
                self.save()  # the skipped micro-batches never reached the weights: this is the last good state
                raise
            self.step += 1
            if progress is not None:
                progress.update(1)
            if self.step % log_cfg.every == 0 or self.step == cfg.train.steps:
                now = time.perf_counter()
                self.phase = f"step {self.step}: averaging the logged losses over the ranks"
                record = self._reduce(window, self.geometry.effective_batch * (self.step - steps_last) / (now - t_last))
                writer.write(record)
                if progress is not None:
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
                window, t_last, steps_last = [], now, self.step
            self.phase = f"step {self.step}: the per-step signal and checkpoint-time check"
            stop, minutes_passed = self.signals.requested(self._minutes_passed())
            if self.step < cfg.train.steps and (minutes_passed or (
                    cfg.train.checkpoint_every and self.step % cfg.train.checkpoint_every == 0)):
                try:
                    self.save()
                    saved_at = self.step
                except ckpt.CheckpointError as e:  # keep training: the next save may succeed
                    log.error("%s", e)
            self._show(writer, final=False)
            if stop:
                log.warning("signal %s: saving at step %d and exiting", self.signals.signal, self.step)
                break
        if progress is not None:
            progress.close()
        if saved_at != self.step:
            self.save()
        if self.skipped_total:
            log.warning("%d non-finite micro-batch(es) were skipped in this run", self.skipped_total)
        if self.signals.signal is None:
            self._show(writer, final=True)
            if cfg.train.export and self.is_main:
                for path in export_checkpoint(self.ckpt_root, ckpt.tag_for(self.step), self.out_dir,
                                              weights="ema" if self.ema is not None else "raw", verify=False):
                    log.info("exported %s", path)
            eng.barrier()
        self._remove_nvme_swap()
        writer.close()

    def _remove_nvme_swap(self) -> None:
        """NVMe offload: the run's swap files (the optimizer states, GBs) go once the last checkpoint holds them."""
        eng.barrier()
        if self.run.nvme_swap and self.acc.local_rank == 0:
            shutil.rmtree(self.run.nvme_swap, ignore_errors=True)

    def _show(self, writer: MetricsWriter, *, final: bool) -> None:
        """Previews and evaluation at their cadence; at the end, for the final weights if the cadence missed them."""
        log_cfg, module = self.cfg.logging, self.engine.module
        self.phase = f"step {self.step}: previews and evaluation"
        for every, show in ((log_cfg.preview_every, self.monitor.preview), (log_cfg.eval_every, self.monitor.evaluate)):
            if every and (self.step % every == 0) != final:
                show(module, self.step, writer)

    def _reduce(self, window: list[dict[str, torch.Tensor]], samples_per_s: float) -> dict:
        """Average the window over steps and ranks: the only device synchronisation in the loop."""
        keys = ["loss", "loss_vanilla", "loss_consistency"]
        stacked = torch.stack([torch.stack([w[k].float() for k in keys]) for w in window]).mean(0)
        values = eng.all_reduce_mean(stacked).tolist()
        record = {"step": self.step, **dict(zip(keys, values))}
        record.update(lr=self.engine.get_lr()[0], samples_per_s=samples_per_s, epoch=self.epoch,
                      skipped_micro_batches=self.skipped_total)
        return record

    def _minutes_passed(self) -> bool:
        """train.checkpoint_minutes since the last save? (decided with every rank in StopSignals.requested)"""
        minutes = self.cfg.train.checkpoint_minutes
        return bool(minutes) and time.monotonic() - self.saved_time >= 60 * minutes

    def save(self) -> Path:
        self.phase = f"saving the checkpoint of step {self.step}"
        client_state = {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
                        "world_size": self.acc.world_size}
        path = ckpt.save(self.engine, self.ckpt_root, step=self.step, client_state=client_state,
                         config=to_dict(self.run.config(self.cfg)), generator=self.generator, rank=self.acc.rank,
                         keep=self.cfg.train.keep, resolved=self.run.to_dict(),
                         rank0_files={EMA_FILE: self.ema.save} if self.ema is not None else None)
        self.saved_time = time.monotonic()
        log.info("checkpoint %s", path)
        return path


def _setup_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank{rank}] %(asctime)s %(levelname)s %(message)s")
    log.setLevel(level)

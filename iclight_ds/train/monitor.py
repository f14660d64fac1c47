"""What the loop shows of the model while it trains: preview grids and the training-time evaluation.

Both are collective under ZeRO-3, which gathers each layer's weights inside its forward: every rank then runs the
(identical, fixed-seed) sampling and rank 0 alone saves. Otherwise rank 0 samples alone.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from ..config import RunConfig
from ..infer.eval import evaluate_samples, load_eval_samples
from ..infer.images import background_tensor, env_tensor, foreground_tensor, open_image
from ..infer.preview import make_preview_grid
from ..infer.sampling import DEMO_NEGATIVE_PROMPT
from . import engine as eng
from .build import make_synthetic
from .ema import WeightsEMA
from .metrics import MetricsWriter

log = logging.getLogger("iclight_ds")


class Monitor:
    def __init__(self, cfg: RunConfig, *, out_dir: Path, is_main: bool, zero_stage: int, dataset, vae, text_encoder,
                 tokenizer, ema: WeightsEMA | None = None):
        self.cfg, self.out_dir, self.is_main = cfg, out_dir, is_main
        self.samples_here = is_main or zero_stage == 3
        # previews and evaluations stack their samples: with data.buckets they see the square centre crops
        self.dataset = dataset.square() if hasattr(dataset, "square") else dataset
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.ema = ema if cfg.logging.preview_weights == "ema" else None  # only rank 0 holds one
        self._warned: set[str] = set()
        self._eval_items: list[dict] | None = None
        self._user_batch: dict | None = None

    def _weights(self, module):
        """The weights previews and evaluations sample with: the EMA's (logging.preview_weights) or the module's."""
        return self.ema.swapped_in(module) if self.ema is not None else contextlib.nullcontext(module)

    def user_batch(self) -> dict:
        """logging.preview_images as a batch (loaded once): foregrounds at the training resolution, their prompts,
        and their backgrounds (FBC) or environment maps (FC), a single entry standing for all."""
        if self._user_batch is None:
            log_cfg, res = self.cfg.logging, self.cfg.data.resolution
            n = len(log_cfg.preview_images)

            def each(values: list[str]) -> list[str]:
                return values if len(values) == n else values * n

            batch = {"foreground": torch.stack([foreground_tensor(open_image(p, "logging.preview_images"), None, res,
                                                                  res) for p in log_cfg.preview_images]),
                     "prompt": each(log_cfg.preview_prompts or [""])}
            if self.cfg.model.variant == "fbc":
                batch["background"] = torch.stack([
                    background_tensor(open_image(p, "logging.preview_backgrounds"), res, res)
                    for p in each(log_cfg.preview_backgrounds)])
            else:
                batch["env"] = torch.stack([env_tensor(p, self.cfg.model.env_shape)
                                            for p in each(log_cfg.preview_envs)])
            self._user_batch = batch
        return self._user_batch

    def _can_decode(self, warning: str) -> bool:
        """Previews and evaluations decode through the VAE, which a run from a latent cache never builds: False then,
        with `warning` logged once (rank 0)."""
        if self.vae is not None:
            return True
        if self.is_main and warning not in self._warned:
            log.warning("%s", warning)
            self._warned.add(warning)
        return False

    def preview(self, module, step: int, writer: MetricsWriter) -> Path | None:
        """Collective: relight the first `preview_samples` samples with a fixed seed; rank 0 saves the grid."""
        if not self._can_decode("no previews when training from a cache (data.cache): the VAE is not loaded"):
            return None
        cfg = self.cfg
        path = self.out_dir / "previews" / f"step_{step:08d}.png"
        if self.samples_here:
            n = min(cfg.logging.preview_samples, len(self.dataset))
            grids = {path: dict(samples=[self.dataset[i] for i in range(n)], steps=cfg.logging.preview_steps)}
            if cfg.logging.preview_images:  # the user's own, with the official demo's sampler settings
                grids[path.with_name(f"user_step_{step:08d}.png")] = dict(
                    samples=self.user_batch(), steps=cfg.logging.preview_image_steps,
                    guidance=cfg.logging.preview_image_cfg, negative_prompt=DEMO_NEGATIVE_PROMPT)
            with self._weights(module):
                for out, how in grids.items():
                    grid = make_preview_grid(module.unet, self.vae, self.text_encoder, self.tokenizer,
                                             module.env_encoder, seed=cfg.train.seed, **how)
                    if self.is_main:
                        out.parent.mkdir(parents=True, exist_ok=True)
                        grid.save(out)
                        writer.image("preview" if out == path else "preview_user", out, step)
                        log.info("preview %s", out)
        eng.barrier()
        return path

    def eval_set(self) -> list[dict]:
        """Collective on first use: the evaluation's scenes (loaded once): logging.eval_data, held-out synthetic
        scenes, or the last training samples (said so in the log)."""
        if self._eval_items is not None:
            return self._eval_items
        cfg = self.cfg
        n = cfg.logging.eval_samples
        root = Path(cfg.logging.eval_data) if cfg.logging.eval_data else None
        if root is None and cfg.data.path is None:
            root = self.out_dir / "eval_data"
            if self.is_main:
                make_synthetic(root, n, seed=cfg.data.synth_seed + 1000, resolution=cfg.data.resolution,
                               env_shape=cfg.model.env_shape)
            eng.barrier()
        if root is not None:
            self._eval_items = load_eval_samples(root, cfg.data.resolution, self.tokenizer, cfg.model.env_shape,
                                                 count=n, require_background=cfg.model.variant == "fbc",
                                                 require_env=cfg.model.env_input)
        else:
            log.info("evaluation on the last %d training samples (set logging.eval_data to held-out scenes)", n)
            self._eval_items = [self.dataset[i] for i in range(max(0, len(self.dataset) - n), len(self.dataset))]
        return self._eval_items

    def evaluate(self, module, step: int, writer: MetricsWriter) -> dict | None:
        """Collective: score the model on the evaluation scenes (iclight_ds.infer.eval); rank 0 logs eval/*."""
        if not self._can_decode("no training-time evaluation when training from a cache (data.cache): no VAE loaded"):
            return None
        cfg = self.cfg
        summary = None
        scenes = self.eval_set()  # on every rank: making the held-out scenes ends with a barrier
        if self.samples_here:
            with self._weights(module):
                result = evaluate_samples(module.unet, self.vae, self.text_encoder, module.env_encoder, scenes,
                                          steps=cfg.logging.eval_steps, seed=cfg.train.seed, tokenizer=self.tokenizer)
            summary = result["summary"]
            if self.is_main:
                writer.write({"step": step, **{f"eval/{k}": v for k, v in summary.items()}})
                log.info("eval at step %d: PSNR %.2f dB (copy input %.2f), SSIM %.3f, additivity error %s", step,
                         summary["psnr"], summary["baseline_psnr"], summary["ssim"],
                         f"{summary['additivity_error']:.3f}" if "additivity_error" in summary else "-")
        eng.barrier()
        return summary

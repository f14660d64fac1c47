"""What the loop shows of the model while it trains: preview grids and the training-time evaluation.

Both are collective under ZeRO-3, which gathers each layer's weights inside its forward: every rank then runs the
(identical, fixed-seed) sampling and rank 0 alone saves. Otherwise rank 0 samples alone.
"""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import RunConfig
from ..infer.eval import evaluate_samples, load_eval_samples
from ..infer.preview import make_preview_grid
from . import engine as eng
from .build import make_synthetic
from .metrics import MetricsWriter

log = logging.getLogger("iclight_ds")


class Monitor:
    def __init__(self, cfg: RunConfig, *, out_dir: Path, is_main: bool, zero_stage: int, dataset, vae, text_encoder,
                 tokenizer):
        self.cfg, self.out_dir, self.is_main = cfg, out_dir, is_main
        self.samples_here = is_main or zero_stage == 3
        # previews and evaluations stack their samples: with data.buckets they see the square centre crops
        self.dataset = dataset.square() if hasattr(dataset, "square") else dataset
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self._warned: set[str] = set()
        self._eval_items: list[dict] | None = None

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
            samples = [self.dataset[i] for i in range(n)]
            grid = make_preview_grid(module.unet, self.vae, self.text_encoder, self.tokenizer, module.env_encoder,
                                     samples, seed=cfg.train.seed, steps=cfg.logging.preview_steps)
            if self.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
                grid.save(path)
                writer.image("preview", path, step)
                log.info("preview %s", path)
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

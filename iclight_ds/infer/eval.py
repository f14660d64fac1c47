"""Measure what a trained model learned: relight held-out scenes and compare with their ground truth.

    python -m iclight_ds.eval --run DIR --data DIR [--steps 20] [--seed 0] [--samples 32] [--strength 1]
                              [--out FILE.json]

`--run` is a trainer output folder (config.json, unet.safetensors, iclight_modules.safetensors); `--data` a dataset
in the manifest format, ideally scenes the run never saw (`python -m iclight_ds.data.synth --seed <other>`). Each
sample is relit through the project's sampling code (`relight.relight_images`: DPM++ 2M SDE Karras, fixed seed) and
scored on its foreground (the mask):

  psnr / ssim          relit vs ground-truth target, sRGB in [0, 1], averaged over the mask; and the same for the
                       trivial baseline that returns the degraded input (the foreground under other light) unchanged
  chroma_drift         albedo drift: mean |c(relit) - c(target)|_1 over the mask, c = linear rgb / (r + g + b)
  additivity_error     light transport: relight under L1, L2 and L = L1 + L2 (samples with `env_parts`), convert to
                       linear light, || R(L1) + R(L2) - R(L) || / || R(L) || over the foreground. The copy-the-input
                       baseline scores exactly 1 (it ignores the light); the ground truth, clipped to the displayable
                       range as the model's outputs are, gives the floor (`additivity_floor`, from target_parts_linear)
  vae_psnr             the VAE's own reconstruction of the target: the ceiling any model trained through it can reach

Prints a table and writes JSON (default <run>/eval.json): the summary (means) and every sample's numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from diffusers.utils import make_image_grid

from ..config import ConfigError, load_config
from ..data.dataset import DatasetError, RelightDataset
from ..data.imageio import GREY, linear_to_srgb, srgb_to_linear
from ..data.synth import background_view
from ..model.base import BaseModelError, load_base
from ..model.formats import MODULES_FILE, UNET_FILE
from ..model.frozen import decode_images, encode_images, encode_text
from ..model.schedule import DEFAULT_SAMPLER
from .images import to_pil
from .metrics import (
    additivity_error,
    chroma_drift,
    masked_psnr,
    masked_ssim,
)
from .sampling import (
    RelightError,
    _env_tokens,
    _with_env,
    prompt_embeddings,
    relight_images,
    resolve_device,
)
from .weights import load_trained_unet

log = logging.getLogger(__name__)

class EvalError(ValueError):
    """A run or dataset that cannot be evaluated; says which file or key."""


# ---------------------------------------------------------------------------------------------------------
# Metrics on (B, 3, H, W) images in [0, 1] with (B, 1, H, W) masks


# ---------------------------------------------------------------------------------------------------------
# Relighting a list of dataset samples with in-memory modules


def _stack(samples: Sequence[dict], key: str) -> torch.Tensor:
    return torch.stack([s[key] for s in samples])


def _backgrounds_of(env: torch.Tensor, resolution: int) -> torch.Tensor:
    """(B, 3, R, R) in [-1, 1]: the synthetic generator's background (the env map resized) for env maps (B, 3, He, We).

    Lets an FBC model be relit under the light parts L1, L2 of a synthetic sample, whose background is the view of L.
    """

    views = [linear_to_srgb(background_view(e.permute(1, 2, 0).numpy().astype(np.float64), resolution))
             for e in env]
    return torch.from_numpy(np.stack(views)).permute(0, 3, 1, 2).float() * 2 - 1


@torch.no_grad()
def relight_samples(unet, vae, text_encoder, env_encoder, samples: Sequence[dict], *, light: str = "full",
                    steps: int = 20, seed: int = 0, guidance: float = 1.0, sampler: str | None = None,
                    tokenizer=None, strength: float = 1.0) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1]: `samples` (RelightDataset items) relit under their light L ('full') or its parts
    ('part1' = L1, 'part2' = L2; samples with env_parts). The same seed for every light, so that the three relights
    of a scene share their initial noise. `tokenizer` is needed for guidance > 1 (the empty negative prompt).
    strength < 1: sampling starts from the degraded input's latent noised to that share of the schedule (img2img)."""

    fbc = unet.config.in_channels == 12
    env = _stack(samples, "env")  # (B, 3, He, We)
    if light != "full":
        env = _stack(samples, "env_parts")[:, 0 if light == "part1" else 1]
    device = next(text_encoder.parameters()).device
    text = encode_text(text_encoder, _stack(samples, "input_ids").to(device))
    env_tokens = _env_tokens(env_encoder, env) if env_encoder is not None else None
    embeds = _with_env(text, env_tokens)
    negative = None
    if guidance > 1:
        if tokenizer is None:
            raise EvalError("guidance > 1 needs the tokenizer (for the empty negative prompt)")
        negative = prompt_embeddings(text_encoder, tokenizer, [""] * len(samples), env_tokens)
    foreground = _stack(samples, "foreground")
    background = None
    if fbc:
        background = _stack(samples, "background") if light == "full" else _backgrounds_of(
            env, samples[0]["target"].shape[-1])
    return relight_images(unet, vae, prompt_embeds=embeds, negative_embeds=negative,
                          foreground=foreground, background=background, seed=seed, steps=steps,
                          guidance=guidance, sampler=sampler or DEFAULT_SAMPLER,
                          init=foreground if strength < 1 else None, strength=strength)


def _eval_mode(*modules):
    """Put modules in eval mode; returns a function that restores their previous modes."""
    modes = [(m, m.training) for m in modules if m is not None]
    for m, _ in modes:
        m.eval()

    def restore() -> None:
        for m, training in modes:
            m.train(training)

    return restore


@torch.no_grad()
def evaluate_samples(unet, vae, text_encoder, env_encoder, samples: Sequence[dict], *, steps: int = 20, seed: int = 0,
                     guidance: float = 1.0, batch_size: int = 16, sampler: str | None = None,
                     additivity: bool = True, tokenizer=None, keep_images: int = 0, strength: float = 1.0) -> dict:
    """Score `samples` (RelightDataset items; `parts_linear` (2, 3, H, W) optional, for the floor).

    Returns {"summary": {metric: mean}, "samples": [{metric: value, ...}, ...]}, plus "images" (a list of
    {"input", "target", "relit", "relit_part1", "relit_part2"}: (3, H, W) in [0, 1]) for the first `keep_images`
    samples. Modules are put in eval mode and restored. Under ZeRO-3 every rank must call this (each layer gathers
    its weights inside forward).
    """
    restore = _eval_mode(unet, env_encoder)
    rows: list[dict] = []
    images: list[dict] = []
    try:
        for start in range(0, len(samples), batch_size):
            chunk = list(samples[start:start + batch_size])
            rows += _score_chunk(unet, vae, text_encoder, env_encoder, chunk, steps=steps, seed=seed + start,
                                 guidance=guidance, sampler=sampler, additivity=additivity, tokenizer=tokenizer,
                                 strength=strength,
                                 images=images if len(images) < keep_images else None)
    finally:
        restore()
    keys = list(dict.fromkeys(k for r in rows for k, v in r.items() if isinstance(v, float)))
    summary = {k: float(np.mean([r[k] for r in rows if k in r])) for k in keys}  # additivity: rows with parts
    summary["samples"] = len(rows)
    summary["samples_with_parts"] = sum("additivity_error" in r for r in rows)
    if "psnr" in summary:
        summary["psnr_gain_db"] = summary["psnr"] - summary["baseline_psnr"]
    result = {"summary": summary, "samples": rows}
    if keep_images:
        result["images"] = images[:keep_images]
    return result


def _score_chunk(unet, vae, text_encoder, env_encoder, chunk, *, steps, seed, guidance, sampler, additivity, tokenizer,
                 strength, images=None):
    how = dict(steps=steps, seed=seed, guidance=guidance, sampler=sampler, tokenizer=tokenizer, strength=strength)
    relit = relight_samples(unet, vae, text_encoder, env_encoder, chunk, **how)  # (B, 3, H, W) in [0, 1]
    target = (_stack(chunk, "target").float() + 1) / 2
    degraded = ((_stack(chunk, "foreground").float() + 1) * GREY / 255).clamp(0, 1)  # undo x / 127 - 1
    mask = _stack(chunk, "mask").float()
    device = next(vae.parameters()).device
    recon = decode_images(vae, encode_images(vae, _stack(chunk, "target").to(device))).cpu()
    lin = srgb_to_linear
    cols = {
        "psnr": masked_psnr(relit, target, mask), "baseline_psnr": masked_psnr(degraded, target, mask),
        "ssim": masked_ssim(relit, target, mask), "baseline_ssim": masked_ssim(degraded, target, mask),
        "chroma_drift": chroma_drift(lin(relit), lin(target), mask),
        "baseline_chroma_drift": chroma_drift(lin(degraded), lin(target), mask),
        "vae_psnr": masked_psnr(recon, target, mask),
    }
    has_parts = torch.tensor([bool(s.get("has_env_parts", False)) for s in chunk])
    if additivity and bool(has_parts.any()):
        parts = [s for s, h in zip(chunk, has_parts) if h]
        idx = has_parts.nonzero().flatten()
        r1 = relight_samples(unet, vae, text_encoder, env_encoder, parts, light="part1", **how)
        r2 = relight_samples(unet, vae, text_encoder, env_encoder, parts, light="part2", **how)
        err = additivity_error(lin(relit[idx]), lin(r1), lin(r2), mask[idx])
        cols["additivity_error"] = torch.full((len(chunk),), float("nan")).index_copy(0, idx, err)
        floors = [s.get("parts_linear") for s in parts]
        if all(f is not None for f in floors):  # the ground truth clipped to [0, 1] after sRGB encoding, as images are
            gt = torch.stack(floors)  # (b, 2, 3, H, W) linear
            clip = lambda x: lin(linear_to_srgb(x))  # noqa: E731
            floor = additivity_error(lin(target[idx]), clip(gt[:, 0]), clip(gt[:, 1]), mask[idx])
            cols["additivity_floor"] = torch.full((len(chunk),), float("nan")).index_copy(0, idx, floor)
    if images is not None:
        parts_of = {int(j): k for k, j in enumerate(has_parts.nonzero().flatten())} if "additivity_error" in cols else {}
        for i in range(len(chunk)):
            entry = {"input": degraded[i], "target": target[i], "relit": relit[i]}
            if i in parts_of:
                entry.update(relit_part1=r1[parts_of[i]], relit_part2=r2[parts_of[i]])
            images.append(entry)
    rows = []
    for i, s in enumerate(chunk):
        row = {"id": s.get("id", str(s.get("index", i)))}
        for k, v in cols.items():
            value = float(v[i])
            if not math.isnan(value):
                row[k] = value
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------------------
# Loading a run and a dataset


def load_eval_samples(data: str | Path, resolution: int, tokenizer, env_shape: tuple[int, int], *,
                      count: int | None = None, require_background: bool = False,
                      require_env: bool | None = None) -> list[dict]:
    """The first `count` samples of the dataset at `data`, as RelightDataset items plus `id` and, when the manifest
    has them at this resolution, `parts_linear` (2, 3, R, R): the ground-truth frames under L1 and L2.
    require_env: every sample needs an env map (default: unless require_background; False for text-lit FC)."""

    try:
        ds = RelightDataset(data, resolution, tokenizer, env_shape=env_shape, require_background=require_background,
                            require_env=not require_background if require_env is None else require_env)
    except DatasetError as e:
        raise EvalError(f"--data {data}: {e}") from e
    n = len(ds) if count is None else min(count, len(ds))
    out = []
    for i in range(n):
        item = dict(ds.load(i))
        meta = ds.samples[i]
        item["id"] = meta.id
        if meta.target_parts_linear is not None:
            parts = [np.load(Path(data) / p, allow_pickle=False) for p in meta.target_parts_linear]
            if all(p.shape == (resolution, resolution, 3) for p in parts):
                item["parts_linear"] = torch.from_numpy(np.stack(parts)).permute(0, 3, 1, 2).float()
        out.append(item)
    return out


def load_run(run: str | Path, weights: str | Path | None = None):
    """(unet, vae, text_encoder, tokenizer, env_encoder, run config) of a trainer output folder, fp32 on the CPU."""

    run = Path(run)
    if not (run / "config.json").is_file():
        raise EvalError(f"--run {run}: no config.json (expected a trainer output folder)")
    weights = Path(weights) if weights else run / UNET_FILE
    if not weights.exists():
        raise EvalError(f"--run {run}: no {weights.name} (the trainer exports it at the end of a run; "
                        f"`python -m iclight_ds.export` makes one from a checkpoint)")
    try:
        cfg = load_config(run / "config.json")
        base = load_base(run)
        unet, env_encoder, _ = load_trained_unet(base, weights, modules=run / MODULES_FILE
                                                 if (run / MODULES_FILE).is_file() else None)
    except (ConfigError, BaseModelError, RelightError) as e:
        raise EvalError(f"--run {run}: {e}") from e
    if base.vae is None or base.text_encoder is None:
        raise EvalError(f"--run {run}: its base has no VAE or text encoder")
    return unet.float(), base.vae.float(), base.text_encoder.float(), base.tokenizer, env_encoder, cfg


# ---------------------------------------------------------------------------------------------------------
# Report


ROWS = (("psnr", "PSNR (dB, fg)", "baseline_psnr", "{:.2f}"), ("ssim", "SSIM (fg)", "baseline_ssim", "{:.3f}"),
        ("chroma_drift", "albedo chroma drift", "baseline_chroma_drift", "{:.4f}"),
        ("additivity_error", "additivity error", None, "{:.3f}"))


def save_grid(images: list[dict], path: str | Path) -> Path:
    """One row per sample: degraded input | target | relit under L [| under L1 | under L2]."""
    keys = ["input", "target", "relit", "relit_part1", "relit_part2"]
    keys = [k for k in keys if all(k in im for im in images)]
    grid = make_image_grid([to_pil(im[k]) for im in images for k in keys], rows=len(images), cols=len(keys))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return path


def format_table(summary: dict) -> str:
    lines = [f"{'metric':<24}{'model':>10}{'copy input':>12}"]
    for key, name, base_key, fmt in ROWS:
        if key not in summary:
            continue
        baseline = fmt.format(summary[base_key]) if base_key else ("1.000" if key == "additivity_error" else "-")
        lines.append(f"{name:<24}{fmt.format(summary[key]):>10}{baseline:>12}")
    if "psnr_gain_db" in summary:
        lines.append(f"{'PSNR gain over copy':<24}{summary['psnr_gain_db']:>+10.2f}")
    if "additivity_floor" in summary:
        lines.append(f"{'additivity floor (GT)':<24}{summary['additivity_floor']:>10.3f}")
    if "vae_psnr" in summary:
        lines.append(f"{'VAE ceiling PSNR':<24}{summary['vae_psnr']:>10.2f}")
    lines.append(f"samples: {summary.get('samples', 0)} ({summary.get('samples_with_parts', 0)} with light parts)")
    return "\n".join(lines)


def run_eval(args: argparse.Namespace) -> dict:

    device = resolve_device(args.device)
    torch.manual_seed(args.seed)
    unet, vae, text_encoder, tokenizer, env_encoder, cfg = load_run(args.run, args.weights)
    for module in (unet, vae, text_encoder, env_encoder):  # fp32 on every device
        if module is not None:
            module.to(device)
    fbc = unet.config.in_channels == 12
    samples = load_eval_samples(args.data, cfg.data.resolution, tokenizer, tuple(cfg.model.env_shape),
                                count=args.samples, require_background=fbc, require_env=env_encoder is not None)
    start = time.perf_counter()
    result = evaluate_samples(unet, vae, text_encoder, env_encoder, samples, steps=args.steps, seed=args.seed,
                              guidance=args.cfg, batch_size=args.batch_size, sampler=args.sampler, tokenizer=tokenizer,
                              keep_images=args.grid_samples if args.grid else 0, strength=args.strength)
    result["settings"] = {"run": str(args.run), "data": str(args.data), "steps": args.steps, "seed": args.seed,
                          "strength": args.strength,
                          "cfg": args.cfg, "sampler": args.sampler or "dpmpp_2m_sde_karras",
                          "variant": cfg.model.variant, "resolution": cfg.data.resolution,
                          "device": str(device), "seconds": round(time.perf_counter() - start, 1)}
    if args.grid:
        result["settings"]["grid"] = str(save_grid(result.pop("images"), args.grid))
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m iclight_ds.eval", description=__doc__.split("\n")[0])
    p.add_argument("--run", required=True, help="trainer output folder")
    p.add_argument("--data", required=True, help="dataset folder (held-out scenes) with manifest.jsonl")
    p.add_argument("--weights", default=None, help="UNet weights to score (default: <run>/unet.safetensors)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samples", type=int, default=32, help="first N samples of --data")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance (1: off, as trained)")
    p.add_argument("--strength", type=float, default=1.0,
                   help="1 (default, every documented score): sample from pure noise; < 1: start from the degraded "
                        "input's latent noised to this share of the sampler steps (img2img, like the demo's initial "
                        "latent), which hands the model the silhouette")
    p.add_argument("--sampler", default=None, help="default: dpmpp_2m_sde_karras (the demo's)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--device", default="cpu", help="cpu (default: the documented numbers), cuda, cuda:N or auto; fp32 on "
                   "every device")
    p.add_argument("--out", default=None, help="JSON result (default: <run>/eval.json)")
    p.add_argument("--grid", default=None, help="also save a PNG: input | target | relit under L, L1, L2 per row")
    p.add_argument("--grid-samples", type=int, default=8, help="rows of --grid")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")

    try:
        result = run_eval(args)
    except (EvalError, RelightError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.run) / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(result["summary"]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

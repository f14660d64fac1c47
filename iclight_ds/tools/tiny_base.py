"""Pretrain the tiny base: a tiny SD1.5-shaped UNet as a plain text-to-image epsilon denoiser of synthetic renders.

IC-Light fine-tunes a pretrained SD1.5; at the CPU default run's size there is none, so this makes one. The UNet is
`model.arch.TINY_UNET` (4-channel conv_in, the CPU default run's UNet before IC-Light widens it), trained on the
relit TARGET images of synthetic scenes with their prompts only: no foreground input, no relighting task. Everything
frozen is encoded once (the shipped tiny VAE's latents, the text encoder's hidden states), so a step does no VAE or
text-encoder work. The result ships as `iclight_ds/model/assets/tiny_base.safetensors` (model/tinybase.py has the
format; `model.base: tiny` loads it), with the recipe, seeds, steps, time, device and held-out scores in its metadata.

    python -m iclight_ds.tools.tiny_base [--out FILE] [--samples 16384] [--steps 4000] [--batch 64] [--lr 2e-3]

The objective is the trainer's (iclight_ds/train/objectives.py): SD1.5's noise schedule, epsilon prediction,
Min-SNR-gamma weights. The text encoder is the tiny random one the trainer builds for train.seed 0 (frozen; it is
stored in the file, so the fine-tune reads prompts exactly as the base did). Scores: epsilon MSE and x0 MSE on
held-out scenes at fixed timesteps and noise (epsilon MSE 1.0 is predicting zero noise), of the weights as stored
(the UNet int8, model/tinybase.py) and, beside them, of the fp32 weights before rounding.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ..data.dataset import RelightDataset
from ..data.synth import generate
from ..model.arch import TINY_UNET
from ..model.frozen import ASSET, build_frozen, encode_images, encode_text
from ..model.schedule import alphas_cumprod
from ..model.tinybase import TINY_BASE_ASSET, as_stored, save_tiny_base
from ..model.tokenizer import build_char_tokenizer
from ..train.objectives import add_noise, min_snr_weights, vanilla_loss

SCORE_TIMESTEPS = (100, 500, 900, 999)


@torch.no_grad()
def encode_scenes(root: Path, resolution: int, vae, text_encoder, tokenizer, batch: int = 256):
    """(latents (N, 4, h, w) scaled, text (N, 77, D)): every scene's target through the VAE, its prompt through the
    text encoder, once."""
    ds = RelightDataset(root, resolution, tokenizer)
    latents, text = [], []
    for start in range(0, len(ds), batch):
        items = [ds[i] for i in range(start, min(start + batch, len(ds)))]
        latents.append(encode_images(vae, torch.stack([it["target"] for it in items])))
        text.append(encode_text(text_encoder, torch.stack([it["input_ids"] for it in items])))
    return torch.cat(latents), torch.cat(text)


@torch.no_grad()
def score(unet, latents: torch.Tensor, text: torch.Tensor, abar: torch.Tensor, seed: int = 0) -> dict[str, float]:
    """Epsilon MSE and x0 MSE at each of SCORE_TIMESTEPS, fixed noise: {"eps_mse_t100": ..., "x0_mse_t999": ...}."""
    unet.eval()
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    out = {}
    for t in SCORE_TIMESTEPS:
        ts = torch.full((len(latents),), t, dtype=torch.long)
        noisy = add_noise(latents, noise, ts, abar)
        eps = unet(noisy, ts, encoder_hidden_states=text).sample
        a = abar[t].float()
        x0 = (noisy - (1 - a).sqrt() * eps) / a.sqrt()
        out[f"eps_mse_t{t}"] = round(torch.mean((eps - noise) ** 2).item(), 4)
        out[f"x0_mse_t{t}"] = round(torch.mean((x0 - latents) ** 2).item(), 4)
    unet.train()
    return out


def lr_at(step: int, progress: float, *, peak: float, warmup: int) -> float:
    """Linear warm-up over `warmup` steps, then cosine from `peak` to 0.1 * peak as `progress` goes 0 -> 1."""
    return peak * min(1.0, step / max(1, warmup)) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train(args: argparse.Namespace) -> dict:
    start = time.time()
    device = torch.device(args.device)
    tokenizer = build_char_tokenizer()
    vae, text_encoder = build_frozen("tiny", seed=0, tokenizer=tokenizer, dtype=torch.float32, device="cpu")
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "train", args.samples, size=args.resolution, seed=args.data_seed, extras=False,
                 workers=args.workers)
        generate(Path(tmp) / "held", args.held, size=args.resolution, seed=args.data_seed + 1, extras=False)
        latents, text = encode_scenes(Path(tmp) / "train", args.resolution, vae, text_encoder, tokenizer)
        held_latents, held_text = encode_scenes(Path(tmp) / "held", args.resolution, vae, text_encoder, tokenizer)
    prepare_s = time.time() - start
    print(f"encoded {len(latents)} + {len(held_latents)} scenes, latents {tuple(latents.shape[1:])}, "
          f"{prepare_s:.0f} s", flush=True)
    torch.manual_seed(args.seed)
    unet = UNet2DConditionModel(**dict(TINY_UNET, sample_size=latents.shape[-1])).to(device).train()
    abar = alphas_cumprod().to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    latents, text = latents.to(device), text.to(device)
    gen = torch.Generator(device).manual_seed(args.seed)
    losses, t0 = [], time.time()
    budget_s = args.minutes * 60
    step = 0
    while step < args.steps and (not budget_s or time.time() - t0 < budget_s):
        step += 1
        progress = min(1.0, (time.time() - t0) / budget_s) if budget_s else (step - 1) / args.steps
        for group in opt.param_groups:
            group["lr"] = lr_at(step, progress, peak=args.lr, warmup=args.warmup)
        idx = torch.randint(0, len(latents), (args.batch,), generator=gen, device=device)
        z0 = latents[idx]  # (B, 4, h, w)
        noise = torch.randn(z0.shape, generator=gen, device=device)
        ts = torch.randint(0, len(abar), (args.batch,), generator=gen, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16"):
            eps = unet(add_noise(z0, noise, ts, abar), ts, encoder_hidden_states=text[idx]).sample
        weights = min_snr_weights(ts, abar, args.snr_gamma) if args.snr_gamma > 0 else None
        loss = vanilla_loss(eps, noise, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 200 == 0:
            print(f"step {step:5d}  loss {sum(losses[-200:]) / len(losses[-200:]):.4f}  {time.time() - t0:6.0f} s",
                  flush=True)
    train_s = time.time() - t0
    window = max(1, min(200, step // 4))  # steps the first and last training losses are averaged over
    unet = unet.cpu().eval()
    held_fp32 = score(unet, held_latents, held_text, abar.cpu())
    as_stored(unet)  # the file's int8 weights: its scores are of what a load reads back
    held = score(unet, held_latents, held_text, abar.cpu())
    info = {
        "trained_on": f"targets and prompts of synthetic scenes (iclight_ds.data.synth, seed {args.data_seed}, "
                      f"{args.samples} scenes, {args.resolution} px) through {ASSET.name}; no foreground input",
        "objective": f"epsilon prediction, SD1.5 schedule, Min-SNR-gamma {args.snr_gamma}",
        "steps": step, "batch": args.batch, "lr": args.lr, "warmup": args.warmup,
        "schedule": f"linear warm-up, cosine to 0.1 of the peak over {f'{args.minutes} min' if budget_s else 'the steps'}",
        "optimizer": "torch AdamW (weight decay 0.01), fp32 weights, grad clip 1.0",
        "precision": "bf16 autocast" if args.precision == "bf16" else "fp32", "seed": args.seed,
        "text_encoder": "the tiny random one of train.seed 0 (frozen.build_frozen), stored here",
        "loss_window": window, "loss_first": round(sum(losses[:window]) / window, 4),
        "loss_last": round(sum(losses[-window:]) / window, 4),
        "heldout": f"{args.held} scenes, seed {args.data_seed + 1}, fixed noise seed 0",
        "heldout_scores": held, "heldout_scores_fp32": held_fp32,
        "stored": "UNet weight tensors int8 with a scale per output channel, the rest fp16 (model/tinybase.py)",
        "train_seconds": round(train_s), "prepare_seconds": round(prepare_s),
        "device": f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else _cpu_device(),
        "torch": torch.__version__, "command": args.command,
    }
    save_tiny_base(unet, text_encoder, args.out, info)
    return info


def _cpu_device() -> str:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), "cpu") if Path("/proc/cpuinfo").is_file() else "cpu"
    return f"cpu ({model}, {cores} cores, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=TINY_BASE_ASSET, help=f"output .safetensors (default: {TINY_BASE_ASSET})")
    p.add_argument("--samples", type=int, default=16384, help="synthetic scenes whose targets it trains on")
    p.add_argument("--held", type=int, default=64, help="held-out scenes it is scored on (seed: --data-seed + 1)")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=4000, help="at most this many steps")
    p.add_argument("--minutes", type=float, default=0,
                   help="train for this long (the cosine runs over the time, not the steps; the steps reached go "
                        "into the metadata): on a shared machine the steps a budget buys vary. 0: --steps")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--snr-gamma", type=float, default=5.0, help="Min-SNR-gamma (0: unweighted), as objective.snr_gamma")
    p.add_argument("--seed", type=int, default=0, help="UNet init, batches, noise and timesteps")
    p.add_argument("--data-seed", type=int, default=30000,
                   help="synthetic data seed: other than the default run's (0), its evaluation's (1000) and the "
                        "held-out scenes' (20000)")
    p.add_argument("--workers", type=int, default=2, help="processes rendering the scenes")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="fp32",
                   help="fp32 (default: 1.6x the samples/s of bf16 autocast for the tiny UNet on the AMX CPU it was made on), or the UNet's forward under bf16 autocast")
    args = p.parse_args(argv)
    args.command = "python -m iclight_ds.tools.tiny_base " + " ".join(sys.argv[1:] if argv is None else argv)
    info = train(args)
    print(json.dumps(info, indent=2))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

"""A small trained VAE for CPU runs: the tiny architecture, fitted to the synthetic relighting images.

A random VAE's latents say little about the image, so a model trained through it cannot be judged by the images
it decodes. This trains a small AutoencoderKL (the `model.arch.TINY_VAE` layout widened to --channels; 8x downsampling
and 4 latent channels, like SD1.5's) on what the trainer feeds a VAE: relit targets, grey-composited foregrounds
and backgrounds of the synthetic generator. The result ships as `iclight_ds/model/assets/tiny_vae.safetensors` (fp16,
2.5 MB) with its config, scaling factor and measured reconstruction PSNR in the metadata; runs with
`model.size=tiny` and no base use it (`model.vae`, see config.py; loaded by iclight_ds/model/frozen.py).

    python -m iclight_ds.tiny_vae --out iclight_ds/model/assets/tiny_vae.safetensors [--steps 4000] [--samples 1024]

Loss: L1 + MSE on the reconstruction of a posterior sample, plus a small KL term (as SD's VAE keeps its latents
near a unit Gaussian), on random 32 px crops (the VAE is convolutional: 4x cheaper per image, and it is used at
64 px). The scaling factor is 1 / std of the posterior mode over the training images, as 0.18215 is for SD1.5's.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from ..data.dataset import RelightDataset
from ..data.synth import generate
from ..infer.metrics import masked_psnr
from ..infer.sampling import RelightError, resolve_device
from ..model.arch import TINY_VAE
from ..model.frozen import ASSET, save_vae_file
from ..model.tokenizer import build_char_tokenizer


def training_images(root: Path, resolution: int) -> torch.Tensor:
    """(3N, 3, R, R): every sample's target, foreground and background, in the dataset's [-1, 1] conventions."""

    ds = RelightDataset(root, resolution, build_char_tokenizer())
    items = [ds[i] for i in range(len(ds))]
    return torch.cat([torch.stack([it[k] for it in items]) for k in ("target", "foreground", "background")])



@torch.no_grad()
def evaluate(vae, images: torch.Tensor, batch: int = 64) -> tuple[float, float]:
    """(mean reconstruction PSNR of the posterior mode in dB, std of the unscaled posterior mode)."""
    recon, latents = [], []
    for i in range(0, len(images), batch):
        z = vae.encode(images[i:i + batch]).latent_dist.mode()
        latents.append(z)
        recon.append(vae.decode(z).sample)
    unit = [((x.float() + 1) / 2).clamp(0, 1) for x in (torch.cat(recon), images)]  # [-1, 1] -> [0, 1]
    return masked_psnr(*unit).mean().item(), torch.cat(latents).std().item()


def train(args: argparse.Namespace) -> dict:


    torch.manual_seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp) / "train", args.samples, size=args.resolution, seed=args.data_seed, extras=False)
        generate(Path(tmp) / "held", 64, size=args.resolution, seed=args.data_seed + 1, extras=False)
        images = training_images(Path(tmp) / "train", args.resolution)
        held = training_images(Path(tmp) / "held", args.resolution)
    levels = len(args.channels)  # downsampling factor 2 ** (levels - 1), as diffusers' pipelines compute it
    config = dict(TINY_VAE, block_out_channels=tuple(args.channels), norm_num_groups=min(16, min(args.channels)),
                  down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels)
    device = torch.device(args.device)
    images, held = images.to(device), held.to(device)
    vae = AutoencoderKL(**config).to(device).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    sched = get_cosine_with_min_lr_schedule_with_warmup(opt, num_warmup_steps=100, num_training_steps=args.steps,
                                                        min_lr_rate=0.05)
    gen = torch.Generator(device).manual_seed(args.seed)
    start = time.time()
    for step in range(args.steps):
        idx = torch.randint(0, len(images), (args.batch,), generator=gen, device=device)
        x = images[idx]
        if args.crop and args.crop < x.shape[-1]:  # a convolutional VAE: random crops train it as well, faster
            cell = 2 ** (levels - 1)  # crops aligned to the latent grid
            i, j = (int(v) for v in torch.randint(0, x.shape[-1] - args.crop + 1, (2,), generator=gen, device=device)
                    // cell * cell)
            x = x[..., i:i + args.crop, j:j + args.crop]
        flip = torch.rand(args.batch, generator=gen, device=device) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        post = vae.encode(x).latent_dist
        recon = vae.decode(post.sample(generator=gen)).sample
        kl = post.kl().mean() / x[0].numel()
        loss = F.l1_loss(recon, x) + F.mse_loss(recon, x) + args.kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 200 == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:6.0f} s", flush=True)
    vae.eval().cpu()
    images, held = images.cpu(), held.cpu()
    train_psnr, std = evaluate(vae, images[:512])
    held_psnr, _ = evaluate(vae, held)
    vae.register_to_config(scaling_factor=round(1.0 / std, 4))
    info = {"trained_on": f"synthetic relighting images (iclight_ds.data.synth, seed {args.data_seed}, "
                          f"{args.samples} samples x target/foreground/background, {args.resolution}px)",
            "steps": args.steps, "batch": args.batch, "crop": args.crop, "channels": list(args.channels), "lr": args.lr, "kl_weight": args.kl, "seed": args.seed,
            "psnr_train_db": round(train_psnr, 2), "psnr_heldout_db": round(held_psnr, 2),
            "latent_std": round(std, 4), "train_seconds": round(time.time() - start),
            "device": f"cuda ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else device.type}
    save_vae_file(vae, args.out, info)
    return info


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=ASSET, help=f"output .safetensors (default: {ASSET})")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--samples", type=int, default=1024, help="synthetic scenes (x3 images) to train on")
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--crop", type=int, default=32, help="train on random crops of this size (0: whole images)")
    p.add_argument("--channels", type=int, nargs="+", default=(32, 64, 64, 64),
                   help="block_out_channels; N widths downsample by 2 ** (N - 1): 4 as SD1.5 (8x), 3 for 4x")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--kl", type=float, default=1e-6, help="weight of the per-element KL term")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="device to train on: cpu, cuda, cuda:N or auto")
    p.add_argument("--data-seed", type=int, default=1000, help="synthetic data seed (held-out scenes: +1)")
    args = p.parse_args(argv)

    try:  # before minutes of data generation: a device this machine lacks is refused by name
        args.device = resolve_device(args.device)
    except RelightError as e:
        raise SystemExit(f"error: {e}") from None
    info = train(args)
    print(json.dumps(info, indent=2))
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()

"""The frozen encoders of a run without a base (VAE, text encoder), the shipped tiny VAE assets, and encoding.

Runs under no_grad; nothing here trains.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from safetensors import safe_open

from ..data.imageio import srgb_to_linear
from .arch import build_text_encoder, build_vae, default_dtype, freeze
from .formats import save_safetensors

# The shipped tiny VAEs, trained by `python -m iclight_ds.tiny_vae` (iclight_ds/tools/tiny_vae.py) on the synthetic
# images; recipe and scores are in each file's metadata. The 8x one (the SD1.5 layout narrowed) is model.vae=auto's
# for size=tiny. The 4x one (widths 32/64/64; 16x16 latents at 64 px; `--channels 32 64 64 --steps 6000 --batch 64
# --device cuda`: 35.9 dB on unseen frames against the 8x one's 27.7) is model.vae=tiny-4x, the GPU default run's
# (iclight_ds/train/presets/default-gpu.yaml); on the CPU default's budget the UNet learns more slowly through it
# (docs/quality.md).
ASSET = Path(__file__).parent / "assets" / "tiny_vae.safetensors"
ASSET_4X = Path(__file__).parent / "assets" / "tiny_vae_4x.safetensors"
FORMAT = "iclight-ds tiny vae v1"


class TinyVaeError(ValueError):
    """A VAE file that is missing, not ours, or does not fit the architecture it claims."""


def load_vae_file(path: str | Path = ASSET, dtype: torch.dtype = torch.float32):
    """An AutoencoderKL from a file written by `save_vae_file` (config and scaling factor from its metadata)."""

    path = Path(path)
    if not path.is_file():
        raise TinyVaeError(f"VAE file {path} does not exist (make one with `python -m iclight_ds.tiny_vae --out "
                           f"{path}`)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise TinyVaeError(f"VAE file {path}: not a readable safetensors file ({e})") from e
    if meta.get("format") != FORMAT or "config" not in meta:
        raise TinyVaeError(f"VAE file {path}: no '{FORMAT}' metadata; expected a file written by "
                           "`python -m iclight_ds.tiny_vae`")
    vae = AutoencoderKL(**json.loads(meta["config"]))
    try:
        vae.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    except RuntimeError as e:
        raise TinyVaeError(f"VAE file {path}: weights do not match its config ({e})") from e
    return vae.to(dtype).eval()


def file_sha256(path: str | Path) -> str:
    return "sha256:" + hashlib.sha256(Path(path).read_bytes()).hexdigest()


def save_vae_file(vae, path: str | Path, info: dict) -> Path:
    """Write the VAE's weights (fp16) with its config and `info` in the metadata; atomic (tmp + rename)."""

    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vae.config.items() if not k.startswith("_")}
    meta = {"format": FORMAT, "config": json.dumps(config), **{k: str(v) for k, v in info.items()}}
    return save_safetensors(vae.state_dict(), path, dtype=torch.float16, metadata=meta)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8) scaled latents, as IC-Light does (mode of the posterior)."""
    dtype = next(vae.parameters()).dtype
    return vae.encode(images.to(dtype)).latent_dist.mode().float() * vae.config.scaling_factor


def decode_images(vae, latents: torch.Tensor) -> torch.Tensor:
    """(N, 4, h, w) scaled latents -> (N, 3, H, W) sRGB images in [0, 1] (fp32, on the VAE's device): the inverse of
    `encode_images`. Gradients reach the latents when the caller asks for them."""
    dtype = next(vae.parameters()).dtype
    return ((vae.decode((latents / vae.config.scaling_factor).to(dtype)).sample.float() + 1) / 2).clamp(0, 1)


def decode_to_linear(vae, latents: torch.Tensor) -> torch.Tensor:
    """(N, 4, h, w) scaled latents -> (N, 3, H, W) linear-light images (`decode_images`, then linearised), with
    gradients to the latents: the space where light adds (objective.consistency linear)."""
    return srgb_to_linear(decode_images(vae, latents), exposure=1.0)


@torch.no_grad()
def encode_text(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(input_ids).last_hidden_state.float()  # (B, 77, D)


def frozen_seed(seed: int) -> int:
    """Seed of the random frozen VAE/text encoder of a run with `train.seed = seed`.

    Their own stream (not whatever the trainable model's init left in the global one), so a latent cache can
    rebuild them from (size, seed, dtype) alone, without building the 860M-parameter UNet first.
    """
    return seed + 1


def vae_source(size: str, vae: str = "auto") -> str:
    """What `model.vae` means for a run without a base: 'random', or the path of a trained VAE file."""
    if vae == "auto":

        return str(ASSET) if size == "tiny" else "random"
    if vae == "tiny-4x":

        return str(ASSET_4X)
    return vae


def vae_identity(size: str, vae: str = "auto") -> str:
    """'random', or the sha256 of the VAE file `model.vae` resolves to (a latent cache records it)."""

    source = vae_source(size, vae)
    return "random" if source == "random" else file_sha256(source)


def build_frozen(size: str, *, seed: int, tokenizer, dtype: torch.dtype, device, vae: str = "auto") -> tuple:
    """(vae, text_encoder): the frozen models of a run without a base, in `dtype` on `device`.

    The text encoder (and a 'random' VAE) are built from the `size` configs with random weights drawn from their
    own seed, so they depend only on (size, seed, dtype, the tokenizer's vocabulary); `vae` is `model.vae`
    (auto: the shipped trained tiny VAE for size=tiny). The trainer, `python -m iclight_ds.cache` and
    `model.base.random_base` all call this. The global torch RNG is left as it was.
    """

    with torch.random.fork_rng(devices=[]), default_dtype(dtype):  # built in `dtype` directly, as before
        torch.manual_seed(frozen_seed(seed))
        vae_model = build_vae(size)  # drawn even when replaced below: the text encoder's weights stay the same
        text_encoder = freeze(build_text_encoder(size, tokenizer), dtype, device)
        source = vae_source(size, vae)
        if source != "random":  # inside fork_rng too: constructing the module draws its (discarded) init
            vae_model = load_vae_file(source)
    return freeze(vae_model, dtype, device), text_encoder


@torch.no_grad()
def encode_posterior_mode(vae, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8) UNSCALED posterior mode, in the VAE's dtype.

    `encode_posterior_mode(vae, x).float() * vae.config.scaling_factor` is exactly `encode_images(vae, x)`; the
    cache stores this (lossless in the VAE's own dtype) and applies the scaling factor when it loads.
    """
    dtype = next(vae.parameters()).dtype
    return vae.encode(images.to(dtype)).latent_dist.mode()

"""From a data batch to the model's conditions: frozen VAE / text encoder, and the complementary light split.

Runs under no_grad on the frozen encoders; nothing here trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.imageio import linear_to_srgb, srgb_to_linear
from .objectives import ConditionedBatch


def split_masks(batch: int, cells: int, size: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """Random binary masks m (B, 1, H, W): each of cells x 2*cells regions belongs to L1 (m=1) or L2 (m=0).

    L1 = L * m and L2 = L * (1 - m) are complementary, so L1 + L2 = L exactly.
    """
    grid = (torch.rand(batch, 1, cells, 2 * cells, generator=generator) < 0.5).float()
    return F.interpolate(grid, size=size, mode="nearest")


def split_background(background: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a background image in [-1, 1] in LINEAR light: returns (bg under m, bg under 1 - m), both in [-1, 1]."""
    linear = srgb_to_linear((background + 1) / 2)
    return tuple(linear_to_srgb(linear * m) * 2 - 1 for m in (mask, 1 - mask))


def env_conditions(batch: dict, split_cells: int, with_split: bool, generator: torch.Generator, device):
    """FC: the environment map L and its complementary parts (L, L*m, L*(1-m)), each (B, 3, He, We)."""
    env_full = batch["env"].to(device).float()
    if not with_split:
        return (env_full,) * 3
    m = split_masks(env_full.shape[0], split_cells, env_full.shape[-2:], generator).to(device)
    return env_full, env_full * m, env_full * (1 - m)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 4, H/8, W/8) scaled latents, as IC-Light does (mode of the posterior)."""
    dtype = next(vae.parameters()).dtype
    return vae.encode(images.to(dtype)).latent_dist.mode().float() * vae.config.scaling_factor


@torch.no_grad()
def encode_text(text_encoder, input_ids: torch.Tensor) -> torch.Tensor:
    return text_encoder(input_ids).last_hidden_state.float()  # (B, 77, D)


@torch.no_grad()
def condition_batch(
    batch: dict,
    *,
    vae,
    text_encoder,
    variant: str,
    split_cells: int,
    with_split: bool,
    generator: torch.Generator,
    device: torch.device,
) -> ConditionedBatch:
    """Encode one data batch. `with_split` draws the complementary illumination parts for the consistency loss.

    FBC: the light is the background; its linear-light split is VAE-encoded like the background itself.
    FC: the light is the environment map, split on its own grid (the encoder inside the model reads it).
    """
    target = batch["target"].to(device)  # (B, 3, H, W)
    fg = batch["foreground"].to(device)
    bsz = target.shape[0]
    images = [target, fg]
    if variant == "fbc":
        bg = batch["background"].to(device)
        if with_split:
            m = split_masks(bsz, split_cells, bg.shape[-2:], generator).to(device)
            images += [bg, *split_background(bg, m)]
        else:
            images += [bg]
    latents = encode_images(vae, torch.cat(images, dim=0)).chunk(len(images), dim=0)  # each (B, 4, h, w)
    background = None
    if variant == "fbc":
        background = tuple(latents[2:]) if with_split else (latents[2],) * 3
    env = env_conditions(batch, split_cells, with_split, generator, device) if variant == "fc" else None
    mask = F.interpolate(batch["mask"].to(device).float(), size=latents[0].shape[-2:], mode="area")  # (B, 1, h, w)
    return ConditionedBatch(
        latents=latents[0],
        foreground=latents[1],
        text=encode_text(text_encoder, batch["input_ids"].to(device)),
        mask=mask,
        background=background,
        env=env,
    )


# ---------------------------------------------------------------------------------------------------------
# The frozen encoders' own random stream, and conditions from a latent cache (iclight_ds/cache.py)


def frozen_seed(seed: int) -> int:
    """Seed of the random frozen VAE/text encoder of a run with `train.seed = seed`.

    Their own stream (not whatever the trainable model's init left in the global one), so a latent cache can
    rebuild them from (size, seed, dtype) alone, without building the 860M-parameter UNet first.
    """
    return seed + 1


def vae_source(size: str, vae: str = "auto") -> str:
    """What `model.vae` means for a run without a base: 'random', or the path of a trained VAE file."""
    if vae == "auto":
        from .tiny_vae import ASSET

        return str(ASSET) if size == "tiny" else "random"
    if vae == "tiny-4x":
        from .tiny_vae import ASSET_4X

        return str(ASSET_4X)
    return vae


def vae_identity(size: str, vae: str = "auto") -> str:
    """'random', or the sha256 of the VAE file `model.vae` resolves to (a latent cache records it)."""
    from .tiny_vae import file_sha256

    source = vae_source(size, vae)
    return "random" if source == "random" else file_sha256(source)


def build_frozen(size: str, *, seed: int, tokenizer, dtype: torch.dtype, device, vae: str = "auto") -> tuple:
    """(vae, text_encoder): the frozen models of a run without a base, in `dtype` on `device`.

    The text encoder (and a 'random' VAE) are built from the `size` configs with random weights drawn from their
    own seed, so they depend only on (size, seed, dtype, the tokenizer's vocabulary); `vae` is `model.vae`
    (auto: the shipped trained tiny VAE for size=tiny). The trainer, `python -m iclight_ds.cache` and
    `base_model.random_base` all call this. The global torch RNG is left as it was.
    """
    from .models import build_text_encoder, build_vae, default_dtype, freeze
    from .tiny_vae import load_vae_file

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


def _cached_latent_scale(batch: dict) -> float:
    scale = batch["latent_scale"]
    if isinstance(scale, torch.Tensor):
        if scale.numel() > 1 and not bool((scale == scale.flatten()[0]).all()):
            raise ValueError("a cached batch mixes latents of several VAE scaling factors")
        scale = scale.flatten()[0].item()
    return float(scale)  # a python float, as vae.config.scaling_factor is in encode_images


@torch.no_grad()
def condition_cached_batch(
    batch: dict,
    *,
    variant: str,
    split_cells: int,
    with_split: bool,
    generator: torch.Generator,
    device: torch.device,
) -> ConditionedBatch:
    """`condition_batch` for a batch of `cache.CachedDataset` samples: no VAE, no text encoder.

    FC: the same ConditionedBatch as `condition_batch` on the same samples with the same generator (the env map is
    cached raw and split here, drawing the same random numbers), up to the storage dtype of the cached
    latents/text. FBC: the split of the background was VAE-encoded at caching time for K random masks per sample
    (`background_parts`, (B, K, 2, 4, h, w)); one of the K is picked per sample with `generator`.
    """
    scale = _cached_latent_scale(batch)

    def latent(x: torch.Tensor) -> torch.Tensor:  # stored unscaled: the same fp32 product encode_images computes
        return x.to(device).float() * scale

    target = latent(batch["target"])  # (B, 4, h, w)
    bsz = target.shape[0]
    background = None
    if variant == "fbc":
        bg = latent(batch["background"])
        if with_split:
            parts = batch.get("background_parts")  # (B, K, 2, 4, h, w)
            if parts is None or parts.shape[1] == 0:
                raise ValueError("this cache has no background split variants: rebuild it with "
                                 "`python -m iclight_ds.cache ... --split-variants K` (K >= 1)")
            cells = batch["split_grid"].shape[-2]  # (B, K, 1, cells, 2 * cells)
            if cells != split_cells:
                raise ValueError(f"the cached background splits use a {cells}-cell grid, objective.split_cells is "
                                 f"{split_cells}")
            pick = torch.randint(0, parts.shape[1], (bsz,), generator=generator)
            chosen = parts[torch.arange(bsz), pick]  # (B, 2, 4, h, w): parts under m and under 1 - m
            background = (bg, latent(chosen[:, 0]), latent(chosen[:, 1]))
        else:
            background = (bg,) * 3
    env = env_conditions(batch, split_cells, with_split, generator, device) if variant == "fc" else None
    return ConditionedBatch(
        latents=target,
        foreground=latent(batch["foreground"]),
        text=batch["text"].to(device).float(),  # (B, 77, D)
        mask=batch["mask"].to(device).float(),  # (B, 1, h, w), area-downsampled when cached
        background=background,
        env=env,
    )

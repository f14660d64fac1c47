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
    env = None
    if variant == "fc":
        env_full = batch["env"].to(device).float()  # (B, 3, He, We)
        if with_split:
            m = split_masks(bsz, split_cells, env_full.shape[-2:], generator).to(device)
            env = (env_full, env_full * m, env_full * (1 - m))
        else:
            env = (env_full,) * 3
    mask = F.interpolate(batch["mask"].to(device).float(), size=latents[0].shape[-2:], mode="area")  # (B, 1, h, w)
    return ConditionedBatch(
        latents=latents[0],
        foreground=latents[1],
        text=encode_text(text_encoder, batch["input_ids"].to(device)),
        mask=mask,
        background=background,
        env=env,
    )

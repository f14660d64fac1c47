"""From a data batch to the model's conditions: frozen VAE / text encoder, and the complementary light split.

Runs under no_grad on the frozen encoders; nothing here trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.split import split_background, split_masks
from ..model.frozen import encode_images, encode_text
from .objectives import ConditionedBatch


def env_conditions(batch: dict, split_cells: int, with_split: bool, generator: torch.Generator, device):
    """FC: the environment map L and its complementary parts (L, L*m, L*(1-m)), each (B, 3, He, We)."""
    env_full = batch["env"].to(device).float()
    if not with_split:
        return (env_full,) * 3
    m = split_masks(env_full.shape[0], split_cells, env_full.shape[-2:], generator).to(device)
    return env_full, env_full * m, env_full * (1 - m)


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
    light_input: str = "env",
) -> ConditionedBatch:
    """Encode one data batch. `with_split` draws the complementary illumination parts for the consistency loss.

    FBC: the light is the background; its linear-light split is VAE-encoded like the background itself.
    FC, light_input=env: the light is the environment map, split on its own grid (the encoder inside the model reads
    it). FC, light_input=text: the light is in the prompt; no env (and nothing to split).
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
    if variant == "fc" and light_input == "env":
        env = env_conditions(batch, split_cells, with_split, generator, device)
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
    light_input: str = "env",
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
    env = None
    if variant == "fc" and light_input == "env":
        env = env_conditions(batch, split_cells, with_split, generator, device)
    return ConditionedBatch(
        latents=target,
        foreground=latent(batch["foreground"]),
        text=batch["text"].to(device).float(),  # (B, 77, D)
        mask=batch["mask"].to(device).float(),  # (B, 1, h, w), area-downsampled when cached
        background=background,
        env=env,
    )

"""The trainer's preview grids: input foreground | [background (FBC)] | [target] | prediction, one row per sample."""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers.utils import make_image_grid
from PIL import Image

from ..data.imageio import GREY
from ..model.frozen import encode_text
from ..model.schedule import DEFAULT_SAMPLER
from .images import to_pil
from .sampling import _env_tokens, _with_env, prompt_embeddings, relight_images


@torch.no_grad()
def make_preview_grid(
    unet,
    vae,
    text_encoder,
    tokenizer,
    env_encoder,
    samples: Sequence[dict] | dict,
    *,
    seed: int = 0,
    steps: int = 4,
    guidance: float = 1.0,
    sampler: str = DEFAULT_SAMPLER,
    negative_prompt: str = "",
) -> Image.Image:
    """A PNG-ready grid, one row per sample: input foreground | [background (FBC)] | [target] | prediction.

    samples: RelightDataset items (or one collated batch): foreground, input_ids (or prompt), and background (FBC) /
    env (when `env_encoder` is given); target when there is one (a user's own images have none). A fixed `seed`
    makes previews comparable across checkpoints; `negative_prompt` is used with guidance > 1. The UNet and env encoder are put in eval mode and restored. Under ZeRO-3 call this inside
    `deepspeed.zero.GatheredParameters` (the UNet weights must be whole).
    """
    if isinstance(samples, dict):
        batch = samples
    else:
        batch = {k: (torch.stack([s[k] for s in samples]) if isinstance(samples[0][k], torch.Tensor)
                     else [s[k] for s in samples]) for k in samples[0]}
    fbc = unet.config.in_channels == 12
    device = next(unet.parameters()).device
    env_tokens = _env_tokens(env_encoder, batch.get("env")) if env_encoder is not None else None
    if "input_ids" in batch:
        text = encode_text(text_encoder, batch["input_ids"].to(device))
    else:
        text = prompt_embeddings(text_encoder, tokenizer, batch["prompt"])
    embeds = _with_env(text, env_tokens)
    negative = None
    if guidance > 1:
        negative = prompt_embeddings(text_encoder, tokenizer, [negative_prompt] * embeds.shape[0], env_tokens)
    modes = [(m, m.training) for m in (unet, env_encoder) if m is not None]
    for m, _ in modes:
        m.eval()
    try:
        pred = relight_images(unet, vae, prompt_embeds=embeds, negative_embeds=negative,
                              foreground=batch["foreground"], background=batch["background"] if fbc else None,
                              seed=seed, steps=steps, guidance=guidance, sampler=sampler)
    finally:
        for m, training in modes:
            m.train(training)
    columns = [(batch["foreground"].float() + 1) * GREY / 255]  # undo x / 127 - 1
    if fbc:
        columns.append((batch["background"].float() + 1) / 2)
    if "target" in batch:
        columns.append((batch["target"].float() + 1) / 2)
    columns.append(pred)
    cells = [to_pil(col[r]) for r in range(pred.shape[0]) for col in columns]  # row-major
    return make_image_grid(cells, rows=pred.shape[0], cols=len(columns))

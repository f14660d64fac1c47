"""Relight a foreground with trained IC-Light weights: the `iclight-relight` command.

    python -m iclight_ds.relight --base MODEL --weights FILE --fg IMAGE [--mask MASK] [--bg IMAGE] [--env ENV.npy|.hdr|.exr]
        --prompt TEXT --out OUT.png [--steps 25] [--cfg 7.0] [--seed 0] [--width W] [--height H]
        [--sampler dpmpp_2m_sde_karras] [--init IMAGE [--strength 0.9]] [--tokenizer DIR] [--modules FILE]
        [--weights-kind auto|offset|full]

Inference follows the official demo: diffusers' StableDiffusionPipeline drives a UNet wrapper that concatenates the
condition latents (foreground, and background for FBC) to the noisy latent, passed as
`cross_attention_kwargs={'concat_conds': ...}`; DPM++ 2M SDE Karras on the SD1.5 schedule. The foreground is
composited over grey 127 (which maps to 0.0) and VAE-encoded with the posterior mode. FC models trained here see
the light through an environment-map encoder: pass --env and its tokens are appended to the prompt embeddings.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import torch

from ..dtypes import DTYPES
from ..model.base import BaseModelError, load_base
from ..model.schedule import DEFAULT_SAMPLER, SAMPLERS
from .images import background_tensor, env_tensor, foreground_tensor, open_image, to_pil
from .sampling import (
    DEMO_NEGATIVE_PROMPT,
    INIT_STRENGTH,
    RelightError,
    _env_tokens,
    _move,
    prompt_embeddings,
    relight_images,
    resolve_device,
)
from .weights import env_shape_of, load_trained_unet

log = logging.getLogger(__name__)





# ---------------------------------------------------------------------------------------------------------
# Images in and out


# ---------------------------------------------------------------------------------------------------------
# Sampling


# ---------------------------------------------------------------------------------------------------------
# Loading trained weights onto a base


def relight_file(args: argparse.Namespace) -> Path:
    """The CLI's work: load, check the inputs against the weights, sample, write the PNG."""

    for flag in ("fg", "mask", "bg", "env", "init"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_file():
            raise RelightError(f"--{flag} {value} does not exist")
    device = resolve_device(args.device)
    dtype = DTYPES.get(args.dtype, torch.float16 if device.type == "cuda" else torch.float32)

    base = load_base(args.base, tokenizer_fallback=args.tokenizer)
    unet, env_encoder, meta = load_trained_unet(base, args.weights, kind=args.weights_kind, modules=args.modules)
    fbc = unet.config.in_channels == 12
    if fbc and args.bg is None:
        raise RelightError("these are FBC weights (12 input channels): pass --bg IMAGE")
    if not fbc and args.bg is not None:
        raise RelightError("these are FC weights (8 input channels): they take no --bg")
    if env_encoder is not None and args.env is None:
        raise RelightError("these FC weights come with an environment encoder (iclight_modules.safetensors): "
                           "pass --env ENV (.npy, .hdr or .exr), a linear HDR environment map")
    if env_encoder is None and args.env is not None:
        raise RelightError("--env was given but these weights have no environment encoder (the official IC-Light "
                           "models, and FC models trained with model.light_input=text, see the light through the "
                           "prompt and, for FBC, the background)")

    latent_scale = 2 ** (len(base.vae.config.block_out_channels) - 1)
    width = args.width or unet.config.sample_size * latent_scale
    height = args.height or unet.config.sample_size * latent_scale
    fg = foreground_tensor(open_image(args.fg, "--fg"), open_image(args.mask, "--mask") if args.mask else None,
                           width, height)[None]
    bg = background_tensor(open_image(args.bg, "--bg"), width, height)[None] if fbc else None
    if args.strength is not None and args.init is None:
        raise RelightError("--strength needs --init IMAGE (the image sampling starts from)")
    init = background_tensor(open_image(args.init, "--init"), width, height)[None] if args.init else None
    strength = 1.0 if init is None else (INIT_STRENGTH if args.strength is None else args.strength)
    for m in (unet, base.vae, base.text_encoder, env_encoder):
        if m is not None:
            _move(m, device, dtype)
    env_tokens = None
    if env_encoder is not None:
        env_tokens = _env_tokens(env_encoder, env_tensor(args.env, env_shape_of(meta))[None])
    embeds = prompt_embeddings(base.text_encoder, base.tokenizer, [args.prompt], env_tokens)
    negative = prompt_embeddings(base.text_encoder, base.tokenizer, [args.negative_prompt], env_tokens)
    image = relight_images(unet, base.vae, prompt_embeds=embeds, negative_embeds=negative, foreground=fg,
                           background=bg, seed=args.seed, steps=args.steps, guidance=args.cfg, sampler=args.sampler,
                           init=init, strength=strength)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image[0]).save(out)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="base SD1.5: diffusers folder, single-file checkpoint or run folder")
    p.add_argument("--weights", required=True, help="IC-Light weights: offset file, unet export, diffusers folder, or a "
                   "LoRA export (with its .conv_in.safetensors beside it)")
    p.add_argument("--weights-kind", choices=("auto", "offset", "full"), default="auto",
                   help="auto: from the file's metadata; files without ours (official releases) are offsets")
    p.add_argument("--modules", default=None, help="iclight_modules.safetensors (default: the one named in the "
                   "weights' metadata, beside them)")
    p.add_argument("--tokenizer", default=None, help="local CLIP tokenizer folder for single-file bases")
    p.add_argument("--fg", required=True, help="foreground: RGBA, or RGB with --mask")
    p.add_argument("--mask", default=None, help="foreground mask (white = object)")
    p.add_argument("--bg", default=None, help="background image (FBC weights)")
    p.add_argument("--env", default=None, help="linear HDR environment map, .npy (H, W, 3), .hdr or .exr (FC weights "
                   "trained with model.light_input=env)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default=DEMO_NEGATIVE_PROMPT)
    p.add_argument("--out", required=True, help="output PNG")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--cfg", type=float, default=7.0, help="classifier-free guidance scale (<= 1 disables it)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--width", type=int, default=None,
                   help="default: the UNet's sample size x the VAE's downsampling (512 for SD1.5; a tiny run's own "
                        "resolution)")
    p.add_argument("--height", type=int, default=None)
    p.add_argument("--sampler", choices=SAMPLERS, default=DEFAULT_SAMPLER)
    p.add_argument("--init", default=None, help="start sampling from this image (resized and centre-cropped like "
                   "--bg) noised to --strength, instead of pure noise: the demo's initial latent, e.g. a light "
                   "gradient, the background, or the foreground itself")
    p.add_argument("--strength", type=float, default=None,
                   help=f"with --init: the share of the sampler steps run from the noised image, in (0, 1] "
                        f"(default {INIT_STRENGTH}, the demo's lowres_denoise); lower keeps more of the image")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1 ...")
    p.add_argument("--dtype", choices=("auto", "fp16", "bf16", "fp32"), default="auto",
                   help="auto: fp16 on CUDA, fp32 on the CPU")
    return p


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    args = build_parser().parse_args(argv)

    try:
        print(relight_file(args))
    except (RelightError, BaseModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

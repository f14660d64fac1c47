"""Relight a foreground with trained IC-Light weights, and the trainer's preview grids.

    python -m iclight_ds.relight --base MODEL --weights FILE --fg IMAGE [--mask MASK] [--bg IMAGE] [--env ENV.npy]
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
import json
import logging
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from . import formats as fmt
from .conditioning import encode_images, encode_text

log = logging.getLogger(__name__)

# The SD1.5 noise schedule (as in train.py): 1000 steps, scaled_linear 0.00085 -> 0.012, epsilon prediction.
SD15_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                     prediction_type="epsilon", steps_offset=1)
DEFAULT_SAMPLER = "dpmpp_2m_sde_karras"
SAMPLERS = ("dpmpp_2m_sde_karras", "dpmpp_2m_karras", "euler_a", "ddim")
DEMO_NEGATIVE_PROMPT = "lowres, bad anatomy, bad hands, cropped, worst quality"  # the official demo's default
GREY = 127
INIT_STRENGTH = 0.9  # the official demo's lowres_denoise: the share of the schedule run from an initial latent
DEFAULT_ENV_SHAPE = (16, 32)


class RelightError(ValueError):
    """Inputs that do not fit the weights (missing background for FBC, env without an env encoder, ...)."""


def make_scheduler(name: str = DEFAULT_SAMPLER):
    """A diffusers scheduler on the SD1.5 schedule; the default is the demo's DPM++ 2M SDE Karras."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler

    if name == "dpmpp_2m_sde_karras":
        return DPMSolverMultistepScheduler(**SD15_SCHEDULE, algorithm_type="sde-dpmsolver++", use_karras_sigmas=True)
    if name == "dpmpp_2m_karras":
        return DPMSolverMultistepScheduler(**SD15_SCHEDULE, algorithm_type="dpmsolver++", use_karras_sigmas=True)
    if name == "euler_a":
        return EulerAncestralDiscreteScheduler(**SD15_SCHEDULE)
    if name == "ddim":
        return DDIMScheduler(**SD15_SCHEDULE, clip_sample=False, set_alpha_to_one=False)
    raise RelightError(f"unknown sampler {name!r}; one of {SAMPLERS}")


class ConcatConditionUNet(torch.nn.Module):
    """The widened UNet as the pipeline sees it: a 4-channel UNet whose forward appends `concat_conds`.

    The pipeline sizes its latents from `config.in_channels`, so the wrapper reports the noisy-latent channel
    count (out_channels); the condition latents (B, C-4, h, w) are repeated to the pipeline's batch (2B with CFG).
    """

    def __init__(self, unet):
        super().__init__()
        from diffusers.configuration_utils import FrozenDict

        self.unet = unet
        self.config = FrozenDict({**unet.config, "in_channels": unet.config.out_channels})

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample, timestep, encoder_hidden_states, cross_attention_kwargs=None, **kwargs):
        extra = dict(cross_attention_kwargs or {})
        concat = extra.pop("concat_conds").to(sample)  # (B, C-4, h, w)
        concat = torch.cat([concat] * (sample.shape[0] // concat.shape[0]), dim=0)
        return self.unet(torch.cat([sample, concat], dim=1), timestep, encoder_hidden_states,
                         cross_attention_kwargs=extra or None, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Images in and out


def fit_center_crop(img: Image.Image, width: int, height: int, resample=Image.LANCZOS) -> Image.Image:
    """Resize to cover width x height, then centre-crop (the demo's resize_and_center_crop)."""
    scale = max(width / img.width, height / img.height)
    rw, rh = max(width, round(img.width * scale)), max(height, round(img.height * scale))
    img = img.resize((rw, rh), resample)
    left, top = (rw - width) // 2, (rh - height) // 2
    return img.crop((left, top, left + width, top + height))


def foreground_tensor(fg: Image.Image, mask: Image.Image | None, width: int, height: int) -> torch.Tensor:
    """(3, H, W) foreground over grey 127 in IC-Light's convention `x / 127 - 1` (grey -> exactly 0).

    The alpha is the image's own alpha channel, times `mask` when one is given (the same composite as the dataset).
    """
    rgba = fg.convert("RGBA")
    has_alpha = fg.mode in ("RGBA", "LA", "PA") or (fg.mode == "P" and "transparency" in fg.info)
    rgb = np.asarray(fit_center_crop(rgba.convert("RGB"), width, height), dtype=np.float32)  # (H, W, 3)
    alpha = np.ones(rgb.shape[:2], dtype=np.float32)
    if has_alpha:
        alpha = np.asarray(fit_center_crop(rgba.getchannel("A"), width, height), dtype=np.float32) / 255.0
    if mask is not None:
        if mask.size != fg.size:
            raise RelightError(f"mask size {mask.size} differs from the foreground's {fg.size}")
        alpha = alpha * np.asarray(fit_center_crop(mask.convert("L"), width, height), dtype=np.float32) / 255.0
    elif not has_alpha:
        log.warning("the foreground has no alpha channel and no --mask was given: the whole image is foreground")
    composite = (GREY + (rgb - GREY) * alpha[..., None]).clip(0, 255).astype(np.uint8)
    return torch.from_numpy(composite.astype(np.float32) / GREY - 1.0).permute(2, 0, 1).contiguous()


def background_tensor(bg: Image.Image, width: int, height: int) -> torch.Tensor:
    """(3, H, W) in [-1, 1] (`x / 127.5 - 1`, the dataset's convention for backgrounds)."""
    rgb = np.asarray(fit_center_crop(bg.convert("RGB"), width, height), dtype=np.float32)
    return torch.from_numpy(rgb / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def env_tensor(path: str | Path, env_shape: tuple[int, int]) -> torch.Tensor:
    """(3, He, We) linear HDR environment map from an (H, W, 3) .npy, area-resampled like the dataset does."""
    from .data.dataset import load_env

    try:
        env = torch.from_numpy(load_env(Path(path))).permute(2, 0, 1)
    except (OSError, ValueError) as e:
        raise RelightError(f"--env {path}: {e}") from e
    if tuple(env.shape[1:]) != tuple(env_shape):
        env = F.interpolate(env[None], size=tuple(env_shape), mode="area")[0]
    return env.contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB image."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


# ---------------------------------------------------------------------------------------------------------
# Sampling


@torch.no_grad()
def relight_images(
    unet,
    vae,
    *,
    prompt_embeds: torch.Tensor,  # (B, L, D): text tokens, plus env tokens for our FC models
    foreground: torch.Tensor,  # (B, 3, H, W), IC-Light convention (grey -> 0)
    background: torch.Tensor | None = None,  # (B, 3, H, W) in [-1, 1], FBC only
    negative_embeds: torch.Tensor | None = None,  # (B, L, D); needed when guidance > 1
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.0,
    sampler: str = DEFAULT_SAMPLER,
    init: torch.Tensor | None = None,  # (B, 3, H, W) in [-1, 1]: start from this image instead of pure noise
    strength: float = 1.0,
) -> torch.Tensor:
    """Sample relit images with the widened `unet`; returns (B, 3, H, W) in [0, 1], float32 on the CPU.

    With `init`, sampling starts from its latent noised to `strength` (the last `strength` of the `steps`; img2img,
    as the official demo's initial latent and its `lowres_denoise`, 0.9 by default there) instead of pure noise.
    Deterministic for a given seed: one CPU generator drives the initial latents and the SDE noise.
    """
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    height, width = foreground.shape[-2:]
    if height % 8 or width % 8:
        raise RelightError(f"width and height must be multiples of 8, got {width}x{height}")
    images = [foreground] + ([background] if background is not None else [])
    device = next(vae.parameters()).device
    concat = encode_images(vae, torch.cat(images, dim=0).to(device))  # (n*B, 4, h, w)
    concat = torch.cat(concat.chunk(len(images), dim=0), dim=1)  # (B, 4n, h, w)
    if concat.shape[1] + unet.config.out_channels != unet.config.in_channels:
        need = "a background (FBC)" if unet.config.in_channels == 12 else "no background (FC)"
        raise RelightError(f"this UNet takes {unet.config.in_channels} input channels: it needs {need}")
    if guidance > 1 and negative_embeds is None:
        raise RelightError("guidance > 1 needs negative_embeds (classifier-free guidance)")
    if not 0 < strength <= 1:
        raise RelightError(f"strength must be in (0, 1], got {strength}")
    if init is None and strength != 1:
        raise RelightError("strength < 1 needs an initial image to start from (init)")
    if init is not None and init.shape != foreground.shape:
        raise RelightError(f"the initial image is {tuple(init.shape[-2:])}, the foreground {(height, width)}")
    if init is not None and int(steps * strength) < 1:
        raise RelightError(f"strength {strength} of {steps} steps leaves no step to sample")
    parts = dict(vae=vae, text_encoder=None, tokenizer=None, unet=ConcatConditionUNet(unet),
                 scheduler=make_scheduler(sampler), safety_checker=None, feature_extractor=None,
                 requires_safety_checker=False)
    pipe = StableDiffusionPipeline(**parts) if init is None else StableDiffusionImg2ImgPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator("cpu").manual_seed(seed)
    start = dict(height=height, width=width) if init is None else dict(
        image=encode_images(vae, init.to(device)), strength=strength)  # 4-channel latents are taken as they are
    latents = pipe(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds if guidance > 1 else None,
        num_inference_steps=steps,
        guidance_scale=guidance,
        generator=generator,
        output_type="latent",
        cross_attention_kwargs={"concat_conds": concat},
        **start,
    ).images  # (B, 4, h, w)
    vae_dtype = next(vae.parameters()).dtype
    decoded = vae.decode(latents.to(vae_dtype) / vae.config.scaling_factor).sample  # (B, 3, H, W) in ~[-1, 1]
    return ((decoded.float() + 1) / 2).clamp(0, 1).cpu()


def prompt_embeddings(text_encoder, tokenizer, prompts: Sequence[str], env_tokens: torch.Tensor | None = None):
    """(B, 77 [+ K], D): the text encoder's last hidden state, with the env tokens (B, K, D) appended."""
    ids = tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return _with_env(encode_text(text_encoder, ids.to(text_encoder.device)), env_tokens)


def _with_env(text: torch.Tensor, env_tokens: torch.Tensor | None) -> torch.Tensor:
    if env_tokens is None:
        return text
    return torch.cat([text, env_tokens.to(text)], dim=1)


@torch.no_grad()
def _env_tokens(env_encoder, env: torch.Tensor | None) -> torch.Tensor | None:
    if env_encoder is None:
        return None
    p = next(env_encoder.parameters())
    return env_encoder(env.to(p.device, p.dtype)).float()  # (B, K, D)


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
) -> Image.Image:
    """A PNG-ready grid, one row per sample: input foreground | [background (FBC)] | target | prediction.

    samples: RelightDataset items (or one collated batch): foreground, target, input_ids (or prompt), and
    background (FBC) / env (when `env_encoder` is given). A fixed `seed` makes previews comparable across
    checkpoints. The UNet and env encoder are put in eval mode and restored. Under ZeRO-3 call this inside
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
        negative = prompt_embeddings(text_encoder, tokenizer, [""] * embeds.shape[0], env_tokens)
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
    columns += [(batch["target"].float() + 1) / 2, pred]
    rows, cols = pred.shape[0], len(columns)
    h, w = pred.shape[-2:]
    grid = Image.new("RGB", (cols * w, rows * h))
    for r in range(rows):
        for c, col in enumerate(columns):
            grid.paste(to_pil(col[r]), (c * w, r * h))
    return grid


# ---------------------------------------------------------------------------------------------------------
# Loading trained weights onto a base


def env_encoder_from_state(small: dict[str, torch.Tensor]):
    """The FC environment encoder from a modules state dict ('env_encoder.*' keys), sizes read off the shapes."""
    from .models import EnvEncoder

    state = {k[len("env_encoder.") :]: v for k, v in small.items() if k.startswith("env_encoder.")}
    if not state:
        return None
    width, dim = state["features.0.weight"].shape[0], state["norm.weight"].shape[0]
    encoder = EnvEncoder(tokens=state["head.weight"].shape[0] // dim, dim=dim, width=width)
    encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return encoder.eval()


def load_trained_unet(base, weights: str | Path, *, kind: str = "auto", modules: str | Path | None = None):
    """(widened UNet, env encoder or None, metadata) from `weights` on top of `base` (a BaseModel).

    weights: an offset file (official IC-Light, our iclight-offset or ldm), a full `unet` export, or a diffusers
    folder. kind: 'offset' adds it to the base; 'full' loads it as is; 'auto' decides from the file's metadata
    (files without ours, such as the official releases, are offsets).
    """
    from safetensors.torch import load_file

    from .base_model import BaseModelError, load_iclight_offset, read_unet_weights
    from .models import widen_conv_in

    weights = Path(weights)
    if weights.is_dir():
        from diffusers import UNet2DConditionModel

        try:
            unet = UNet2DConditionModel.from_pretrained(str(weights), local_files_only=True)
        except Exception as e:
            raise RelightError(f"--weights {weights}: cannot load a diffusers UNet folder: {e}") from e
        info = weights / "iclight_export.json"
        meta = json.loads(info.read_text()) if info.is_file() else {}
        modules_path = Path(modules) if modules else weights / meta.get("modules_file", "iclight_modules.safetensors")
    else:
        try:
            state, meta = read_unet_weights(weights, base.unet.config)
        except (BaseModelError, fmt.FormatError) as e:
            raise RelightError(str(e)) from e
        if kind == "auto":
            kind = "full" if meta.get("format") == fmt.FORMAT_TAGS["unet"] else "offset"
        unet = base.unet
        dtype = unet.dtype
        if kind == "offset":
            if meta.get("base_hash") and meta["base_hash"] != base.unet_hash:
                log.warning("these offsets were taken from another base (%s, %s) than %s (%s); the result is that "
                            "base plus the learned change", meta.get("base", "?"), meta["base_hash"][:19],
                            base.source, base.unet_hash[:19])
            load_iclight_offset(unet, state)
        else:
            widen_conv_in(unet, state["conv_in.weight"].shape[1])
            unet.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True)
        default = meta.get("modules_file")
        modules_path = Path(modules) if modules else (weights.parent / default if default else None)
    if unet.config.in_channels not in (8, 12):
        raise RelightError(f"--weights {weights}: the UNet takes {unet.config.in_channels} input channels; "
                           "IC-Light models take 8 (FC) or 12 (FBC)")
    env_encoder = None
    if modules_path is not None:
        if modules_path.is_file():
            env_encoder = env_encoder_from_state(load_file(str(modules_path)))
        elif modules:
            raise RelightError(f"--modules {modules_path} does not exist")
    return unet.eval(), env_encoder, meta


def _env_shape(meta: dict) -> tuple[int, int]:
    try:
        return tuple(json.loads(meta.get("config", "{}")).get("model", {}).get("env_shape", DEFAULT_ENV_SHAPE))
    except (TypeError, json.JSONDecodeError):
        return DEFAULT_ENV_SHAPE


def resolve_device(spec: str) -> torch.device:
    """A `--device` value: 'auto' (CUDA when there is one), 'cpu', 'cuda', 'cuda:N'. One this machine lacks is refused
    by name instead of failing later inside torch."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise RelightError(f"--device {spec}: not a device name ({e}); expected auto, cpu, cuda or cuda:N") from e
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RelightError(f"--device {spec}: no CUDA device here (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise RelightError(f"--device {spec}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise RelightError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    return device


def _move(module, device: torch.device, dtype: torch.dtype) -> None:
    p = next(module.parameters())
    if p.device != device:
        module.to(device)
    if p.dtype != dtype:  # diffusers warns on every dtype cast, even a no-op one
        module.to(dtype)


def _open_image(path: str | Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, ValueError) as e:
        raise RelightError(f"{what} {path}: cannot read the image ({e})") from e


def relight_file(args: argparse.Namespace) -> Path:
    """The CLI's work: load, check the inputs against the weights, sample, write the PNG."""
    from .base_model import load_base

    for flag in ("fg", "mask", "bg", "env", "init"):
        value = getattr(args, flag)
        if value is not None and not Path(value).is_file():
            raise RelightError(f"--{flag} {value} does not exist")
    device = resolve_device(args.device)
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}.get(
        args.dtype, torch.float16 if device.type == "cuda" else torch.float32)

    base = load_base(args.base, tokenizer_fallback=args.tokenizer)
    unet, env_encoder, meta = load_trained_unet(base, args.weights, kind=args.weights_kind, modules=args.modules)
    fbc = unet.config.in_channels == 12
    if fbc and args.bg is None:
        raise RelightError("these are FBC weights (12 input channels): pass --bg IMAGE")
    if not fbc and args.bg is not None:
        raise RelightError("these are FC weights (8 input channels): they take no --bg")
    if env_encoder is not None and args.env is None:
        raise RelightError("these FC weights come with an environment encoder (iclight_modules.safetensors): "
                           "pass --env ENV.npy, an (H, W, 3) linear HDR environment map")
    if env_encoder is None and args.env is not None:
        raise RelightError("--env was given but these weights have no environment encoder (the official IC-Light "
                           "models see the light through the prompt and, for FBC, the background)")

    latent_scale = 2 ** (len(base.vae.config.block_out_channels) - 1)
    width = args.width or unet.config.sample_size * latent_scale
    height = args.height or unet.config.sample_size * latent_scale
    fg = foreground_tensor(_open_image(args.fg, "--fg"), _open_image(args.mask, "--mask") if args.mask else None,
                           width, height)[None]
    bg = background_tensor(_open_image(args.bg, "--bg"), width, height)[None] if fbc else None
    if args.strength is not None and args.init is None:
        raise RelightError("--strength needs --init IMAGE (the image sampling starts from)")
    init = background_tensor(_open_image(args.init, "--init"), width, height)[None] if args.init else None
    strength = 1.0 if init is None else (INIT_STRENGTH if args.strength is None else args.strength)
    for m in (unet, base.vae, base.text_encoder, env_encoder):
        if m is not None:
            _move(m, device, dtype)
    env_tokens = None
    if env_encoder is not None:
        env_tokens = _env_tokens(env_encoder, env_tensor(args.env, _env_shape(meta))[None])
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
    p.add_argument("--weights", required=True, help="IC-Light weights: offset file, unet export or diffusers folder")
    p.add_argument("--weights-kind", choices=("auto", "offset", "full"), default="auto",
                   help="auto: from the file's metadata; files without ours (official releases) are offsets")
    p.add_argument("--modules", default=None, help="iclight_modules.safetensors (default: the one named in the "
                   "weights' metadata, beside them)")
    p.add_argument("--tokenizer", default=None, help="local CLIP tokenizer folder for single-file bases")
    p.add_argument("--fg", required=True, help="foreground: RGBA, or RGB with --mask")
    p.add_argument("--mask", default=None, help="foreground mask (white = object)")
    p.add_argument("--bg", default=None, help="background image (FBC weights)")
    p.add_argument("--env", default=None, help="(H, W, 3) linear HDR environment map .npy (our FC weights)")
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
    from .base_model import BaseModelError

    try:
        print(relight_file(args))
    except (RelightError, BaseModelError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Sampling relit images with a widened UNet, as the official IC-Light demo does.

diffusers' StableDiffusionPipeline drives a UNet wrapper that concatenates the condition latents (foreground, and
background for FBC) to the noisy latent, passed as `cross_attention_kwargs={'concat_conds': ...}`; DPM++ 2M SDE
Karras on the SD1.5 schedule by default. FC models trained here see the light through an environment-map encoder:
its tokens are appended to the prompt embeddings.
"""

from __future__ import annotations

from typing import Sequence

import torch
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from diffusers.configuration_utils import FrozenDict

from ..model.frozen import decode_images, encode_images, encode_text
from ..model.schedule import DEFAULT_SAMPLER, make_scheduler

DEMO_NEGATIVE_PROMPT = "lowres, bad anatomy, bad hands, cropped, worst quality"  # the official demo's default


INIT_STRENGTH = 0.9  # the official demo's lowres_denoise: the share of the schedule run from an initial latent


class RelightError(ValueError):
    """Inputs that do not fit the weights (missing background for FBC, env without an env encoder, ...)."""


class ConcatConditionUNet(torch.nn.Module):
    """The widened UNet as the pipeline sees it: a 4-channel UNet whose forward appends `concat_conds`.

    The pipeline sizes its latents from `config.in_channels`, so the wrapper reports the noisy-latent channel
    count (out_channels); the condition latents (B, C-4, h, w) are repeated to the pipeline's batch (2B with CFG).
    """

    def __init__(self, unet):
        super().__init__()

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
    return decode_images(vae, latents).cpu()  # (B, 3, H, W) in [0, 1]


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

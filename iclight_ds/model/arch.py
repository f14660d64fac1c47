"""The SD1.5 architecture built from configs in code (full size and the tiny test/default-run size), and the
helpers that build, freeze and count modules. Knows nothing of IC-Light, DeepSpeed, data files or the loop."""

from __future__ import annotations

import contextlib
import logging

import torch
from diffusers import AutoencoderKL
from diffusers.models.attention_processor import AttnProcessor2_0
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

log = logging.getLogger(__name__)

# The real SD1.5 shapes (../shared/DOMAIN.md); 859.5M UNet parameters at 4 input channels.
SD15_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
SD15_VAE = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)
SD15_TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)

# Tiny versions with the same block structure (and the same /8 VAE downsampling) for tests and the default run.
# The tiny UNet's widths (64, 128) are measured, not guessed: at high noise an epsilon-prediction UNet must pass its
# noisy input through to its output almost exactly (through GroupNorm + SiLU), and with (32, 64) a from-scratch model
# never learnt to: after 1500 steps its x0 error at t=999 was 5.4 (latent variance 0.95) and every sample came out
# as saturated noise; with (64, 128), 1.5 after the same steps, and the samples are objects (docs/quality.md).
TINY_UNET = dict(
    SD15_UNET,
    sample_size=8,
    block_out_channels=(64, 128),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1,
    cross_attention_dim=32,
)
# A random tiny VAE's latents have std ~0.25 on the synthetic images (measured over seeds 0-2); scaling by 4 gives
# ~unit variance, as 0.18215 does for the real SD VAE, so the noise-prediction task is not trivially easy.
TINY_VAE = dict(
    SD15_VAE, block_out_channels=(16, 32, 32, 32), layers_per_block=1, norm_num_groups=16, sample_size=64,
    scaling_factor=4.0,
)
TINY_TEXT = dict(
    SD15_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32
)

ARCHS = {"tiny": (TINY_UNET, TINY_VAE, TINY_TEXT), "full": (SD15_UNET, SD15_VAE, SD15_TEXT)}


def build_vae(size: str):
    return AutoencoderKL(**ARCHS[size][1])


def build_text_encoder(size: str, tokenizer):
    """CLIP text model; the vocabulary and special ids follow `tokenizer` so every id it emits is valid."""

    spec = dict(ARCHS[size][2])
    spec["vocab_size"] = max(spec["vocab_size"] if size == "full" else 0, len(tokenizer))
    spec.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    spec.update(pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return CLIPTextModel(CLIPTextConfig(**spec))


def configure_attention(unet, choice: str, device_type: str) -> str:
    """Pick the attention kernel; returns the name of what was chosen (the caller logs it)."""

    want_xformers = choice == "xformers" or (choice == "auto" and device_type == "cuda")
    if want_xformers:
        try:
            import xformers  # noqa: F401

            if device_type != "cuda":
                raise RuntimeError(f"xformers needs a CUDA device, this run is on {device_type}")
            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as e:  # ImportError, or a build that does not match this torch
            if choice == "xformers":
                raise RuntimeError(f"model.attention=xformers was asked for but cannot be used: {e}") from e
            log.info("xformers unavailable (%s); using PyTorch SDPA", e)
    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


def use_channels_last(unet) -> None:
    """Run the UNet's convolutions in the channels-last (NHWC) memory format (model.channels_last), in place.

    Only the input changes: a forward pre-hook makes `sample` channels-last before conv_in; cuDNN (and oneDNN on a
    CPU) pick NHWC kernels when the input or the weight is channels-last, and the activations stay so through the
    network. The weights stay contiguous, as DeepSpeed needs them: it broadcasts each one viewed as bytes at
    initialisation (a channels-last weight cannot be viewed so) and its bf16 and ZeRO optimizers re-point them into
    flat buffers anyway."""
    unet.register_forward_pre_hook(_channels_last_sample, with_kwargs=True)


def _channels_last_sample(module, args, kwargs):
    """Forward pre-hook: the UNet's `sample` (N, C, h, w), positional or keyword, as channels-last."""
    if args:
        return (args[0].contiguous(memory_format=torch.channels_last), *args[1:]), kwargs
    kwargs = dict(kwargs, sample=kwargs["sample"].contiguous(memory_format=torch.channels_last))
    return args, kwargs


def compile_unet(unet, backend: str = "inductor") -> None:
    """torch.compile the UNet in place (model.compile): nn.Module.compile keeps the module and its state-dict keys
    (torch.compile(unet) would wrap it and prefix every key with `_orig_mod.`). Compiles lazily, at the first call."""
    unet.compile(backend=backend)


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype):
    """Build modules directly in `dtype` (no full fp32 replica first: 3.4 GB saved per rank for the SD1.5 UNet)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def freeze(module: nn.Module, dtype: torch.dtype, device) -> nn.Module:
    """Frozen helpers (VAE, text encoder): eval mode, no gradients, low precision."""
    module.requires_grad_(False)
    return module.to(device=device, dtype=dtype).eval()


def count_parameters(module: nn.Module) -> int:
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in module.parameters())


FULL_SIZE_MIN_PARAMETERS = 100_000_000  # SD1.5's UNet has 860M, the tiny one 3M


def unet_size_of(parameters: int) -> str:
    """'full' for a UNet of SD1.5's size, 'tiny' for the small ones (the sizes of model.size)."""
    return "full" if parameters >= FULL_SIZE_MIN_PARAMETERS else "tiny"


def wants_checkpointing(setting: str | bool, unet_parameters: int) -> bool:
    """model.gradient_checkpointing resolved: auto is on for a UNet of SD1.5's size (860M parameters), where it saves
    most of the activation memory, and off for the tiny ones (3M), whose activations are a few MB: there recomputing
    them only costs time (21% of the default run's step on the 2-core development CPU)."""
    if setting == "auto":
        return unet_size_of(unet_parameters) == "full"
    return bool(setting)

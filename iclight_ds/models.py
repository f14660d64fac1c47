"""Model building and surgery: SD1.5 components from configs, the widened UNet, and the small IC-Light modules.

Knows nothing of DeepSpeed, data files or the training loop.
"""

from __future__ import annotations

import contextlib
import logging

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch import nn

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
# as saturated noise; with (64, 128), 1.5 after the same steps, and the samples are objects (README "Evaluation").
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


def build_unet(size: str, in_channels: int = 4):
    """A randomly initialised SD1.5-shaped UNet, widened to `in_channels` the IC-Light way."""
    unet = UNet2DConditionModel(**ARCHS[size][0])
    return widen_conv_in(unet, in_channels) if in_channels != 4 else unet


def build_vae(size: str):
    return AutoencoderKL(**ARCHS[size][1])


def build_text_encoder(size: str, tokenizer):
    """CLIP text model; the vocabulary and special ids follow `tokenizer` so every id it emits is valid."""
    from transformers import CLIPTextConfig, CLIPTextModel

    spec = dict(ARCHS[size][2])
    spec["vocab_size"] = max(spec["vocab_size"] if size == "full" else 0, len(tokenizer))
    spec.update(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    spec.update(pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return CLIPTextModel(CLIPTextConfig(**spec))


@torch.no_grad()
def widen_conv_in(unet, channels: int, modify=contextlib.nullcontext):
    """IC-Light surgery: `conv_in` takes `channels` inputs; the new ones start at zero, the old weights and bias stay.

    The widened UNet computes exactly what the original computed, whatever the extra channels hold.
    `modify(params)` is a context in which `params` are whole and writable (partitioned-parameter schemes
    such as ZeRO-3 pass one that gathers them); the default does nothing.
    """
    old = unet.conv_in
    if channels < old.in_channels:
        raise ValueError(f"widen_conv_in: cannot narrow conv_in from {old.in_channels} to {channels} channels")
    new = nn.Conv2d(
        channels,
        old.out_channels,
        kernel_size=old.kernel_size,
        stride=old.stride,
        padding=old.padding,
        device=old.weight.device,
        dtype=old.weight.dtype,
    )
    with modify([old.weight, old.bias, new.weight, new.bias]):
        new.weight.zero_()  # (320, C, 3, 3)
        new.weight[:, : old.in_channels].copy_(old.weight)
        new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=channels)
    return unet


class EnvEncoder(nn.Module):
    """FC's illumination input: an HDR environment map (B, 3, He, We) -> `tokens` cross-attention tokens (B, K, D).

    log1p compresses the HDR range; a small conv stack and a linear head produce K tokens that are appended to
    the text tokens, so the UNet sees the light through cross-attention without any change to its weights' shapes.
    """

    def __init__(self, tokens: int, dim: int, width: int = 64):
        super().__init__()
        self.tokens, self.dim = tokens, dim
        self.features = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1),
            nn.SiLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1),
            nn.SiLU(),
            nn.AdaptiveAvgPool2d((4, 8)),
        )
        self.head = nn.Linear(width * 32, tokens * dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, env: torch.Tensor) -> torch.Tensor:
        x = self.features(torch.log1p(env.clamp_min(0)))  # (B, width, 4, 8)
        x = self.head(x.flatten(1)).view(-1, self.tokens, self.dim)  # (B, K, D)
        return self.norm(x)


class _ZeroConv1x1(nn.Conv2d):
    """A convolution initialised to zero inside its own constructor (so it holds under ZeRO-3's partitioned init,
    which partitions each module's parameters as its constructor returns)."""

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)


class LatentMerger(nn.Module):
    """phi of the consistency objective: merges two noise predictions per latent pixel, (B,4,h,w) x 2 -> (B,4,h,w).

    An MLP over the 8 stacked channels (1x1 convolutions). It starts as the mean of the two predictions (last
    layer zero-initialised, residual around the mean): a neutral prior, since latent space is not linear.
    """

    def __init__(self, hidden: int = 64, layers: int = 5):
        super().__init__()
        dims = [8] + [hidden] * (layers - 1) + [4]
        blocks: list[nn.Module] = []
        for i in range(layers):
            last = i == layers - 1
            blocks.append((_ZeroConv1x1 if last else nn.Conv2d)(dims[i], dims[i + 1], 1))
            if not last:
                blocks.append(nn.SiLU())
        self.mlp = nn.Sequential(*blocks)

    def forward(self, eps_1: torch.Tensor, eps_2: torch.Tensor) -> torch.Tensor:
        return 0.5 * (eps_1 + eps_2) + self.mlp(torch.cat([eps_1, eps_2], dim=1))


class ICLightModel(nn.Module):
    """Everything that trains: the widened UNet, the consistency merger and (FC) the environment encoder.

    This is the one module handed to `deepspeed.initialize`.
    """

    def __init__(self, unet, merger: LatentMerger, env_encoder: EnvEncoder | None = None):
        super().__init__()
        self.unet = unet
        self.merger = merger
        self.env_encoder = env_encoder

    def forward(
        self,
        noisy: torch.Tensor,  # (N, 4, h, w)
        timesteps: torch.Tensor,  # (N,)
        concat: torch.Tensor,  # (N, 4 or 8, h, w): foreground latent (+ background latent)
        text: torch.Tensor,  # (N, 77, D)
        env: torch.Tensor | None = None,  # (N, 3, He, We), FC only
    ) -> torch.Tensor:
        dtype = self.unet.conv_in.weight.dtype
        hidden = text.to(dtype)
        if self.env_encoder is not None:
            if env is None:
                raise ValueError("this FC model sees the light through its environment encoder: pass `env`")
            hidden = torch.cat([hidden, self.env_encoder(env.to(dtype))], dim=1)  # (N, 77 + K, D)
        sample = torch.cat([noisy, concat], dim=1).to(dtype)  # (N, C, h, w)
        return self.unet(sample, timesteps, encoder_hidden_states=hidden).sample

    def merge(self, eps_1: torch.Tensor, eps_2: torch.Tensor) -> torch.Tensor:
        dtype = self.unet.conv_in.weight.dtype
        return self.merger(eps_1.to(dtype), eps_2.to(dtype))

    def small_modules_state(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.state_dict().items() if not k.startswith("unet.")}


def build_iclight_model(model_cfg, unet=None, modify=contextlib.nullcontext) -> ICLightModel:
    """The trainable model for `model_cfg` (a config.ModelConfig); `unet` defaults to a random one of its size."""
    unet = unet if unet is not None else build_unet(model_cfg.size, 4)
    if unet.config.in_channels == 4:
        widen_conv_in(unet, model_cfg.in_channels, modify)
    elif unet.config.in_channels != model_cfg.in_channels:
        raise ValueError(
            f"model.variant={model_cfg.variant} needs a UNet with 4 or {model_cfg.in_channels} input channels, "
            f"got {unet.config.in_channels}"
        )
    env_encoder = None
    if model_cfg.variant == "fc":
        env_encoder = EnvEncoder(model_cfg.env_tokens, unet.config.cross_attention_dim)
    merger = LatentMerger(model_cfg.merger_hidden, model_cfg.merger_layers)
    return ICLightModel(unet, merger, env_encoder)


def configure_attention(unet, choice: str, device_type: str) -> str:
    """Pick the attention kernel; returns the name of what was chosen (the caller logs it)."""
    from diffusers.models.attention_processor import AttnProcessor2_0

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

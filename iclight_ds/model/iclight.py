"""IC-Light surgery and modules: the widened `conv_in`, the environment encoder, the consistency merger, and the
one trainable module handed to DeepSpeed. Knows nothing of DeepSpeed, data files or the training loop."""

from __future__ import annotations

import contextlib

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .arch import ARCHS, default_dtype


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

    An MLP over the 8 stacked channels (1x1 convolutions), a residual around `init` of the two inputs (the last
    layer zero-initialised, so it starts as exactly that): "mean", a neutral prior, since latent space is not linear;
    "sum", the prior of additive light for the x0 form (config.ModelConfig.merger_init).
    """

    def __init__(self, hidden: int = 64, layers: int = 5, init: str = "mean"):
        super().__init__()
        if init not in ("mean", "sum"):
            raise ValueError(f"LatentMerger init {init!r}: expected 'mean' or 'sum'")
        self.prior_scale = 0.5 if init == "mean" else 1.0
        dims = [8] + [hidden] * (layers - 1) + [4]
        blocks: list[nn.Module] = []
        for i in range(layers):
            last = i == layers - 1
            blocks.append((_ZeroConv1x1 if last else nn.Conv2d)(dims[i], dims[i + 1], 1))
            if not last:
                blocks.append(nn.SiLU())
        self.mlp = nn.Sequential(*blocks)

    def forward(self, eps_1: torch.Tensor, eps_2: torch.Tensor) -> torch.Tensor:
        return self.prior_scale * (eps_1 + eps_2) + self.mlp(torch.cat([eps_1, eps_2], dim=1))


class ICLightModel(nn.Module):
    """Everything that trains: the widened UNet, the consistency merger and (FC with model.light_input=env) the
    environment encoder; without one the light is in the prompt and `env` is ignored.

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
    if model_cfg.env_input:  # FC with light_input=env; the official FC (light_input=text) has none
        env_encoder = EnvEncoder(model_cfg.env_tokens, unet.config.cross_attention_dim)
    merger = LatentMerger(model_cfg.merger_hidden, model_cfg.merger_layers, model_cfg.merger_init)
    return ICLightModel(unet, merger, env_encoder)


def build_initial_model(model_cfg, *, seed: int, dtype: torch.dtype, unet=None,
                        modify=contextlib.nullcontext) -> ICLightModel:
    """The run's initial trainable model: `torch.manual_seed(seed)`, then `build_iclight_model` with `dtype` as the
    default dtype (modules built directly in it: no fp32 replica first). The trainer builds its model with this, and
    `base.random_base` rebuilds a run's random base with it, so the two cannot drift apart. Callers that partition
    parameters (ZeRO-3) enter their init context around this call and pass `modify`."""
    torch.manual_seed(seed)  # identical initial weights on every rank
    with default_dtype(dtype):
        return build_iclight_model(model_cfg, unet=unet, modify=modify)


@torch.no_grad()
def narrow_conv_in(unet, channels: int):
    """Inverse of models.widen_conv_in: keep the first `channels` input channels of conv_in (in place)."""
    old = unet.conv_in
    if old.in_channels == channels:
        return unet
    new = torch.nn.Conv2d(channels, old.out_channels, kernel_size=old.kernel_size, stride=old.stride,
                          padding=old.padding, device=old.weight.device, dtype=old.weight.dtype)
    new.weight.copy_(old.weight[:, :channels])
    new.bias.copy_(old.bias)
    unet.conv_in = new
    unet.register_to_config(in_channels=channels)
    return unet


def has_env_encoder(small) -> bool:
    """Whether a small-modules state dict (keys without 'unet.') holds an FC environment encoder ('env_encoder.*')."""
    return any(k.startswith("env_encoder.") for k in small)


def env_encoder_from_state(small: dict[str, torch.Tensor]):
    """The FC environment encoder from a modules state dict ('env_encoder.*' keys), sizes read off the shapes."""

    state = {k[len("env_encoder.") :]: v for k, v in small.items() if k.startswith("env_encoder.")}
    if not state:
        return None
    width, dim = state["features.0.weight"].shape[0], state["norm.weight"].shape[0]
    encoder = EnvEncoder(tokens=state["head.weight"].shape[0] // dim, dim=dim, width=width)
    encoder.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return encoder.eval()


def build_unet(size: str, in_channels: int = 4):
    """A randomly initialised SD1.5-shaped UNet, widened to `in_channels` the IC-Light way."""
    unet = UNet2DConditionModel(**ARCHS[size][0])
    return widen_conv_in(unet, in_channels) if in_channels != 4 else unet

"""The shipped tiny pretrained base: a tiny SD1.5-shaped text-to-image UNet with the text encoder it was trained
with, in one safetensors file, and the shipped tiny VAE it was trained through.

It is what SD1.5 is to IC-Light, at the CPU default run's size: `model.base: tiny` (the CPU default run's preset,
iclight_ds/train/presets/default-cpu.yaml) loads it like any other base, IC-Light widens its conv_in 4 -> 8 and
fine-tunes it, and offset exports are against it. `python -m iclight_ds.tools.tiny_base` trains it (recipe, seeds,
steps, time, device and scores are in the file's metadata).

File layout: `unet.<diffusers key>` (4-channel UNet) and `text_encoder.<transformers key>` tensors; metadata `format`,
`unet_config` (JSON), `vae_sha256` (the VAE file it was trained through, `frozen.ASSET`) and the recipe. The UNet's
weight matrices and conv kernels are int8, symmetric with one fp32 scale per output channel under
`unet_scale.<diffusers key>` (dequantised to fp32 on load: the file stays under 5 MB), everything else is fp16. The
held-out scores in the metadata are of the weights as stored.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open

from ..config import SHIPPED_TINY_BASE
from .arch import build_text_encoder
from .formats import save_safetensors
from .frozen import ASSET, file_sha256, load_vae_file
from .tokenizer import build_char_tokenizer

FORMAT = "iclight-ds tiny base v2"
READABLE_FORMATS = (FORMAT, "iclight-ds tiny base v1")  # v1: every tensor fp16, no scales
TINY_BASE_ASSET = SHIPPED_TINY_BASE
SCALE_PREFIX = "unet_scale."


class TinyBaseError(ValueError):
    """A tiny-base file that is missing, not ours, or whose weights do not fit its config."""


def is_tiny_base_file(path: str | Path) -> bool:
    """A safetensors file whose metadata says it is a tiny base written by `save_tiny_base`."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") in READABLE_FORMATS
    except Exception:  # not a readable safetensors file: the SD1.5 single-file reader names the problem
        return False


def quantise_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 tensor of weight's shape, fp32 scale per output channel (dim 0)): symmetric, round to nearest."""
    flat = weight.detach().float().reshape(weight.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = torch.round(flat / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.reshape(weight.shape), scale


def dequantise_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (q.float().reshape(q.shape[0], -1) * scale.float()[:, None]).reshape(q.shape)


def pack_unet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The UNet's tensors as the file stores them: `unet.` keys (int8 for tensors of 2+ dims, else fp16) and the
    int8 ones' scales under `unet_scale.`."""
    out = {}
    for key, value in state.items():
        if value.ndim >= 2:
            out[f"unet.{key}"], out[f"{SCALE_PREFIX}{key}"] = quantise_int8(value)
        else:
            out[f"unet.{key}"] = value.detach().half()
    return out


def as_stored(unet) -> None:
    """Round the UNet's weights in place to what `save_tiny_base` stores and `load_tiny_base` reads back."""
    packed = pack_unet(unet.state_dict())
    unet.load_state_dict(_unpack(packed, "unet.", "the UNet"))


def save_tiny_base(unet, text_encoder, path: str | Path, info: dict) -> Path:
    """Write the UNet (int8 with scales, `pack_unet`) and the text encoder (fp16) with the UNet config, the VAE's
    hash and `info` in the metadata."""
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet.config.items() if not k.startswith("_")}
    tensors = pack_unet(unet.state_dict())
    tensors.update({f"text_encoder.{k}": v.detach().half() for k, v in text_encoder.state_dict().items()})
    meta = {"format": FORMAT, "unet_config": json.dumps(config), "vae_sha256": file_sha256(ASSET),
            **{k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in info.items()}}
    return save_safetensors(tensors, path, dtype=None, metadata=meta)


def read_tiny_base(path: str | Path = TINY_BASE_ASSET) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a tiny-base file; refuses files that are not one."""
    path = Path(path)
    if not is_tiny_base_file(path):
        raise TinyBaseError(f"{path}: not a tiny base file (no '{FORMAT}' metadata); make one with "
                            "`python -m iclight_ds.tools.tiny_base`")
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def load_tiny_base(path: str | Path = TINY_BASE_ASSET, *, unet_only: bool = False):
    """(unet, vae, text_encoder, tokenizer) in fp32; vae, text encoder and tokenizer None with unet_only.

    The tokenizer is the char-level one the base was trained with; the VAE the shipped tiny one, checked against the
    hash in the file (a base trained through another VAE would not read its latents)."""
    state, meta = read_tiny_base(path)
    unet = UNet2DConditionModel(**json.loads(meta["unet_config"]))
    _load_part(unet, state, "unet.", path)
    if unet_only:
        return unet.eval(), None, None, None
    if meta.get("vae_sha256") != file_sha256(ASSET):
        raise TinyBaseError(f"{path}: trained through a VAE ({meta.get('vae_sha256')}) other than the shipped "
                            f"{ASSET.name} ({file_sha256(ASSET)})")
    tokenizer = build_char_tokenizer()
    text_encoder = build_text_encoder("tiny", tokenizer)
    _load_part(text_encoder, state, "text_encoder.", path)
    return unet.eval(), load_vae_file(ASSET), text_encoder.eval(), tokenizer


def _unpack(state: dict[str, torch.Tensor], prefix: str, where) -> dict[str, torch.Tensor]:
    """The tensors under `prefix` in fp32, int8 ones multiplied by their scales under SCALE_PREFIX."""
    part = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if value.dtype == torch.int8:
            scale = state.get(SCALE_PREFIX + name)
            if scale is None or scale.shape != (value.shape[0],):
                raise TinyBaseError(f"{where}: int8 tensor {key} has no {SCALE_PREFIX}{name} of shape "
                                    f"({value.shape[0]},)")
            part[name] = dequantise_int8(value, scale)
        else:
            part[name] = value.float()
    return part


def _load_part(module, state: dict[str, torch.Tensor], prefix: str, path) -> None:
    part = _unpack(state, prefix, path)
    try:
        module.load_state_dict(part, strict=True)
    except RuntimeError as e:
        raise TinyBaseError(f"{path}: its {prefix.rstrip('.')} weights do not fit its config ({e})") from e

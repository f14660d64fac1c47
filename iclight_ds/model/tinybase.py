"""The shipped tiny pretrained base: a tiny SD1.5-shaped text-to-image UNet with the text encoder it was trained
with, in one safetensors file, and the shipped tiny VAE it was trained through.

It is what SD1.5 is to IC-Light, at the CPU default run's size: `model.base: tiny` (the CPU default run's preset,
iclight_ds/train/presets/default-cpu.yaml) loads it like any other base, IC-Light widens its conv_in 4 -> 8 and
fine-tunes it, and offset exports are against it. `python -m iclight_ds.tools.tiny_base` trains it (recipe, seeds,
steps, time, device and scores are in the file's metadata).

File layout: `unet.<diffusers key>` (4-channel UNet) and `text_encoder.<transformers key>` tensors, fp16; metadata
`format`, `unet_config` (JSON), `vae_sha256` (the VAE file it was trained through, `frozen.ASSET`) and the recipe.
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

FORMAT = "iclight-ds tiny base v1"
TINY_BASE_ASSET = SHIPPED_TINY_BASE


class TinyBaseError(ValueError):
    """A tiny-base file that is missing, not ours, or whose weights do not fit its config."""


def is_tiny_base_file(path: str | Path) -> bool:
    """A safetensors file whose metadata says it is a tiny base written by `save_tiny_base`."""
    path = Path(path)
    if not path.is_file() or path.suffix != ".safetensors":
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except Exception:  # not a readable safetensors file: the SD1.5 single-file reader names the problem
        return False


def save_tiny_base(unet, text_encoder, path: str | Path, info: dict) -> Path:
    """Write the UNet and text encoder (fp16) with the UNet config, the VAE's hash and `info` in the metadata."""
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in unet.config.items() if not k.startswith("_")}
    tensors = {f"unet.{k}": v for k, v in unet.state_dict().items()}
    tensors.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    meta = {"format": FORMAT, "unet_config": json.dumps(config), "vae_sha256": file_sha256(ASSET),
            **{k: (json.dumps(v) if isinstance(v, (dict, list)) else str(v)) for k, v in info.items()}}
    return save_safetensors(tensors, path, dtype=torch.float16, metadata=meta)


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


def _load_part(module, state: dict[str, torch.Tensor], prefix: str, path) -> None:
    part = {k[len(prefix):]: v.float() for k, v in state.items() if k.startswith(prefix)}
    try:
        module.load_state_dict(part, strict=True)
    except RuntimeError as e:
        raise TinyBaseError(f"{path}: its {prefix.rstrip('.')} weights do not fit its config ({e})") from e

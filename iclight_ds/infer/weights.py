"""Trained IC-Light weights onto a base: offsets (official files, ours), full UNet exports, diffusers folders."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import load_file

from ..config import DEFAULT_ENV_SHAPE
from ..model import formats as fmt
from ..model.base import BaseModelError, load_iclight_offset, read_unet_weights
from ..model.iclight import env_encoder_from_state, widen_conv_in
from ..model.lora import KOHYA_PREFIX, LoraError, apply_kohya, from_kohya
from .sampling import RelightError

log = logging.getLogger(__name__)


def load_trained_unet(base, weights: str | Path, *, kind: str = "auto", modules: str | Path | None = None):
    """(widened UNet, env encoder or None, metadata) from `weights` on top of `base` (a BaseModel).

    weights: an offset file (official IC-Light, our iclight-offset or ldm), a full `unet` export, a single-file
    `checkpoint` export (its UNet only), a diffusers folder, or a LoRA export (kohya-layout keys, with its conv_in file beside it). kind: 'offset' adds it to the base;
    'full' loads it as is; 'auto' decides from the file's metadata (files without ours, such as the official releases,
    are offsets).
    """


    weights = Path(weights)
    if weights.is_dir():

        try:
            unet = UNet2DConditionModel.from_pretrained(str(weights), local_files_only=True)
        except Exception as e:
            raise RelightError(f"--weights {weights}: cannot load a diffusers UNet folder: {e}") from e
        info = weights / fmt.EXPORT_INFO
        meta = json.loads(info.read_text()) if info.is_file() else {}
        modules_path = Path(modules) if modules else weights / meta.get("modules_file", fmt.MODULES_FILE)
    elif _is_lora_file(weights):
        unet, meta = _lora_onto_base(base, weights)
        default = meta.get("modules_file")
        modules_path = Path(modules) if modules else (weights.parent / default if default else None)
    else:
        try:
            state, meta = read_unet_weights(weights, base.unet.config)
        except (BaseModelError, fmt.FormatError) as e:
            raise RelightError(str(e)) from e
        if kind == "auto":
            full = (fmt.FORMAT_TAGS["unet"], fmt.FORMAT_TAGS["checkpoint"])
            kind = "full" if meta.get("format") in full else "offset"
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


def _is_lora_file(path: Path) -> bool:
    """A kohya-layout LoRA file: every UNet key starts with 'lora_unet_' (our `lora` export, kohya's, ComfyUI's)."""
    if path.suffix != ".safetensors":
        return False
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    return bool(keys) and all(k.startswith(KOHYA_PREFIX) for k in keys)


def _lora_onto_base(base, path: Path):
    """(UNet, metadata): the base with the conv_in offset (the file named by the LoRA's `conv_in_file`, beside it)
    and every LoRA layer's update added; keys that match no layer of the base UNet are refused by name."""
    meta = fmt.read_metadata(path)
    try:
        modules = from_kohya(load_file(str(path)), base.unet.config)
    except LoraError as e:
        raise RelightError(f"--weights {path}: {e}") from e
    conv_in_path = path.parent / meta.get("conv_in_file", path.name.replace(".safetensors", ".conv_in.safetensors"))
    if not conv_in_path.is_file():
        raise RelightError(f"--weights {path}: a LoRA file needs the conv_in offset exported with it ({conv_in_path} "
                           "does not exist): the LoRA layers cannot widen conv_in to the condition latents")
    conv_in, _ = read_unet_weights(conv_in_path, base.unet.config)
    unet = widen_conv_in(base.unet, conv_in["conv_in.weight"].shape[1])
    state = unet.state_dict()
    for key in ("conv_in.weight", "conv_in.bias"):
        state[key] = state[key].float() + conv_in[key].float()
    try:
        state = apply_kohya(state, modules)
    except LoraError as e:
        raise RelightError(f"--weights {path}: {e}") from e
    unet.load_state_dict({k: v.to(unet.dtype) for k, v in state.items()}, strict=True)
    return unet, meta


def env_shape_of(meta: dict) -> tuple[int, int]:
    try:
        return tuple(json.loads(meta.get("config", "{}")).get("model", {}).get("env_shape", DEFAULT_ENV_SHAPE))
    except (TypeError, json.JSONDecodeError):
        return DEFAULT_ENV_SHAPE

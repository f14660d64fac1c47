"""Weight formats: IC-Light offsets, the original (LDM) key layout, and safetensors files with metadata.

Pure conversions on state dicts; no DeepSpeed, no checkpoints, no command line (export.py does those).

* An IC-Light offset is `trained - base` per key, where `base` is the 4-channel base UNet with `conv_in` zero-padded
  to the trained channel count. Tools add it back: `merged[k] = base[k] + offset[k]`, then
  `load_state_dict(merged, strict=True)` (the official demo; ../shared/DOMAIN.md).
* LDM keys are the original Stable Diffusion layout (`input_blocks.1.0.in_layers.0.weight`, ...) that ComfyUI and
  Forge use: bare in a UNet-only file (the published `*_unet_ldm` files), under `model.diffusion_model.` in a whole
  checkpoint. `unet_to_ldm` / `unet_from_ldm` map between it and diffusers' `UNet2DConditionModel` keys; the VAE and
  CLIP-text mappings write whole single-file checkpoints (`write_ldm_checkpoint`).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Mapping

import torch
from diffusers import UNet2DConditionModel
from safetensors import safe_open
from safetensors.torch import save_file

# File names of an export (iclight_ds/train/export.py) and of what the trainer writes beside it
UNET_FILE = "unet.safetensors"
MODULES_FILE = "iclight_modules.safetensors"
EXPORT_INFO = "iclight_export.json"  # metadata of a diffusers-folder export
BASE_RECORD = "base.json"  # in a run folder: {"source": ..., "unet_hash": ...} of the base it trained on

# Key prefixes of an original single-file SD1.5 checkpoint.
LDM_UNET_PREFIX = "model.diffusion_model."
LDM_VAE_PREFIX = "first_stage_model."
LDM_TEXT_PREFIX = "cond_stage_model.transformer."
# Prefixes an LDM-layout UNet file may carry. "" (bare keys) is the UNet-only layout: ComfyUI's UNet loader strips
# only "model.diffusion_model." before it looks for "input_blocks.0.0.weight", and the ComfyUI/Forge IC-Light nodes
# prepend "diffusion_model." to every key themselves (docs/weights-and-export.md names their files).
UNET_LDM_PREFIXES = (LDM_UNET_PREFIX, "diffusion_model.", "")

# format name -> value of the "format" metadata entry
FORMAT_TAGS = {
    "iclight-offset": "iclight-ds/iclight-offset",
    "ldm": "iclight-ds/ldm-offset",
    "unet": "iclight-ds/diffusers-unet",
    "diffusers": "iclight-ds/diffusers-folder",
    "checkpoint": "iclight-ds/ldm-checkpoint",
    "modules": "iclight-ds/training-modules",
    "lora": "iclight-ds/lora",  # kohya-layout LoRA layers (model/lora.py)
    "conv-in": "iclight-ds/conv-in-offset",  # the conv_in offset that goes with a LoRA file
}


class FormatError(ValueError):
    """A weights file has a layout or keys this module cannot convert; the message names them."""


# ---------------------------------------------------------------------------------------------------------
# Offsets


def padded_base(base: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base UNet as IC-Light sees it: `conv_in.weight` zero-padded to the trained channel count (320, C, 3, 3)."""
    out = dict(base)
    w, target = base["conv_in.weight"], trained["conv_in.weight"]
    if w.shape[1] < target.shape[1]:
        pad = torch.zeros(w.shape[0], target.shape[1] - w.shape[1], *w.shape[2:], dtype=w.dtype, device=w.device)
        out["conv_in.weight"] = torch.cat([w, pad], dim=1)
    return out


def _check_same_keys(a: Mapping, b: Mapping, what_a: str, what_b: str) -> None:
    missing, extra = sorted(set(a) - set(b)), sorted(set(b) - set(a))
    if missing or extra:
        raise FormatError(
            f"{what_a} and {what_b} hold different keys: only in {what_a}: {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}; only in {what_b}: {extra[:5]}{' ...' if len(extra) > 5 else ''}"
        )
    bad = [k for k in a if a[k].shape != b[k].shape]
    if bad:
        raise FormatError(
            f"{what_a} and {what_b} differ in shape at {len(bad)} key(s), e.g. {bad[0]}: "
            f"{tuple(a[bad[0]].shape)} vs {tuple(b[bad[0]].shape)}"
        )


def check_fits_base(trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> None:
    """FormatError unless `trained` has the base UNet's keys and shapes (its conv_in may take more channels)."""
    _check_same_keys(trained, padded_base(base, trained), "the trained UNet", "the base UNet")


def make_offset(trained: Mapping[str, torch.Tensor], base: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """IC-Light offset, fp32: `trained[k] - padded_base[k]` for every key (diffusers UNet keys on both sides)."""
    base = padded_base(base, trained)
    _check_same_keys(trained, base, "the trained UNet", "the base UNet")
    return {k: trained[k].float() - base[k].float() for k in trained}


def apply_offset(base: Mapping[str, torch.Tensor], offset: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The official merge, in fp32: `base[k] + offset[k]` with the base conv_in zero-padded to the offset's."""
    base = padded_base(base, offset)
    _check_same_keys(base, offset, "the base UNet", "the offset")
    return {k: base[k].float() + offset[k].float() for k in base}


# ---------------------------------------------------------------------------------------------------------
# UNet: diffusers <-> LDM keys

_RESNET_TO_LDM = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_TOP_LEVEL_TO_LDM = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}


def _layers_per_block(config: Mapping) -> int:
    lpb = config["layers_per_block"]
    if not isinstance(lpb, int):
        raise FormatError(f"layers_per_block={lpb!r}: only one value for every block (as in SD1.5) is supported")
    return lpb


def _resnet_to_ldm(rest: str) -> str:
    name, _, tail = rest.partition(".")
    if name not in _RESNET_TO_LDM:
        raise KeyError(rest)
    return f"{_RESNET_TO_LDM[name]}.{tail}"


def unet_key_to_ldm(key: str, config: Mapping) -> str:
    """One diffusers UNet key -> its LDM key (no prefix), for an SD1.x-style UNet described by `config`.

    Down block b, layer l -> input_blocks.{1 + b(L+1) + l} (L = layers_per_block; .0 resnet, .1 attention); its
    downsampler -> input_blocks.{(b+1)(L+1)}.0.op. Up block b has L+1 layers -> output_blocks.{b(L+1) + l}; its
    upsampler sits after the attention when the block has one (.2.conv) and after the resnet otherwise (.1.conv).
    """
    lpb = _layers_per_block(config)
    for src, dst in _TOP_LEVEL_TO_LDM.items():
        if key.startswith(src + "."):
            return dst + key[len(src) :]
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m:
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "downsamplers":
            return f"input_blocks.{(b + 1) * (lpb + 1)}.0.op.{rest.removeprefix('conv.')}"
        idx = 1 + b * (lpb + 1) + i
        return f"input_blocks.{idx}.0.{_resnet_to_ldm(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, i, rest = m[1], int(m[2]), m[3]
        return f"middle_block.{2 * i}.{_resnet_to_ldm(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        b, kind, i, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "upsamplers":
            slot = 2 if "CrossAttn" in config["up_block_types"][b] else 1
            return f"output_blocks.{b * (lpb + 1) + lpb}.{slot}.{rest}"
        idx = b * (lpb + 1) + i
        return f"output_blocks.{idx}.0.{_resnet_to_ldm(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    raise KeyError(key)


def unet_keys(config: Mapping) -> list[str]:
    """The state-dict keys of a diffusers UNet with `config` (built on the meta device: no memory, no init)."""

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(config))
    return list(unet.state_dict())


def unet_to_ldm(state: Mapping[str, torch.Tensor], config: Mapping, *, prefix: str = "") -> dict[str, torch.Tensor]:
    """Diffusers UNet state dict -> LDM keys (`prefix` + key); values unchanged (SD1.5 shapes are the same)."""
    out = {}
    for key, value in state.items():
        try:
            out[prefix + unet_key_to_ldm(key, config)] = value
        except KeyError:
            raise FormatError(f"no LDM name for diffusers UNet key {key!r} (not an SD1.x UNet?)") from None
    return out


def detect_unet_ldm_prefix(keys) -> str | None:
    """Which LDM prefix the keys carry ('model.diffusion_model.', 'diffusion_model.' or ''), or None if not LDM."""
    keys = list(keys)
    for prefix in UNET_LDM_PREFIXES:
        if any(k.startswith(prefix + "input_blocks.") for k in keys):
            return prefix
    return None


def unet_from_ldm(state: Mapping[str, torch.Tensor], config: Mapping) -> dict[str, torch.Tensor]:
    """LDM-layout UNet state dict (any of UNET_LDM_PREFIXES) -> diffusers keys. Exact inverse of `unet_to_ldm`."""
    prefix = detect_unet_ldm_prefix(state)
    if prefix is None:
        raise FormatError("no LDM UNet keys ('input_blocks.*', optionally under 'diffusion_model.' or "
                          "'model.diffusion_model.') found")
    inverse = {unet_key_to_ldm(k, config): k for k in unet_keys(config)}
    out, unknown = {}, []
    for key, value in state.items():
        name = inverse.get(key[len(prefix) :]) if key.startswith(prefix) else None
        if name is None:
            unknown.append(key)
        else:
            out[name] = value
    if unknown:
        raise FormatError(f"{len(unknown)} key(s) are not LDM keys of this UNet, e.g. {unknown[:5]}")
    return out


# ---------------------------------------------------------------------------------------------------------
# VAE and CLIP text encoder: diffusers -> LDM (to write single-file checkpoints; diffusers reads them back)

_VAE_ATTN_TO_LDM = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def vae_to_ldm(state: Mapping[str, torch.Tensor], *, prefix: str = LDM_VAE_PREFIX) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict -> original keys. Attention projections become 1x1 convolutions (C, C, 1, 1)."""
    n_up = 1 + max((int(m[1]) for k in state if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))), default=-1)
    out = {}
    for key, value in state.items():
        new = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block.", new)
        new = re.sub(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.resnets\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.block.", new)
        new = re.sub(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.",
                     lambda m: f"decoder.up.{n_up - 1 - int(m[1])}.upsample.", new)
        new = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", new)
        m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", new)
        if m:
            new = f"{m[1]}.mid.attn_1.{_VAE_ATTN_TO_LDM[m[2]]}.{m[3]}"
            if m[3] == "weight" and m[2] != "group_norm":
                value = value[:, :, None, None]  # Linear (C, C) -> Conv2d 1x1 (C, C, 1, 1)
        out[prefix + new] = value
    return out


def text_encoder_to_ldm(state: Mapping[str, torch.Tensor], *, prefix: str = LDM_TEXT_PREFIX) -> dict[str, torch.Tensor]:
    """CLIPTextModel state dict -> 'cond_stage_model.transformer.text_model.*' (flattened or wrapped models)."""
    return {prefix + (k if k.startswith("text_model.") else "text_model." + k): v for k, v in state.items()}


def write_ldm_checkpoint(path: str | Path, *, unet: Mapping, unet_config: Mapping, vae: Mapping,
                         text_encoder: Mapping, extra: Mapping | None = None, dtype: torch.dtype | None = None,
                         metadata: Mapping[str, str] | None = None) -> Path:
    """One original-layout single-file checkpoint (UNet + VAE + CLIP text) as .safetensors or .ckpt/.pt.

    Keys: `model.diffusion_model.*` (the UNet, any conv_in width), `first_stage_model.*`,
    `cond_stage_model.transformer.text_model.*`. `dtype` None keeps each tensor's; `metadata` goes into a
    .safetensors header. A .ckpt is written as `{"state_dict": ...}` like the original releases (tensors only).
    """
    path = Path(path)
    state = {**unet_to_ldm(unet, unet_config, prefix=LDM_UNET_PREFIX), **vae_to_ldm(vae),
             **text_encoder_to_ldm(text_encoder), **(extra or {})}
    if path.suffix == ".safetensors":
        save_safetensors(state, path, dtype=dtype, metadata=metadata or {})
    else:
        if dtype is not None:
            state = {k: v.detach().to(dtype) for k, v in state.items()}
        torch.save({"state_dict": state}, path)
    return path


# ---------------------------------------------------------------------------------------------------------
# safetensors files


def new_file_mode() -> int:
    """The permissions the umask gives a new file (0o644 usually). safetensors (0.8) creates its files 0600 whatever
    the umask, which other users' tools, e.g. a ComfyUI reading a shared models folder, cannot open."""
    try:  # read where Linux shows it: setting the umask to read it would change it process-wide for a moment
        mask = next(int(line.split()[1], 8) for line in Path("/proc/self/status").read_text().splitlines()
                    if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError, IndexError):
        mask = os.umask(0o022)
        os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(tensors: Mapping[str, torch.Tensor], path: str | Path, *, dtype: torch.dtype | None,
                     metadata: Mapping[str, str]) -> Path:
    """Write atomically (a crash mid-write leaves any previous file intact); `dtype` None keeps each tensor's.
    The file gets the usual permissions of a new file (`new_file_mode`), not safetensors' 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    data = {k: (v.detach().to(dtype) if dtype is not None else v.detach()).contiguous() for k, v in tensors.items()}
    save_file(data, str(tmp), metadata={k: str(v) for k, v in metadata.items()})
    tmp.chmod(new_file_mode())
    tmp.replace(path)
    return path


def read_metadata(path: str | Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def metadata(fmt: str, *, variant: str, in_channels: int, step: int, config: Mapping | None,
             base_hash: str = "", base: str = "", **extra: str) -> dict[str, str]:
    """The header every exported file carries (safetensors metadata values are strings)."""
    meta = {
        "format": FORMAT_TAGS[fmt],
        "variant": variant,
        "in_channels": str(in_channels),
        "step": str(step),
        "base_hash": base_hash,
        "base": base,
        "config": json.dumps(config or {}),
    }
    meta.update({k: str(v) for k, v in extra.items()})
    return meta

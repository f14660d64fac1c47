"""Base SD1.5 models, offline: a diffusers folder, an original single-file checkpoint, or a run's random base.

`load_base(path)` accepts
  (a) a diffusers folder with `unet/`, `vae/`, `text_encoder/` (and optionally `tokenizer/`);
  (b) one single-file checkpoint in the original (LDM) layout: `.safetensors`, or `.ckpt`/`.pt` read with
      `torch.load(weights_only=True)` (nothing is unpickled); the architecture comes from the SD1.5 configs shipped
      in `iclight_ds/model/sd15_configs/` and the weights are converted by diffusers' own single-file converters;
  (c) the tiny pretrained base (`model.base: tiny`, model/tinybase.py): a tiny UNet and its text encoder in one
      safetensors file, with the shipped tiny VAE;
  (d) an iclight-ds run folder: its `model.base`, or, when that is null, the random base the trainer built,
      rebuilt from the run's seed with the trainer's own builders (`random_base`).
`load_iclight_offset(unet, path)` adds an IC-Light offset file to a base UNet the way the official demo does.

No network access: every `from_pretrained` uses `local_files_only=True`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from safetensors.torch import load_file
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from ..config import load_config, read_resolved
from ..dtypes import DTYPES
from . import formats as fmt
from .arch import SD15_TEXT, SD15_UNET, SD15_VAE, unet_size_of
from .frozen import build_frozen
from .iclight import build_initial_model, narrow_conv_in, widen_conv_in
from .tinybase import is_tiny_base_file, load_tiny_base
from .tokenizer import build_char_tokenizer

log = logging.getLogger(__name__)

SD15_CONFIG_DIR = Path(__file__).resolve().parent / "sd15_configs"
COMPONENTS = ("unet", "vae", "text_encoder")
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
ACCEPTED = (
    "accepted bases: a diffusers folder (unet/, vae/, text_encoder/, optional tokenizer/); one SD1.5 single-file "
    "checkpoint in the original layout (.safetensors, or .ckpt/.pt holding tensors only); or an iclight-ds run folder"
)


class BaseModelError(ValueError):
    """A base model path that cannot be loaded; the message names what is missing and which layouts are accepted."""


@dataclass
class BaseModel:
    """The frozen SD1.5 parts IC-Light builds on. `unet` has the base's own (usually 4) input channels."""

    unet: Any  # diffusers UNet2DConditionModel
    vae: Any | None  # diffusers AutoencoderKL (None when loaded with unet_only=True)
    text_encoder: Any | None  # transformers CLIPTextModel
    tokenizer: Any | None
    source: str  # what was loaded, for logs and export metadata
    unet_hash: str  # content hash of the base UNet weights as stored (see `unet_hash`)
    real_tokenizer: bool = True  # False when the char-level fallback stands in for a CLIP tokenizer


# ---------------------------------------------------------------------------------------------------------
# Hashing


def unet_hash(state: dict[str, torch.Tensor]) -> str:
    """'sha256:<hex>' over sorted keys, shapes and fp32 values: identical weights hash identically, whatever the
    file layout (diffusers folder, single file) they were read from."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.numpy().data)  # the buffer itself, no copy
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Shipped SD1.5 configs


def sd15_configs() -> dict[str, dict]:
    """The SD1.5 component configs, generated from the dicts in models.py (what `sd15_configs/` must hold)."""


    with torch.device("meta"):
        unet = UNet2DConditionModel(**SD15_UNET)
        vae = AutoencoderKL(**SD15_VAE)
    return {
        "unet": json.loads(unet.to_json_string()),
        "vae": json.loads(vae.to_json_string()),
        "text_encoder": dict(CLIPTextConfig(**SD15_TEXT).to_diff_dict(), architectures=["CLIPTextModel"]),
    }


def write_sd15_configs(out_dir: str | Path = SD15_CONFIG_DIR) -> list[Path]:
    """(Re)generate `<out_dir>/{unet,vae,text_encoder}/config.json`."""
    written = []
    for name, cfg in sd15_configs().items():
        path = Path(out_dir) / name / "config.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written


def _build_from_configs(config_dir: Path, which: str):
    """An uninitialised (meta-device) UNet or VAE, or a CLIP text model, from `<config_dir>/<which>/config.json`."""
    sub = config_dir / which
    if not (sub / "config.json").is_file():
        raise BaseModelError(f"no {which}/config.json in the config folder {config_dir}")
    if which == "text_encoder":

        # Built normally (123M parameters at full size): its non-persistent position_ids buffer must be real.
        return CLIPTextModel(CLIPTextConfig.from_pretrained(str(sub), local_files_only=True))

    cls = UNet2DConditionModel if which == "unet" else AutoencoderKL
    with torch.device("meta"):  # weights arrive with load_state_dict(assign=True): no random init of 860M values
        return cls.from_config(cls.load_config(str(sub)))


def _load_strict(module, state: dict[str, torch.Tensor], *, what: str, source: str) -> None:
    """load_state_dict(strict=True), with an error that names missing/unexpected keys and shape mismatches."""
    own = module.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            k = shapes[0]
            parts.append(f"{len(shapes)} with another shape (e.g. {k}: {tuple(state[k].shape)} in the file, "
                         f"{tuple(own[k].shape)} in SD1.5)")
        raise BaseModelError(f"{source}: the {what} weights do not match the SD1.5 {what}: " + "; ".join(parts)
                             + " (an SD2/SDXL checkpoint? " + ACCEPTED + ")")
    on_meta = any(p.is_meta for p in module.parameters())
    module.load_state_dict({k: v.contiguous() for k, v in state.items()}, strict=True, assign=on_meta)


# ---------------------------------------------------------------------------------------------------------
# Single files


def read_single_file(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat {key: tensor} from a .safetensors or a tensors-only .ckpt/.pt (unwrapping 'state_dict')."""
    path = Path(path)
    if path.suffix == ".safetensors":

        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError, OSError: the library's message says what is wrong
            raise BaseModelError(f"{path}: cannot read as safetensors: {e}") from e
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise BaseModelError(
            f"{path}: refused: the file holds Python objects other than tensors, and it is never unpickled "
            f"(torch.load weights_only=True said: {str(e).splitlines()[0]}). Convert it to .safetensors with a tool "
            f"you trust, or re-save only its state_dict. {ACCEPTED}"
        ) from e
    except Exception as e:
        raise BaseModelError(f"{path}: cannot read as a torch checkpoint: {e}") from e
    while isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict):
        raise BaseModelError(f"{path}: holds a {type(obj).__name__}, not a state dict. {ACCEPTED}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise BaseModelError(f"{path}: holds no tensors. {ACCEPTED}")
    return tensors


def _describe_keys(keys) -> str:
    heads = sorted({".".join(k.split(".")[:2]) for k in keys})
    return ", ".join(heads[:8]) + (" ..." if len(heads) > 8 else "")


def _convert_single_file(state: dict[str, torch.Tensor], config_dir: Path, *, source: str, unet_only: bool):
    """Original-layout state dict -> (unet, vae, text_encoder) diffusers models (diffusers' converters)."""

    if not any(k.startswith(fmt.LDM_UNET_PREFIX) for k in state):
        hint = ""
        if "conv_in.weight" in state:
            hint = (" It holds diffusers UNet keys (conv_in.weight, ...): an IC-Light offset or a UNet export is "
                    "not a base model; pass it as --weights.")
        elif fmt.detect_unet_ldm_prefix(state) is not None:
            hint = " It holds a UNet in the LDM layout without the VAE and text encoder (a UNet-only file)."
        raise BaseModelError(f"{source}: no '{fmt.LDM_UNET_PREFIX}*' keys, so not an original-layout SD checkpoint "
                             f"(found: {_describe_keys(state)}).{hint} {ACCEPTED}")
    needed = {"vae": fmt.LDM_VAE_PREFIX, "text_encoder": fmt.LDM_TEXT_PREFIX}
    absent = [f"{name} ('{p}*')" for name, p in needed.items() if not any(k.startswith(p) for k in state)]
    if absent and not unet_only:
        raise BaseModelError(f"{source}: the checkpoint has a UNet but no " + " and no ".join(absent)
                             + f" keys; a base needs all three parts. {ACCEPTED}")
    if sum(k.startswith("model_ema.") for k in state) > 100:
        log.warning("%s holds EMA and non-EMA UNet weights; using the non-EMA ones", source)

    unet = _build_from_configs(config_dir, "unet")
    unet_state = convert_ldm_unet_checkpoint(state, dict(unet.config))
    _load_strict(unet, unet_state, what="UNet", source=source)
    if unet_only:
        return unet, None, None
    vae = _build_from_configs(config_dir, "vae")
    _load_strict(vae, convert_ldm_vae_checkpoint(state, dict(vae.config)), what="VAE", source=source)
    text_encoder = _build_from_configs(config_dir, "text_encoder")
    text_state = convert_ldm_clip_checkpoint(state)  # 'text_model.*' keys
    if not hasattr(text_encoder, "text_model"):  # transformers >= 5.6 flattened CLIPTextModel
        text_state = {k.removeprefix("text_model."): v for k, v in text_state.items()}
    # position_ids is a non-persistent buffer in current transformers; old checkpoints still carry it
    text_state = {k: v for k, v in text_state.items() if not k.endswith("position_ids")}
    _load_strict(text_encoder, text_state, what="text encoder", source=source)
    return unet, vae, text_encoder


# ---------------------------------------------------------------------------------------------------------
# Tokenizers


def _load_tokenizer_dir(path: str | Path):

    path = Path(path)
    if not path.is_dir():
        raise BaseModelError(f"tokenizer folder {path} does not exist (expected a local CLIP tokenizer folder with "
                             "tokenizer_config.json and vocab.json/merges.txt or tokenizer.json)")
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise BaseModelError(f"tokenizer folder {path}: cannot load a tokenizer from it: {e}") from e


def _fallback_tokenizer(tokenizer_fallback, source: str) -> tuple[Any, bool]:
    """(tokenizer, is_real): `tokenizer_fallback` (a folder or a tokenizer object), else the char tokenizer."""
    if tokenizer_fallback is not None:
        if isinstance(tokenizer_fallback, (str, Path)):
            return _load_tokenizer_dir(tokenizer_fallback), True
        return tokenizer_fallback, True

    log.warning(
        "%s has no tokenizer and none was given (--tokenizer DIR): using the character-level test tokenizer. "
        "A real CLIP text encoder will NOT understand prompts tokenized this way; pass a local CLIP tokenizer "
        "folder (e.g. the tokenizer/ folder of any SD1.5 diffusers model) for meaningful prompts.", source)
    return build_char_tokenizer(), False


# ---------------------------------------------------------------------------------------------------------
# The loaders


def _diffusers_weights_variant(sub: Path) -> str | None:
    """None when full-precision weights are there, 'fp16' when only the fp16 variant (`*.fp16.safetensors`) is."""
    weights = [p.name for p in sub.iterdir() if p.suffix in (".safetensors", ".bin")]
    if any(".fp16." not in n for n in weights):
        return None
    return "fp16" if weights else None


def _load_diffusers_folder(path: Path, *, unet_only: bool):

    needed = ("unet",) if unet_only else COMPONENTS
    missing = [c for c in needed if not (path / c / "config.json").is_file()]
    if missing:
        raise BaseModelError(f"{path}: a diffusers folder needs {', '.join(n + '/' for n in needed)} each with "
                             f"config.json; missing: {', '.join(m + '/' for m in missing)}. {ACCEPTED}")
    loaders = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    parts = {}
    for name in needed:
        sub = path / name
        try:
            parts[name] = loaders[name].from_pretrained(str(sub), local_files_only=True,
                                                        variant=_diffusers_weights_variant(sub))
        except Exception as e:  # a missing weights file, a config of another model...
            raise BaseModelError(f"{sub}: cannot load the {name}: {e}") from e
    return parts["unet"], parts.get("vae"), parts.get("text_encoder")


def is_run_dir(path: Path) -> bool:
    """An iclight-ds run folder: the trainer's resolved config.json (sections model/train) at its top."""
    cfg = path / "config.json"
    if not cfg.is_file() or (path / "unet").is_dir():
        return False
    try:
        tree = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return isinstance(tree, dict) and "model" in tree and "train" in tree


def run_dtypes(run_config, resolved: dict) -> tuple[torch.dtype, torch.dtype]:
    """(training dtype, frozen dtype) of a run, from its resolved record (`resolved.json`, which the trainer writes
    into the run folder and every checkpoint); a folder without one is taken as bf16, the dtype of every shipped
    DeepSpeed config."""
    dtype = DTYPES[resolved.get("dtype", "bf16")]
    frozen = run_config.model.frozen_dtype
    return dtype, dtype if frozen == "auto" else DTYPES[frozen]


def random_base(run_config, *, resolved: dict | None = None, unet_only: bool = False) -> BaseModel:
    """The random base of a run with `model.base` null, rebuilt with the trainer's own builders: the initial model
    from `iclight.build_initial_model` (ZeRO-3's partitioned construction draws the same values and is not
    reproduced), the VAE and text encoder from `frozen.build_frozen`. The UNet returned is that initial UNet
    narrowed back to its 4 original input channels (widening only appended zero channels), in fp32.

    resolved: the run's resolved record (see `run_dtypes`). The global torch RNG state is saved and restored.
    """
    cfg = run_config
    dtype, frozen_dtype = run_dtypes(cfg, resolved or {})
    rng = torch.get_rng_state()
    try:
        model = build_initial_model(cfg.model, seed=cfg.train.seed, dtype=dtype)
        unet = narrow_conv_in(model.unet, model.unet.config.out_channels).float()  # a new Conv2d draws too
    finally:
        torch.set_rng_state(rng)
    tokenizer = build_char_tokenizer()
    vae = text_encoder = None
    if not unet_only:  # the trainer's (and the latent cache's) own function: its own seed, RNG left alone
        vae, text_encoder = build_frozen(cfg.model.size, seed=cfg.train.seed, tokenizer=tokenizer,
                                         dtype=frozen_dtype, device=torch.device("cpu"), vae=cfg.model.vae)
        if cfg.model.size == "tiny":  # the run's latent size, so a pipeline's default image size is its resolution
            # (the tiny config's 8 fits the 8x VAE at 64 px; the 4x VAE's latents are 16)
            unet.register_to_config(sample_size=cfg.data.resolution // 2 ** (len(vae.config.block_out_channels) - 1))
    source = f"random {cfg.model.size} base (train.seed={cfg.train.seed}, built in {str(dtype).split('.')[-1]})"
    return BaseModel(unet, vae, text_encoder, tokenizer, source, unet_hash(unet.state_dict()), real_tokenizer=False)


def base_unet_size(path: str | Path) -> str | None:
    """The UNet size ('tiny' or 'full') of a base, read without loading its weights, for the planner (which decides
    the DeepSpeed config and optimizer before the base is loaded); None where it cannot tell (load_base then names
    the problem). Single files are SD1.5 (the only architecture they are read as); a diffusers folder is judged by
    its unet/config.json's parameter count; a run folder by its own base or model.size."""


    path = Path(path)
    if path.is_dir() and is_run_dir(path):
        cfg = load_config(path / "config.json")
        return base_unet_size(cfg.model.base) if cfg.model.base else cfg.model.size
    if is_tiny_base_file(path):
        return "tiny"
    if path.is_file() and path.suffix in SINGLE_FILE_SUFFIXES:
        return "full"
    config = path / "unet" / "config.json"
    if not config.is_file():
        return None
    try:
        spec = {k: v for k, v in json.loads(config.read_text()).items() if not k.startswith("_")}
        with torch.device("meta"):
            params = sum(p.numel() for p in UNet2DConditionModel.from_config(spec).parameters())
    except Exception as e:  # a config diffusers cannot build: load_base reports it with its own message
        log.debug("%s: could not size its UNet (%s)", config, e)
        return None
    return unet_size_of(params)


def load_base(
    path: str | Path,
    *,
    tokenizer_fallback: str | Path | Any | None = None,
    dtype: torch.dtype | None = torch.float32,
    unet_only: bool = False,
    config_dir: str | Path | None = None,
) -> BaseModel:
    """Load a base model offline (see the module docstring for the accepted layouts).

    tokenizer_fallback: a local tokenizer folder (or a tokenizer object) used when the base has none of its own
        (single files never have one); without it the char-level test tokenizer is used, with a warning.
    dtype: dtype of the returned models; None keeps the stored dtype. The hash is always of the stored weights.
    unet_only: load only the UNet (what an offset export needs).
    config_dir: folder with unet/, vae/, text_encoder/ config.json for single files; default: the shipped SD1.5.
    """
    path = Path(path)
    if not path.exists():
        raise BaseModelError(f"base model {path} does not exist. {ACCEPTED}")
    tokenizer, real = None, True
    if path.is_dir() and is_run_dir(path):
        cfg = load_config(path / "config.json")
        if cfg.model.base:
            log.info("run %s was trained on model.base=%s", path, cfg.model.base)
            return load_base(cfg.model.base, tokenizer_fallback=tokenizer_fallback, dtype=dtype,
                             unet_only=unet_only, config_dir=config_dir)
        base = random_base(cfg, resolved=read_resolved(path), unet_only=unet_only)
        return _cast(base, dtype)
    if path.is_dir():
        unet, vae, text_encoder = _load_diffusers_folder(path, unet_only=unet_only)
        source = f"diffusers folder {path}"
        if not unet_only:
            if (path / "tokenizer").is_dir():
                tokenizer = _load_tokenizer_dir(path / "tokenizer")
            else:
                tokenizer, real = _fallback_tokenizer(tokenizer_fallback, source)
    elif is_tiny_base_file(path):
        unet, vae, text_encoder, tokenizer = load_tiny_base(path, unet_only=unet_only)
        source, real = f"tiny pretrained base {path}", False
    elif path.suffix in SINGLE_FILE_SUFFIXES:
        source = f"single-file checkpoint {path}"
        state = read_single_file(path)
        unet, vae, text_encoder = _convert_single_file(
            state, Path(config_dir) if config_dir else SD15_CONFIG_DIR, source=source, unet_only=unet_only)
        del state
        if not unet_only:
            tokenizer, real = _fallback_tokenizer(tokenizer_fallback, source)
    else:
        raise BaseModelError(f"{path}: unknown file type {path.suffix!r} (single files: "
                             f"{', '.join(SINGLE_FILE_SUFFIXES)}). {ACCEPTED}")
    base = BaseModel(unet, vae, text_encoder, tokenizer, source, unet_hash(unet.state_dict()), real_tokenizer=real)
    log.info("loaded base: %s (%s)", source, base.unet_hash[:19])
    return _cast(base, dtype)


def _cast(base: BaseModel, dtype: torch.dtype | None) -> BaseModel:
    for m in (base.unet, base.vae, base.text_encoder):
        if m is not None:
            m.eval()
            if dtype is not None and next(m.parameters()).dtype != dtype:
                m.to(dtype)
    return base


def base_for_run(config_path: str | Path, *, override: str | Path | None = None, unet_only: bool = True) -> BaseModel:
    """The base a run was trained from: `override`, else the run config's `model.base`, else its random base.

    config_path: the resolved config.json the trainer saved (in the run folder and beside every checkpoint).
    """
    if override is not None:
        return load_base(override, unet_only=unet_only)
    cfg = load_config(Path(config_path))
    if cfg.model.base:
        return load_base(cfg.model.base, unet_only=unet_only)
    return random_base(cfg, resolved=read_resolved(Path(config_path).parent), unet_only=unet_only)


# ---------------------------------------------------------------------------------------------------------
# IC-Light offsets on top of a base


def read_unet_weights(path: str | Path, unet_config) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A UNet weights file in diffusers keys or LDM keys (any prefix) -> (diffusers-key state dict, metadata)."""
    path = Path(path)
    if not path.is_file():
        raise BaseModelError(f"weights file {path} does not exist")
    meta = fmt.read_metadata(path) if path.suffix == ".safetensors" else {}
    state = read_single_file(path)
    if "conv_in.weight" in state:
        return state, meta
    prefix = fmt.detect_unet_ldm_prefix(state)
    if prefix == "model.diffusion_model.":  # a whole single-file checkpoint: its VAE and text encoder are not read
        state = {k: v for k, v in state.items() if k.startswith(prefix)}
    if prefix is not None:
        return fmt.unet_from_ldm(state, unet_config), meta
    raise BaseModelError(f"{path}: neither diffusers UNet keys (conv_in.weight, ...) nor LDM UNet keys "
                         f"(input_blocks.*) (found: {_describe_keys(state)})")


@torch.no_grad()
def load_iclight_offset(unet, path_or_state: str | Path | dict[str, torch.Tensor]):
    """Add an IC-Light offset to `unet` in place, as the official demo does; returns the unet.

    The base `conv_in` is widened (zero-padded) to the offset's channel count with models.widen_conv_in, then
    `merged[k] = base[k] + offset[k]` for every key and `load_state_dict(merged, strict=True)`. The offset may be in
    diffusers keys (official files, our `iclight-offset`) or LDM keys (our `ldm`, community files).
    """

    if isinstance(path_or_state, dict):
        offset = path_or_state
    else:
        offset, _ = read_unet_weights(path_or_state, unet.config)
    channels = offset["conv_in.weight"].shape[1] if "conv_in.weight" in offset else None
    if channels is None:
        raise BaseModelError("the offset has no conv_in.weight: not an IC-Light UNet offset")
    if unet.config.in_channels < channels:
        widen_conv_in(unet, channels)
    base = unet.state_dict()
    try:
        merged = fmt.apply_offset(base, offset)
    except fmt.FormatError as e:
        raise BaseModelError(f"the offset does not fit this base UNet: {e}") from e
    dtype = unet.conv_in.weight.dtype
    unet.load_state_dict({k: v.to(dtype) for k, v in merged.items()}, strict=True)
    return unet


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Regenerate the shipped SD1.5 configs, or describe a base model.")
    p.add_argument("--write-configs", action="store_true", help=f"rewrite {SD15_CONFIG_DIR}")
    p.add_argument("--describe", default=None, help="load this base and print its source and UNet hash")
    args = p.parse_args(argv)
    if args.write_configs:
        for path in write_sd15_configs():
            print(path)
    if args.describe:
        logging.basicConfig(level=logging.INFO)
        base = load_base(args.describe, unet_only=True)
        print(base.source)
        print(base.unet_hash)


if __name__ == "__main__":
    main()

"""Export trained weights from a DeepSpeed checkpoint (any ZeRO stage, any world size) in formats IC-Light tools read.

    python -m iclight_ds.export --run DIR [--format FORMAT] [--out PATH] [--dtype fp16|bf16|fp32] [--tag TAG]
                                [--base MODEL] [--ldm-prefix PREFIX]

Formats (the UNet; the merger / env-encoder always go to a separate small `*modules.safetensors`):
  unet            full trained weights, diffusers keys (what the trainer writes at the end of a run)
  iclight-offset  trained - base (base conv_in zero-padded), diffusers keys: what the official demo adds to its base
  ldm             the same offset in bare LDM keys (input_blocks.0.0.weight, ...), the layout of the published
                  *_unet_ldm files that ComfyUI's UNet loader and the ComfyUI / Forge IC-Light nodes read
  diffusers       a folder `UNet2DConditionModel.from_pretrained` loads (full weights, safetensors)
  checkpoint      one original-layout single file for tools that load one checkpoint: the trained UNet (widened
                  conv_in) + the base's VAE and text encoder (model.diffusion_model.*, first_stage_model.*,
                  cond_stage_model.transformer.*)
  lora            a LoRA run only (model.lora_rank > 0): the LoRA layers in the kohya / ComfyUI key layout
                  (lora_unet_<layer>.lora_down.weight / .lora_up.weight / .alpha; --lora-layout ldm or diffusers
                  layer names) + `*.conv_in.safetensors`, the trained conv_in as an offset in bare LDM keys
                  (input_blocks.0.0.weight / .bias), which a LoRA cannot express
A LoRA run's other formats hold the merged UNet (each LoRA layer's weight plus its update).
The offsets need the base UNet: --base, else the run's `model.base`, else the run's random base rebuilt from its seed;
a checkpoint takes its VAE and text encoder from that base. An FC model that sees the light through an environment
encoder is exported to iclight-offset, ldm or checkpoint with a warning: those tools never run the encoder.
See docs/weights-and-export.md for each tool's format, folder and loader.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from ..dtypes import DTYPES
from ..model import formats as fmt
from ..model.base import base_for_run, load_iclight_offset
from ..model.formats import BASE_RECORD, EXPORT_INFO, MODULES_FILE, UNET_FILE
from ..model.iclight import has_env_encoder
from ..model.lora import LAYOUTS, LoraError, is_lora_state, merge_lora, to_kohya
from . import checkpoint as ckpt
from . import engine as eng
from .ema import EMA_FILE, read_ema_file

FORMATS = ("unet", "iclight-offset", "ldm", "diffusers", "checkpoint")  # of any run (a LoRA run's merged)
LORA_FORMAT = "lora"  # of a LoRA run only
# Read by third-party tools (the official demo, ComfyUI, Forge, single-file loaders), which run the UNet on text and
# the condition latents only: an FC environment encoder exported to them is never run.
TOOL_FORMATS = ("iclight-offset", "ldm", "checkpoint", LORA_FORMAT)
# The ldm format's key prefix: none, the layout of the published *_unet_ldm files (formats.UNET_LDM_PREFIXES says
# who reads what). --ldm-prefix writes 'diffusion_model.' or 'model.diffusion_model.' for other tools.
DEFAULT_LDM_PREFIX = ""

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """An export this checkpoint cannot give (e.g. a LoRA file from a full fine-tune); the message says why."""


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """ICLightModel keys -> (UNet state dict with diffusers keys, the merger/env-encoder state dict)."""
    unet = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    small = {k: v for k, v in state.items() if not k.startswith("unet.")}
    if not unet:
        raise ValueError("state dict holds no 'unet.*' keys: not an iclight-ds model")
    return unet, small


def export_state_dict(state: dict, out_dir: Path, *, dtype: str, config: dict, step: int) -> list[Path]:
    """The trainer's end-of-run export: `unet.safetensors` (full weights) + `iclight_modules.safetensors`."""
    out_dir = Path(out_dir)
    unet, small = split_state_dict(state)
    return export_formatted(unet, small, fmt_name="unet", out=out_dir, dtype=dtype, config=config, step=step)


def export_checkpoint(checkpoint_root: Path, tag: str | None, out_dir: Path, *, dtype: str = "fp32",
                      weights: str = "auto", verify: bool = True) -> list[Path]:
    """Consolidate a saved checkpoint (any stage, any world size) and write the `unet` format files."""
    return export_run_checkpoint(checkpoint_root, tag, out_dir, fmt_name="unet", dtype=dtype, weights=weights,
                                 verify=verify)


def checkpoint_state(folder: Path, weights: str = "auto") -> dict[str, torch.Tensor]:
    """The trained model's fp32 state dict in checkpoint `folder`: its raw weights (consolidated from DeepSpeed's
    files), or with weights 'ema' (the default, 'auto', where the checkpoint holds an EMA) the averaged ones."""
    ema_path = folder / EMA_FILE
    if weights == "ema" and not ema_path.is_file():
        raise FileNotFoundError(f"--weights ema: {folder} holds no {EMA_FILE} (the run had train.ema_decay=0)")
    state = eng.fp32_state_dict_from_checkpoint(folder.parent, folder.name)
    if weights == "raw" or not ema_path.is_file():
        return state
    averaged, _ = read_ema_file(ema_path)
    unknown = sorted(set(averaged) - set(state))
    if unknown:
        raise ValueError(f"{ema_path}: EMA of parameters the model does not have, e.g. {unknown[:3]}")
    log.info("exporting the EMA weights of %s (--weights raw for the raw ones)", folder)
    return {**state, **averaged}


# ---------------------------------------------------------------------------------------------------------
# Formats


def output_paths(fmt_name: str, out: Path, variant: str) -> tuple[Path, Path]:
    """(where the UNet goes, where the small modules go) for `out`, a .safetensors file or a folder."""
    out = Path(out)
    if fmt_name == "diffusers":
        return out, out / MODULES_FILE
    if out.suffix != ".safetensors":
        if fmt_name == "unet":  # the trainer's layout
            return out / UNET_FILE, out / MODULES_FILE
        name = {"iclight-offset": f"iclight_{variant}_offset", "ldm": f"iclight_{variant}_unet_ldm",
                "checkpoint": f"iclight_{variant}_checkpoint", LORA_FORMAT: f"iclight_{variant}_lora"}[fmt_name]
        out = out / f"{name}.safetensors"
    return out, beside(out, "modules")


def beside(path: Path, what: str) -> Path:
    """`x.safetensors` -> `x.<what>.safetensors`: a file that goes with an export (its modules, a LoRA's conv_in)."""
    return path.with_name(path.name[: -len(".safetensors")] + f".{what}.safetensors")


def lora_settings(config: dict) -> tuple[int, float]:
    """(model.lora_rank, the alpha it applies with) from a run's resolved config (0 for a full fine-tune)."""
    model = config.get("model") or {}
    rank = int(model.get("lora_rank") or 0)
    alpha = model.get("lora_alpha")
    return rank, float(alpha if alpha is not None else rank)


def export_formatted(
    unet: dict[str, torch.Tensor],
    small: dict[str, torch.Tensor],
    *,
    fmt_name: str,
    out: Path,
    dtype: str = "fp32",
    config: dict,
    step: int,
    base=None,
    ldm_prefix: str = DEFAULT_LDM_PREFIX,
    lora_layout: str = "ldm",
    start=None,
) -> list[Path]:
    """Write one export format from the trained UNet (diffusers keys; a LoRA run's with peft's LoRA layers) and the
    small modules.

    base: a base_model.BaseModel: its 4-channel UNet for iclight-offset, ldm, diffusers and lora; for checkpoint also
    its VAE and text encoder. start: for lora, the UNet state dict the run started from (the base, plus the
    model.iclight_weights offsets where the run had them; default: the base): the conv_in file is the trained conv_in
    minus its own (zero-padded).
    """
    _check_format(fmt_name, base)
    lora = is_lora_state(unet)
    if fmt_name == LORA_FORMAT and not lora:
        raise ExportError(f"--format {LORA_FORMAT}: this run is a full fine-tune (model.lora_rank=0): it has no LoRA "
                         "layers to write; export its offsets (--format ldm or iclight-offset) instead")
    rank, alpha = lora_settings(config)
    if lora and fmt_name != LORA_FORMAT:
        unet = merge_lora(unet, alpha=alpha)
    torch_dtype = DTYPES[dtype]
    variant = (config.get("model") or {}).get("variant", "")
    in_channels = unet["conv_in.weight"].shape[1]
    unet_path, modules_path = output_paths(fmt_name, out, variant)
    if fmt_name in TOOL_FORMATS and has_env_encoder(small):
        warn_env_encoder(fmt_name, modules_path)
    meta = fmt.metadata(
        fmt_name, variant=variant, in_channels=in_channels, step=step, config=config,
        base_hash=base.unet_hash if base is not None else "", base=base.source if base is not None else "",
    )
    if small:
        meta["modules_file"] = modules_path.name
    if fmt_name == LORA_FORMAT:
        written = _write_lora(unet, unet_path, dtype=torch_dtype, meta=meta, base=base, start=start,
                              layout=lora_layout, rank=rank, alpha=alpha, ldm_prefix=ldm_prefix)
    else:
        written = _write_unet(unet, fmt_name, unet_path, dtype=torch_dtype, meta=meta, base=base,
                              ldm_prefix=ldm_prefix)
    if small:
        written.append(fmt.save_safetensors(small, modules_path, dtype=torch_dtype,
                                            metadata=dict(meta, format=fmt.FORMAT_TAGS["modules"])))
    return written


def _check_format(fmt_name: str, base) -> None:
    if fmt_name not in FORMATS + (LORA_FORMAT,):
        raise ValueError(f"unknown format {fmt_name!r}; one of {FORMATS + (LORA_FORMAT,)}")
    if fmt_name != "unet" and base is None:
        raise ValueError(f"format {fmt_name} needs the base model (base=...)")
    if fmt_name == "checkpoint" and (base.vae is None or base.text_encoder is None):
        raise ValueError("format checkpoint needs the base's VAE and text encoder (a base loaded with unet_only=False)")


def warn_env_encoder(fmt_name: str, modules_path: Path) -> str:
    """Log (and return) why an environment-conditioned FC exported to a tool format loses its light input."""
    msg = (f"this FC model sees the light through an environment-map encoder (env_encoder.* in {modules_path.name}), "
           f"which the tools that read the {fmt_name} format (the official IC-Light demo, the ComfyUI and Forge "
           "IC-Light nodes, single-file loaders) never run: there the UNet gets text and foreground only, without the "
           "light it was trained with. To relight with the environment map use iclight-relight (python -m "
           "iclight_ds.relight --env ENV.npy) or the diffusers snippet with the modules file in "
           "docs/weights-and-export.md; for an FC those tools run as trained, train with model.light_input: text")
    log.warning(msg)
    return msg


def _write_unet(unet: dict[str, torch.Tensor], fmt_name: str, path: Path, *, dtype: torch.dtype, meta: dict,
                base, ldm_prefix: str) -> list[Path]:
    """The format's UNet file(s) (everything but the small modules); returns what was written."""
    if fmt_name == "unet":
        return [fmt.save_safetensors(unet, path, dtype=dtype, metadata=meta)]
    if fmt_name in ("iclight-offset", "ldm"):
        offset = fmt.make_offset(unet, base.unet.state_dict())
        if fmt_name == "ldm":
            offset = fmt.unet_to_ldm(offset, base.unet.config, prefix=ldm_prefix)
            meta = dict(meta, ldm_prefix=ldm_prefix)
        return [fmt.save_safetensors(offset, path, dtype=dtype, metadata=meta)]
    if fmt_name == "checkpoint":
        fmt.check_fits_base(unet, base.unet.state_dict())  # its VAE and the key layout must be the trained UNet's
        return [fmt.write_ldm_checkpoint(path, unet=unet, unet_config=base.unet.config, vae=base.vae.state_dict(),
                                         text_encoder=base.text_encoder.state_dict(), dtype=dtype, metadata=meta)]
    _save_diffusers_folder(unet, path, dtype=dtype, base_config=base.unet.config)
    (path / EXPORT_INFO).write_text(json.dumps(meta, indent=2) + "\n")
    return [path, path / EXPORT_INFO]


def _write_lora(unet: dict[str, torch.Tensor], path: Path, *, dtype: torch.dtype, meta: dict, base, start,
                layout: str, rank: int, alpha: float, ldm_prefix: str) -> list[Path]:
    """The kohya-layout LoRA file and, beside it, the conv_in offset (trained - the zero-padded conv_in the run
    started from) in bare LDM keys, the layout kijai's ComfyUI IC-Light node patches key by key."""
    config = base.unet.config
    start = fmt.padded_base(start if start is not None else base.unet.state_dict(), unet)
    conv_in = {k: unet[k].float() - start[k].float() for k in ("conv_in.weight", "conv_in.bias")}
    conv_in_path = beside(path, "conv_in")
    lora_meta = dict(meta, format=fmt.FORMAT_TAGS[LORA_FORMAT], lora_layout=layout, lora_rank=str(rank),
                     lora_alpha=str(alpha), conv_in_file=conv_in_path.name,
                     # what kohya's scripts write, which the web UIs show and some loaders read
                     ss_network_module="networks.lora", ss_network_dim=str(rank), ss_network_alpha=str(alpha),
                     ss_base_model_version="sd_v1")
    written = [fmt.save_safetensors(to_kohya(unet, config, alpha=alpha, layout=layout), path, dtype=dtype,
                                    metadata=lora_meta)]
    conv_meta = dict(meta, format=fmt.FORMAT_TAGS["conv-in"], ldm_prefix=ldm_prefix, lora_file=path.name)
    written.append(fmt.save_safetensors(fmt.unet_to_ldm(conv_in, config, prefix=ldm_prefix), conv_in_path,
                                        dtype=dtype, metadata=conv_meta))
    return written


def _save_diffusers_folder(unet: dict[str, torch.Tensor], out: Path, *, dtype: torch.dtype, base_config) -> Path:
    """save_pretrained (safetensors) of a UNet with the base's config widened to the trained channel count."""

    config = dict(base_config, in_channels=unet["conv_in.weight"].shape[1])
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(config)
    model.load_state_dict({k: v.detach().to(dtype).contiguous() for k, v in unet.items()}, strict=True, assign=True)
    model.save_pretrained(str(out), safe_serialization=True)
    for weights in out.glob("*.safetensors"):  # safetensors writes them 0600
        weights.chmod(fmt.new_file_mode())
    return out


# ---------------------------------------------------------------------------------------------------------
# From checkpoints


def export_run_checkpoint(
    checkpoint_root: Path,
    tag: str | None,
    out: Path,
    *,
    fmt_name: str = "unet",
    dtype: str = "fp32",
    base: str | Path | None = None,
    ldm_prefix: str = DEFAULT_LDM_PREFIX,
    weights: str = "auto",
    verify: bool = True,
    unverified_ok: bool = False,
    lora_layout: str = "ldm",
) -> list[Path]:
    """Consolidate checkpoint `tag` (default: latest) under `checkpoint_root` and export it as `fmt_name`; `weights`:
    ema, raw, or auto (the EMA where the checkpoint holds one). The checkpoint is checked against its manifest first
    (`verify`; a checkpoint without one only with `unverified_ok`)."""
    checkpoint_root = Path(checkpoint_root)
    tag = tag or ckpt.latest_tag(checkpoint_root)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_root} (no 'latest' file)")
    if verify:
        ckpt.verify(checkpoint_root / tag, unverified_ok=unverified_ok)
    config_path = checkpoint_root / tag / "config.json"
    config = json.loads(config_path.read_text())
    if fmt_name == LORA_FORMAT and not lora_settings(config)[0]:
        raise ExportError(f"--format {LORA_FORMAT}: {checkpoint_root / tag} is a full fine-tune (model.lora_rank=0 in "
                         "its config.json): it has no LoRA layers to write; export its offsets (--format ldm or "
                         "iclight-offset) instead")
    state = checkpoint_state(checkpoint_root / tag, weights)
    step = int(tag.rsplit("_", 1)[-1]) if tag.startswith("step_") else -1
    unet, small = split_state_dict(state)
    base_model = None
    if fmt_name != "unet":  # a checkpoint also takes the base's VAE and text encoder
        base_model = base_for_run(config_path, override=base, unet_only=fmt_name != "checkpoint")
        log.info("base for export: %s (%s)", base_model.source, base_model.unet_hash[:19])
        _check_base_record(checkpoint_root.parent / BASE_RECORD, base_model, overridden=base is not None)
    start = _starting_unet(config, base_model) if fmt_name == LORA_FORMAT else None
    return export_formatted(unet, small, fmt_name=fmt_name, out=Path(out), dtype=dtype, config=config, step=step,
                            base=base_model, ldm_prefix=ldm_prefix, lora_layout=lora_layout, start=start)


def _starting_unet(config: dict, base_model) -> dict[str, torch.Tensor]:
    """The UNet a run started from: its base, plus the IC-Light offsets of model.iclight_weights where it had them."""
    offsets = (config.get("model") or {}).get("iclight_weights")
    if not offsets:
        return base_model.unet.state_dict()
    unet = copy.deepcopy(base_model.unet)
    return load_iclight_offset(unet, offsets).state_dict()


def _check_base_record(record: Path, base_model, *, overridden: bool) -> None:
    """When the run recorded its base's hash, the base the offsets are taken from must be that one."""
    if not record.is_file():
        return
    want = json.loads(record.read_text()).get("unet_hash")
    if not want or want == base_model.unet_hash:
        return
    msg = (f"the run trained on a base with UNet hash {want[:19]} ({record}), but {base_model.source} has "
           f"{base_model.unet_hash[:19]}: offsets from it would not give back the trained UNet")
    if not overridden:
        raise ValueError(msg + "; pass --base with the run's base model")
    log.warning("%s (--base was given explicitly: exporting anyway)", msg)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="run folder (holding checkpoints/)")
    p.add_argument("--format", dest="fmt", choices=FORMATS + (LORA_FORMAT,), default="unet",
                   help="what to write (default: unet; lora: a LoRA run's layers in the kohya layout)")
    p.add_argument("--lora-layout", choices=LAYOUTS, default="ldm",
                   help="--format lora: layer names in the keys, LDM (input_blocks_1_1_..., default: ComfyUI, Forge) "
                        "or diffusers (down_blocks_0_attentions_0_..., kohya's SD1.5 scripts, diffusers' loader)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument("--out", type=Path, default=None,
                   help="a .safetensors file, or a folder (default: the run folder; diffusers: <run>/unet_diffusers)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--unverified", action="store_true",
                   help="export a checkpoint that has no manifest (written by another tool) without checking it")
    p.add_argument("--weights", choices=("auto", "ema", "raw"), default="auto",
                   help="auto (default): the EMA weights where the checkpoint holds them (train.ema_decay), else raw")
    p.add_argument("--base", default=None,
                   help="base model the offsets are taken from, and a checkpoint's VAE and text encoder (default: the "
                        "run's model.base, or its random base)")
    p.add_argument("--ldm-prefix", default=DEFAULT_LDM_PREFIX,
                   help="key prefix of the ldm format (default '': bare LDM keys, input_blocks.0.0.weight ..., the "
                        "layout of the published *_unet_ldm files that ComfyUI's UNet loader, kijai's and "
                        "huchenlei's ComfyUI IC-Light nodes and the Forge/A1111 IC-Light extensions read; "
                        "'diffusion_model.' or 'model.diffusion_model.' for tools that want those prefixes)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    out = args.out or (args.run / "unet_diffusers" if args.fmt == "diffusers" else args.run)
    try:
        paths = export_run_checkpoint(args.run / "checkpoints", args.tag, out, fmt_name=args.fmt, dtype=args.dtype,
                                      base=args.base, ldm_prefix=args.ldm_prefix, weights=args.weights,
                                      unverified_ok=args.unverified, lora_layout=args.lora_layout)
    except (ckpt.CheckpointError, ExportError, LoraError) as e:  # a checkpoint that fails its manifest; a format it
        # cannot be exported in
        print(f"error: {e}", file=sys.stderr)
        return 2
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

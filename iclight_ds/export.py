"""Export trained weights to safetensors: the UNet (diffusers keys) and, separately, the small training modules.

`python -m iclight_ds.export --run DIR [--tag TAG] [--out DIR] [--dtype fp16|bf16|fp32]`
works from any ZeRO stage's checkpoint, ZeRO-3 included (the fp32 master weights are consolidated).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import checkpoint as ckpt
from . import engine as eng

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
UNET_FILE = "unet.safetensors"
MODULES_FILE = "iclight_modules.safetensors"


def split_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """ICLightModel keys -> (UNet state dict with diffusers keys, the merger/env-encoder state dict)."""
    unet = {k[len("unet.") :]: v for k, v in state.items() if k.startswith("unet.")}
    small = {k: v for k, v in state.items() if not k.startswith("unet.")}
    if not unet:
        raise ValueError("state dict holds no 'unet.*' keys: not an iclight-ds model")
    return unet, small


def _save(tensors: dict[str, torch.Tensor], path: Path, dtype: torch.dtype, metadata: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().to(dtype).contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)  # a crash mid-write leaves the previous export intact


def export_state_dict(state: dict, out_dir: Path, *, dtype: str, config: dict, step: int) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    unet, small = split_state_dict(state)
    in_channels = unet["conv_in.weight"].shape[1]
    meta = {
        "format": "iclight-ds/diffusers-unet",
        "variant": config.get("model", {}).get("variant", ""),
        "in_channels": str(in_channels),
        "step": str(step),
        "config": json.dumps(config),
    }
    written = [out_dir / UNET_FILE]
    _save(unet, written[0], DTYPES[dtype], meta)
    if small:
        written.append(out_dir / MODULES_FILE)
        _save(small, written[1], DTYPES[dtype], dict(meta, format="iclight-ds/training-modules"))
    return written


def export_checkpoint(checkpoint_root: Path, tag: str | None, out_dir: Path, *, dtype: str = "fp32") -> list[Path]:
    """Consolidate a saved checkpoint (any stage, any world size) and write the safetensors files."""
    tag = tag or ckpt.latest_tag(checkpoint_root)
    if tag is None:
        raise FileNotFoundError(f"no complete checkpoint under {checkpoint_root} (no 'latest' file)")
    config = json.loads((checkpoint_root / tag / "config.json").read_text())
    state = eng.fp32_state_dict_from_checkpoint(checkpoint_root, tag)
    step = int(tag.rsplit("_", 1)[-1]) if tag.startswith("step_") else -1
    return export_state_dict(state, out_dir, dtype=dtype, config=config, step=step)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="run folder (holding checkpoints/)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: the run folder)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    args = p.parse_args(argv)
    for path in export_checkpoint(args.run / "checkpoints", args.tag, args.out or args.run, dtype=args.dtype):
        print(path)


if __name__ == "__main__":
    main()

"""Check a dataset folder file by file before training on it.

CLI: python -m iclight_ds.data.validate DIR [--require-background] [--require-env] [--env-shape H W]
prints `manifest.jsonl:LINE: PATH: message` per problem and a summary; exit code 1 if any problem.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ..config import DEFAULT_ENV_SHAPE
from .dataset import MANIFEST, Problem, Sample, load_env, read_manifest
from .imageio import DECODE_ERRORS, open_decoded

IMAGE_MODES = ("RGB", "RGBA", "L", "LA", "P", "PA", "1", "CMYK")  # 16-bit grey arrives here as "L"
MASK_MODES = ("L", "1")
BINARY_FRACTION = 0.9  # a mask must have more than this share of pixels near 0 or 255
NEAR = 16  # "near 0 or 255": within this many grey levels


def _decode(problems: list[Problem], line: int, rel: str, root: Path, modes: tuple[str, ...],
            what: str) -> Image.Image | None:
    """Fully decode an image; record a problem and return None when it fails or has a wrong mode."""
    try:
        img = open_decoded(root / rel)
    except DECODE_ERRORS as e:
        problems.append(Problem(line, rel, f"cannot decode image ({e})"))
        return None
    if img.mode not in modes:
        problems.append(Problem(line, rel, f"{what} has mode {img.mode}, expected one of {', '.join(modes)}"))
        return None
    return img


def _check_mask(mask: Image.Image, foreground: Image.Image | None, s: Sample) -> list[Problem]:
    problems = []
    if foreground is not None and mask.size != foreground.size:
        problems.append(Problem(s.line, s.mask, f"mask size {mask.size[0]}x{mask.size[1]} differs from "
                                f"foreground {s.foreground} size {foreground.size[0]}x{foreground.size[1]}"))
    m = np.asarray(mask.convert("L"))
    binary = ((m <= NEAR) | (m >= 255 - NEAR)).mean()
    if binary <= BINARY_FRACTION:
        problems.append(Problem(s.line, s.mask, f"mask is not binary: only {binary:.0%} of pixels are near 0 or 255"))
    if not (m >= 128).any():
        problems.append(Problem(s.line, s.mask, "mask is empty (no pixel >= 128)"))
    return problems


def _load_array(problems: list[Problem], line: int, rel: str, root: Path, loader) -> np.ndarray | None:
    try:
        return loader(root / rel)
    except (*DECODE_ERRORS, ValueError) as e:
        problems.append(Problem(line, rel, str(e)))
        return None


def _linear_image(path: Path) -> np.ndarray:
    """(H, W, 3) finite float array."""
    arr = np.load(path, allow_pickle=False)
    if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype.kind != "f":
        raise ValueError(f"linear image has shape {arr.shape} dtype {arr.dtype}, expected (H, W, 3) float")
    if not np.isfinite(arr).all():
        raise ValueError(f"linear image has {int((~np.isfinite(arr)).sum())} non-finite values")
    return arr


def _check_parts(problems: list[Problem], s: Sample, whole: np.ndarray | None, whole_rel: str | None,
                 parts: list[np.ndarray | None], rels: tuple[str, str]) -> None:
    """Light transport parts must have the whole's shape and sum to it."""
    if whole is None or any(p is None for p in parts):
        return
    for p, rel in zip(parts, rels):
        if p.shape != whole.shape:
            problems.append(Problem(s.line, rel, f"shape {p.shape} differs from {whole_rel} shape {whole.shape}"))
            return
    err = np.abs(parts[0] + parts[1] - whole).max()
    if not np.allclose(parts[0] + parts[1], whole, rtol=1e-4, atol=1e-5):
        problems.append(Problem(s.line, rels[0], f"parts do not sum to {whole_rel} (max error {err:g})"))


def check_sample(root: Path, s: Sample, env_shape: tuple[int, int]) -> list[Problem]:
    """Decode every file of one sample and check sizes, modes, the mask and the arrays."""
    problems: list[Problem] = []
    target = _decode(problems, s.line, s.target, root, IMAGE_MODES, "target")
    foreground = _decode(problems, s.line, s.foreground, root, IMAGE_MODES, "foreground")
    if s.background is not None:
        _decode(problems, s.line, s.background, root, IMAGE_MODES, "background")
    mask = _decode(problems, s.line, s.mask, root, MASK_MODES, "mask")
    if mask is not None:
        problems += _check_mask(mask, foreground, s)

    env = _load_array(problems, s.line, s.env, root, load_env) if s.env is not None else None
    if env is not None and env.shape[1] * env_shape[0] != env.shape[0] * env_shape[1]:
        problems.append(Problem(s.line, s.env, f"env map is {env.shape[0]}x{env.shape[1]}, not the aspect of "
                                f"the training env shape {env_shape[0]}x{env_shape[1]} (equirectangular)"))
    if s.env_parts is not None:
        parts = [_load_array(problems, s.line, p, root, load_env) for p in s.env_parts]
        _check_parts(problems, s, env, s.env, parts, s.env_parts)
    linear = None
    if s.target_linear is not None:
        linear = _load_array(problems, s.line, s.target_linear, root, _linear_image)
        if linear is not None and target is not None and linear.shape[:2] != target.size[::-1]:
            problems.append(Problem(s.line, s.target_linear, f"shape {linear.shape} does not match target "
                                    f"{s.target} size {target.size[0]}x{target.size[1]}"))
    if s.target_parts_linear is not None:
        parts = [_load_array(problems, s.line, p, root, _linear_image) for p in s.target_parts_linear]
        _check_parts(problems, s, linear, s.target_linear, parts, s.target_parts_linear)
    return problems


def validate_dataset(root: str | Path, env_shape: tuple[int, int] = DEFAULT_ENV_SHAPE, require_background: bool = False,
                     require_env: bool = False) -> list[Problem]:
    """Every problem of the dataset at `root`, in manifest order (empty list: the dataset is fine)."""
    root = Path(root)
    samples, problems = read_manifest(root, require_background, require_env)
    for s in samples:
        problems += check_sample(root, s, env_shape)
    return sorted(problems, key=lambda p: p.line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Check a relighting dataset folder.")
    parser.add_argument("root", type=Path, help=f"dataset folder containing {MANIFEST}")
    parser.add_argument("--require-background", action="store_true", help="every sample needs a background")
    parser.add_argument("--require-env", action="store_true", help="every sample needs an env map")
    parser.add_argument("--env-shape", type=int, nargs=2, default=DEFAULT_ENV_SHAPE, metavar=("H", "W"))
    args = parser.parse_args(argv)
    problems = validate_dataset(args.root, tuple(args.env_shape), args.require_background, args.require_env)
    for p in problems:
        print(p.format())
    n_samples = len(read_manifest(args.root)[0])
    if problems:
        lines = len({p.line for p in problems})
        print(f"{args.root}: {len(problems)} problem(s) on {lines} line(s); {n_samples} sample(s) read")
        return 1
    print(f"{args.root}: OK, {n_samples} sample(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

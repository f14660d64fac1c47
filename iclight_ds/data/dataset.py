"""On-disk relighting datasets: the manifest reader and the torch Dataset.

A dataset is a folder with `manifest.jsonl`, one JSON object per line (docs/data.md):
required `id`, `prompt`, `target`, `foreground`, `mask`; optional `background`, `env` and the
generator's extras `env_parts`, `target_linear`, `target_parts_linear`. Paths are relative to the
folder and may not leave it.
"""

from __future__ import annotations

import json
import logging
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..config import DEFAULT_ENV_SHAPE
from .buckets import make_buckets, nearest_bucket, upright_size
from .imageio import (
    DECODE_ERRORS,
    GREY,
    open_decoded,
    read_env_file,
    resize_center_crop,
    to_rgb_over_grey,
    to_rgba,
)

log = logging.getLogger(__name__)

MANIFEST = "manifest.jsonl"
REQUIRED_KEYS = ("id", "prompt", "target", "foreground", "mask")
FILE_KEYS = ("target", "foreground", "mask", "background", "env", "target_linear")  # one path each
PAIR_KEYS = ("env_parts", "target_parts_linear")  # two paths each


class DatasetError(ValueError):
    """A dataset that cannot be used as it is; the message names the manifest line and the file."""


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a dataset. `line` is 1-based (0: the manifest as a whole)."""

    line: int
    path: str  # the file concerned, relative to the dataset folder; "" when it is the line itself
    message: str

    def format(self, manifest: str = MANIFEST) -> str:
        where = f"{manifest}:{self.line}: "
        return where + (f"{self.path}: " if self.path else "") + self.message


@dataclass(frozen=True)
class Sample:
    """One manifest line, checked: every path exists inside the dataset folder."""

    line: int
    id: str
    prompt: str
    target: str
    foreground: str
    mask: str
    background: str | None = None
    env: str | None = None
    target_linear: str | None = None
    env_parts: tuple[str, str] | None = None
    target_parts_linear: tuple[str, str] | None = None


def _path_problem(root: Path, rel: Any) -> str | None:
    """Why `rel` is not a usable file path inside `root`, or None."""
    if not isinstance(rel, str) or not rel:
        return f"expected a relative path string, got {rel!r}"
    if posixpath.isabs(rel):
        return "absolute path: paths must be relative to the dataset folder"
    if posixpath.normpath(rel.replace("\\", "/")).split("/")[0] == "..":
        return "path escapes the dataset folder"
    if not (root / rel).is_file():
        return "file not found"
    return None


def _parse_line(root: Path, line: int, text: str) -> tuple[Sample | None, list[Problem]]:
    """Check one manifest line; return the sample when the line has no problems."""
    try:
        rec = json.loads(text)
    except json.JSONDecodeError as e:
        return None, [Problem(line, "", f"not valid JSON ({e.msg} at column {e.colno})")]
    if not isinstance(rec, dict):
        return None, [Problem(line, "", f"expected a JSON object, got {type(rec).__name__}")]
    missing = [k for k in REQUIRED_KEYS if k not in rec]
    if missing:
        return None, [Problem(line, "", "missing key(s) " + ", ".join(repr(k) for k in missing))]
    problems = []
    if not isinstance(rec["id"], str) or not rec["id"]:
        problems.append(Problem(line, "", f"'id' must be a non-empty string, got {rec['id']!r}"))
    if not isinstance(rec["prompt"], str) or not rec["prompt"].strip():
        problems.append(Problem(line, "", f"'prompt' must be a non-empty string, got {rec['prompt']!r}"))
    for key in FILE_KEYS:
        if rec.get(key) is not None and (why := _path_problem(root, rec[key])):
            problems.append(Problem(line, str(rec[key]), f"'{key}': {why}"))
    for key in PAIR_KEYS:
        pair = rec.get(key)
        if pair is None:
            continue
        if not isinstance(pair, list) or len(pair) != 2:
            problems.append(Problem(line, "", f"'{key}' must be a list of two paths, got {pair!r}"))
            continue
        problems += [Problem(line, str(p), f"'{key}': {why}") for p in pair if (why := _path_problem(root, p))]
    if problems:
        return None, problems
    pairs = {k: tuple(rec[k]) if rec.get(k) is not None else None for k in PAIR_KEYS}
    return Sample(line=line, id=rec["id"], prompt=rec["prompt"], **{k: rec.get(k) for k in FILE_KEYS}, **pairs), []


PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".bmp")


def no_manifest_message(root: Path) -> str:
    """Why `root` is not a dataset, and, for a folder of photos, the command that makes one from it."""
    if not root.is_dir():
        return f"no {MANIFEST} in {root} (no such folder)"
    photos = sum(1 for p in root.rglob("*") if p.suffix.lower() in PHOTO_SUFFIXES)
    message = f"no {MANIFEST} in {root}"
    if photos:
        out = root.resolve().parent / f"{root.resolve().name}-prepared"
        message += (f"; it holds {photos} image(s): to train on your own photos, make a dataset from them with "
                    f"`python -m iclight_ds.data.prepare --images {root} --out {out}` (docs/data.md)")
    return message


def read_manifest(root: str | Path, require_background: bool = False,
                  require_env: bool = False) -> tuple[list[Sample], list[Problem]]:
    """Parse and check `root/manifest.jsonl` (no image decoding).

    Returns the samples of the lines without problems, and every problem found. Blank lines are
    ignored but counted, so line numbers match an editor's.
    """
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        return [], [Problem(0, "", no_manifest_message(root))]
    samples: list[Sample] = []
    problems: list[Problem] = []
    first_line: dict[str, int] = {}
    for line, text in enumerate(manifest.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        sample, line_problems = _parse_line(root, line, text)
        problems += line_problems
        if sample is None:
            continue
        if sample.id in first_line:
            problems.append(Problem(line, "", f"duplicate id {sample.id!r} (first on line {first_line[sample.id]})"))
            continue
        first_line[sample.id] = line
        absent = [k for k, needed in (("background", require_background), ("env", require_env))
                  if needed and getattr(sample, k) is None]
        problems += [Problem(line, "", f"no '{k}', which this dataset requires") for k in absent]
        if not absent:
            samples.append(sample)
    if not samples and not problems:
        problems.append(Problem(0, "", "the manifest has no samples"))
    return samples, problems


def load_env(path: Path) -> np.ndarray:
    """(H, W, 3) float32 linear env map from a .npy, .hdr or .exr file; raises ValueError when it is malformed or of
    another type."""
    env = read_env_file(Path(path))
    if env.ndim != 3 or env.shape[2] != 3 or env.shape[0] < 1 or env.shape[1] < 1:
        raise ValueError(f"env map shape {env.shape}, expected (H, W, 3)")
    if env.dtype.kind != "f":
        raise ValueError(f"env map dtype {env.dtype}, expected float")
    if not np.isfinite(env).all():
        raise ValueError(f"env map has {int((~np.isfinite(env)).sum())} non-finite values")
    if (env < 0).any():
        raise ValueError(f"env map has negative values (min {env.min():g})")
    return env.astype(np.float32)


def _rgb_tensor(img: Image.Image, scale: float) -> torch.Tensor:
    """(R, R, 3) uint8 image -> (3, R, R) float32 `x / scale - 1`."""
    return (torch.from_numpy(np.array(img, dtype=np.float32)) / scale - 1.0).permute(2, 0, 1).contiguous()


class RelightDataset(torch.utils.data.Dataset):
    """Samples for IC-Light training: relit target, grey-composited foreground, mask, background, env.

    `__getitem__` returns (H x W = R x R for R = resolution, or the sample's bucket with `buckets`; He x We =
    env_shape):
      target (3, H, W) in [-1, 1]; foreground (3, H, W) IC-Light convention (`x / 127 - 1`, grey -> 0);
      mask (1, H, W) in {0, 1}; background (3, H, W) in [-1, 1] or zeros; env (3, He, We) linear or
      zeros; env_parts (2, 3, He, We) or zeros; has_background / has_env / has_env_parts (bool);
      input_ids (L,) long; index (int, of the sample actually returned).
    With `skip_bad`, a sample whose files fail to load is replaced by the next one that loads and
    counted in `skipped` (per process: workers count in their own copies). With `buckets` (data.buckets) each sample
    is sized to the aspect-ratio bucket nearest its target's aspect (`bucket_of[i]`, (W, H); iclight_ds.data.buckets).
    """

    def __init__(self, root: str | Path, resolution: int, tokenizer: Any, env_shape: tuple[int, int] = DEFAULT_ENV_SHAPE,
                 require_background: bool = False, require_env: bool = False, skip_bad: bool = False,
                 buckets: bool = False) -> None:
        self.root = Path(root)
        self.resolution = int(resolution)
        self.tokenizer = tokenizer
        self.env_shape = (int(env_shape[0]), int(env_shape[1]))
        self.skip_bad = skip_bad
        self.skipped = 0
        self.samples, problems = read_manifest(self.root, require_background, require_env)
        if problems:
            shown = "\n".join(p.format(str(self.root / MANIFEST)) for p in problems[:20])
            more = f"\n... and {len(problems) - 20} more" if len(problems) > 20 else ""
            raise DatasetError(f"{shown}{more}\n({len(problems)} problem(s); "
                               f"`python -m iclight_ds.data.validate {self.root}` checks every file)")
        square = (self.resolution, self.resolution)
        self.bucket_of: list[tuple[int, int]] = [square] * len(self.samples)
        if buckets:
            self.bucket_of = [self._bucket(s, make_buckets(self.resolution)) for s in self.samples]

    def _bucket(self, sample: Sample, buckets: list[tuple[int, int]]) -> tuple[int, int]:
        try:
            return nearest_bucket(*upright_size(self.root / sample.target), buckets)
        except DECODE_ERRORS:  # a broken file: its error comes when it is loaded
            return (self.resolution, self.resolution)

    def square(self) -> "RelightDataset":
        """This dataset without buckets (every sample R x R): for previews and evaluations, which stack samples."""
        if all(b == (self.resolution, self.resolution) for b in self.bucket_of):
            return self
        copy = object.__new__(RelightDataset)
        copy.__dict__.update(self.__dict__, bucket_of=[(self.resolution, self.resolution)] * len(self.samples))
        return copy

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for offset in range(len(self.samples)):
            i = (index + offset) % len(self.samples)
            if self.bucket_of[i] != self.bucket_of[index]:  # a replacement must have the batch's size
                continue
            try:
                return self.load(i)
            except DatasetError as e:
                if not self.skip_bad:
                    raise
                self.skipped += 1
                log.warning("skipping a bad sample: %s", e)
        raise DatasetError(f"{self.root / MANIFEST}: no sample could be loaded")

    # -- loading one sample -------------------------------------------------------------------

    def _error(self, sample: Sample, path: str, message: str) -> DatasetError:
        return DatasetError(Problem(sample.line, path, message).format(str(self.root / MANIFEST)))

    def _image(self, sample: Sample, rel: str) -> Image.Image:
        try:
            return open_decoded(self.root / rel)
        except DECODE_ERRORS as e:
            raise self._error(sample, rel, f"cannot decode image ({e})") from e

    def _env(self, sample: Sample, rel: str) -> torch.Tensor:
        """(3, He, We) float32, area-resampled to env_shape when its shape differs."""
        try:
            env = torch.from_numpy(load_env(self.root / rel)).permute(2, 0, 1)
        except (*DECODE_ERRORS, ValueError) as e:
            raise self._error(sample, rel, f"bad env map ({e})") from e
        if tuple(env.shape[1:]) != self.env_shape:
            env = F.interpolate(env[None], size=self.env_shape, mode="area")[0]
        return env.contiguous()

    def _foreground(self, sample: Sample, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Foreground over grey 127 (3, H, W) and thresholded mask (1, H, W); size = (W, H)."""
        rgb, alpha = to_rgba(self._image(sample, sample.foreground))
        mask = self._image(sample, sample.mask).convert("L")
        if mask.size != rgb.size:
            raise self._error(sample, sample.mask, f"mask size {mask.size[0]}x{mask.size[1]} differs from "
                              f"foreground {sample.foreground} size {rgb.size[0]}x{rgb.size[1]}")
        fg = np.array(resize_center_crop(rgb, *size), dtype=np.float32)  # (H, W, 3) in [0, 255]
        m = np.array(resize_center_crop(mask, *size), dtype=np.float32) / 255.0  # (H, W)
        a = m if alpha is None else m * np.array(resize_center_crop(alpha, *size), dtype=np.float32) / 255.0
        # IC-Light's composite: uint8 `127 + (fg - 127) * a`, then `x / 127 - 1`, so grey is exactly 0.
        fg = (GREY + (fg - GREY) * a[..., None]).clip(0, 255).astype(np.uint8)
        mask_t = torch.from_numpy((m > 0.5).astype(np.float32))[None]  # (1, H, W)
        return _rgb_tensor(Image.fromarray(fg), float(GREY)), mask_t.contiguous()

    def load(self, i: int) -> dict[str, Any]:
        """Load sample i without skipping; raises DatasetError naming the file that failed."""
        s, size = self.samples[i], self.bucket_of[i]  # size: (W, H)
        he, we = self.env_shape
        target = _rgb_tensor(resize_center_crop(to_rgb_over_grey(self._image(s, s.target)), *size), 127.5)
        foreground, mask = self._foreground(s, size)
        background = torch.zeros(3, size[1], size[0])
        if s.background is not None:
            background = _rgb_tensor(resize_center_crop(to_rgb_over_grey(self._image(s, s.background)), *size), 127.5)
        env = self._env(s, s.env) if s.env is not None else torch.zeros(3, he, we)
        env_parts = torch.zeros(2, 3, he, we)
        if s.env_parts is not None:
            env_parts = torch.stack([self._env(s, p) for p in s.env_parts])
        tok = self.tokenizer(s.prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt")
        return {
            "target": target, "foreground": foreground, "mask": mask,
            "background": background, "has_background": s.background is not None,
            "env": env, "has_env": s.env is not None,
            "env_parts": env_parts, "has_env_parts": s.env_parts is not None,
            "input_ids": tok.input_ids[0].long().contiguous(), "index": i,
        }

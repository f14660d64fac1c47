"""Make a training set from a folder of photos: the `iclight-prepare` command.

    python -m iclight_ds.data.prepare --images IN --out OUT [--masks DIR] [--matting MODEL_DIR] [--backgrounds DIR]
        [--shadow-materials DIR] [--variants K] [--resolution R] [--seed S] [--default-prompt TEXT] [--workers N]
        [--degrade.KEY VALUE ...]

Each photo becomes K samples (docs/data.md): the photo is the target I_L, and K relight degradations of it
(iclight_ds/data/degrade.py) are the foregrounds I_d. The object's mask comes from a same-stem file in --masks, else
the photo's alpha channel (RGBA / LA cut-outs), else the local segmentation model --matting. Captions come from a
same-stem .txt (kohya / diffusers convention) or a diffusers imagefolder metadata.jsonl, else --default-prompt.
With --backgrounds the set is for FBC: each sample gets a background from that folder and its target is the object
relit to agree with it, composited over it.

OUT holds manifest.jsonl (the dataset format; `python -m iclight_ds.data.validate OUT` passes), target/, fg/,
mask/ (and bg/), prepare.json (the settings) and prepare_summary.json (kept / skipped with the reason per file).
Interrupted, the same command resumes (finished photos are kept; the result has the same bytes as an uninterrupted
run). Every random choice of sample (photo, k) comes from (--seed, the photo's path, k): the output does not depend
on --workers or on the order the photos are processed in.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import multiprocessing
import os
import re
import sys
import typing
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from ..config import ConfigError, DegradationConfig, coerce, field_docs
from . import degrade as dg
from .dataset import MANIFEST
from .imageio import DECODE_ERRORS, GREY, open_decoded, resize_center_crop, to_rgba

log = logging.getLogger(__name__)

PHOTO_TYPES = (".jpg", ".jpeg", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif", ".tga", ".ppm", ".pgm",
               ".pnm", ".avif")
CAPTION_KEYS = ("text", "caption", "prompt")  # metadata.jsonl columns, in this order (diffusers' default is "text")
SETTINGS_FILE = "prepare.json"
SUMMARY_FILE = "prepare_summary.json"
STATE_DIR = ".prepare"  # one record per finished photo: what a resumed run keeps
MIN_COVERAGE, MAX_COVERAGE = 0.001, 0.995  # a mask covering less is empty, more is all white
DEFAULT_PROMPT = "a photo of an object"


class PrepareError(ValueError):
    """The command cannot run as given; the message says which option to change."""


class Skip(Exception):
    """One photo cannot be used; the message is the reason reported for it."""


@dataclass
class Settings:
    images: Path
    out: Path
    masks: Path | None = None
    matting: Path | None = None
    backgrounds: Path | None = None
    shadow_materials: Path | None = None
    variants: int = 2
    resolution: int = 512
    image_format: str = "jpg"  # of targets, foregrounds and backgrounds; masks are always PNG
    seed: int = 0
    default_prompt: str = DEFAULT_PROMPT
    degradation: DegradationConfig = field(default_factory=DegradationConfig)

    def record(self) -> dict:
        """What the output depends on (saved as prepare.json; a resume must match it)."""
        out = {k: (str(v.resolve()) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(self).items()}
        out.pop("out")
        return json.loads(json.dumps(out))


# ---------------------------------------------------------------------------------------------------------
# The input folder: photos, captions, what is not a photo


@dataclass
class Scan:
    photos: list[Path]  # relative to --images, sorted
    names: dict[Path, str]  # each photo's output name (output_names)
    captions: dict[Path, str]  # from metadata.jsonl files, by relative photo path
    skipped: list[dict]  # {"file", "reason"}
    notes: list[str]  # problems that cost no photo (a bad metadata.jsonl line)


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def scan(s: Settings) -> Scan:
    """Every file under --images (except the other option folders inside it), sorted, classified."""
    others = [p for p in (s.masks, s.backgrounds, s.shadow_materials, s.matting) if p is not None]
    photos, skipped, notes, captions = [], [], [], {}
    for path in sorted(p for p in s.images.rglob("*") if p.is_file()):
        if any(_inside(path, o) for o in others):
            continue
        rel = path.relative_to(s.images)
        suffix = path.suffix.lower()
        if path.name == "metadata.jsonl":
            _read_metadata(path, rel.parent, captions, notes)
        elif suffix == ".txt":
            continue  # a caption, read with its photo
        elif suffix in PHOTO_TYPES:
            photos.append(rel)
        else:
            skipped.append({"file": str(rel), "reason": f"not an image ({suffix or 'no extension'}; photos are "
                            f"{', '.join(PHOTO_TYPES[:6])}, ...)"})
    return Scan(photos, output_names(photos), captions, skipped, notes)


def _read_metadata(path: Path, folder: Path, captions: dict, notes: list) -> None:
    """A diffusers imagefolder metadata.jsonl: {"file_name": ..., "text": ...} per line."""
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            name = rec["file_name"]
            text = next(rec[k] for k in CAPTION_KEYS if isinstance(rec.get(k), str))
        except (json.JSONDecodeError, KeyError, TypeError, StopIteration):
            notes.append(f"{folder / path.name}:{number}: expected JSON with 'file_name' and one of "
                         f"{', '.join(CAPTION_KEYS)}; line ignored")
            continue
        captions[Path(os.path.normpath(folder / name))] = text


def caption_for(s: Settings, rel: Path, metadata: dict[Path, str]) -> tuple[str, str]:
    """(prompt, where it came from: txt / metadata / default / empty-txt)."""
    txt = (s.images / rel).with_suffix(".txt")
    if txt.is_file():
        text = " ".join(txt.read_text(encoding="utf-8", errors="replace").split())
        return (text, "txt") if text else (s.default_prompt, "empty-txt")
    if rel in metadata and metadata[rel].strip():
        return " ".join(metadata[rel].split()), "metadata"
    return s.default_prompt, "default"


def output_names(photos: list[Path]) -> dict[Path, str]:
    """A file-name-safe name per photo: its relative path without the suffix, '/' as '__'; photos that share a stem
    (mug.jpg, mug.png) keep their suffix in it (mug_jpg, mug_png)."""
    stems = Counter(p.with_suffix("") for p in photos)
    names = {}
    for p in photos:
        name = re.sub(r"[^A-Za-z0-9._-]", "_", "__".join(p.with_suffix("").parts))
        names[p] = name + (f"_{p.suffix[1:].lower()}" if stems[p.with_suffix("")] > 1 else "")
    return names


def _has_alpha(path: Path) -> bool:
    try:
        with Image.open(path) as img:  # the header only
            return img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    except DECODE_ERRORS:
        return False


def check_mask_source(s: Settings, photos: list[Path]) -> None:
    """Without --masks or --matting only cut-outs with an alpha channel can be used: refuse a folder that has none."""
    if s.masks is not None or s.matting is not None or not photos:
        return
    if not any(_has_alpha(s.images / p) for p in photos):
        raise PrepareError(
            f"no mask source: none of the {len(photos)} image(s) in {s.images} has an alpha channel, and neither "
            "--masks DIR (a same-stem mask image per photo, white = object) nor --matting MODEL_DIR (a local "
            "foreground-segmentation model, e.g. BiRefNet or RMBG saved on disk) was given. Pass one of them, or use "
            "RGBA / LA cut-outs, whose alpha is the mask.")


# ---------------------------------------------------------------------------------------------------------
# Masks: a mask file, the photo's alpha, or a local segmentation model


def _mask_file(s: Settings, rel: Path) -> Path | None:
    """The same-stem image in --masks (the same relative folder), any photo type."""
    base = s.masks / rel.with_suffix("")
    for suffix in PHOTO_TYPES:
        for candidate in (base.with_name(base.name + suffix), base.with_name(base.name + suffix.upper())):
            if candidate.is_file():
                return candidate
    return None


def find_mask(s: Settings, rel: Path, photo: Image.Image, alpha: Image.Image | None) -> tuple[Image.Image, str]:
    """(mask 'L' at the photo's size, its source: masks / alpha / matting), or Skip with the reason."""
    if s.masks is not None:
        path = _mask_file(s, rel)
        if path is not None:
            try:
                mask = open_decoded(path)
            except DECODE_ERRORS as e:
                raise Skip(f"mask {path.name}: cannot decode image ({e})") from e
            if mask.size != photo.size:
                raise Skip(f"mask {path.name} is {mask.size[0]}x{mask.size[1]}, the image {photo.size[0]}x"
                           f"{photo.size[1]}: a mask must have its photo's size")
            return (mask.getchannel("A") if mask.mode in ("RGBA", "LA") and mask.getextrema()[-1][0] < 255
                    else mask.convert("L")), "masks"
    if alpha is not None and alpha.getextrema()[0] < 255:  # a fully opaque alpha says nothing
        return alpha, "alpha"
    if s.matting is not None:
        return matting_model(s.matting).mask(photo), "matting"
    options = "no same-stem file in --masks" if s.masks is not None else "no --masks"
    raise Skip(f"no mask: {options}, no alpha channel, no --matting")


class Matting:
    """A local foreground-segmentation model (transformers format), loaded offline: image -> soft mask.

    Semantic-segmentation models (AutoModelForSemanticSegmentation: logits (B, labels, h, w); the foreground is
    the label named foreground / fg / object / salient, else label 1, or the one channel through a sigmoid) and
    image-segmentation models that ship their own code (AutoModelForImageSegmentation, e.g. BiRefNet / RMBG-2.0:
    the last output, through a sigmoid). Without a preprocessor_config.json the image is resized to 1024 px and
    normalised with the ImageNet mean and std, as BiRefNet expects.
    """

    def __init__(self, folder: Path):
        import transformers as tf  # seconds to import: only when a matting model is used

        if not (folder / "config.json").is_file():
            raise PrepareError(f"--matting {folder}: no config.json (expected a model folder saved with "
                               "save_pretrained; nothing is downloaded)")
        try:
            self.model = tf.AutoModelForSemanticSegmentation.from_pretrained(folder, local_files_only=True)
        except (ValueError, KeyError):  # not a semantic-segmentation architecture
            try:
                self.model = tf.AutoModelForImageSegmentation.from_pretrained(folder, local_files_only=True,
                                                                              trust_remote_code=True)
            except Exception as e:
                raise PrepareError(f"--matting {folder}: cannot load a segmentation model from it ({e})") from e
        self.model.eval()
        self.processor = None
        if (folder / "preprocessor_config.json").is_file():
            self.processor = tf.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
        labels = {str(v).lower(): int(k) for k, v in (getattr(self.model.config, "id2label", None) or {}).items()}
        self.label = next((labels[n] for n in ("foreground", "fg", "object", "salient") if n in labels), 1)

    def _pixels(self, photo: Image.Image):
        if self.processor is not None:
            return self.processor(images=photo, return_tensors="pt")["pixel_values"]
        x = np.asarray(photo.resize((1024, 1024), Image.BILINEAR), np.float32) / 255.0
        x = (x - np.array([0.485, 0.456, 0.406], np.float32)) / np.array([0.229, 0.224, 0.225], np.float32)
        return torch.from_numpy(x).permute(2, 0, 1)[None]

    def mask(self, photo: Image.Image) -> Image.Image:
        """'L' soft mask at the photo's size."""
        with torch.no_grad():
            out = self.model(pixel_values=self._pixels(photo.convert("RGB")))
        logits = getattr(out, "logits", out)
        while isinstance(logits, (list, tuple)):
            logits = logits[-1]
        logits = logits.float()  # (1, C, h, w)
        if logits.shape[1] == 1:
            prob = torch.sigmoid(logits) if (logits.min() < 0 or logits.max() > 1) else logits
        else:
            prob = torch.softmax(logits, dim=1)[:, self.label: self.label + 1]
        w, h = photo.size
        prob = torch.nn.functional.interpolate(prob, size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        return Image.fromarray(np.round(prob.clamp(0, 1).numpy() * 255).astype(np.uint8), "L")


_MATTING: dict[Path, Matting] = {}  # one model per process (each worker loads its own)


def matting_model(folder: Path) -> Matting:
    if folder not in _MATTING:
        _MATTING[folder] = Matting(folder)
    return _MATTING[folder]


# ---------------------------------------------------------------------------------------------------------
# One photo -> its files and manifest lines


def _save_image(image: Image.Image, path: Path) -> None:
    """Write atomically (a crash leaves no half-written file), the same bytes each run. JPEG at quality 95 without
    chroma subsampling (a photo's noise makes PNG ~20x slower to write, bench/prepare_speed.py); PNG at compress
    level 1 with the run-length strategy (Z_RLE), the fastest of zlib's for images."""
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".jpg":
        image.save(tmp, format="JPEG", quality=95, subsampling=0)
    else:
        image.save(tmp, format="PNG", compress_level=1, compress_type=3)
    os.replace(tmp, path)


def _rng(seed: int, rel: Path, k: int) -> np.random.Generator:
    """The random stream of sample (photo, k): from the seed and the photo's path only."""
    return np.random.default_rng([seed, zlib.crc32(rel.as_posix().encode()), k])


def load_photo(s: Settings, rel: Path) -> tuple[np.ndarray, np.ndarray, str, tuple[int, int]]:
    """(rgb (H, W, 3) uint8 over grey where transparent, soft mask (H, W) float32, mask source, original size) at
    the output size: the short side resized to --resolution."""
    try:
        img = open_decoded(s.images / rel)
    except DECODE_ERRORS as e:
        raise Skip(f"cannot decode image ({e})") from e
    rgb, alpha = to_rgba(img)
    mask, source = find_mask(s, rel, rgb, alpha)
    w, h = rgb.size
    scale = s.resolution / min(w, h)
    size = (max(s.resolution, round(w * scale)), max(s.resolution, round(h * scale)))
    rgb_arr = np.asarray(rgb.resize(size, Image.LANCZOS), np.float32)
    m = np.asarray(mask.resize(size, Image.LANCZOS), np.float32) / 255.0
    coverage = float((m >= 0.5).mean())
    if coverage < MIN_COVERAGE:
        raise Skip(f"mask from {source} is empty (no object pixel)")
    if coverage > MAX_COVERAGE:
        raise Skip(f"mask from {source} is all white (the whole image would be the object: an inverted or missing "
                   "mask?)")
    if alpha is not None:  # transparent pixels over grey, as the dataset composites RGBA targets
        a = np.asarray(alpha.resize(size, Image.LANCZOS), np.float32)[..., None] / 255.0
        rgb_arr = GREY + (rgb_arr - GREY) * a
    return np.round(rgb_arr).clip(0, 255).astype(np.uint8), m.astype(np.float32), source, (w, h)


def _foreground(image: np.ndarray, mask: np.ndarray) -> Image.Image:
    """The degraded object, grey outside the mask (never seen: the dataset composites with the mask)."""
    return Image.fromarray(np.where(mask[..., None] > 0, image, np.uint8(GREY)), "RGB")


def _mask_image(mask: np.ndarray) -> Image.Image:
    """'L': the soft mask with its edge steepened (x4 around 0.5), so that the dataset composites anti-aliased edges
    and thresholds at 0.5 as before, while a feathered mask still counts as binary for validation."""
    return Image.fromarray(np.round(np.clip((mask - 0.5) * 4 + 0.5, 0, 1) * 255).astype(np.uint8), "L")


def _fbc_target(s: Settings, analysis: dg.PhotoAnalysis, mask: np.ndarray, backgrounds: list[Path],
                rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, dict]:
    """(background, target: the object relit to agree with the background and composited over it, record)."""
    h, w = mask.shape
    index = int(rng.integers(0, len(backgrounds)))
    try:
        bg = np.asarray(resize_center_crop(to_rgba(open_decoded(backgrounds[index]))[0], w, h), np.uint8)
    except DECODE_ERRORS as e:
        raise Skip(f"background {backgrounds[index].name}: cannot decode image ({e})") from e
    light = dg.light_from_background(bg, rng, s.degradation)
    scene = float(np.sqrt(max(analysis.mean_luma, 1e-4) * max(light["scene_luma"], 1e-4)))
    obj = dg.relight(analysis, light, None, target_luma=scene)
    composite = dg.to_linear(bg) * (1 - mask[..., None]) + obj * mask[..., None]
    record = {"background": backgrounds[index].name, "target_light": dg.describe_light(light)}
    return bg, dg.to_srgb8(composite), record


def process_photo(s: Settings, rel: Path, name: str, prompt: str, materials: list[np.ndarray],
                  backgrounds: list[Path]) -> dict:
    """Write one photo's files; return its record: {"source", "mask_source", "lines": manifest dicts}."""
    rgb, mask, source, _ = load_photo(s, rel)
    analysis = dg.analyse(rgb, mask, s.degradation)
    out, ext = s.out, s.image_format
    mask_rel = f"mask/{name}.png"
    _save_image(_mask_image(mask), out / mask_rel)
    if not backgrounds:
        target_rel = f"target/{name}.{ext}"
        _save_image(Image.fromarray(rgb, "RGB"), out / target_rel)
    lines = []
    for k in range(s.variants):
        rng = _rng(s.seed, rel, k)
        image, drawn = dg.degrade(analysis, rng, s.degradation, materials)
        line = {"id": f"{name}-{k}", "prompt": prompt}
        fg_rel = f"fg/{name}-{k}.{ext}"
        _save_image(_foreground(image, mask), out / fg_rel)
        if backgrounds:
            bg, target, bg_record = _fbc_target(s, analysis, mask, backgrounds, rng)
            target_rel, bg_rel = f"target/{name}-{k}.{ext}", f"bg/{name}-{k}.{ext}"
            _save_image(Image.fromarray(target, "RGB"), out / target_rel)
            _save_image(Image.fromarray(bg, "RGB"), out / bg_rel)
            line["background"] = bg_rel
            drawn = {**drawn, **bg_record}
        line.update(target=target_rel, foreground=fg_rel, mask=mask_rel, source=rel.as_posix(), degradation=drawn)
        lines.append(line)
    return {"source": rel.as_posix(), "mask_source": source, "lines": lines}


# ---------------------------------------------------------------------------------------------------------
# The run: settings check, workers, resume, manifest, summary


@dataclass
class _Job:
    rel: Path
    name: str
    prompt: str
    caption: str  # where the prompt came from


_WORKER: dict = {}  # per process: the settings, shadow materials and background list


def _init_worker(s: Settings, backgrounds: list[Path], pool: bool = False) -> None:
    """Per process: the settings, shadow materials and backgrounds; a pool's workers use one thread each (the pool is
    the parallelism), the caller's own process is left as it is."""
    if pool:
        cv2.setNumThreads(1)
        torch.set_num_threads(1)
    materials = []
    if s.shadow_materials is not None:
        for path in sorted(p for p in s.shadow_materials.iterdir() if p.suffix.lower() in PHOTO_TYPES):
            try:
                materials.append(dg.load_material(path))
            except DECODE_ERRORS as e:
                log.warning("shadow material %s: cannot decode (%s); not used", path, e)
    _WORKER.update(settings=s, materials=materials, backgrounds=backgrounds)


def _run_job(job: _Job) -> tuple[_Job, dict | None, str | None]:
    """(job, record or None, skip reason or None); a finished record is saved in the state folder."""
    s = _WORKER["settings"]
    try:
        record = process_photo(s, job.rel, job.name, job.prompt, _WORKER["materials"], _WORKER["backgrounds"])
    except Skip as e:
        return job, None, str(e)
    record["caption"] = job.caption
    state = s.out / STATE_DIR / f"{job.name}.json"
    tmp = state.with_name(state.name + ".tmp")
    tmp.write_text(json.dumps(record, sort_keys=True) + "\n")
    os.replace(tmp, state)
    return job, record, None


def _check_settings(s: Settings) -> None:
    if not s.images.is_dir():
        raise PrepareError(f"--images {s.images}: no such folder")
    if _inside(s.out, s.images):
        raise PrepareError(f"--out {s.out} is inside --images {s.images}: the prepared files would be read as photos "
                           "the next time; choose a folder outside it")
    for flag, path in (("--masks", s.masks), ("--matting", s.matting), ("--backgrounds", s.backgrounds),
                       ("--shadow-materials", s.shadow_materials)):
        if path is not None and not path.is_dir():
            raise PrepareError(f"{flag} {path}: no such folder")
    if s.matting is not None and not (s.matting / "config.json").is_file():
        raise PrepareError(f"--matting {s.matting}: no config.json (expected a model folder saved with "
                           "save_pretrained; nothing is downloaded)")
    if s.image_format not in ("jpg", "png"):
        raise PrepareError(f"--image-format {s.image_format}: jpg or png")
    if s.variants < 1:
        raise PrepareError(f"--variants {s.variants}: must be >= 1")
    if s.resolution < 32 or s.resolution % 8:
        raise PrepareError(f"--resolution {s.resolution}: must be a multiple of 8 and >= 32 (data.resolution's rule)")
    if not s.default_prompt.strip():
        raise PrepareError("--default-prompt: must not be empty")


def _claim_out(s: Settings) -> None:
    """Create OUT with its settings, or check that an existing one was made with the same (a resume)."""
    settings_path = s.out / SETTINGS_FILE
    mine = s.record()
    if settings_path.is_file():
        theirs = json.loads(settings_path.read_text())
        differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
        if differ:
            raise PrepareError(f"--out {s.out} was prepared with other settings ({', '.join(differ)} differ, see "
                               f"{settings_path}): rerun with those to resume it, or choose another --out")
    elif s.out.exists() and any(s.out.iterdir()):
        raise PrepareError(f"--out {s.out} exists and is not a prepared set (no {SETTINGS_FILE}): choose an empty or "
                           "new folder")
    for sub in ("target", "fg", "mask", STATE_DIR) + (("bg",) if s.backgrounds else ()):
        (s.out / sub).mkdir(parents=True, exist_ok=True)
    for tmp in s.out.rglob("*.tmp"):  # left by an interrupted run
        tmp.unlink()
    settings_path.write_text(json.dumps(mine, indent=2, sort_keys=True) + "\n")


def _background_list(s: Settings) -> list[Path]:
    if s.backgrounds is None:
        return []
    found = sorted(p for p in s.backgrounds.rglob("*") if p.is_file() and p.suffix.lower() in PHOTO_TYPES)
    if not found:
        raise PrepareError(f"--backgrounds {s.backgrounds}: no images in it")
    return found


def _finished(s: Settings, job: _Job) -> dict | None:
    """The record of a photo an earlier run finished, when its files are all there and its prompt is unchanged."""
    path = s.out / STATE_DIR / f"{job.name}.json"
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except ValueError:
        return None
    lines = record.get("lines", [])
    files = [line[k] for line in lines for k in ("target", "foreground", "mask", "background") if k in line]
    if len(lines) != s.variants or any(line["prompt"] != job.prompt for line in lines):
        return None
    return record if all((s.out / f).is_file() for f in files) else None


def _run_pending(s: Settings, pending: list[_Job], backgrounds: list[Path], workers: int,
                 progress: bool) -> tuple[list[dict], list[dict]]:
    """Process the photos not done yet: (records, skipped)."""
    records, skipped = [], []
    bar = tqdm(total=len(pending), unit="photo", desc=f"prepare {s.out.name}", dynamic_ncols=True,
               disable=None if progress else True)
    if workers <= 1 or len(pending) <= 1:
        _init_worker(s, backgrounds)
        results = map(_run_job, pending)
        pool = None
    else:
        # forkserver, not fork: a process forked from one whose OpenCV / torch thread pools already ran can deadlock
        # on a lock held by a thread that did not survive the fork (seen in tests: a worker stuck in a futex)
        context = multiprocessing.get_context("forkserver")
        context.set_forkserver_preload(["iclight_ds.data.prepare"])
        pool = context.Pool(workers, initializer=_init_worker, initargs=(s, backgrounds, True))
        results = pool.imap_unordered(_run_job, pending, chunksize=4)
    try:
        for job, record, reason in results:
            if record is not None:
                records.append(record)
            else:
                skipped.append({"file": job.rel.as_posix(), "reason": reason})
            bar.update(1)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
            pool.join()
    return records, skipped


def prepare(s: Settings, *, workers: int = 1, progress: bool = True) -> dict:
    """Prepare (or resume) the set in s.out; returns the summary (also written to prepare_summary.json)."""
    _check_settings(s)
    found = scan(s)
    check_mask_source(s, found.photos)
    backgrounds = _background_list(s)
    _claim_out(s)
    jobs = [_Job(rel, found.names[rel], *caption_for(s, rel, found.captions)) for rel in found.photos]
    done = {job.name: record for job in jobs if (record := _finished(s, job)) is not None}
    pending = [job for job in jobs if job.name not in done]
    log.info("%d photo(s): %d done by an earlier run, %d to prepare", len(jobs), len(done), len(pending))
    if s.matting is not None and pending:
        matting_model(s.matting)  # loaded here first: a folder it cannot load stops the run before any work
    records, skipped = _run_pending(s, pending, backgrounds, workers, progress)
    records = sorted([*done.values(), *records], key=lambda r: r["source"])
    lines = [json.dumps(line, ensure_ascii=False, sort_keys=True) for r in records for line in r["lines"]]
    tmp = s.out / (MANIFEST + ".tmp")
    tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    os.replace(tmp, s.out / MANIFEST)
    summary = _summary(found, jobs, records, skipped)
    (s.out / SUMMARY_FILE).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    summary["resumed"] = len(done)
    return summary


def _summary(found: Scan, jobs: list[_Job], records: list[dict], skipped: list[dict]) -> dict:
    kept = {r["source"] for r in records}
    captions = Counter(job.caption for job in jobs if job.rel.as_posix() in kept)
    return {"photos": len(found.photos), "kept": len(records), "samples": sum(len(r["lines"]) for r in records),
            "skipped": sorted(found.skipped + skipped, key=lambda x: x["file"]),
            "captions": {k: captions.get(k, 0) for k in ("txt", "metadata", "default", "empty-txt")},
            "masks": dict(sorted(Counter(r["mask_source"] for r in records).items())), "notes": found.notes}


def format_summary(summary: dict, out: Path) -> str:
    c = summary["captions"]
    lines = [f"{out}: {summary['kept']} of {summary['photos']} photo(s) kept -> {summary['samples']} sample(s)"
             + (f" ({summary['resumed']} finished by an earlier run)" if summary.get("resumed") else ""),
             f"  captions: {c['txt']} from .txt, {c['metadata']} from metadata.jsonl, "
             f"{c['default'] + c['empty-txt']} default prompt ({c['empty-txt']} of them for an empty .txt)",
             "  masks: " + (", ".join(f"{n} from {k}" for k, n in summary["masks"].items()) or "-")]
    if summary["skipped"]:
        lines.append(f"  skipped {len(summary['skipped'])} file(s):")
        lines += [f"    {x['file']}: {x['reason']}" for x in summary["skipped"]]
    lines += [f"  note: {n}" for n in summary["notes"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------
# Command line


def _degradation_options(p: argparse.ArgumentParser) -> None:
    docs = field_docs(DegradationConfig)
    group = p.add_argument_group("degradation (iclight_ds.config.DegradationConfig; ranges as LOW,HIGH)")
    for f in dataclasses.fields(DegradationConfig):
        group.add_argument(f"--degrade.{f.name}", dest=f"degrade_{f.name}", default=None, metavar="V",
                           help=f"{docs.get(f.name, '')} (default: {f.default})")


def _degradation_from(args: argparse.Namespace) -> DegradationConfig:
    cfg = DegradationConfig()
    hints = typing.get_type_hints(DegradationConfig)
    for f in dataclasses.fields(cfg):
        value = getattr(args, f"degrade_{f.name}")
        if value is not None:
            setattr(cfg, f.name, coerce(value, hints[f.name], f"--degrade.{f.name}"))
    return cfg


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m iclight_ds.data.prepare", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", required=True, type=Path, help="folder of photos (searched recursively)")
    p.add_argument("--out", required=True, type=Path, help="dataset folder to write (outside --images)")
    p.add_argument("--masks", type=Path, default=None, help="folder of same-stem mask images (white = object)")
    p.add_argument("--matting", type=Path, default=None, help="local foreground-segmentation model folder "
                   "(transformers format; loaded offline, never downloaded; a model shipping its own code, such as "
                   "BiRefNet, runs that code)")
    p.add_argument("--backgrounds", type=Path, default=None, help="folder of background images: an FBC set")
    p.add_argument("--shadow-materials", type=Path, default=None,
                   help="folder of grey shadow images (dark = shadow) used as random cast shadows")
    p.add_argument("--variants", type=int, default=2, help="degradations (samples) per photo")
    p.add_argument("--resolution", type=int, default=512, help="short side of the written images, in pixels")
    p.add_argument("--image-format", choices=("jpg", "png"), default="jpg",
                   help="targets, foregrounds and backgrounds: jpg (quality 95, 4:4:4; fast) or png (lossless, "
                   "~20x slower to write for photos); masks are always png")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--default-prompt", default=DEFAULT_PROMPT, help="prompt of a photo without a caption")
    p.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                   else (os.cpu_count() or 1), help="processes (default: the usable cores)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    _degradation_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        s = Settings(images=args.images, out=args.out, masks=args.masks, matting=args.matting,
                     backgrounds=args.backgrounds, shadow_materials=args.shadow_materials, variants=args.variants,
                     resolution=args.resolution, image_format=args.image_format, seed=args.seed,
                     default_prompt=args.default_prompt,
                     degradation=_degradation_from(args))
        summary = prepare(s, workers=args.workers, progress=not args.no_progress)
    except (PrepareError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_summary(summary, args.out))
    if summary["kept"] == 0:
        print("error: no photo could be used (see the reasons above)", file=sys.stderr)
        return 1
    variant = "--model.variant fbc" if args.backgrounds else "--model.variant fc --model.light_input text"
    print(f"train on it: python -m iclight_ds.train --data.path {args.out} {variant} "
          f"--data.resolution {args.resolution} ...")
    return 0


if __name__ == "__main__":
    sys.exit(main())

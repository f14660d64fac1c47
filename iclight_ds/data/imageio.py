"""Image decoding, IC-Light style resize/crop, and the linear <-> sRGB tone curve.

`linear_to_srgb` / `srgb_to_linear` accept numpy arrays and torch tensors alike, so the synthetic
generator (numpy) and the trainer (torch) share one definition of the tone curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image, ImageOps

Array = TypeVar("Array", np.ndarray, torch.Tensor)

# Tone mapping used by the synthetic generator: `srgb = oetf(clip(exposure * linear, 0, 1))`.
DEFAULT_EXPOSURE = 1.0
GREY = 127  # IC-Light composites foregrounds over grey 127, which maps to 0.0 under x / 127 - 1.

# Decoding can fail in several ways depending on how a file is broken.
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)
_SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _xp(x: np.ndarray | torch.Tensor):
    return torch if isinstance(x, torch.Tensor) else np


def linear_to_srgb(x: Array, exposure: float = DEFAULT_EXPOSURE) -> Array:
    """Linear HDR radiance -> sRGB-encoded values in [0, 1] (exposure, clip, sRGB OETF)."""
    xp = _xp(x)
    x = (x * exposure).clip(0.0, 1.0)
    return xp.where(x <= 0.0031308, 12.92 * x, 1.055 * x.clip(0.0031308, 1.0) ** (1 / 2.4) - 0.055)


def srgb_to_linear(x: Array, exposure: float = DEFAULT_EXPOSURE) -> Array:
    """Inverse of `linear_to_srgb` for unclipped values: sRGB in [0, 1] -> linear radiance."""
    xp = _xp(x)
    x = x.clip(0.0, 1.0)
    lin = xp.where(x <= 0.04045, x / 12.92, ((x.clip(0.04045, 1.0) + 0.055) / 1.055) ** 2.4)
    return lin / exposure


def float_to_uint8(x: np.ndarray) -> np.ndarray:
    """[0, 1] float array -> uint8 with rounding (same shape)."""
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


def _to_8bit(img: Image.Image) -> Image.Image:
    """16-bit / 32-bit integer grey -> 8-bit 'L' (PIL's own convert clips instead of scaling)."""
    if img.mode in _SIXTEEN_BIT_GREY:
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode != "I" or arr.max() > 255 else 255.0
        return Image.fromarray(np.round(arr * (255.0 / peak)).clip(0, 255).astype(np.uint8), "L")
    if img.mode == "F":
        return Image.fromarray(float_to_uint8(np.asarray(img)), "L")
    return img


def open_decoded(path: Path) -> Image.Image:
    """Open and fully decode an image (raises one of DECODE_ERRORS if the file is broken), turned upright by its EXIF
    orientation (as viewers show it) and with 16-bit or float grey scaled to 8-bit 'L'. Other modes (CMYK, palette,
    LA, ...) are kept: `to_rgba` converts them."""
    with Image.open(path) as img:
        img.load()
        upright = ImageOps.exif_transpose(img)  # a copy without the orientation tag, or `img` when upright
        return _to_8bit(upright if upright is not None else img)


def to_rgba(img: Image.Image) -> tuple[Image.Image, Image.Image | None]:
    """Split any mode into an RGB image and an alpha channel ('L') when the image has one."""
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    if not has_alpha:
        return img.convert("RGB"), None
    rgba = img.convert("RGBA")
    return rgba.convert("RGB"), rgba.getchannel("A")


def to_rgb_over_grey(img: Image.Image) -> Image.Image:
    """Any mode -> RGB; transparent pixels are composited over grey 127."""
    rgb, alpha = to_rgba(img)
    if alpha is None:
        return rgb
    grey = Image.new("RGB", rgb.size, (GREY, GREY, GREY))
    return Image.composite(rgb, grey, alpha)


# Environment-map file types: numpy arrays, Radiance RGBE (OpenCV) and OpenEXR (the OpenEXR bindings)
ENV_TYPES = (".npy", ".hdr", ".exr")


def read_env_file(path: Path) -> np.ndarray:
    """The pixels of an environment-map file as (H, W, C) values (float for .hdr / .exr), by the file's type.

    .npy is read without pickles; .hdr (Radiance RGBE) through OpenCV, whose BGR order is turned into RGB; .exr
    through the OpenEXR bindings (its RGB or R, G, B channels; a Y-only map becomes grey RGB). Another type raises
    ValueError naming it and the accepted ones."""
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return np.load(path, allow_pickle=False)
    if suffix == ".hdr":
        import cv2  # a large import, needed only for this file type

        bgr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if bgr is None:
            raise ValueError(f"cannot read {path.name} as a Radiance .hdr image")
        return np.ascontiguousarray(bgr[..., ::-1]) if bgr.ndim == 3 else bgr[..., None].repeat(3, axis=2)
    if suffix == ".exr":
        return _read_exr(path)
    raise ValueError(f"environment maps of type {suffix or '(no extension)'!r} are not supported; accepted: "
                     + ", ".join(ENV_TYPES))


def _read_exr(path: Path) -> np.ndarray:
    import OpenEXR

    try:
        with OpenEXR.File(str(path)) as f:
            channels = {name: np.asarray(c.pixels) for name, c in f.channels().items()}
    except Exception as e:  # the bindings raise plain exceptions for broken files
        raise ValueError(f"cannot read {path.name} as OpenEXR ({e})") from e
    if "RGB" in channels or "RGBA" in channels:
        return (channels.get("RGB") if "RGB" in channels else channels["RGBA"])[..., :3]
    if all(c in channels for c in "RGB"):
        return np.stack([channels[c] for c in "RGB"], axis=-1)
    if "Y" in channels:
        return channels["Y"][..., None].repeat(3, axis=2)
    raise ValueError(f"{path.name}: no R, G, B or Y channels (has {', '.join(sorted(channels))})")


def resize_center_crop(img: Image.Image, width: int, height: int | None = None,
                       resample: int = Image.LANCZOS) -> Image.Image:
    """Resize to cover width x height (default: a square of `width`), then centre-crop: IC-Light's geometry, and the
    official demo's resize_and_center_crop. The one resize/crop of training data and of inference inputs.

    Integer crop offsets (not PIL's rounding of half-pixel boxes) keep the output exactly width x height.
    """
    height = width if height is None else height
    w, h = img.size
    scale = max(width / w, height / h)
    rw, rh = max(width, int(round(w * scale))), max(height, int(round(h * scale)))
    img = img.resize((rw, rh), resample)  # a no-op copy when the size already matches
    left, top = (rw - width) // 2, (rh - height) // 2
    return img.crop((left, top, left + width, top + height))

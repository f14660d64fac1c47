"""Image decoding, IC-Light style resize/crop, and the linear <-> sRGB tone curve.

`linear_to_srgb` / `srgb_to_linear` accept numpy arrays and torch tensors alike, so the synthetic
generator (numpy) and the trainer (torch) share one definition of the tone curve.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image

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
    """Open and fully decode an image (raises one of DECODE_ERRORS if the file is broken)."""
    with Image.open(path) as img:
        img.load()
        return _to_8bit(img)


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

"""Images in and out of sampling: a user's foreground, background and environment map as the model's tensors."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..data.dataset import load_env
from ..data.imageio import GREY, resize_center_crop
from .sampling import RelightError

log = logging.getLogger(__name__)



def foreground_tensor(fg: Image.Image, mask: Image.Image | None, width: int, height: int) -> torch.Tensor:
    """(3, H, W) foreground over grey 127 in IC-Light's convention `x / 127 - 1` (grey -> exactly 0).

    The alpha is the image's own alpha channel, times `mask` when one is given (the same composite as the dataset).
    """
    rgba = fg.convert("RGBA")
    has_alpha = fg.mode in ("RGBA", "LA", "PA") or (fg.mode == "P" and "transparency" in fg.info)
    rgb = np.asarray(resize_center_crop(rgba.convert("RGB"), width, height), dtype=np.float32)  # (H, W, 3)
    alpha = np.ones(rgb.shape[:2], dtype=np.float32)
    if has_alpha:
        alpha = np.asarray(resize_center_crop(rgba.getchannel("A"), width, height), dtype=np.float32) / 255.0
    if mask is not None:
        if mask.size != fg.size:
            raise RelightError(f"mask size {mask.size} differs from the foreground's {fg.size}")
        alpha = alpha * np.asarray(resize_center_crop(mask.convert("L"), width, height), dtype=np.float32) / 255.0
    elif not has_alpha:
        log.warning("the foreground has no alpha channel and no --mask was given: the whole image is foreground")
    composite = (GREY + (rgb - GREY) * alpha[..., None]).clip(0, 255).astype(np.uint8)
    return torch.from_numpy(composite.astype(np.float32) / GREY - 1.0).permute(2, 0, 1).contiguous()


def background_tensor(bg: Image.Image, width: int, height: int) -> torch.Tensor:
    """(3, H, W) in [-1, 1] (`x / 127.5 - 1`, the dataset's convention for backgrounds)."""
    rgb = np.asarray(resize_center_crop(bg.convert("RGB"), width, height), dtype=np.float32)
    return torch.from_numpy(rgb / 127.5 - 1.0).permute(2, 0, 1).contiguous()


def env_tensor(path: str | Path, env_shape: tuple[int, int]) -> torch.Tensor:
    """(3, He, We) linear HDR environment map from a .npy, .hdr or .exr file, area-resampled like the dataset does."""

    try:
        env = torch.from_numpy(load_env(Path(path))).permute(2, 0, 1)
    except (OSError, ValueError) as e:
        raise RelightError(f"--env {path}: {e}") from e
    if tuple(env.shape[1:]) != tuple(env_shape):
        env = F.interpolate(env[None], size=tuple(env_shape), mode="area")[0]
    return env.contiguous()


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> RGB image."""
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(arr, "RGB")


def open_image(path: str | Path, what: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()
            return img
    except (OSError, ValueError) as e:
        raise RelightError(f"{what} {path}: cannot read the image ({e})") from e

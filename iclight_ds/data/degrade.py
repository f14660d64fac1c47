"""The relight degradation of in-the-wild photos: the same object with its lighting removed and replaced.

IC-Light's photos were degraded by "albedo extraction plus random shadows and highlights" (paper, Sec. 4, and its
supplementary); this is a cheap stand-in, per photo and variant (all in linear light, H x W = the photo's size):

    S      = masked blur of the luminance               (B, the photo's shading, smooth; `shading_blur`)
    A      = photo / S^a, then / c^g                    (albedo-like: shading and light colour c flattened)
    n      = normals of a dome over the mask (its distance transform) + luminance-gradient detail
    I_d    = A * (ambient * c_amb + c_light * max(0, n . l) * (1 - shadow)) + c_light * specular * (1 - shadow)

with a random light direction l, colours, ambient, shadow mask (procedural noise, shapes, or a shadow material
image) and Blinn-Phong highlight, every choice drawn from one numpy Generator. Shading, shadows and highlights are
computed at a low working resolution and upsampled (they are smooth); the albedo stays at full resolution.
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

from ..config import DegradationConfig
from .imageio import srgb_to_linear

LUMA = np.array([0.2126, 0.7152, 0.0722], dtype=np.float32)
WORK = 128  # short side of the working resolution of shading, shadows and highlights
_SRGB_TO_LINEAR = srgb_to_linear(np.arange(256, dtype=np.float64) / 255.0).astype(np.float32)  # uint8 -> linear
_ENCODE_LEVELS = 4096
_LINEAR_TO_SRGB = np.round(
    np.where((v := np.linspace(0.0, 1.0, _ENCODE_LEVELS)) <= 0.0031308, 12.92 * v,
             1.055 * np.maximum(v, 0.0031308) ** (1 / 2.4) - 0.055) * 255.0).clip(0, 255).astype(np.uint8)


def to_linear(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 sRGB -> float32 linear (a table lookup)."""
    return _SRGB_TO_LINEAR[rgb]


def to_srgb8(linear: np.ndarray) -> np.ndarray:
    """float linear (clipped to [0, 1]) -> uint8 sRGB, through a 4096-level table."""
    idx = np.clip(linear, 0.0, 1.0) * (_ENCODE_LEVELS - 1) + 0.5
    return _LINEAR_TO_SRGB[idx.astype(np.int32)]


def _work_size(h: int, w: int) -> tuple[int, int]:
    scale = min(1.0, WORK / min(h, w))
    return max(1, round(w * scale)), max(1, round(h * scale))  # cv2's (width, height)


def _up(x: np.ndarray, h: int, w: int) -> np.ndarray:
    return cv2.resize(x, (w, h), interpolation=cv2.INTER_LINEAR)


@dataclass
class PhotoAnalysis:
    """What every variant of one photo shares: its albedo estimate and shape proxy."""

    albedo: np.ndarray  # (H, W, 3) float32 linear, the albedo-like estimate
    mean_luma: float  # mean luminance of the photo over the object (linear)
    normals: np.ndarray  # (h, w, 3) float32 unit normals at the working resolution (x right, y up, z to the viewer)
    work_mask: np.ndarray  # (h, w) float32 mask at the working resolution


def analyse(rgb: np.ndarray, mask: np.ndarray, cfg: DegradationConfig) -> PhotoAnalysis:
    """rgb (H, W, 3) uint8, mask (H, W) float32 in [0, 1] -> the albedo estimate and normals."""
    h, w = mask.shape
    lin = to_linear(rgb)
    luma = lin @ LUMA  # (H, W)
    size = _work_size(h, w)
    m_small = cv2.resize(mask, size, interpolation=cv2.INTER_AREA)
    y_small = cv2.resize(luma * mask, size, interpolation=cv2.INTER_AREA)
    sigma = max(0.5, cfg.shading_blur * min(size))
    # normalised convolution: the blur of the object's luminance only, not of the background around it
    blur_m = cv2.GaussianBlur(m_small, (0, 0), sigma) + 1e-4
    shading = cv2.GaussianBlur(y_small, (0, 0), sigma) / blur_m  # (h, w)
    inside = mask > 0.5
    mean_luma = float(luma[inside].mean()) if inside.any() else float(luma.mean())
    s_full = np.maximum(_up(shading, h, w), 1e-3)
    albedo = lin * ((mean_luma + 1e-3) / s_full)[..., None] ** cfg.albedo_strength
    colour = lin[inside].mean(axis=0) if inside.any() else lin.reshape(-1, 3).mean(axis=0)
    colour = colour / max(float(colour @ LUMA), 1e-4)  # the light colour under the grey-world assumption
    albedo = albedo / colour.astype(np.float32) ** cfg.grey_world
    return PhotoAnalysis(albedo=np.clip(albedo, 0.0, 4.0).astype(np.float32), mean_luma=mean_luma,
                         normals=_normals(m_small, y_small, cfg.normal_detail), work_mask=m_small)


def _normals(mask: np.ndarray, luma: np.ndarray, detail: float) -> np.ndarray:
    """(h, w, 3) unit normals of a dome over the mask: for a disk of radius r at distance d from its edge, the
    height sqrt(2 r d - d^2) is a hemisphere; plus `detail` times the luminance gradient (brighter = nearer)."""
    binary = (mask > 0.5).astype(np.uint8)
    dist = cv2.distanceTransform(binary, cv2.DIST_L2, 5)
    r = max(float(dist.max()), 1.0)
    height = np.sqrt(np.maximum(2 * r * dist - dist ** 2, 0.0))
    height = cv2.GaussianBlur(height, (0, 0), max(1.0, 0.05 * min(mask.shape)))
    height = height + detail * r * cv2.GaussianBlur(luma, (0, 0), 1.0) / max(float(luma.max()), 1e-4)
    gy, gx = np.gradient(height)  # per pixel; rows grow downwards, so +y (up) is -rows
    n = np.stack([-gx, gy, np.ones_like(gx)], axis=-1)
    return (n / np.linalg.norm(n, axis=-1, keepdims=True)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------------
# Random light


def _colour(rng: np.random.Generator, saturation: float) -> np.ndarray:
    """A random hue at `saturation`, normalised to luminance 1."""
    rgb = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), saturation, 1.0), dtype=np.float32)
    return rgb / float(rgb @ LUMA)


def _direction(polar_deg: float, azimuth: float) -> np.ndarray:
    polar = math.radians(polar_deg)
    return np.array([math.sin(polar) * math.cos(azimuth), math.sin(polar) * math.sin(azimuth), math.cos(polar)],
                    dtype=np.float32)


def random_light(rng: np.random.Generator, cfg: DegradationConfig) -> dict:
    """The light of one degradation: direction (unit, towards the light), colours, ambient, highlight, exposure.
    The polar angle from the view axis is drawn uniformly on the sphere's cap up to `light_polar_max`."""
    cos_max = math.cos(math.radians(cfg.light_polar_max))
    polar = math.degrees(math.acos(rng.uniform(cos_max, 1.0)))
    azimuth = rng.uniform(0, 2 * math.pi)
    light = {"direction": _direction(polar, azimuth), "polar": polar, "azimuth": math.degrees(azimuth),
             "colour": _colour(rng, rng.uniform(*cfg.light_saturation)),
             "ambient": rng.uniform(*cfg.ambient),
             "ambient_colour": _colour(rng, rng.uniform(0, cfg.light_saturation[1] / 2)),
             "exposure": rng.uniform(*cfg.exposure), "highlight": 0.0, "shininess": 0.0}
    if rng.uniform() < cfg.highlight_prob:
        light["highlight"] = rng.uniform(*cfg.highlight_strength)
        light["shininess"] = rng.uniform(*cfg.shininess)
    return light


# ---------------------------------------------------------------------------------------------------------
# Shadows: (h, w) float32 in [0, 1], 1 = the directional light fully blocked


def _noise_shadow(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Blotchy shadows (foliage, clouds): two octaves of value noise, thresholded with a soft edge."""
    field = np.zeros((h, w), np.float32)
    for cells, weight in ((rng.integers(2, 5), 1.0), (rng.integers(6, 12), 0.4)):
        grid = rng.standard_normal((int(cells), int(cells))).astype(np.float32)
        field += weight * cv2.resize(grid, (w, h), interpolation=cv2.INTER_CUBIC)
    level = np.quantile(field, rng.uniform(0.3, 0.7))
    return np.clip((field - level) / (0.15 * float(field.std()) + 1e-6) + 0.5, 0.0, 1.0)


def _shape_shadow(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Hard-edged cast shadows: window-blind stripes or a few polygons, softened by a blur (penumbra)."""
    if rng.uniform() < 0.5:
        angle = rng.uniform(0, math.pi)
        period = rng.uniform(0.1, 0.4) * max(h, w)
        yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) / period + rng.uniform(0, 1)
        shadow = ((phase % 1.0) < rng.uniform(0.3, 0.7)).astype(np.float32)
    else:
        img = Image.new("L", (w, h), 0)
        draw = ImageDraw.Draw(img)
        for _ in range(int(rng.integers(1, 4))):
            cx, cy = rng.uniform(0, w), rng.uniform(0, h)
            k = int(rng.integers(3, 7))
            radius = rng.uniform(0.2, 0.6) * max(h, w)
            angles = np.sort(rng.uniform(0, 2 * math.pi, k))
            draw.polygon([(cx + radius * math.cos(a), cy + radius * math.sin(a)) for a in angles], fill=255)
        shadow = np.asarray(img, np.float32) / 255.0
    return cv2.GaussianBlur(shadow, (0, 0), rng.uniform(0.5, 3.0))


def _material_shadow(rng: np.random.Generator, material: np.ndarray, h: int, w: int) -> np.ndarray:
    """A shadow material (grey image, dark = shadow) turned, flipped and cropped at random to (h, w)."""
    m = np.rot90(material, int(rng.integers(0, 4)))
    if rng.uniform() < 0.5:
        m = m[:, ::-1]
    mh, mw = m.shape
    scale = rng.uniform(1.0, 2.0) * max(h / mh, w / mw)
    m = cv2.resize(np.ascontiguousarray(m), (max(w, round(mw * scale)), max(h, round(mh * scale))),
                   interpolation=cv2.INTER_AREA)
    top, left = int(rng.integers(0, m.shape[0] - h + 1)), int(rng.integers(0, m.shape[1] - w + 1))
    return 1.0 - m[top:top + h, left:left + w]


def random_shadow(rng: np.random.Generator, h: int, w: int, cfg: DegradationConfig,
                  materials: list[np.ndarray]) -> tuple[np.ndarray | None, dict]:
    """A shadow mask at (h, w) or None, and what was drawn."""
    if rng.uniform() >= cfg.shadow_prob:
        return None, {"shadow": "none"}
    strength = rng.uniform(*cfg.shadow_strength)
    if materials and rng.uniform() < cfg.material_prob:
        index = int(rng.integers(0, len(materials)))
        return strength * _material_shadow(rng, materials[index], h, w), {"shadow": f"material {index}",
                                                                           "shadow_strength": round(strength, 4)}
    if rng.uniform() < 0.5:
        return strength * _noise_shadow(rng, h, w), {"shadow": "noise", "shadow_strength": round(strength, 4)}
    return strength * _shape_shadow(rng, h, w), {"shadow": "shapes", "shadow_strength": round(strength, 4)}


def load_material(path: Path) -> np.ndarray:
    """A shadow material image -> (h, w) float32 in [0, 1] (grey; at most 512 px on its long side)."""
    with Image.open(path) as img:
        img = img.convert("L")
        img.thumbnail((512, 512), Image.BILINEAR)
        return np.asarray(img, np.float32) / 255.0


# ---------------------------------------------------------------------------------------------------------
# Rendering


def shade(analysis: PhotoAnalysis, light: dict, shadow: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(diffuse (h, w, 3), specular (h, w, 3)) at the working resolution under `light`."""
    n, l = analysis.normals, light["direction"]
    lambert = np.maximum(n @ l, 0.0)  # (h, w)
    half = l + np.array([0.0, 0.0, 1.0], np.float32)
    half = half / max(float(np.linalg.norm(half)), 1e-6)
    spec = light["highlight"] * np.maximum(n @ half, 0.0) ** max(light["shininess"], 1.0) if light["highlight"] else 0.0
    lit = 1.0 - (shadow if shadow is not None else 0.0)
    direct = (lambert * lit)[..., None] * light["colour"]
    diffuse = light["ambient"] * light["ambient_colour"] + direct
    specular = (spec * lit)[..., None] * light["colour"] if light["highlight"] else np.zeros_like(diffuse)
    return diffuse.astype(np.float32), specular.astype(np.float32)


def relight(analysis: PhotoAnalysis, light: dict, shadow: np.ndarray | None, *,
            target_luma: float | None = None) -> np.ndarray:
    """(H, W, 3) float32 linear: the albedo estimate under `light`, exposed so that the object's mean luminance is
    `target_luma` (default: the photo's) times 2^exposure."""
    h, w = analysis.albedo.shape[:2]
    diffuse, specular = shade(analysis, light, shadow)
    image = analysis.albedo * _up(diffuse, h, w) + _up(specular, h, w)
    mask = _up(analysis.work_mask, h, w) > 0.5
    current = float((image[mask] @ LUMA).mean()) if mask.any() else float((image @ LUMA).mean())
    wanted = (analysis.mean_luma if target_luma is None else target_luma) * 2.0 ** light["exposure"]
    return image * (wanted / max(current, 1e-5))


def degrade(analysis: PhotoAnalysis, rng: np.random.Generator, cfg: DegradationConfig,
            materials: list[np.ndarray] = ()) -> tuple[np.ndarray, dict]:
    """One random degradation: (H, W, 3) uint8 sRGB and the JSON-ready record of what was drawn."""
    h, w = analysis.work_mask.shape
    light = random_light(rng, cfg)
    shadow, drawn = random_shadow(rng, h, w, cfg, list(materials))
    image = to_srgb8(relight(analysis, light, shadow))
    return image, {**describe_light(light), **drawn}


def describe_light(light: dict) -> dict:
    """A light as JSON-ready, rounded numbers."""
    r = lambda x: round(float(x), 4)  # noqa: E731
    return {"polar": r(light["polar"]), "azimuth": r(light["azimuth"]), "colour": [r(c) for c in light["colour"]],
            "ambient": r(light["ambient"]), "ambient_colour": [r(c) for c in light["ambient_colour"]],
            "exposure": r(light["exposure"]), "highlight": r(light["highlight"]), "shininess": r(light["shininess"])}


def light_from_background(background: np.ndarray, rng: np.random.Generator, cfg: DegradationConfig) -> dict:
    """FBC targets: a light that agrees with a background image (H, W, 3) uint8, read as the scene around the object:
    the direction leans towards the background's bright side, the colour is that of its brightest tenth, the ambient
    is its mean colour. A coarse reading: a background shows what is behind the object, not the light in front."""
    small = to_linear(cv2.resize(background, (32, 16), interpolation=cv2.INTER_AREA))  # (16, 32, 3)
    luma = small @ LUMA
    yy, xx = np.mgrid[0:16, 0:32].astype(np.float32)
    weight = luma / max(float(luma.sum()), 1e-6)
    dx = float(((xx / 31.0 - 0.5) * 2 * weight).sum())  # -1 (left) .. 1 (right)
    dy = float(((0.5 - yy / 15.0) * 2 * weight).sum())  # -1 (below) .. 1 (above)
    polar = min(cfg.light_polar_max, 30.0 + 120.0 * min(1.0, math.hypot(dx, dy) * 3))
    azimuth = math.atan2(dy, dx)
    bright = small[luma >= np.quantile(luma, 0.9)].mean(axis=0)
    mean = small.reshape(-1, 3).mean(axis=0)
    norm = lambda c: (c / max(float(c @ LUMA), 1e-4)).astype(np.float32)  # noqa: E731
    return {"direction": _direction(polar, azimuth), "polar": polar, "azimuth": math.degrees(azimuth),
            "colour": norm(bright), "ambient": float(np.clip(rng.uniform(*cfg.ambient) * 1.5, 0.05, 0.6)),
            "ambient_colour": norm(mean), "exposure": 0.0, "highlight": 0.0, "shininess": 0.0,
            "scene_luma": float(mean @ LUMA)}

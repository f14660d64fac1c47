"""The relight degradation: an albedo-like estimate, then random new light; every draw from the generator."""

import numpy as np

from iclight_ds.config import DegradationConfig
from iclight_ds.data import degrade as dg


def _ball(h=96, w=128, colour=(0.8, 0.3, 0.2)):
    """A Lambertian ball of one albedo lit from the upper left, in sRGB uint8, and its mask."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = 0.4 * h
    x, y = (xx - w / 2) / r, (h / 2 - yy) / r
    mask = (x ** 2 + y ** 2) < 1
    n = np.stack([x, y, np.sqrt(np.clip(1 - x ** 2 - y ** 2, 0, 1))], -1)
    light = np.array([-0.6, 0.6, 0.53])
    shading = np.clip(n @ (light / np.linalg.norm(light)), 0, 1) * 0.9 + 0.05
    linear = np.where(mask[..., None], shading[..., None] * np.array(colour), 0.2)
    return dg.to_srgb8(linear), mask.astype(np.float32)


def _cv(values):
    return float(values.std() / values.mean())


def test_the_albedo_estimate_flattens_the_shading_and_the_light_colour():
    rgb, mask = _ball()
    cfg = DegradationConfig()
    a = dg.analyse(rgb, mask, cfg)
    inner = (mask > 0.5) & (np.hypot(*np.gradient(mask)) == 0)
    photo_luma, albedo_luma = dg.to_linear(rgb) @ dg.LUMA, a.albedo @ dg.LUMA
    assert _cv(albedo_luma[inner]) < 0.6 * _cv(photo_luma[inner])  # the shading is (mostly) divided out
    chroma = a.albedo[inner].mean(0) / a.albedo[inner].mean()
    assert chroma[0] > chroma[2]  # the object stays red: only part of its colour is taken for the light's
    off = dg.analyse(rgb, mask, DegradationConfig(albedo_strength=0.0, grey_world=0.0))
    assert np.allclose(off.albedo[inner], dg.to_linear(rgb)[inner], rtol=1e-3)


def test_normals_of_the_mask_dome_point_outwards():
    _, mask = _ball()
    n = dg.analyse(np.zeros(mask.shape + (3,), np.uint8) + 128, mask, DegradationConfig(normal_detail=0)).normals
    h, w = n.shape[:2]
    assert n[h // 2, int(w * 0.2), 0] < -0.3 and n[h // 2, int(w * 0.8), 0] > 0.3  # left edge faces left
    assert n[int(h * 0.2), w // 2, 1] > 0.3 and n[h // 2, w // 2, 2] > 0.95  # top faces up, centre the viewer


def test_degradations_are_drawn_from_the_generator_only():
    rgb, mask = _ball()
    cfg = DegradationConfig()
    a = dg.analyse(rgb, mask, cfg)
    first, rec1 = dg.degrade(a, np.random.default_rng([0, 1]), cfg)
    again, rec2 = dg.degrade(a, np.random.default_rng([0, 1]), cfg)
    other, rec3 = dg.degrade(a, np.random.default_rng([0, 2]), cfg)
    assert np.array_equal(first, again) and rec1 == rec2
    assert not np.array_equal(first, other) and rec1 != rec3
    assert first.shape == rgb.shape and first.dtype == np.uint8


def test_light_direction_exposure_and_shadow_do_what_they_say():
    rgb, mask = _ball()
    cfg = DegradationConfig(highlight_prob=0.0, shadow_prob=0.0, ambient=(0.05, 0.05), exposure=(0.0, 0.0))
    a = dg.analyse(rgb, mask, cfg)
    light = dg.random_light(np.random.default_rng(0), cfg)
    light["direction"] = np.array([1.0, 0.0, 0.2], np.float32) / np.linalg.norm([1.0, 0.0, 0.2])
    lit = dg.relight(a, light, None)
    inside = mask > 0.5
    left, right = lit[:, :40][inside[:, :40]] @ dg.LUMA, lit[:, -40:][inside[:, -40:]] @ dg.LUMA
    assert right.mean() > 3 * left.mean()  # light from the right
    assert abs(float((lit[inside] @ dg.LUMA).mean()) / a.mean_luma - 1) < 1e-3  # exposure 0: the photo's level
    shadow = np.zeros(a.work_mask.shape, np.float32)
    shadow[:, shadow.shape[1] // 2:] = 0.9
    light["exposure"] = 0.0
    shaded = dg.relight(a, light, shadow)
    half = lit.shape[1] // 2
    ratio_right = (shaded[:, half + 8:][inside[:, half + 8:]] / lit[:, half + 8:][inside[:, half + 8:]]).mean()
    ratio_left = (shaded[:, :half - 8][inside[:, :half - 8]] / lit[:, :half - 8][inside[:, :half - 8]]).mean()
    assert ratio_right < 0.7 * ratio_left  # the shadowed half lost most of its direct light


def test_shadows_cover_part_of_the_frame_and_materials_are_used():
    cfg = DegradationConfig(shadow_prob=1.0, material_prob=1.0)
    material = np.ones((40, 60), np.float32)
    material[:, :30] = 0.0  # dark = shadow
    shadow, drawn = dg.random_shadow(np.random.default_rng(3), 32, 48, cfg, [material])
    assert drawn["shadow"] == "material 0" and 0.1 < (shadow > 0.2).mean() < 0.9
    for seed in range(6):
        shadow, drawn = dg.random_shadow(np.random.default_rng(seed), 32, 48, DegradationConfig(shadow_prob=1.0), [])
        assert drawn["shadow"] in ("noise", "shapes") and shadow.max() <= cfg.shadow_strength[1] + 1e-6
        assert 0.0 < (shadow > 0.05).mean() < 1.0
    assert dg.random_shadow(np.random.default_rng(0), 8, 8, DegradationConfig(shadow_prob=0.0), [])[0] is None


def test_a_background_light_leans_to_its_bright_side():
    bg = np.zeros((40, 80, 3), np.uint8)
    bg[:, 60:] = (255, 200, 120)  # bright warm right side
    light = dg.light_from_background(bg, np.random.default_rng(0), DegradationConfig())
    assert light["direction"][0] > 0.5 and light["colour"][0] > light["colour"][2]

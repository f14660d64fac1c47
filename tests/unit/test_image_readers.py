"""What users have: .hdr / .exr environment maps beside .npy, EXIF orientation, CMYK, palette, 16-bit and grey."""

import json

import cv2
import numpy as np
import OpenEXR as exr
import pytest
from PIL import Image

from iclight_ds.data.dataset import RelightDataset, load_env
from iclight_ds.data.imageio import open_decoded, to_rgb_over_grey, to_rgba
from iclight_ds.data.validate import validate_dataset


def _env(h=8, w=16) -> np.ndarray:
    env = np.random.default_rng(0).uniform(0.0, 4.0, (h, w, 3)).astype(np.float32)
    env[0, 0] = (3.0, 0.0, 0.0)  # pure red: catches a BGR / RGB swap
    return env


def test_hdr_is_read_as_linear_rgb(tmp_path):
    env = _env()
    path = tmp_path / "studio.hdr"
    assert cv2.imwrite(str(path), env[..., ::-1].copy())  # OpenCV writes BGR
    got = load_env(path)
    assert got.shape == (8, 16, 3) and got.dtype == np.float32
    assert np.allclose(got, env, rtol=0.02, atol=0.02)  # RGBE keeps ~1% precision
    assert got[0, 0, 0] > 2.9 and got[0, 0, 2] == 0.0


def test_exr_is_read_exactly(tmp_path):
    env = _env()
    path = tmp_path / "sky.exr"
    with exr.File({"compression": exr.ZIP_COMPRESSION, "type": exr.scanlineimage}, {"RGB": env}) as f:
        f.write(str(path))
    assert np.array_equal(load_env(path), env)
    split = tmp_path / "split.exr"
    with exr.File({"compression": exr.ZIP_COMPRESSION, "type": exr.scanlineimage},
                  {c: env[..., i].copy() for i, c in enumerate("RGB")}) as f:
        f.write(str(split))
    assert np.array_equal(load_env(split), env)


def test_an_unsupported_or_broken_env_map_is_named(tmp_path):
    Image.new("RGB", (16, 8)).save(tmp_path / "env.png")
    with pytest.raises(ValueError) as e:
        load_env(tmp_path / "env.png")
    assert str(e.value) == "environment maps of type '.png' are not supported; accepted: .npy, .hdr, .exr"
    (tmp_path / "bad.hdr").write_bytes(b"#?RADIANCE\nnot really\n")
    with pytest.raises(ValueError, match="cannot read bad.hdr as a Radiance .hdr image"):
        load_env(tmp_path / "bad.hdr")
    (tmp_path / "bad.exr").write_bytes(b"\x76\x2f\x31\x01 truncated")
    with pytest.raises(ValueError, match="cannot read bad.exr as OpenEXR"):
        load_env(tmp_path / "bad.exr")


def test_a_dataset_with_hdr_env_maps_validates_and_loads(tmp_path):
    from iclight_ds.model.tokenizer import build_char_tokenizer

    for name in ("target", "fg", "mask"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (32, 32), (200, 100, 50)).save(tmp_path / "target/a.png")
    Image.new("RGB", (32, 32), (90, 90, 90)).save(tmp_path / "fg/a.png")
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    mask.save(tmp_path / "mask/a.png")
    cv2.imwrite(str(tmp_path / "env.hdr"), _env(16, 32)[..., ::-1].copy())
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"id": "a", "prompt": "p", "target": "target/a.png",
                                                         "foreground": "fg/a.png", "mask": "mask/a.png",
                                                         "env": "env.hdr"}) + "\n")
    assert validate_dataset(tmp_path, require_env=True) == []
    item = RelightDataset(tmp_path, 32, build_char_tokenizer(), require_env=True).load(0)
    assert item["has_env"] and item["env"].shape == (3, 16, 32) and float(item["env"][0, 0, 0]) > 2.9


def test_exif_orientation_is_honoured(tmp_path):
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 10, 20))  # blue on the left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: show it turned 90 degrees clockwise
    img.save(tmp_path / "phone.jpg", exif=exif, quality=100)
    upright = open_decoded(tmp_path / "phone.jpg")
    assert upright.size == (20, 40)
    top = np.asarray(upright)[:5].mean(axis=(0, 1))
    assert top[2] > 200 and top[0] < 60  # the stored left edge is now the top


def test_cmyk_palette_sixteen_bit_and_grey_images(tmp_path):
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    rgb, alpha = to_rgba(open_decoded(tmp_path / "cmyk.jpg"))
    assert rgb.mode == "RGB" and alpha is None and np.asarray(rgb)[4, 4, 0] > 200 > np.asarray(rgb)[4, 4, 1]
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    pal.info["transparency"] = 0
    pal.save(tmp_path / "pal.png", transparency=0)
    rgb, alpha = to_rgba(open_decoded(tmp_path / "pal.png"))
    assert tuple(np.asarray(rgb)[0, 0]) == (10, 200, 30) and alpha is not None
    Image.fromarray(np.full((8, 8), 65535 // 2, np.uint16)).save(tmp_path / "grey16.png")  # a 16-bit grey PNG
    grey = open_decoded(tmp_path / "grey16.png")
    assert grey.mode == "L" and int(np.asarray(grey)[0, 0]) == 127  # scaled, not clipped to 255
    assert to_rgb_over_grey(grey).mode == "RGB"

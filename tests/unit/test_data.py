"""RelightDataset, the manifest checks, the validator and the tiny tokenizer."""

import json
import logging
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import REPO
from iclight_ds.data.dataset import DatasetError, RelightDataset
from iclight_ds.data.validate import main as validate_main, validate_dataset
from iclight_ds.model.tokenizer import build_char_tokenizer

SIZE = 16  # hand-made samples are SIZE x SIZE


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def synth_dir(synthetic) -> Path:
    return synthetic(5, size=32, seed=3)


# ----------------------------------------------------------------------------- hand-made datasets

def save_png(root: Path, rel: str, arr: np.ndarray) -> str:
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(root / rel)
    return rel


def write_manifest(root: Path, recs: list) -> None:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in recs]
    (root / "manifest.jsonl").write_text("".join(line + "\n" for line in lines))


def disc(size: int = SIZE) -> np.ndarray:
    """(size, size) uint8 mask: a centred disc of 255."""
    yy, xx = np.mgrid[:size, :size] - (size - 1) / 2
    return np.where(xx**2 + yy**2 < (size / 3) ** 2, 255, 0).astype(np.uint8)


def make_sample(root: Path, sid: str, colour=(200, 40, 20), env: np.ndarray | None = None) -> dict:
    """Write one valid sample: solid target and foreground, disc mask, background, env."""
    solid = np.broadcast_to(np.array(colour, np.uint8), (SIZE, SIZE, 3)).copy()
    rec = {"id": sid, "prompt": f"a sample {sid}",
           "target": save_png(root, f"img/{sid}_t.png", solid),
           "foreground": save_png(root, f"img/{sid}_f.png", solid[::-1].copy()),
           "mask": save_png(root, f"img/{sid}_m.png", disc()),
           "background": save_png(root, f"img/{sid}_b.png", np.full((SIZE, SIZE, 3), 30, np.uint8)),
           "env": f"img/{sid}_env.npy"}
    np.save(root / rec["env"], np.ones((16, 32, 3), np.float32) if env is None else env)
    return rec


def make_dataset(root: Path, n: int = 3) -> list[dict]:
    recs = [make_sample(root, f"s{i}", colour=(40 * i + 10, 100, 200)) for i in range(n)]
    write_manifest(root, recs)
    return recs


def expect_error(root: Path, tok, *fragments: str, **kwargs) -> str:
    with pytest.raises(DatasetError) as info:
        RelightDataset(root, SIZE, tok, **kwargs)
    for f in fragments:
        assert f in str(info.value), (f, str(info.value))
    return str(info.value)


def problem_lines(root: Path, **kwargs) -> list[str]:
    return [p.format() for p in validate_dataset(root, **kwargs)]


# ----------------------------------------------------------------------------- tokenizer

def test_char_tokenizer(tok):
    assert tok.model_max_length == 77 and len(tok) == 514
    ids = tok("A red sphere", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids[0]
    assert ids.shape == (77,) and ids.dtype == torch.long
    assert ids[0] == 512 and ids[13] == 513 and (ids[13:] == 513).all()  # BOS, 12 chars, EOS + EOS padding
    assert tok.decode(ids, skip_special_tokens=True) == "a red sphere"  # CLIP lower-cases
    long = tok("x" * 200, padding="max_length", max_length=77, truncation=True).input_ids
    assert len(long) == 77 and long[-1] == 513
    clone = pickle.loads(pickle.dumps(tok))
    assert clone("light from the left").input_ids == tok("light from the left").input_ids


# ----------------------------------------------------------------------------- outputs

def test_outputs_on_synthetic_data(synth_dir, tok):
    ds = RelightDataset(synth_dir, 24, tok, require_background=True, require_env=True)
    assert len(ds) == 5
    recs = [json.loads(line) for line in (synth_dir / "manifest.jsonl").read_text().splitlines()]
    for i in range(len(ds)):
        b = ds[i]
        shapes = {"target": (3, 24, 24), "foreground": (3, 24, 24), "mask": (1, 24, 24),
                  "background": (3, 24, 24), "env": (3, 16, 32), "env_parts": (2, 3, 16, 32)}
        for key, shape in shapes.items():
            assert b[key].shape == shape and b[key].dtype == torch.float32 and b[key].is_contiguous(), key
        assert -1 <= b["target"].min() and b["target"].max() <= 1
        assert -1 <= b["background"].min() and b["background"].max() <= 1
        assert -1 <= b["foreground"].min() and b["foreground"].max() <= 255 / 127 - 1
        assert set(b["mask"].unique().tolist()) == {0.0, 1.0}
        env = torch.from_numpy(np.load(synth_dir / recs[i]["env"])).permute(2, 0, 1)
        torch.testing.assert_close(b["env"], env, rtol=0, atol=0)
        torch.testing.assert_close(b["env_parts"].sum(0), env, rtol=0, atol=0)
        assert b["has_background"] and b["has_env"] and b["has_env_parts"] and b["index"] == i
        expected_ids = tok(recs[i]["prompt"], padding="max_length", max_length=77, truncation=True,
                           return_tensors="pt").input_ids[0]
        assert b["input_ids"].dtype == torch.long and torch.equal(b["input_ids"], expected_ids)


def test_foreground_is_grey_zero_outside_the_mask(synth_dir, tok):
    same = RelightDataset(synth_dir, 32, tok)  # no resampling: exact everywhere
    for i in range(len(same)):
        b = same[i]
        outside = b["mask"][0] == 0
        assert outside.any() and (b["foreground"][:, outside] == 0).all()
        rec = same.samples[i]
        fg = torch.from_numpy(np.array(Image.open(synth_dir / rec.foreground), np.float32)).permute(2, 0, 1)
        torch.testing.assert_close(b["foreground"][:, ~outside], fg[:, ~outside] / 127 - 1)
    smaller = RelightDataset(synth_dir, 20, tok)  # Lanczos rings a few pixels past the edge only
    for i in range(len(smaller)):
        b = smaller[i]
        near = torch.nn.functional.max_pool2d(b["mask"][None], 9, stride=1, padding=4)[0, 0]
        assert (b["foreground"][:, near == 0] == 0).all()


def test_env_is_area_resampled(synth_dir, tok):
    b = RelightDataset(synth_dir, 16, tok, env_shape=(8, 16))[0]
    env = torch.from_numpy(np.load(synth_dir / "env/000000.npy")).permute(2, 0, 1)
    torch.testing.assert_close(b["env"], env.reshape(3, 8, 2, 16, 2).mean((2, 4)))


def test_resize_and_centre_crop_of_non_square_images(tmp_path, tok):
    rec = make_sample(tmp_path, "wide")
    cols = np.repeat(np.arange(64, dtype=np.uint8)[None, :, None] * 4, 32, 0).repeat(3, 2)  # (32, 64, 3)
    rec["target"] = save_png(tmp_path, "wide.png", cols)
    write_manifest(tmp_path, [rec])
    b = RelightDataset(tmp_path, 16, tok)[0]
    # 64x32 -> 32x16 (short side 16), then the central 16 columns: original columns 16..47.
    assert b["target"].shape == (3, 16, 16)
    assert abs(b["target"][0, 8, 0].item() * 127.5 + 127.5 - 4 * 16.5) < 3
    assert abs(b["target"][0, 8, 15].item() * 127.5 + 127.5 - 4 * 46.5) < 3


def test_dataloader_workers_give_the_same_batches(synth_dir, tok):
    ds = RelightDataset(synth_dir, 16, tok)
    serial = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=0))
    parallel = list(torch.utils.data.DataLoader(ds, batch_size=2, num_workers=2))
    assert len(serial) == len(parallel) == 3
    for a, b in zip(serial, parallel):
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), key


# ----------------------------------------------------------------------------- image modes

def test_rgba_and_greyscale_images_are_handled(tmp_path, tok):
    rec = make_sample(tmp_path, "a")
    rgba = np.zeros((SIZE, SIZE, 4), np.uint8)
    rgba[..., :3] = (250, 10, 10)
    rgba[:, SIZE // 2:, 3] = 255  # left half transparent
    rec["foreground"] = save_png(tmp_path, "fg_rgba.png", rgba)
    rec["mask"] = save_png(tmp_path, "mask_full.png", np.full((SIZE, SIZE), 255, np.uint8))
    target = rgba.copy()
    target[..., 3] = 0
    target[0, 0, 3] = 255  # one opaque pixel; the rest composites over grey
    rec["target"] = save_png(tmp_path, "t_rgba.png", target)
    grey = np.tile(np.linspace(0, 255, SIZE).astype(np.uint8), (SIZE, 1))
    rec["background"] = save_png(tmp_path, "bg_grey.png", grey)
    rec16 = make_sample(tmp_path, "b")
    rec16["target"] = "t16.png"
    Image.fromarray(np.full((SIZE, SIZE), 65535, np.uint16)).save(tmp_path / "t16.png")
    write_manifest(tmp_path, [rec, rec16])
    assert problem_lines(tmp_path) == []

    ds = RelightDataset(tmp_path, SIZE, tok)
    b = ds[0]
    assert (b["foreground"][:, :, : SIZE // 2] == 0).all()  # alpha 0 -> grey 127 -> 0
    torch.testing.assert_close(b["foreground"][:, 0, -1], torch.tensor([250, 10, 10]) / 127 - 1)
    assert (b["mask"] == 1).all()  # the mask file decides the mask; alpha only shapes the composite
    torch.testing.assert_close(b["target"][:, 0, 0], torch.tensor([250, 10, 10]) / 127.5 - 1)
    torch.testing.assert_close(b["target"][:, 5, 5], torch.full((3,), 127 / 127.5 - 1))
    assert b["background"].shape == (3, SIZE, SIZE)
    assert torch.equal(b["background"][0], b["background"][1]) and torch.equal(b["background"][0], b["background"][2])
    torch.testing.assert_close(b["background"][0, 3], torch.from_numpy(grey[3]).float() / 127.5 - 1)
    torch.testing.assert_close(ds[1]["target"], torch.ones(3, SIZE, SIZE))  # 16-bit white -> 1.0


# ----------------------------------------------------------------------------- bad datasets

def test_missing_file(tmp_path, tok):
    recs = make_dataset(tmp_path)
    recs[1]["target"] = "img/nope.png"
    write_manifest(tmp_path, recs)
    expect_error(tmp_path, tok, "manifest.jsonl:2: img/nope.png: 'target': file not found")
    assert problem_lines(tmp_path) == ["manifest.jsonl:2: img/nope.png: 'target': file not found"]


def test_truncated_png(tmp_path, tok, caplog):
    make_dataset(tmp_path)
    broken = tmp_path / "img/s1_t.png"
    broken.write_bytes(broken.read_bytes()[:60])
    with pytest.raises(DatasetError, match=r"manifest.jsonl:2: img/s1_t.png: cannot decode image"):
        RelightDataset(tmp_path, SIZE, tok)[1]
    ds = RelightDataset(tmp_path, SIZE, tok, skip_bad=True)
    with caplog.at_level(logging.WARNING, logger="iclight_ds.data.dataset"):
        b = ds[1]
    assert b["index"] == 2 and ds.skipped == 1
    assert "img/s1_t.png" in caplog.text
    assert [b["index"] for b in (ds[i] for i in range(3))] == [0, 2, 2] and ds.skipped == 2
    lines = problem_lines(tmp_path)
    assert len(lines) == 1 and lines[0].startswith("manifest.jsonl:2: img/s1_t.png: cannot decode image")


def test_mask_of_the_wrong_size(tmp_path, tok):
    recs = make_dataset(tmp_path)
    recs[0]["mask"] = save_png(tmp_path, "small_mask.png", disc(8))
    write_manifest(tmp_path, recs)
    message = "small_mask.png: mask size 8x8 differs from foreground img/s0_f.png size 16x16"
    with pytest.raises(DatasetError, match="manifest.jsonl:1: " + message):
        RelightDataset(tmp_path, SIZE, tok)[0]
    assert problem_lines(tmp_path) == ["manifest.jsonl:1: " + message]


def test_soft_and_empty_masks_are_reported(tmp_path, tok):
    recs = make_dataset(tmp_path)
    recs[0]["mask"] = save_png(tmp_path, "soft.png", np.full((SIZE, SIZE), 128, np.uint8))
    recs[2]["mask"] = save_png(tmp_path, "empty.png", np.zeros((SIZE, SIZE), np.uint8))
    write_manifest(tmp_path, recs)
    assert problem_lines(tmp_path) == [
        "manifest.jsonl:1: soft.png: mask is not binary: only 0% of pixels are near 0 or 255",
        "manifest.jsonl:3: empty.png: mask is empty (no pixel >= 128)"]


def test_nan_in_env_map(tmp_path, tok):
    env = np.ones((16, 32, 3), np.float32)
    env[3, 4, 1] = np.nan
    write_manifest(tmp_path, [make_sample(tmp_path, "a"), make_sample(tmp_path, "b", env=env)])
    assert problem_lines(tmp_path) == ["manifest.jsonl:2: img/b_env.npy: env map has 1 non-finite values"]
    with pytest.raises(DatasetError, match="manifest.jsonl:2: img/b_env.npy: bad env map"):
        RelightDataset(tmp_path, SIZE, tok)[1]


def test_env_maps_of_the_wrong_shape_or_sign(tmp_path):
    write_manifest(tmp_path, [make_sample(tmp_path, "a", env=np.ones((16, 32), np.float32)),
                              make_sample(tmp_path, "b", env=-np.ones((16, 32, 3), np.float32)),
                              make_sample(tmp_path, "c", env=np.ones((16, 16, 3), np.float32))])
    lines = problem_lines(tmp_path)
    assert lines[0] == "manifest.jsonl:1: img/a_env.npy: env map shape (16, 32), expected (H, W, 3)"
    assert lines[1] == "manifest.jsonl:2: img/b_env.npy: env map has negative values (min -1)"
    assert lines[2].startswith("manifest.jsonl:3: img/c_env.npy: env map is 16x16, not the aspect")


def test_empty_manifest(tmp_path, tok):
    (tmp_path / "manifest.jsonl").write_text("\n\n")
    expect_error(tmp_path, tok, "manifest.jsonl:0: the manifest has no samples")
    assert problem_lines(tmp_path) == ["manifest.jsonl:0: the manifest has no samples"]
    expect_error(tmp_path / "nowhere", tok, "no manifest.jsonl in")


def test_line_that_is_not_json(tmp_path, tok):
    recs = make_dataset(tmp_path)
    write_manifest(tmp_path, [recs[0], '{"id": "x", "prompt": ', recs[2]])
    expect_error(tmp_path, tok, "manifest.jsonl:2: not valid JSON")
    assert problem_lines(tmp_path)[0].startswith("manifest.jsonl:2: not valid JSON")


def test_missing_keys_and_bad_values(tmp_path, tok):
    recs = make_dataset(tmp_path)
    del recs[0]["mask"], recs[0]["prompt"]
    recs[1]["prompt"] = "  "
    write_manifest(tmp_path, recs)
    assert problem_lines(tmp_path) == ["manifest.jsonl:1: missing key(s) 'prompt', 'mask'",
                                       "manifest.jsonl:2: 'prompt' must be a non-empty string, got '  '"]


def test_duplicate_ids(tmp_path, tok):
    recs = make_dataset(tmp_path)
    recs[2]["id"] = "s0"
    write_manifest(tmp_path, recs)
    expect_error(tmp_path, tok, "manifest.jsonl:3: duplicate id 's0' (first on line 1)")


def test_paths_escaping_the_folder(tmp_path, tok):
    root = tmp_path / "ds"
    recs = make_dataset(root)
    save_png(tmp_path, "outside.png", disc())  # exists, but outside the dataset folder
    recs[0]["mask"] = "../outside.png"
    recs[1]["target"] = "img/../../outside.png"
    recs[2]["background"] = str(tmp_path / "outside.png")
    write_manifest(root, recs)
    message = expect_error(root, tok, "manifest.jsonl:1: ../outside.png: 'mask': path escapes the dataset folder",
                           "manifest.jsonl:2: img/../../outside.png: 'target': path escapes",
                           "manifest.jsonl:3: ", "'background': absolute path")
    assert "3 problem(s)" in message


def test_required_background_and_env(tmp_path, tok):
    recs = make_dataset(tmp_path)
    del recs[1]["background"], recs[2]["env"]
    write_manifest(tmp_path, recs)
    assert len(RelightDataset(tmp_path, SIZE, tok)) == 3
    b = RelightDataset(tmp_path, SIZE, tok)[1]
    assert not b["has_background"] and (b["background"] == 0).all()
    expect_error(tmp_path, tok, "manifest.jsonl:2: no 'background', which this dataset requires",
                 require_background=True)
    expect_error(tmp_path, tok, "manifest.jsonl:3: no 'env'", require_env=True)


# ----------------------------------------------------------------------------- validate CLI

def test_validate_cli_exit_codes(synth_dir, tmp_path, capsys):
    ok = subprocess.run([sys.executable, "-m", "iclight_ds.data.validate", str(synth_dir), "--require-env"],
                        cwd=REPO, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "OK, 5 sample(s)" in ok.stdout
    recs = make_dataset(tmp_path)
    recs[1]["target"] = "img/nope.png"
    del recs[2]["background"]
    write_manifest(tmp_path, recs)
    assert validate_main([str(tmp_path)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "manifest.jsonl:2: img/nope.png: 'target': file not found"
    assert "1 problem(s) on 1 line(s)" in out[-1]
    assert validate_main([str(tmp_path), "--require-background"]) == 1
    assert "manifest.jsonl:3: no 'background'" in capsys.readouterr().out

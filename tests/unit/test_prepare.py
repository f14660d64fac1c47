"""iclight-prepare: a folder of photos -> a dataset in the manifest format; every bad input named in the summary."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from iclight_ds.data import prepare as prep
from iclight_ds.data.dataset import MANIFEST, read_manifest
from iclight_ds.data.validate import validate_dataset

SIZE = (96, 72)  # (W, H) of the test photos


def _disc(seed: int, size=SIZE) -> tuple[np.ndarray, np.ndarray]:
    """A shaded ball on a gradient: (H, W, 3) uint8 photo and (H, W) bool mask."""
    w, h = size
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    cx, cy, r = w / 2 + rng.integers(-8, 8), h / 2, 0.35 * h
    d = np.hypot(xx - cx, yy - cy)
    mask = d < r
    shade = np.clip(0.25 + 0.75 * np.sqrt(np.clip(1 - (d / r) ** 2, 0, 1)) - 0.3 * (xx - cx) / r, 0, 1)
    colour = rng.uniform(0.3, 1.0, 3)
    background = np.stack([xx / w, yy / h, np.full(xx.shape, 0.5)], -1)
    photo = np.where(mask[..., None], shade[..., None] * colour, background)
    return np.round(photo * 255).astype(np.uint8), mask


def _cutout(path, seed: int) -> None:
    photo, mask = _disc(seed)
    Image.fromarray(np.dstack([photo, mask.astype(np.uint8) * 255]), "RGBA").save(path)


def _photo_and_mask(folder, masks, stem: str, seed: int, mask_size=None) -> None:
    photo, mask = _disc(seed)
    Image.fromarray(photo).save(folder / f"{stem}.jpg", quality=95)
    m = Image.fromarray(mask.astype(np.uint8) * 255, "L")
    m.resize(mask_size or m.size).save(masks / f"{stem}.png")


@pytest.fixture
def folders(tmp_path):
    images, masks = tmp_path / "photos", tmp_path / "masks"
    images.mkdir()
    masks.mkdir()
    return images, masks, tmp_path / "out"


def _run(images, out, **kw) -> dict:
    workers = kw.pop("workers", 1)
    return prep.prepare(prep.Settings(images=images, out=out, resolution=64, **kw), workers=workers, progress=False)


def _tree(root) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_cutouts_and_masks_give_a_valid_dataset_with_captions(folders):
    images, masks, out = folders
    _cutout(images / "mug.png", 0)
    _photo_and_mask(images, masks, "lamp", 1)
    (images / "mug.txt").write_text("a white mug,\n warm light from the left\n")
    (images / "metadata.jsonl").write_text(json.dumps({"file_name": "lamp.jpg", "text": "a lamp, rim light"}) + "\n")
    summary = _run(images, out, masks=masks, variants=3)
    assert summary["kept"] == 2 and summary["samples"] == 6 and summary["skipped"] == []
    assert summary["captions"] == {"txt": 1, "metadata": 1, "default": 0, "empty-txt": 0}
    assert summary["masks"] == {"alpha": 1, "masks": 1}
    assert validate_dataset(out) == []
    samples, problems = read_manifest(out)
    assert problems == [] and [s.id for s in samples] == ["lamp-0", "lamp-1", "lamp-2", "mug-0", "mug-1", "mug-2"]
    assert samples[3].prompt == "a white mug, warm light from the left" and samples[0].prompt == "a lamp, rim light"
    assert samples[0].env is None and samples[0].background is None
    # the target is the photo at the output size (short side 64), the variants differ from it and from each other
    target = np.asarray(Image.open(out / samples[0].target))
    assert target.shape == (64, 85, 3)
    fgs = [np.asarray(Image.open(out / s.foreground)) for s in samples[:3]]
    assert fgs[0].shape == (64, 85, 3) and samples[0].foreground.endswith(".jpg")
    mask = np.asarray(Image.open(out / samples[0].mask))
    inside = mask > 127
    assert abs(inside.mean() - 0.35 ** 2 * np.pi * 72 / 96) < 0.03  # the ball's share of the frame
    assert ((mask == 0) | (mask == 255)).mean() > 0.9  # soft only at the edge
    diffs = [np.abs(f.astype(int) - target).mean(axis=-1)[inside].mean() for f in fgs]
    assert min(diffs) > 3 and np.abs(fgs[0].astype(int) - fgs[1]).mean() > 1
    assert np.median(fgs[0][mask == 0]) == 127  # grey outside the object


def test_no_mask_source_names_the_options(folders):
    images, _, out = folders
    Image.fromarray(_disc(0)[0]).save(images / "a.jpg")
    with pytest.raises(prep.PrepareError) as e:
        _run(images, out)
    assert "no mask source" in str(e.value) and "--masks DIR" in str(e.value) and "--matting MODEL_DIR" in str(e.value)
    assert not out.exists()


def test_out_inside_images_is_refused(folders):
    images, masks, _ = folders
    _cutout(images / "a.png", 0)
    with pytest.raises(prep.PrepareError, match="is inside --images"):
        _run(images, images / "prepared")


def test_bad_files_are_skipped_with_their_reasons(folders):
    images, masks, out = folders
    _cutout(images / "good.png", 0)
    _photo_and_mask(images, masks, "other-size", 1, mask_size=(50, 50))
    Image.fromarray(np.zeros((72, 96, 4), np.uint8), "RGBA").save(images / "empty.png")  # alpha all 0
    Image.fromarray(_disc(2)[0]).save(images / "white.jpg")
    Image.new("L", SIZE, 255).save(masks / "white.png")
    data = (images / "good.png").read_bytes()
    (images / "truncated.png").write_bytes(data[: len(data) // 2])
    (images / "garbage.jpg").write_bytes(b"not a jpeg at all")
    (images / "notes.md").write_text("shot on a phone")
    Image.fromarray(_disc(3)[0]).save(images / "no-mask.jpg")
    summary = _run(images, out, masks=masks)
    reasons = {x["file"]: x["reason"] for x in summary["skipped"]}
    assert summary["kept"] == 1 and summary["photos"] == 7
    assert reasons["other-size.jpg"].startswith("mask other-size.png is 50x50, the image 96x72")
    assert reasons["empty.png"] == "mask from alpha is empty (no object pixel)"
    assert reasons["white.jpg"].startswith("mask from masks is all white")
    assert reasons["truncated.png"].startswith("cannot decode image (")
    assert reasons["garbage.jpg"].startswith("cannot decode image (cannot identify image file")
    assert reasons["notes.md"].startswith("not an image (.md")
    assert reasons["no-mask.jpg"] == "no mask: no same-stem file in --masks, no alpha channel, no --matting"
    text = prep.format_summary(summary, out)
    assert "skipped 7 file(s)" in text and "truncated.png: cannot decode image" in text
    assert validate_dataset(out) == []


def test_missing_or_empty_caption_uses_the_default_prompt_and_counts_it(folders):
    images, _, out = folders
    _cutout(images / "a.png", 0)
    _cutout(images / "b.png", 1)
    (images / "b.txt").write_text("  \n")
    summary = _run(images, out, default_prompt="a product, soft light", variants=1)
    assert summary["captions"] == {"txt": 0, "metadata": 0, "default": 1, "empty-txt": 1}
    assert {s.prompt for s in read_manifest(out)[0]} == {"a product, soft light"}
    assert "2 default prompt (1 of them for an empty .txt)" in prep.format_summary(summary, out)


def test_same_bytes_for_a_seed_whatever_the_workers_and_another_seed_differs(folders, tmp_path):
    images, _, out = folders
    for i in range(4):
        _cutout(images / f"p{i}.png", i)
    _run(images, out)
    _run(images, tmp_path / "two", workers=2)
    assert _tree(out) == _tree(tmp_path / "two")
    _run(images, tmp_path / "seed1", seed=1)
    assert _tree(out)["fg/p0-0.jpg"] != _tree(tmp_path / "seed1")["fg/p0-0.jpg"]
    assert _tree(out)["target/p0.jpg"] == _tree(tmp_path / "seed1")["target/p0.jpg"]
    _run(images, tmp_path / "png", image_format="png")
    assert sorted(_tree(tmp_path / "png"))[-4:] == ["target/p0.png", "target/p1.png", "target/p2.png", "target/p3.png"]
    assert validate_dataset(tmp_path / "png") == []


def test_an_interrupted_run_resumes_to_the_same_bytes(folders, tmp_path, monkeypatch):
    images, _, out = folders
    for i in range(4):
        _cutout(images / f"p{i}.png", i)
    _run(images, tmp_path / "whole")
    calls, save = [], prep._save_image

    def dying_save(image, path):
        calls.append(path)
        if len(calls) == 10:  # the third photo: its mask written, not its target (4 files per photo)
            raise KeyboardInterrupt
        save(image, path)

    monkeypatch.setattr(prep, "_save_image", dying_save)
    with pytest.raises(KeyboardInterrupt):
        _run(images, out)
    assert not (out / MANIFEST).exists() and len(list((out / prep.STATE_DIR).glob("*.json"))) == 2
    assert (out / "mask/p2.png").is_file() and not (out / "target/p2.jpg").exists()
    monkeypatch.setattr(prep, "_save_image", save)
    summary = _run(images, out)
    assert summary["resumed"] == 2 and summary["kept"] == 4
    assert _tree(out) == _tree(tmp_path / "whole")


def test_a_resume_with_other_settings_is_refused(folders):
    images, _, out = folders
    _cutout(images / "a.png", 0)
    _run(images, out)
    with pytest.raises(prep.PrepareError, match=r"other settings \(resolution differ"):
        prep.prepare(prep.Settings(images=images, out=out, resolution=128), progress=False)


def test_backgrounds_make_an_fbc_set(folders, tmp_path):
    images, _, out = folders
    _cutout(images / "a.png", 0)
    bgs = tmp_path / "bgs"
    bgs.mkdir()
    Image.new("RGB", (120, 80), (250, 120, 40)).save(bgs / "sunset.jpg")
    summary = _run(images, out, backgrounds=bgs, variants=2)
    assert summary["samples"] == 2 and validate_dataset(out, require_background=True) == []
    s = read_manifest(out, require_background=True)[0][0]
    bg = np.asarray(Image.open(out / s.background), np.float32)
    target = np.asarray(Image.open(out / s.target), np.float32)
    inside = np.asarray(Image.open(out / s.mask)) > 127
    outside = cv2.dilate(np.asarray(Image.open(out / s.mask)), np.ones((5, 5), np.uint8)) == 0  # off the edge
    assert bg.shape == target.shape and np.abs(target[outside] - bg[outside]).mean() < 1  # composited over it
    obj = target[inside].mean(axis=0)
    assert obj[0] > obj[2]  # the object takes the orange light of the background


def test_matting_model_masks_photos(folders, tmp_path):
    from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerImageProcessor

    images, _, out = folders
    photo = _disc(0)[0]
    Image.fromarray(photo).save(images / "a.png")
    model_dir = tmp_path / "matting"
    torch.manual_seed(0)
    cfg = SegformerConfig(num_encoder_blocks=1, depths=[1], sr_ratios=[1], hidden_sizes=[8], patch_sizes=[3],
                          strides=[2], num_attention_heads=[1], mlp_ratios=[1], decoder_hidden_size=8, num_labels=2,
                          id2label={0: "background", 1: "foreground"}, label2id={"background": 0, "foreground": 1})
    model = SegformerForSemanticSegmentation(cfg).eval()
    processor = SegformerImageProcessor(size={"height": 64, "width": 64})
    pixels = processor(images=Image.fromarray(photo), return_tensors="pt")["pixel_values"]
    with torch.no_grad():  # centre the foreground-minus-background logit on this photo: about half is object
        logits = model(pixel_values=pixels).logits
        model.decode_head.classifier.bias[1] -= float((logits[0, 1] - logits[0, 0]).median())
        prob = torch.softmax(model(pixel_values=pixels).logits, dim=1)[:, 1:]
    model.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    summary = _run(images, out, matting=model_dir, variants=1)
    assert summary["kept"] == 1 and summary["masks"] == {"matting": 1}
    written = np.asarray(Image.open(out / "mask/a.png")) > 127
    h, w = written.shape
    expected = torch.nn.functional.interpolate(prob, size=(h, w), mode="bilinear")[0, 0].numpy() >= 0.5
    assert 0.2 < written.mean() < 0.8 and (written != expected).mean() < 0.03
    (tmp_path / "not-a-model").mkdir()
    with pytest.raises(prep.PrepareError, match="no config.json"):
        _run(images, tmp_path / "out2", matting=tmp_path / "not-a-model")


def test_cli_prints_the_summary_and_the_train_command(folders, capsys):
    images, _, out = folders
    _cutout(images / "a.png", 0)
    assert prep.main(["--images", str(images), "--out", str(out), "--resolution", "64", "--workers", "1",
                      "--no-progress", "--degrade.shadow_prob", "0", "--variants", "1"]) == 0
    printed = capsys.readouterr().out
    assert "1 of 1 photo(s) kept -> 1 sample(s)" in printed and "--model.light_input text" in printed
    assert json.loads((out / "manifest.jsonl").read_text())["degradation"]["shadow"] == "none"
    assert prep.main(["--images", str(images), "--out", str(out) + "2", "--degrade.ambient", "x"]) == 2
    assert "--degrade.ambient: expected 2 values" in capsys.readouterr().err


def test_shadow_materials_are_used(folders, tmp_path):
    from iclight_ds.config import DegradationConfig

    images, _, out = folders
    _cutout(images / "a.png", 0)
    materials = tmp_path / "shadows"
    materials.mkdir()
    leaf = Image.new("L", (64, 64), 255)
    leaf.paste(0, (0, 0, 32, 64))
    leaf.save(materials / "leaf.png")
    _run(images, out, shadow_materials=materials, variants=2,
         degradation=DegradationConfig(shadow_prob=1.0, material_prob=1.0))
    drawn = [s["degradation"] for s in map(json.loads, (out / MANIFEST).read_text().splitlines())]
    assert [d["shadow"] for d in drawn] == ["material 0", "material 0"] and all(d["shadow_strength"] > 0 for d in drawn)

"""A folder of product photos -> iclight-prepare -> validate -> a 2-step Trainer run from a base (FC text-lit and
FBC) -> export, relight and eval under model.light_input=text."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from iclight_ds.config import load_config
from iclight_ds.data import prepare as prep
from iclight_ds.data.validate import main as validate_main


def _cutouts(folder, n=4):
    """RGBA product shots: a shaded box of a random colour on a transparent background."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        img = np.zeros((80, 80, 4), np.uint8)
        x0, y0 = rng.integers(10, 25, 2)
        ramp = np.linspace(1.0, 0.4, 80 - 2 * x0)[None, :, None]
        img[y0:80 - y0, x0:80 - x0, :3] = (ramp * rng.uniform(80, 255, 3)).astype(np.uint8)
        img[y0:80 - y0, x0:80 - x0, 3] = 255
        Image.fromarray(img, "RGBA").save(folder / f"item{i}.png")
        (folder / f"item{i}.txt").write_text(f"product {i} on a table, soft light from the {['left', 'right'][i % 2]}")


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A tiny SD1.5-layout base in the diffusers folder layout a user has on disk (random weights)."""
    from iclight_ds.model.arch import build_text_encoder, build_vae
    from iclight_ds.model.iclight import build_unet
    from iclight_ds.model.tokenizer import build_char_tokenizer

    root = tmp_path_factory.mktemp("base")
    torch.manual_seed(1)
    tok = build_char_tokenizer()
    build_unet("tiny").save_pretrained(root / "unet")
    build_vae("tiny").save_pretrained(root / "vae")
    build_text_encoder("tiny", tok).save_pretrained(root / "text_encoder")
    tok.save_pretrained(root / "tokenizer")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("shop")
    _cutouts(root / "photos")
    bgs = root / "backgrounds"
    bgs.mkdir()
    Image.new("RGB", (96, 64), (40, 60, 200)).save(bgs / "blue.jpg")
    Image.new("RGB", (96, 64), (230, 150, 60)).save(bgs / "warm.jpg")
    return root


def _train(data, out, base, **over):
    from iclight_ds.train.trainer import Trainer

    cfg = load_config(None, {"model.base": str(base), "data.path": str(data), "data.resolution": 64,
                             "train.output_dir": str(out), "train.steps": 2, "train.ds_config": "cpu-1rank",
                             "train.lr": 1e-4, "logging.wandb": False, "logging.progress": False,
                             "logging.every": 1, "logging.preview_every": 0, "logging.eval_every": 0,
                             "data.num_workers": 0, **over})
    trainer = Trainer(cfg)
    trainer.train()
    return trainer, [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def test_fc_text_lit_from_photos(photos, tiny_base, tmp_path, capsys, caplog):
    data = tmp_path / "fc-set"
    assert prep.main(["--images", str(photos / "photos"), "--out", str(data), "--resolution", "64",
                      "--variants", "2", "--workers", "1", "--no-progress"]) == 0
    assert "4 of 4 photo(s) kept -> 8 sample(s)" in capsys.readouterr().out
    assert validate_main([str(data)]) == 0
    trainer, metrics = _train(data, tmp_path / "run", tiny_base, **{"model.light_input": "text",
                                                                     "logging.preview_every": 2,
                                                                     "logging.preview_samples": 2,
                                                                     "logging.preview_steps": 2})
    assert trainer.engine.module.env_encoder is None
    assert "the consistency term is off: model.light_input=text" in caplog.text
    losses = [m for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(m["loss_consistency"] == 0.0 and m["loss"] == m["loss_vanilla"] > 0
                                    for m in losses)
    run = tmp_path / "run"
    with safe_open(str(run / "iclight_modules.safetensors"), "pt") as f:
        assert {k.split(".")[0] for k in f.keys()} == {"merger"}
    assert json.loads((run / "config.json").read_text())["model"]["light_input"] == "text"
    assert (run / "previews" / "step_00000002.png").is_file()
    _relight_and_eval(run, data, tmp_path, capsys)


def _relight_and_eval(run, data, tmp_path, capsys):
    from iclight_ds.infer.eval import main as eval_main
    from iclight_ds.infer.relight import main as relight_main

    fg = data / "fg" / "item0-0.jpg"
    common = ["--base", str(run), "--weights", str(run / "unet.safetensors"), "--fg", str(fg), "--steps", "2",
              "--mask", str(data / "mask" / "item0.png"),
              "--prompt", "product 0, warm light from the left", "--device", "cpu", "--cfg", "1"]
    np.save(tmp_path / "env.npy", np.ones((8, 16, 3), np.float32))
    assert relight_main(common + ["--out", str(tmp_path / "x.png"), "--env", str(tmp_path / "env.npy")]) == 2
    assert "FC models trained with model.light_input=text, see the light through the prompt" in capsys.readouterr().err
    assert relight_main(common + ["--out", str(tmp_path / "relit.png")]) == 0
    assert Image.open(tmp_path / "relit.png").size == (64, 64)
    assert eval_main(["--run", str(run), "--data", str(data), "--samples", "2", "--steps", "2",
                      "--out", str(tmp_path / "eval.json")]) == 0
    summary = json.loads((tmp_path / "eval.json").read_text())["summary"]
    assert summary["samples"] == 2 and summary["samples_with_parts"] == 0 and np.isfinite(summary["psnr"])


def test_fbc_from_photos_and_backgrounds(photos, tiny_base, tmp_path):
    data = tmp_path / "fbc-set"
    summary = prep.prepare(prep.Settings(images=photos / "photos", out=data, backgrounds=photos / "backgrounds",
                                         resolution=64, variants=2), workers=2, progress=False)
    assert summary["samples"] == 8
    assert validate_main([str(data), "--require-background"]) == 0
    _, metrics = _train(data, tmp_path / "run", tiny_base, **{"model.variant": "fbc"})
    losses = [m for m in metrics if "loss" in m]
    assert len(losses) == 2 and all(m["loss_consistency"] > 0 for m in losses)  # the background is split


def test_a_photo_folder_as_data_path_points_to_prepare(photos, tmp_path):
    from iclight_ds.data.dataset import DatasetError
    from iclight_ds.train.trainer import Trainer

    with pytest.raises(DatasetError) as e:
        Trainer(load_config(None, {"data.path": str(photos / "photos"), "train.output_dir": str(tmp_path / "r"),
                                   "logging.wandb": False, "train.ds_config": "cpu-1rank"}))
    assert "python -m iclight_ds.data.prepare --images" in str(e.value) and "skip_bad" not in str(e.value)


def test_a_text_lit_cache_stores_no_env_and_matches_a_text_run(photos, tiny_base, tmp_path):
    from iclight_ds.data.cache import CacheError, CachedDataset, build_cache, run_expectations

    data = tmp_path / "set"
    prep.prepare(prep.Settings(images=photos / "photos", out=data, resolution=64, variants=1), progress=False)
    build_cache(data, tmp_path / "cache", base=str(tiny_base), variant="fc", light_input="text", resolution=64,
                progress=False)
    over = {"model.base": str(tiny_base), "data.path": str(data), "data.resolution": 64}
    text_run = load_config(None, {**over, "model.light_input": "text"})
    item = CachedDataset(tmp_path / "cache", run_expectations(text_run, torch.bfloat16))[0]
    assert "env" not in item and item["target"].shape == (4, 8, 8)
    with pytest.raises(CacheError, match="env_shape"):
        CachedDataset(tmp_path / "cache", run_expectations(load_config(None, over), torch.bfloat16))


def test_buckets_train_photos_of_two_aspects_uncropped(tiny_base, tmp_path):
    from iclight_ds.train.trainer import Trainer

    images = tmp_path / "photos"
    images.mkdir()
    for i in range(16):
        w, h = (120, 80) if i % 2 else (80, 120)
        img = np.zeros((h, w, 4), np.uint8)
        img[10:h - 10, 10:w - 10] = (200, 120 + 4 * i, 60, 255)
        Image.fromarray(img, "RGBA").save(images / f"p{i:02d}.png")
    data = tmp_path / "set"
    prep.prepare(prep.Settings(images=images, out=data, resolution=64, variants=1), progress=False)
    cfg = load_config(None, {"model.base": str(tiny_base), "data.path": str(data), "data.resolution": 64,
                             "data.buckets": True, "model.light_input": "text", "train.output_dir": str(tmp_path / "r"),
                             "train.steps": 2, "train.ds_config": "cpu-1rank", "logging.wandb": False,
                             "logging.progress": False, "logging.preview_every": 2, "logging.preview_samples": 2,
                             "logging.preview_steps": 1, "logging.eval_every": 0, "data.num_workers": 0})
    trainer = Trainer(cfg)
    assert sorted(set(trainer.dataset.bucket_of)) == [(48, 80), (80, 48)]
    shapes, step = [], trainer.forward_backward
    trainer.forward_backward = lambda batch: (shapes.append(tuple(batch["target"].shape)), step(batch))[1]
    trainer.train()
    assert len(shapes) == 2 and all(s[0] == 8 and s[2:] in ((48, 80), (80, 48)) for s in shapes)
    assert Image.open(tmp_path / "r" / "previews" / "step_00000002.png").size[1] == 2 * 64  # square previews

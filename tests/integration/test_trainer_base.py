"""Training from a local SD1.5-layout base (diffusers folder), with IC-Light offsets, and preview images."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from helpers import patch_everywhere, run_config
from iclight_ds.model import base as base_model
from iclight_ds.model.arch import TINY_UNET
from iclight_ds.train.trainer import Trainer


@pytest.fixture(scope="module")
def data(synthetic):
    return synthetic(16, size=64, seed=9)


def test_trains_from_a_diffusers_folder_with_iclight_offsets_and_previews(tiny_base, data, tmp_path):
    from diffusers import UNet2DConditionModel

    base_unet = UNet2DConditionModel.from_pretrained(tiny_base / "unet", local_files_only=True)
    offset = {k: torch.zeros_like(v) for k, v in base_unet.state_dict().items()}
    offset["conv_in.weight"] = torch.full((TINY_UNET["block_out_channels"][0], 8, 3, 3), 0.25)  # an "IC-Light FC" offset
    offset["conv_out.bias"] = torch.full_like(offset["conv_out.bias"], 0.5)
    offset_file = tmp_path / "iclight_fc_offset.safetensors"
    save_file(offset, str(offset_file))

    out = tmp_path / "run"
    cfg = run_config(out, data, {"model.base": str(tiny_base), "model.iclight_weights": str(offset_file),
                                 "train.steps": 2, "logging.preview_every": 1, "logging.preview_samples": 2,
                                 "logging.preview_steps": 2})
    trainer = Trainer(cfg)
    unet = trainer.engine.module.unet
    # the engine starts from base + offset (the official merge), in the training dtype
    expected = base_unet.conv_in.weight + 0.25
    assert torch.equal(unet.conv_in.weight[:, :4], expected.to(unet.conv_in.weight.dtype))
    assert torch.equal(unet.conv_in.weight[:, 4:], torch.full((TINY_UNET["block_out_channels"][0], 4, 3, 3), 0.25, dtype=unet.conv_in.weight.dtype))
    assert torch.equal(unet.conv_out.bias, (base_unet.conv_out.bias + 0.5).to(unet.conv_out.bias.dtype))
    assert str(trainer.tokenizer.name_or_path).endswith("tokenizer")  # the folder's own tokenizer was loaded
    base = json.loads((out / "base.json").read_text())
    assert base["unet_hash"].startswith("sha256:") and base["base"] == str(tiny_base)
    trainer.train()
    previews = sorted((out / "previews").glob("*.png"))
    assert [p.name for p in previews] == ["step_00000001.png", "step_00000002.png"]
    grid = Image.open(previews[-1])
    assert grid.size[0] >= 3 * 64 and grid.size[1] >= 2 * 64  # fg | target | prediction, two rows
    first, second = (torch.from_numpy(np.asarray(Image.open(p), dtype=np.float32)) for p in previews)
    assert not torch.equal(first, second)  # the prediction changed with the weights
    metrics = [m for x in (out / "metrics.jsonl").read_text().splitlines() if "loss" in (m := json.loads(x))]
    assert len(metrics) == 2 and all(math.isfinite(m["loss"]) for m in metrics)


def test_the_planner_counts_the_base_s_own_unet_size(tiny_base, data, tmp_path, caplog, monkeypatch):
    """auto plans the DeepSpeed config and optimizer before the base is loaded: from the base's config (a single file
    is SD1.5, a diffusers folder by its unet/config.json, a run folder by its own base or size), not model.size; a
    base whose size cannot be read is planned as model.size, and a mismatch is then logged."""
    import logging

    assert base_model.base_unet_size(tiny_base) == "tiny"
    assert base_model.base_unet_size(base_model.SD15_CONFIG_DIR) == "full"  # unet/config.json of SD1.5
    single = tmp_path / "sd15.safetensors"
    single.write_bytes(b"")
    assert base_model.base_unet_size(single) == "full"
    run = tmp_path / "a-run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"model": {"size": "full"}, "data": {"resolution": 256}, "train": {}}))
    assert base_model.base_unet_size(run) == "full"
    assert base_model.base_unet_size(tmp_path / "nothing-here") is None

    over = {"model.base": str(tiny_base), "model.size": "full", "train.steps": 1}
    with caplog.at_level(logging.INFO, logger="iclight_ds"):
        trainer = Trainer(run_config(tmp_path / "run1", data, over))
    assert trainer.run.plan_size == "tiny" and "has a tiny UNet: planning for that, not model.size=full" in caplog.text
    assert "may not fit" not in caplog.text
    patch_everywhere(monkeypatch, base_model, "base_unet_size", lambda path: None)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="iclight_ds"):
        trainer = Trainer(run_config(tmp_path / "run2", data, over))
    assert trainer.run.plan_size == "full"
    assert "planned as size full (859.5M)" in caplog.text and "set model.size=tiny" in caplog.text

"""FBC (foreground + background conditioning) end to end on two DeepSpeed CPU ranks: train on synthetic scenes with
backgrounds, resume exactly from a mid-run checkpoint, export offsets, relight with the CLI (its process), evaluate
with the CLI's main."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from helpers import QUIET_ARGS, find_free_port, losses, python_module, run_logged, write_relight_inputs
from iclight_ds.model import formats as fmt
from iclight_ds.model.base import base_for_run

STEPS = 4
COMMON = ["bash", "launch/train.sh", "--num-gpus", "2", "--ds-config", "cpu", "--model.variant", "fbc",
          "--logging.every", "1", "--logging.preview_every", "0", "--logging.eval_every", "0", *QUIET_ARGS,
          "--train.lr", "1e-3", "--train.checkpoint_every", "2", "--data.num_workers", "0"]


@pytest.fixture(scope="module")
def runs(synthetic, tmp_path_factory) -> dict[str, Path]:
    """An uninterrupted 4-step FBC run, and a second run resumed from the first one's step-2 checkpoint."""
    data = synthetic(32, size=64, seed=11)  # extras: every sample has its background (and light parts)
    assert all("background" in json.loads(line) for line in (data / "manifest.jsonl").read_text().splitlines())
    tmp = tmp_path_factory.mktemp("fbc")
    full, resumed = tmp / "full", tmp / "resumed"
    run_logged([*COMMON, "--data.path", str(data), "--output-dir", str(full), "--train.steps", str(STEPS),
                "--master-port", str(find_free_port())], tmp / "full.log")
    run_logged([*COMMON, "--data.path", str(data), "--output-dir", str(resumed), "--train.steps", str(STEPS),
                "--resume", str(full / "checkpoints" / "step_00000002"), "--master-port", str(find_free_port())],
               tmp / "resumed.log")
    return {"full": full, "resumed": resumed, "tmp": tmp}


def test_fbc_trains_on_backgrounds_and_resumes_exactly(runs):
    full, resumed = runs["full"], runs["resumed"]
    assert sorted(losses(full)) == [1, 2, 3, 4] and sorted(losses(resumed)) == [3, 4]
    assert all(math.isfinite(v) for v in losses(full).values())
    assert losses(resumed) == {s: v for s, v in losses(full).items() if s > 2}  # the same steps, bit for bit
    files = sorted(p.name for p in full.glob("*.safetensors"))
    assert "unet.safetensors" in files and files == sorted(p.name for p in resumed.glob("*.safetensors"))
    for name in files:
        a, b = load_file(str(full / name)), load_file(str(resumed / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    conv_in = load_file(str(full / "unet.safetensors"))["conv_in.weight"]
    assert conv_in.shape[1] == 12  # noisy + foreground + background latents
    assert conv_in[:, 8:].abs().sum() > 0  # the zero-initialised background channels were trained
    saved = json.loads((resumed / "checkpoints" / "step_00000004" / "config.json").read_text())
    assert saved["model"]["variant"] == "fbc"


def test_fbc_exports_relights_and_evaluates(runs, synthetic):
    from iclight_ds.infer import eval as ev
    from iclight_ds.infer import relight
    from iclight_ds.train import export

    run, tmp = runs["resumed"], runs["tmp"]
    assert export.main(["--run", str(run), "--format", "iclight-offset", "--out", str(tmp / "offset")]) == 0
    offset_file = tmp / "offset" / "iclight_fbc_offset.safetensors"
    merged = fmt.apply_offset(base_for_run(run / "config.json").unet.state_dict(), load_file(str(offset_file)))
    for k, v in load_file(str(run / "unet.safetensors")).items():  # base + offset = the trained UNet
        torch.testing.assert_close(merged[k], v, rtol=0, atol=1e-6)

    inputs = write_relight_inputs(tmp)
    args = ["--base", str(run), "--weights", str(offset_file), "--fg", str(inputs["fg"]), "--prompt", "sunlight",
            "--steps", "2", "--cfg", "1.0", "--width", "64", "--height", "64"]
    run_logged(python_module("iclight_ds.relight", *args, "--bg", inputs["bg"], "--out", tmp / "relit.png"),
               tmp / "relit.log")
    assert relight.main([*args, "--bg", str(inputs["fg_rgb"]), "--out", str(tmp / "other-bg.png")]) == 0  # in-process
    relit, other = (np.asarray(Image.open(tmp / name), dtype=np.float32) for name in ("relit.png", "other-bg.png"))
    assert relit.shape == (64, 64, 3) and relit.std() > 0
    # the background reaches the UNet: after 4 steps its conv_in channels are small, so the change is too
    assert not np.array_equal(relit, other)

    held = synthetic(4, size=64, seed=12)
    assert ev.main(["--run", str(run), "--data", str(held), "--samples", "2", "--steps", "2", "--batch-size", "2",
                    "--out", str(tmp / "eval.json")]) == 0  # the CLI's process: tests/e2e/test_eval_cli.py
    result = json.loads((tmp / "eval.json").read_text())
    assert result["settings"]["variant"] == "fbc" and result["summary"]["samples"] == 2 == len(result["samples"])
    for key in ("psnr", "baseline_psnr", "ssim", "additivity_error"):
        assert math.isfinite(result["summary"][key]), key

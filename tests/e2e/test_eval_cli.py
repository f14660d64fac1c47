"""The eval CLI on a short real run (trained in a subprocess): JSON and table, the baseline, img2img, errors."""

from __future__ import annotations

import json
import math
import subprocess

import pytest
import torch
from PIL import Image

from helpers import QUIET_ARGS, REPO, python_module, run_logged, subprocess_env
from iclight_ds.config import DEFAULT_ENV_SHAPE
from iclight_ds.infer import eval as ev
from iclight_ds.infer.metrics import masked_psnr
from iclight_ds.model.tokenizer import build_char_tokenizer


def _eval(*args: str) -> subprocess.CompletedProcess:
    """`python -m iclight_ds.infer.eval args...` in the repository, its output captured."""
    return subprocess.run(python_module("iclight_ds.infer.eval", *args), cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)


def test_eval_cli_scores_a_run_and_its_baseline(synthetic, tmp_path, capsys):
    """A short default-style run, then the eval CLI: JSON and table, baseline computed right."""
    run, held = tmp_path / "run", synthetic(6, size=64, seed=777)
    run_logged(python_module("iclight_ds.train", "--train.ds_config", "cpu", "--train.output_dir", run,
                             "--train.steps", "3", "--data.synth_samples", "16", "--logging.preview_every", "0",
                             "--logging.eval_every", "0", *QUIET_ARGS, "--data.num_workers", "0"),
               tmp_path / "train.log", timeout=600)
    out = tmp_path / "eval.json"
    proc = _eval("--run", str(run), "--data", str(held), "--samples", "4", "--steps", "3", "--batch-size", "2",
                 "--out", str(out), "--grid", str(tmp_path / "grid.png"), "--grid-samples", "3")
    assert proc.returncode == 0, proc.stderr
    assert "PSNR (dB, fg)" in proc.stdout and "copy input" in proc.stdout
    result = json.loads(out.read_text())
    summary, rows = result["summary"], result["samples"]
    assert summary["samples"] == 4 == len(rows) and summary["samples_with_parts"] == 4
    for key in ("psnr", "baseline_psnr", "ssim", "chroma_drift", "additivity_error", "additivity_floor", "vae_psnr"):
        assert math.isfinite(summary[key]), key
    assert summary["psnr_gain_db"] == pytest.approx(summary["psnr"] - summary["baseline_psnr"])
    assert result["settings"]["device"] == "cpu"
    assert Image.open(tmp_path / "grid.png").size == (5 * 64, 3 * 64)  # input | target | relit L, L1, L2
    # the baseline is the degraded input itself: recompute it from the files
    items = ev.load_eval_samples(held, 64, build_char_tokenizer(), DEFAULT_ENV_SHAPE, count=4)
    target = torch.stack([(it["target"] + 1) / 2 for it in items])
    degraded = torch.stack([((it["foreground"] + 1) * 127 / 255).clamp(0, 1) for it in items])
    mask = torch.stack([it["mask"] for it in items])
    expected = masked_psnr(degraded, target, mask)
    assert [r["baseline_psnr"] for r in rows] == pytest.approx(expected.tolist(), abs=1e-4)
    # --strength < 1 starts each relight from the degraded input's noised latent: other relit scores, same baseline
    # (the CLI's main in this process from here on: the process itself ran above)
    img2img = tmp_path / "img2img.json"
    assert ev.main(["--run", str(run), "--data", str(held), "--samples", "4", "--steps", "3", "--batch-size", "2",
                    "--strength", "0.5", "--out", str(img2img)]) == 0
    started = json.loads(img2img.read_text())
    assert started["settings"]["strength"] == 0.5 and result["settings"]["strength"] == 1.0
    assert started["summary"]["baseline_psnr"] == pytest.approx(summary["baseline_psnr"])
    assert abs(started["summary"]["psnr"] - summary["psnr"]) > 1e-3
    # errors name what is missing
    capsys.readouterr()
    assert ev.main(["--run", str(tmp_path / "nope"), "--data", str(held)]) == 2
    assert "no config.json" in capsys.readouterr().err
    missing = f"cuda:{torch.cuda.device_count()}"  # a GPU this machine does not have
    assert ev.main(["--run", str(run), "--data", str(held), "--device", missing]) == 2
    assert f"--device {missing}" in capsys.readouterr().err

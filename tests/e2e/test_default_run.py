"""The default run through launch/train.sh: the README's main command (the CPU default's preset: the tiny pretrained
base fine-tuned) learns and exports without leaking the wandb key; the training-time evaluation on two ranks with
scenes the run generates itself."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from helpers import FAKE_WANDB_KEY, QUIET_ARGS, metrics, run_logged


@pytest.mark.slow
def test_default_run_learns_and_exports(tmp_path, free_port):
    """The README's main command (shortened): synthetic data, the tiny base's low loss, checkpoint + export."""
    from iclight_ds.train.cli import CPU_DEFAULT_PRESET

    out = tmp_path / "default"
    run_logged(["bash", "launch/train.sh", "--config", str(CPU_DEFAULT_PRESET), "--output-dir", str(out),
                "--train.steps", "80", "--logging.every", "1", "--data.synth_samples", "128", "--master-port",
                str(free_port)], tmp_path / "log.txt", WANDB_MODE="offline")
    assert json.loads((out / "base.json").read_text())["base"].endswith("tiny_base.safetensors")
    records = metrics(out)
    steps = [m for m in records if "loss" in m]
    assert [m["step"] for m in steps] == list(range(1, 81))
    evals = [m for m in records if "eval/psnr" in m]  # the training-time evaluation ran once, at the end
    assert [m["step"] for m in evals] == [80] and evals[0]["eval/samples"] == 8
    assert math.isfinite(evals[0]["eval/psnr"]) and 0 <= evals[0]["eval/additivity_error"] < 10
    first = sum(m["loss"] for m in steps[:8]) / 8
    last = sum(m["loss"] for m in steps[-8:]) / 8
    # from the pretrained base the loss starts low and stays there (in the pretraining script a random tiny UNet
    # averaged 0.72 over its first 10 steps, 16 scenes at 32 px)
    assert first < 0.2 and last < 0.2, (first, last)
    assert all(m["samples_per_s"] > 0 and m["lr"] > 0 for m in steps)
    assert (out / "checkpoints" / "latest").read_text() == "step_00000080"
    if not torch.cuda.is_available():  # auto on one CPU rank: ZeRO stage 0, exported from its own checkpoint layout
        assert json.loads((out / "ds_config.json").read_text())["_source"].endswith("cpu-1rank.json")
    unet = load_file(str(out / "unet.safetensors"))
    assert unet["conv_in.weight"].shape[1] == 8  # FC: noisy + foreground latent
    assert unet["conv_in.weight"][:, 4:].abs().sum() > 0  # the foreground channels were trained
    assert (out / "data" / "manifest.jsonl").is_file() and (out / "config.json").is_file()
    # the wandb key in the environment appears in no log, config or metrics file
    assert list(out.glob("wandb/offline-run-*")), "wandb ran offline into the run folder"
    for path in [tmp_path / "log.txt", *out.rglob("*.json"), *out.rglob("*.jsonl"), *out.rglob("*.log"),
                 *out.rglob("*.yaml")]:
        assert FAKE_WANDB_KEY not in path.read_text(errors="ignore"), path


def test_training_time_eval_on_two_ranks_with_generated_scenes(tmp_path, free_port):
    """Two ZeRO-2 CPU ranks, synthetic data made by the run: rank 0 writes the held-out scenes while the other rank
    waits, every evaluation is logged once, and the run does not hang on mismatched collectives."""
    out = tmp_path / "run"
    run_logged(["bash", "launch/train.sh", "--num-gpus", "2", "--ds-config", "cpu", "--output-dir", str(out),
                "--train.steps", "2", "--data.synth_samples", "32", "--logging.every", "1", "--logging.eval_every",
                "1", "--logging.eval_samples", "2", "--logging.eval_steps", "2", "--logging.preview_every", "0",
                *QUIET_ARGS, "--master-port", str(free_port)], tmp_path / "log.txt", timeout=300)
    records = metrics(out)
    evals = [r for r in records if "eval/psnr" in r]
    assert [r["step"] for r in evals] == [1, 2] and all(r["eval/samples"] == 2 for r in evals)
    assert all(math.isfinite(r["eval/psnr"]) and math.isfinite(r["eval/baseline_psnr"]) for r in evals)
    assert len(list((out / "eval_data" / "target").glob("*.png"))) == 2

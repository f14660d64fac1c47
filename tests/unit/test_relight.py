"""Relighting pieces with tiny random models on the CPU: the grey composite, the default scheduler, the pipeline
wrapper, the trainer's preview grid and the device names of the CLIs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import write_relight_inputs
from iclight_ds.config import ModelConfig
from iclight_ds.infer import images, sampling
from iclight_ds.infer.preview import make_preview_grid
from iclight_ds.model.arch import build_text_encoder, build_vae
from iclight_ds.model.iclight import build_iclight_model
from iclight_ds.model.schedule import SAMPLERS, make_scheduler
from iclight_ds.model.tokenizer import build_char_tokenizer

W, H = 64, 48  # requested output size (multiples of 8; not square, to catch swapped axes)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return write_relight_inputs(tmp_path_factory.mktemp("inputs"))


def test_foreground_is_composited_over_grey_127(inputs):
    fg = images.foreground_tensor(Image.open(inputs["fg"]), None, 70, 90)  # native size: no resampling
    assert fg.shape == (3, 90, 70)
    assert torch.all(fg[:, :20] == 0.0)  # transparent -> grey 127 -> exactly 0
    torch.testing.assert_close(fg[:, 30, 30], torch.tensor([220, 40, 30]) / 127.0 - 1)
    masked = images.foreground_tensor(Image.open(inputs["fg_rgb"]), Image.open(inputs["mask"]), 70, 90)
    assert torch.all(masked[:, :20] == 0.0)
    torch.testing.assert_close(masked[:, 30, 30], torch.full((3,), 200 / 127.0 - 1))
    resized = images.foreground_tensor(Image.open(inputs["fg"]), None, W, H)
    assert resized.shape == (3, H, W)


def test_default_scheduler_is_dpmpp_2m_sde_karras_on_the_sd15_schedule():
    s = make_scheduler()
    assert type(s).__name__ == "DPMSolverMultistepScheduler"
    assert s.config.algorithm_type == "sde-dpmsolver++" and s.config.use_karras_sigmas
    assert (s.config.num_train_timesteps, s.config.beta_start, s.config.beta_end, s.config.beta_schedule) == (
        1000, 0.00085, 0.012, "scaled_linear")
    for name in SAMPLERS:
        make_scheduler(name)
    with pytest.raises(ValueError, match="unknown sampler"):
        make_scheduler("plms")


def test_wrapper_concatenates_conditions_like_the_demo():
    torch.manual_seed(0)
    unet = build_iclight_model(ModelConfig(variant="fbc")).unet.eval()
    wrapped = sampling.ConcatConditionUNet(unet)
    assert wrapped.config.in_channels == 4 and unet.config.in_channels == 12
    x, cond, text = torch.randn(2, 4, 8, 8), torch.randn(1, 8, 8, 8), torch.randn(2, 77, 32)
    t = torch.tensor([10, 10])
    with torch.no_grad():
        got = wrapped(x, t, text, cross_attention_kwargs={"concat_conds": cond}, return_dict=False)[0]
        want = unet(torch.cat([x, cond.expand(2, -1, -1, -1)], 1), t, text).sample
    torch.testing.assert_close(got, want)


def _samples(n: int, variant: str) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    tok = build_char_tokenizer()
    out = []
    for i in range(n):
        ids = tok(f"sample {i}", padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        out.append({
            "foreground": torch.rand(3, 64, 64, generator=g) * 2 - 1,
            "target": torch.rand(3, 64, 64, generator=g) * 2 - 1,
            "background": torch.rand(3, 64, 64, generator=g) * 2 - 1,
            "env": torch.rand(3, 16, 32, generator=g),
            "input_ids": ids[0],
        })
    return out


@pytest.mark.parametrize("variant,columns", [("fc", 3), ("fbc", 4)])
def test_preview_grid(variant, columns):
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    model = build_iclight_model(ModelConfig(variant=variant))
    vae, te = build_vae("tiny").eval(), build_text_encoder("tiny", tok).eval()
    model.train()
    samples = _samples(2, variant)
    grid = make_preview_grid(model.unet, vae, te, tok, model.env_encoder, samples, seed=0, steps=2)
    again = make_preview_grid(model.unet, vae, te, tok, model.env_encoder, samples, seed=0, steps=2,
                                      guidance=2.0)
    assert grid.size == (columns * 64, 2 * 64) and again.size == grid.size
    assert model.unet.training  # restored
    arr = np.asarray(grid)
    target = ((samples[1]["target"] + 1) / 2 * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    col = columns - 2
    assert np.array_equal(arr[64:, col * 64:(col + 1) * 64], target)
    assert np.array_equal(arr, np.asarray(make_preview_grid(
        model.unet, vae, te, tok, model.env_encoder, samples, seed=0, steps=2)))


def test_device_names_are_checked_before_any_work():
    """`--device` of the relight and eval CLIs: auto/cpu resolve; a device this machine lacks is refused by name."""
    assert sampling.resolve_device("cpu") == torch.device("cpu")
    assert sampling.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(sampling.RelightError, match="--device tpu: not a device name"):
        sampling.resolve_device("tpu")
    with pytest.raises(sampling.RelightError, match="--device mps: expected auto, cpu, cuda or cuda:N"):
        sampling.resolve_device("mps")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or any GPU where there is none
    with pytest.raises(sampling.RelightError, match=f"--device {missing}: (no CUDA device here|this machine has)"):
        sampling.resolve_device(missing)

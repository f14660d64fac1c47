"""Relighting with tiny random models on the CPU: the grey composite, the pipeline wrapper, deterministic sampling,
the CLI for FC (with an environment map) and FBC weights, and the trainer's preview grid."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from iclight_ds import relight
from iclight_ds.base_model import load_base
from iclight_ds.config import ModelConfig
from iclight_ds.data.tokenizer import build_char_tokenizer
from iclight_ds.export import export_formatted, split_state_dict
from iclight_ds.models import build_iclight_model, build_text_encoder, build_unet, build_vae

W, H = 64, 48  # requested output size (multiples of 8; not square, to catch swapped axes)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    tok = build_char_tokenizer()
    root = tmp_path_factory.mktemp("base")
    build_unet("tiny").save_pretrained(str(root / "unet"))
    build_vae("tiny").save_pretrained(str(root / "vae"))
    build_text_encoder("tiny", tok).save_pretrained(str(root / "text_encoder"))
    tok.save_pretrained(str(root / "tokenizer"))
    return root


def _export(base_dir: Path, out: Path, variant: str, *, with_modules: bool = True) -> Path:
    """Offsets of a tiny model 'trained' away from the base (random perturbation), as our export writes them."""
    base = load_base(base_dir, unet_only=True)
    torch.manual_seed(1)
    model = build_iclight_model(ModelConfig(variant=variant), unet=copy.deepcopy(base.unet))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    trained, small = split_state_dict(model.state_dict())
    config = {"model": {"variant": variant, "env_shape": [16, 32]}}
    paths = export_formatted(trained, small if with_modules else {}, fmt_name="iclight-offset", out=out,
                             config=config, step=1, base=base)
    return paths[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    rgba = np.zeros((90, 70, 4), np.uint8)
    rgba[20:70, 15:55] = (220, 40, 30, 255)
    Image.fromarray(rgba, "RGBA").save(root / "fg.png")
    rgb = np.full((90, 70, 3), 200, np.uint8)
    Image.fromarray(rgb).save(root / "fg_rgb.png")
    Image.fromarray((rgba[..., 3] > 0).astype(np.uint8) * 255).save(root / "mask.png")
    bg = np.linspace(0, 255, 80 * 100 * 3).reshape(80, 100, 3).astype(np.uint8)
    Image.fromarray(bg).save(root / "bg.png")
    np.save(root / "env.npy", np.random.default_rng(0).uniform(0, 4, (16, 32, 3)).astype(np.float32))
    return {"fg": root / "fg.png", "fg_rgb": root / "fg_rgb.png", "mask": root / "mask.png", "bg": root / "bg.png",
            "env": root / "env.npy"}


# ---------------------------------------------------------------------------------------------------------
# Pieces


def test_foreground_is_composited_over_grey_127(inputs):
    fg = relight.foreground_tensor(Image.open(inputs["fg"]), None, 70, 90)  # native size: no resampling
    assert fg.shape == (3, 90, 70)
    assert torch.all(fg[:, :20] == 0.0)  # transparent -> grey 127 -> exactly 0
    torch.testing.assert_close(fg[:, 30, 30], torch.tensor([220, 40, 30]) / 127.0 - 1)
    masked = relight.foreground_tensor(Image.open(inputs["fg_rgb"]), Image.open(inputs["mask"]), 70, 90)
    assert torch.all(masked[:, :20] == 0.0)
    torch.testing.assert_close(masked[:, 30, 30], torch.full((3,), 200 / 127.0 - 1))
    resized = relight.foreground_tensor(Image.open(inputs["fg"]), None, W, H)
    assert resized.shape == (3, H, W)


def test_default_scheduler_is_dpmpp_2m_sde_karras_on_the_sd15_schedule():
    s = relight.make_scheduler()
    assert type(s).__name__ == "DPMSolverMultistepScheduler"
    assert s.config.algorithm_type == "sde-dpmsolver++" and s.config.use_karras_sigmas
    assert (s.config.num_train_timesteps, s.config.beta_start, s.config.beta_end, s.config.beta_schedule) == (
        1000, 0.00085, 0.012, "scaled_linear")
    for name in relight.SAMPLERS:
        relight.make_scheduler(name)
    with pytest.raises(relight.RelightError, match="unknown sampler"):
        relight.make_scheduler("plms")


def test_wrapper_concatenates_conditions_like_the_demo():
    torch.manual_seed(0)
    unet = build_iclight_model(ModelConfig(variant="fbc")).unet.eval()
    wrapped = relight.ConcatConditionUNet(unet)
    assert wrapped.config.in_channels == 4 and unet.config.in_channels == 12
    x, cond, text = torch.randn(2, 4, 8, 8), torch.randn(1, 8, 8, 8), torch.randn(2, 77, 32)
    t = torch.tensor([10, 10])
    with torch.no_grad():
        got = wrapped(x, t, text, cross_attention_kwargs={"concat_conds": cond}, return_dict=False)[0]
        want = unet(torch.cat([x, cond.expand(2, -1, -1, -1)], 1), t, text).sample
    torch.testing.assert_close(got, want)


# ---------------------------------------------------------------------------------------------------------
# Sampling


@pytest.fixture(scope="module")
def fc_models(tiny_base, tmp_path_factory):
    from iclight_ds.relight import load_trained_unet

    weights = _export(tiny_base, tmp_path_factory.mktemp("fc"), "fc")
    base = load_base(tiny_base)
    unet, env_encoder, meta = load_trained_unet(base, weights)
    return base, unet, env_encoder


def test_relight_images_size_determinism_and_seed(fc_models, inputs):
    base, unet, env_encoder = fc_models
    fg = relight.foreground_tensor(Image.open(inputs["fg"]), None, W, H)[None]
    env = relight.env_tensor(inputs["env"], (16, 32))[None]
    tokens = relight._env_tokens(env_encoder, env)
    embeds = relight.prompt_embeddings(base.text_encoder, base.tokenizer, ["warm light from the left"], tokens)
    assert embeds.shape == (1, 77 + 4, 32)
    negative = relight.prompt_embeddings(base.text_encoder, base.tokenizer, [""], tokens)
    run = lambda seed: relight.relight_images(unet, base.vae, prompt_embeds=embeds, negative_embeds=negative,  # noqa
                                              foreground=fg, seed=seed, steps=3, guidance=3.0)
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 3, H, W) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    with pytest.raises(relight.RelightError, match="needs a background"):
        relight.relight_images(build_iclight_model(ModelConfig(variant="fbc")).unet, base.vae, prompt_embeds=embeds,
                               foreground=fg, steps=1, guidance=1.0)


def test_relight_from_an_initial_image(fc_models, inputs):
    """init + strength (img2img, the demo's initial latent): a low strength keeps the initial image, strength 1 from
    pure noise does not; a different initial image changes the result; bad strengths are named."""
    from iclight_ds.conditioning import encode_images

    base, unet, env_encoder = fc_models
    fg = relight.foreground_tensor(Image.open(inputs["fg"]), None, W, H)[None]
    tokens = relight._env_tokens(env_encoder, relight.env_tensor(inputs["env"], (16, 32))[None])
    embeds = relight.prompt_embeddings(base.text_encoder, base.tokenizer, ["light from the left"], tokens)
    init = relight.background_tensor(Image.open(inputs["bg"]), W, H)[None]
    latents = encode_images(base.vae, init) / base.vae.config.scaling_factor
    kept = ((base.vae.decode(latents).sample + 1) / 2).clamp(0, 1)  # what the VAE keeps of the initial image
    run = lambda **kw: relight.relight_images(unet, base.vae, prompt_embeds=embeds, foreground=fg, seed=0,  # noqa
                                              steps=20, guidance=1.0, **kw)
    low, half, noise = run(init=init, strength=0.05), run(init=init, strength=0.5), run()
    assert (low - kept).abs().mean() < 0.5 * (noise - kept).abs().mean()
    assert torch.equal(half, run(init=init, strength=0.5))
    assert (half - run(init=-init, strength=0.5)).abs().max() > 1e-2
    for kw, match in (({"strength": 0.5}, "needs an initial image"),
                      ({"init": init, "strength": 0.0}, "in \\(0, 1\\]"),
                      ({"init": init[..., :8, :8], "strength": 0.5}, "initial image is"),
                      ({"init": init, "strength": 0.01}, "leaves no step")):
        with pytest.raises(relight.RelightError, match=match):
            run(**kw)


def _cli(tiny_base: Path, weights: Path, inputs: dict, out: Path, *extra: str) -> int:
    args = ["--base", str(tiny_base), "--weights", str(weights), "--fg", str(inputs["fg"]), "--prompt", "a red box",
            "--out", str(out), "--steps", "3", "--width", str(W), "--height", str(H), *extra]
    return relight.main(args)


def test_cli_fc_with_env_map(tiny_base, inputs, tmp_path, capsys):
    weights = _export(tiny_base, tmp_path / "fc", "fc")
    assert weights.with_name("iclight_fc_offset.modules.safetensors").is_file()  # env encoder, found beside
    assert _cli(tiny_base, weights, inputs, tmp_path / "a.png", "--env", str(inputs["env"])) == 0
    assert _cli(tiny_base, weights, inputs, tmp_path / "b.png", "--env", str(inputs["env"])) == 0
    assert _cli(tiny_base, weights, inputs, tmp_path / "c.png", "--env", str(inputs["env"]), "--seed", "5") == 0
    a, b, c = (np.asarray(Image.open(tmp_path / f"{n}.png")) for n in "abc")
    assert a.shape == (H, W, 3)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    capsys.readouterr()
    assert _cli(tiny_base, weights, inputs, tmp_path / "d.png") == 2
    assert "pass --env" in capsys.readouterr().err
    env = ("--env", str(inputs["env"]))
    assert _cli(tiny_base, weights, inputs, tmp_path / "e.png", *env, "--init", str(inputs["bg"])) == 0
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "e.png")), a)  # started from the image, not noise
    assert _cli(tiny_base, weights, inputs, tmp_path / "f.png", *env, "--strength", "0.5") == 2
    assert "--strength needs --init" in capsys.readouterr().err
    assert _cli(tiny_base, weights, inputs, tmp_path / "f.png", *env, "--init", str(tmp_path / "no.png")) == 2
    assert "--init" in capsys.readouterr().err


def test_cli_init_strength_defaults_to_the_demos_lowres_denoise(tiny_base, inputs, tmp_path, monkeypatch):
    weights = _export(tiny_base, tmp_path / "fc", "fc")
    seen = []

    def spy(unet, vae, **kw):
        seen.append((kw["init"], kw["strength"]))
        return torch.zeros(1, 3, H, W)

    monkeypatch.setattr(relight, "relight_images", spy)
    env = ("--env", str(inputs["env"]))
    assert _cli(tiny_base, weights, inputs, tmp_path / "a.png", *env, "--init", str(inputs["bg"])) == 0
    assert _cli(tiny_base, weights, inputs, tmp_path / "b.png", *env, "--init", str(inputs["bg"]),
                "--strength", "0.3") == 0
    assert _cli(tiny_base, weights, inputs, tmp_path / "c.png", *env) == 0
    assert [strength for _, strength in seen] == [relight.INIT_STRENGTH, 0.3, 1.0] and relight.INIT_STRENGTH == 0.9
    assert seen[0][0].shape == (1, 3, H, W) and seen[2][0] is None


def test_cli_fbc_needs_a_background(tiny_base, inputs, tmp_path, capsys):
    weights = _export(tiny_base, tmp_path / "fbc", "fbc", with_modules=False)
    assert _cli(tiny_base, weights, inputs, tmp_path / "x.png") == 2
    assert "pass --bg" in capsys.readouterr().err
    assert _cli(tiny_base, weights, inputs, tmp_path / "x.png", "--bg", str(inputs["bg"]), "--env",
                str(inputs["env"])) == 2
    assert "no environment encoder" in capsys.readouterr().err
    assert _cli(tiny_base, weights, inputs, tmp_path / "x.png", "--bg", str(inputs["bg"]), "--cfg", "1.0") == 0
    assert Image.open(tmp_path / "x.png").size == (W, H)
    assert _cli(tiny_base, weights, inputs, tmp_path / "y.png", "--bg", str(tmp_path / "missing.png")) == 2
    assert "does not exist" in capsys.readouterr().err


def test_official_style_offset_without_metadata(tiny_base, inputs, tmp_path):
    """A plain offset file (diffusers keys, no metadata, no modules), like the released iclight_sd15_fc."""
    from safetensors.torch import load_file, save_file

    weights = _export(tiny_base, tmp_path / "ours", "fc", with_modules=False)
    save_file(load_file(str(weights)), str(tmp_path / "plain.safetensors"))
    assert _cli(tiny_base, tmp_path / "plain.safetensors", inputs, tmp_path / "p.png") == 0
    assert _cli(tiny_base, weights, inputs, tmp_path / "q.png") == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "p.png")), np.asarray(Image.open(tmp_path / "q.png")))


# ---------------------------------------------------------------------------------------------------------
# Preview grid


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
    grid = relight.make_preview_grid(model.unet, vae, te, tok, model.env_encoder, samples, seed=0, steps=2)
    again = relight.make_preview_grid(model.unet, vae, te, tok, model.env_encoder, samples, seed=0, steps=2,
                                      guidance=2.0)
    assert grid.size == (columns * 64, 2 * 64) and again.size == grid.size
    assert model.unet.training  # restored
    arr = np.asarray(grid)
    target = ((samples[1]["target"] + 1) / 2 * 255).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    col = columns - 2
    assert np.array_equal(arr[64:, col * 64:(col + 1) * 64], target)
    assert np.array_equal(arr, np.asarray(relight.make_preview_grid(
        model.unet, vae, te, tok, model.env_encoder, samples, seed=0, steps=2)))


def test_device_names_are_checked_before_any_work():
    """`--device` of the relight and eval CLIs: auto/cpu resolve; a device this machine lacks is refused by name."""
    assert relight.resolve_device("cpu") == torch.device("cpu")
    assert relight.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(relight.RelightError, match="--device tpu: not a device name"):
        relight.resolve_device("tpu")
    with pytest.raises(relight.RelightError, match="--device mps: expected auto, cpu, cuda or cuda:N"):
        relight.resolve_device("mps")
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU, or any GPU where there is none
    with pytest.raises(relight.RelightError, match=f"--device {missing}: (no CUDA device here|this machine has)"):
        relight.resolve_device(missing)

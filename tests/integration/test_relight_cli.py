"""Relighting with a tiny random base on the CPU: deterministic sampling from noise or an initial image, and the CLI
for FC (with an environment map) and FBC weights, ours and official-style offsets."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import patch_everywhere, write_relight_inputs
from iclight_ds.config import DEFAULT_ENV_SHAPE, ModelConfig
from iclight_ds.infer import images, relight, sampling
from iclight_ds.infer.weights import load_trained_unet
from iclight_ds.model.base import load_base
from iclight_ds.model.frozen import encode_images
from iclight_ds.model.iclight import build_iclight_model
from iclight_ds.train.export import export_formatted, split_state_dict

W, H = 64, 48  # requested output size (multiples of 8; not square, to catch swapped axes)


def _export(base_dir: Path, out: Path, variant: str, *, with_modules: bool = True) -> Path:
    """Offsets of a tiny model 'trained' away from the base (random perturbation), as our export writes them."""
    base = load_base(base_dir, unet_only=True)
    torch.manual_seed(1)
    model = build_iclight_model(ModelConfig(variant=variant), unet=copy.deepcopy(base.unet))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    trained, small = split_state_dict(model.state_dict())
    config = {"model": {"variant": variant, "env_shape": list(DEFAULT_ENV_SHAPE)}}
    paths = export_formatted(trained, small if with_modules else {}, fmt_name="iclight-offset", out=out,
                             config=config, step=1, base=base)
    return paths[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    return write_relight_inputs(tmp_path_factory.mktemp("inputs"))


@pytest.fixture(scope="module")
def fc_models(tiny_base, tmp_path_factory):
    weights = _export(tiny_base, tmp_path_factory.mktemp("fc"), "fc")
    base = load_base(tiny_base)
    unet, env_encoder, meta = load_trained_unet(base, weights)
    return base, unet, env_encoder


def test_relight_images_size_determinism_and_seed(fc_models, inputs):
    base, unet, env_encoder = fc_models
    fg = images.foreground_tensor(Image.open(inputs["fg"]), None, W, H)[None]
    env = images.env_tensor(inputs["env"], DEFAULT_ENV_SHAPE)[None]
    tokens = sampling._env_tokens(env_encoder, env)
    embeds = sampling.prompt_embeddings(base.text_encoder, base.tokenizer, ["warm light from the left"], tokens)
    assert embeds.shape == (1, 77 + 4, 32)
    negative = sampling.prompt_embeddings(base.text_encoder, base.tokenizer, [""], tokens)
    run = lambda seed: sampling.relight_images(unet, base.vae, prompt_embeds=embeds, negative_embeds=negative,  # noqa
                                               foreground=fg, seed=seed, steps=3, guidance=3.0)
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (1, 3, H, W) and a.dtype == torch.float32
    assert 0 <= a.min() and a.max() <= 1
    assert torch.equal(a, b)
    assert (a - c).abs().max() > 1e-3
    with pytest.raises(sampling.RelightError, match="needs a background"):
        sampling.relight_images(build_iclight_model(ModelConfig(variant="fbc")).unet, base.vae, prompt_embeds=embeds,
                                foreground=fg, steps=1, guidance=1.0)


def test_relight_from_an_initial_image(fc_models, inputs):
    """init + strength (img2img, the demo's initial latent): a low strength keeps the initial image, strength 1 from
    pure noise does not; a different initial image changes the result; bad strengths are named."""
    base, unet, env_encoder = fc_models
    fg = images.foreground_tensor(Image.open(inputs["fg"]), None, W, H)[None]
    tokens = sampling._env_tokens(env_encoder, images.env_tensor(inputs["env"], DEFAULT_ENV_SHAPE)[None])
    embeds = sampling.prompt_embeddings(base.text_encoder, base.tokenizer, ["light from the left"], tokens)
    init = images.background_tensor(Image.open(inputs["bg"]), W, H)[None]
    latents = encode_images(base.vae, init) / base.vae.config.scaling_factor
    kept = ((base.vae.decode(latents).sample + 1) / 2).clamp(0, 1)  # what the VAE keeps of the initial image
    run = lambda **kw: sampling.relight_images(unet, base.vae, prompt_embeds=embeds, foreground=fg, seed=0,  # noqa
                                               steps=20, guidance=1.0, **kw)
    low, half, noise = run(init=init, strength=0.05), run(init=init, strength=0.5), run()
    assert (low - kept).abs().mean() < 0.5 * (noise - kept).abs().mean()
    assert torch.equal(half, run(init=init, strength=0.5))
    assert (half - run(init=-init, strength=0.5)).abs().max() > 1e-2
    for kw, match in (({"strength": 0.5}, "needs an initial image"),
                      ({"init": init, "strength": 0.0}, "in \\(0, 1\\]"),
                      ({"init": init[..., :8, :8], "strength": 0.5}, "initial image is"),
                      ({"init": init, "strength": 0.01}, "leaves no step")):
        with pytest.raises(sampling.RelightError, match=match):
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

    patch_everywhere(monkeypatch, sampling, "relight_images", spy)
    env = ("--env", str(inputs["env"]))
    assert _cli(tiny_base, weights, inputs, tmp_path / "a.png", *env, "--init", str(inputs["bg"])) == 0
    assert _cli(tiny_base, weights, inputs, tmp_path / "b.png", *env, "--init", str(inputs["bg"]),
                "--strength", "0.3") == 0
    assert _cli(tiny_base, weights, inputs, tmp_path / "c.png", *env) == 0
    assert [strength for _, strength in seen] == [sampling.INIT_STRENGTH, 0.3, 1.0] and sampling.INIT_STRENGTH == 0.9
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

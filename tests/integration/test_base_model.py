"""Base models offline: shipped SD1.5 configs, diffusers folders, original single-file checkpoints (tiny and full
SD1.5 size), the tokenizer fallback, IC-Light offsets on a base, and the errors for what cannot be loaded."""

from __future__ import annotations

import copy
import gc
import json
import logging
from pathlib import Path

import pytest
import torch

from iclight_ds.config import ModelConfig
from iclight_ds.model import base as bm
from iclight_ds.model import formats as fmt
from iclight_ds.model.iclight import build_iclight_model
from iclight_ds.model.tokenizer import build_char_tokenizer


def _equal_states(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert set(sa) == set(sb)
    bad = [k for k in sa if not torch.equal(sa[k], sb[k])]
    assert not bad, bad[:5]


@pytest.fixture(scope="module")
def tiny_configs(tiny_parts, tmp_path_factory) -> Path:
    """unet/ vae/ text_encoder/ config.json of the tiny models (what sd15_configs/ is for SD1.5)."""
    unet, vae, te, _ = tiny_parts
    root = tmp_path_factory.mktemp("tiny_configs")
    unet.save_config(str(root / "unet"))
    vae.save_config(str(root / "vae"))
    te.config.save_pretrained(str(root / "text_encoder"))
    return root


def _write_single(tiny_parts, path: Path, **kw) -> Path:
    unet, vae, te, _ = tiny_parts
    extra = {"cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    return fmt.write_ldm_checkpoint(path, unet=kw.get("unet", unet.state_dict()), unet_config=unet.config,
                                    vae=kw.get("vae", vae.state_dict()), text_encoder=te.state_dict(), extra=extra)


# ---------------------------------------------------------------------------------------------------------
# Shipped configs


def test_shipped_sd15_configs_are_the_models_py_shapes():
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    expected = bm.sd15_configs()
    for name in bm.COMPONENTS:
        shipped = json.loads((bm.SD15_CONFIG_DIR / name / "config.json").read_text())
        strip = lambda d: {k: v for k, v in d.items() if not k.startswith("_") and k != "transformers_version"}  # noqa
        assert strip(shipped) == strip(json.loads(json.dumps(expected[name]))), name
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(str(bm.SD15_CONFIG_DIR / "unet")))
        vae = AutoencoderKL.from_config(AutoencoderKL.load_config(str(bm.SD15_CONFIG_DIR / "vae")))
        te = CLIPTextModel(CLIPTextConfig.from_pretrained(str(bm.SD15_CONFIG_DIR / "text_encoder")))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert abs(count(unet) - 859.52e6) < 0.01e6
    assert abs(count(vae) - 83.65e6) < 0.01e6
    assert abs(count(te) - 123.06e6) < 0.01e6
    assert vae.config.scaling_factor == 0.18215 and unet.config.cross_attention_dim == te.config.hidden_size == 768


# ---------------------------------------------------------------------------------------------------------
# Diffusers folders


def test_diffusers_folder_base_loads(tiny_parts, tiny_base):
    unet, vae, te, tok = tiny_parts
    base = bm.load_base(tiny_base)
    _equal_states(base.unet, unet)
    _equal_states(base.vae, vae)
    _equal_states(base.text_encoder, te)
    assert base.real_tokenizer and base.tokenizer("a lamp").input_ids == tok("a lamp").input_ids
    assert base.unet_hash == bm.unet_hash(unet.state_dict()) and base.unet_hash.startswith("sha256:")
    assert "diffusers folder" in base.source
    half = bm.load_base(tiny_base, dtype=torch.bfloat16)
    assert half.unet.dtype == torch.bfloat16 and half.vae.dtype == torch.bfloat16
    assert half.unet_hash == base.unet_hash  # the hash is of the stored weights
    only = bm.load_base(tiny_base, unet_only=True)
    assert only.vae is None and only.text_encoder is None and only.unet_hash == base.unet_hash


def test_missing_tokenizer_falls_back_with_a_warning(tiny_base, tmp_path, caplog):
    import shutil

    folder = tmp_path / "no_tok"
    shutil.copytree(tiny_base, folder, ignore=shutil.ignore_patterns("tokenizer"))
    with caplog.at_level(logging.WARNING, logger="iclight_ds.model.base"):
        base = bm.load_base(folder)
    assert not base.real_tokenizer and len(base.tokenizer) == 514
    assert "will NOT understand prompts" in caplog.text and "--tokenizer" in caplog.text
    given = bm.load_base(folder, tokenizer_fallback=tiny_base / "tokenizer")
    assert given.real_tokenizer and given.tokenizer("x").input_ids == base.tokenizer("x").input_ids
    with pytest.raises(bm.BaseModelError, match="does not exist"):
        bm.load_base(folder, tokenizer_fallback=tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------------
# Single files


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_single_file_loads_to_identical_diffusers_weights(tiny_parts, tiny_configs, tmp_path, suffix):
    unet, vae, te, _ = tiny_parts
    path = _write_single(tiny_parts, tmp_path / f"model{suffix}")
    base = bm.load_base(path, config_dir=tiny_configs, tokenizer_fallback=build_char_tokenizer())
    _equal_states(base.unet, unet)
    _equal_states(base.vae, vae)
    _equal_states(base.text_encoder, te)
    assert base.unet_hash == bm.unet_hash(unet.state_dict())  # same weights, same hash, whatever the layout
    assert "single-file" in base.source
    ids = torch.tensor([[512, 100, 513]])
    with torch.no_grad():
        torch.testing.assert_close(base.text_encoder(ids).last_hidden_state, te(ids).last_hidden_state)


def _random_state(module: torch.nn.Module, pool: torch.Tensor, salt: int) -> dict[str, torch.Tensor]:
    """Distinct random-looking bf16 values for every tensor, cut from one random pool (drawing 1.07B normals
    directly takes ~25 s on two cores); each key starts at its own offset, so swapped keys would not compare
    equal."""
    out = {}
    for i, (k, v) in enumerate(module.state_dict().items()):
        n = v.numel()
        start = (i * 1_000_003 + salt * 7_919) % (pool.numel() - n)
        out[k] = pool[start : start + n].view(v.shape).clone()
    return out


@pytest.mark.slow
def test_full_size_sd15_single_file_round_trip(tmp_path):
    """A random FULL-size SD1.5 (UNet + VAE + CLIP text, bf16 to keep memory moderate) written in the original
    layout loads back through the shipped configs to identical diffusers weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from iclight_ds.model.arch import SD15_TEXT, SD15_UNET, SD15_VAE

    pool = (0.05 * torch.randn(40_000_000, generator=torch.Generator().manual_seed(0))).to(torch.bfloat16)
    with torch.device("meta"):
        unet_m, vae_m = UNet2DConditionModel(**SD15_UNET), AutoencoderKL(**SD15_VAE)
        te_m = CLIPTextModel(CLIPTextConfig(**SD15_TEXT))
    unet, vae = _random_state(unet_m, pool, 1), _random_state(vae_m, pool, 2)
    te = {k: v for k, v in _random_state(te_m, pool, 3).items() if not k.endswith("position_ids")}
    del pool
    path = fmt.write_ldm_checkpoint(tmp_path / "sd15.safetensors", unet=unet, unet_config=unet_m.config, vae=vae,
                                    text_encoder=te)
    assert path.stat().st_size > 2.0e9  # ~1.07B bf16 values
    base = bm.load_base(path, dtype=None, tokenizer_fallback=build_char_tokenizer())
    _equal_states(base.unet, unet)
    _equal_states(base.vae, vae)
    _equal_states(base.text_encoder, te)
    assert base.unet.config.in_channels == 4 and base.unet_hash.startswith("sha256:")
    del base, unet, vae, te
    gc.collect()


# ---------------------------------------------------------------------------------------------------------
# Errors


def test_missing_path_and_unknown_suffix(tmp_path):
    with pytest.raises(bm.BaseModelError, match="does not exist.*accepted bases"):
        bm.load_base(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(bm.BaseModelError, match="unknown file type '.txt'"):
        bm.load_base(tmp_path / "notes.txt")


def test_folder_lacking_parts_names_them(tiny_base, tmp_path):
    import shutil

    folder = tmp_path / "partial"
    shutil.copytree(tiny_base / "vae", folder / "vae")
    with pytest.raises(bm.BaseModelError, match=r"missing: unet/, text_encoder/"):
        bm.load_base(folder)
    shutil.copytree(tiny_base / "text_encoder", folder / "text_encoder")
    (folder / "unet").mkdir()
    (folder / "unet" / "config.json").write_text((tiny_base / "unet" / "config.json").read_text())
    with pytest.raises(bm.BaseModelError, match="cannot load the unet"):
        bm.load_base(folder)


def test_single_file_layout_errors(tiny_parts, tiny_configs, tmp_path):
    from safetensors.torch import save_file

    save_file({"foo.bar.weight": torch.zeros(2), "baz.weight": torch.zeros(2)}, str(tmp_path / "odd.safetensors"))
    with pytest.raises(bm.BaseModelError, match=r"no 'model.diffusion_model.\*' keys.*found: baz.weight, foo.bar"):
        bm.load_base(tmp_path / "odd.safetensors")
    unet = tiny_parts[0]
    save_file(unet.state_dict(), str(tmp_path / "offset.safetensors"))
    with pytest.raises(bm.BaseModelError, match="pass it as --weights"):
        bm.load_base(tmp_path / "offset.safetensors")
    path = _write_single(tiny_parts, tmp_path / "novae.safetensors", vae={})
    with pytest.raises(bm.BaseModelError, match=r"no vae \('first_stage_model.\*'\)"):
        bm.load_base(path, config_dir=tiny_configs)
    # tiny weights against the shipped SD1.5 configs: shapes do not match
    path = _write_single(tiny_parts, tmp_path / "tiny.safetensors")
    with pytest.raises(bm.BaseModelError, match="do not match the SD1.5 UNet.*another shape"):
        bm.load_base(path, unet_only=True)
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(bm.BaseModelError, match="cannot read as safetensors"):
        bm.load_base(tmp_path / "broken.safetensors")


class _Payload:
    """A pickle that would create a file when unpickled."""

    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_ckpt_with_a_non_tensor_pickle_is_refused_unopened(tmp_path):
    sentinel = tmp_path / "pwned"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1)}, "callback": _Payload(sentinel)},
               tmp_path / "evil.ckpt")
    with pytest.raises(bm.BaseModelError, match="refused.*never unpickled"):
        bm.load_base(tmp_path / "evil.ckpt")
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------------------
# IC-Light offsets on a base, random bases


@pytest.mark.parametrize("layout", ["diffusers", "ldm"])
def test_load_iclight_offset_rebuilds_the_trained_unet(tiny_parts, tmp_path, layout):
    from safetensors.torch import save_file

    base_unet = tiny_parts[0]
    model = build_iclight_model(ModelConfig(variant="fbc"), unet=copy.deepcopy(base_unet))
    with torch.no_grad():
        for p in model.unet.parameters():
            p.add_(0.01 * torch.randn_like(p))
    trained = model.unet.state_dict()
    offset = fmt.make_offset(trained, base_unet.state_dict())
    if layout == "ldm":
        offset = fmt.unet_to_ldm(offset, base_unet.config)
    save_file(offset, str(tmp_path / "offset.safetensors"))
    unet = bm.load_iclight_offset(copy.deepcopy(base_unet), tmp_path / "offset.safetensors")
    assert unet.config.in_channels == 12
    got = unet.state_dict()
    for k in trained:
        torch.testing.assert_close(got[k], trained[k], rtol=0, atol=1e-6)
    wrong = {k: v for k, v in fmt.make_offset(trained, base_unet.state_dict()).items() if k != "conv_out.bias"}
    with pytest.raises(bm.BaseModelError, match="conv_out.bias"):
        bm.load_iclight_offset(copy.deepcopy(base_unet), wrong)


def test_random_base_is_deterministic_and_leaves_the_rng_alone():
    from iclight_ds.config import load_config

    cfg = load_config(None, {"model.variant": "fbc", "train.seed": "3"})
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a, b = bm.random_base(cfg, unet_only=True), bm.random_base(cfg)
    assert torch.equal(torch.get_rng_state(), state)
    assert a.unet_hash == b.unet_hash and a.unet.config.in_channels == 4 and a.unet.dtype == torch.float32
    assert b.vae is not None and b.text_encoder is not None and not b.real_tokenizer
    other = bm.random_base(load_config(None, {"model.variant": "fbc", "train.seed": "4"}), unet_only=True)
    assert other.unet_hash != a.unet_hash


@pytest.mark.parametrize("vae", ["auto", "tiny-4x"])
def test_a_run_s_own_base_draws_images_at_its_resolution(vae):
    """relight --base RUN without --width/--height draws at the run's resolution through either shipped VAE
    (the pipeline's default size is unet sample_size x the VAE's downsampling)."""
    from iclight_ds.config import load_config

    base = bm.random_base(load_config(None, {"model.vae": vae}))
    scale = 2 ** (len(base.vae.config.block_out_channels) - 1)
    assert scale == (4 if vae == "tiny-4x" else 8)
    assert base.unet.config.sample_size * scale == 64

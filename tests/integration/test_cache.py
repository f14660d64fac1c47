"""The latent cache: round trip equals on-the-fly conditioning, resume, refusals by key, training from a cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.utils.data import default_collate

from helpers import losses, metrics, patch_everywhere, run_config, tiny_parts, write_base_folder
from iclight_ds.data import cache as cache_mod
from iclight_ds.data.cache import CacheError, CachedDataset, build_cache, run_expectations
from iclight_ds.data.dataset import RelightDataset
from iclight_ds.data.split import split_background
from iclight_ds.dtypes import DTYPES, dtype_name
from iclight_ds.model.frozen import build_frozen, encode_images
from iclight_ds.model.tokenizer import build_char_tokenizer
from iclight_ds.train.conditioning import condition_batch, condition_cached_batch

RES = 64


@pytest.fixture(scope="module")
def data(synthetic) -> Path:
    return synthetic(12, size=RES, seed=5, extras=False)


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def _cache(data, out, **kw):
    kw = {"batch_size": 4, "shard_size": 5, "progress": False, "validate": False, **kw}
    return build_cache(data, out, **kw)


def _batches(ds, cds, idx):
    return default_collate([ds[i] for i in idx]), default_collate([cds[i] for i in idx])


@pytest.mark.parametrize("frozen,stored,exact", [("fp32", "fp32", True), ("bf16", "bf16", True),
                                                 ("fp32", "bf16", False)])
def test_fc_cache_equals_on_the_fly_conditioning(data, tok, tmp_path, frozen, stored, exact):
    """FC: the same ConditionedBatch as condition_batch (and the same generator draws): exact when the cache stores
    the encoders' own dtype (latents are stored unscaled), within bf16 rounding otherwise."""
    _cache(data, tmp_path / "c", frozen_dtype=frozen, dtype=stored, seed=2)
    vae, te = build_frozen("tiny", seed=2, tokenizer=tok, dtype=DTYPES[frozen], device="cpu")
    ds = RelightDataset(data, RES, tok, require_env=True)
    cds = CachedDataset(tmp_path / "c", {"variant": "fc", "resolution": RES, "seed": 2, "frozen_dtype": frozen})
    assert len(cds) == len(ds) == 12
    batch, cached = _batches(ds, cds, [3, 7, 1, 10, 5])  # across the three shards
    assert cached["target"].dtype == DTYPES[stored] and cached["index"].tolist() == [3, 7, 1, 10, 5]
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    a = condition_batch(batch, vae=vae, text_encoder=te, variant="fc", split_cells=4, with_split=True, generator=g1,
                        device="cpu")
    b = condition_cached_batch(cached, variant="fc", split_cells=4, with_split=True, generator=g2, device="cpu")
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=2 ** -8, atol=1e-5)  # bf16: 8 significant bits
    for name in ("latents", "foreground", "text", "mask"):
        x, y = getattr(a, name), getattr(b, name)
        assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape
        torch.testing.assert_close(y, x, **tol, msg=name)
        if not exact and name != "mask":
            assert not torch.equal(x, y)  # the tolerance is really exercised
    assert a.background is None and b.background is None
    for x, y in zip(a.env, b.env):  # raw env map, split with the same random numbers
        assert torch.equal(x, y)
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))  # same draws consumed


def test_fbc_cache_holds_encoded_linear_light_splits(data, tok, tmp_path):
    """FBC: the background latent as on the fly; each of the K cached parts is the VAE encoding of the background
    split in linear light by its stored mask, and training picks one of the K per sample with the generator."""
    k = 3
    _cache(data, tmp_path / "c", variant="fbc", frozen_dtype="fp32", dtype="fp32", split_variants=k, split_cells=2)
    vae, te = build_frozen("tiny", seed=0, tokenizer=tok, dtype=torch.float32, device="cpu")
    ds = RelightDataset(data, RES, tok, require_background=True)
    cds = CachedDataset(tmp_path / "c", {"variant": "fbc", "split_cells": 2})
    batch, cached = _batches(ds, cds, [0, 6, 11])
    assert cached["background_parts"].shape == (3, k, 2, 4, RES // 8, RES // 8)
    assert cached["split_grid"].shape == (3, k, 1, 2, 4)
    a = condition_batch(batch, vae=vae, text_encoder=te, variant="fbc", split_cells=2, with_split=False,
                        generator=torch.Generator(), device="cpu")
    g = torch.Generator().manual_seed(1)
    b = condition_cached_batch(cached, variant="fbc", split_cells=2, with_split=True, generator=g, device="cpu")
    assert torch.equal(a.background[0], b.background[0]) and torch.equal(a.latents, b.latents)
    masks = F.interpolate(cached["split_grid"].flatten(0, 1).float(), size=(RES, RES), mode="nearest")
    under_m, under_rest = split_background(batch["background"].repeat_interleave(k, 0), masks)
    expect = torch.stack([encode_images(vae, under_m), encode_images(vae, under_rest)], 1).view(3, k, 2, 4, 8, 8)
    scale = vae.config.scaling_factor
    assert torch.equal(cached["background_parts"].float() * scale, expect)
    pick = torch.randint(0, k, (3,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(b.background[1], expect[torch.arange(3), pick, 0])
    assert torch.equal(b.background[2], expect[torch.arange(3), pick, 1])
    assert len(set(map(bytes, cached["split_grid"].flatten(1).numpy()))) > 1  # the K masks differ
    with pytest.raises(ValueError, match="split_cells is 4"):
        condition_cached_batch(cached, variant="fbc", split_cells=4, with_split=True, generator=g, device="cpu")


def test_interrupted_cache_resumes_to_identical_files(data, tmp_path, monkeypatch):
    ref = tmp_path / "ref"
    _cache(data, ref)
    out = tmp_path / "resumed"
    real_write, calls = cache_mod._write_shard, []

    def dies_on_second_shard(path, *args):
        calls.append(path.name)
        if len(calls) == 2:
            path.with_name(path.name + ".tmp").write_bytes(b"half a shard")  # what a kill mid-write leaves
            raise KeyboardInterrupt
        real_write(path, *args)

    monkeypatch.setattr(cache_mod, "_write_shard", dies_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        _cache(data, out)
    monkeypatch.setattr(cache_mod, "_write_shard", real_write)
    assert sorted(p.name for p in out.iterdir()) == ["cache.json", "shard_00000.safetensors",
                                                     "shard_00001.safetensors.tmp"]
    with pytest.raises(CacheError, match="incomplete cache \\(1/3 shards\\)"):
        CachedDataset(out)
    stats = _cache(data, out)
    assert stats["skipped_shards"] == 1 and stats["samples"] == 7
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in ref.iterdir()) and not any(n.endswith(".tmp") for n in names)
    for name in names[1:]:  # same tensors and metadata (the header's key order is not stable across writes)
        with safe_open(str(out / name), "pt") as x, safe_open(str(ref / name), "pt") as y:
            assert x.metadata() == y.metadata() and sorted(x.keys()) == sorted(y.keys())
            assert all(torch.equal(x.get_tensor(k), y.get_tensor(k)) for k in x.keys()), name
    assert json.loads((out / "cache.json").read_text())["identity"] == json.loads((ref / "cache.json").read_text())[
        "identity"]
    assert _cache(data, out)["samples"] == 0  # complete: nothing to do


@pytest.mark.parametrize("flag,value,key", [("--resolution", "32", "resolution"), ("--variant", "fbc", "variant"),
                                            ("--base", "some/sd15", "base"), ("--frozen-dtype", "fp32",
                                                                              "frozen_dtype")])
def test_cache_cli_refuses_to_append_other_settings(data, tmp_path, capsys, flag, value, key):
    from iclight_ds.data.cache import main

    args = ["--data", str(data), "--out", str(tmp_path / "c"), "--no-validate", "--shard-size", "6"]
    assert main(args) == 0
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()}
    capsys.readouterr()
    assert main(args + [flag, value]) == 2
    err = capsys.readouterr().err
    old = {"resolution": "64", "variant": "'fc'", "base": "None", "frozen_dtype": "'bf16'"}[key]
    assert f"built with {key}={old}" in err and f"{key}=" in err.split("but this command has")[1], err
    assert value.split("/")[-1] in err.split("but this command has")[1], err
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "c").iterdir()} == before  # untouched


def test_cache_of_real_weights_records_their_hash_and_refuses_changed_weights(data, tok, tmp_path):
    parts = tiny_parts(seed=0)  # its own: the VAE is changed below
    base = write_base_folder(tmp_path / "sd15", parts)
    vae = parts[1]
    _cache(data, tmp_path / "c", base=str(base), frozen_dtype="fp32", dtype="fp32")
    ident = json.loads((tmp_path / "c" / "cache.json").read_text())["identity"]
    assert ident["base"] == str(base.resolve()) and ident["base_hash"].startswith("sha256:") and ident["size"] is None
    cached = default_collate([CachedDataset(tmp_path / "c")[i] for i in (0, 1)])
    batch = default_collate([RelightDataset(data, RES, tok, require_env=True)[i] for i in (0, 1)])
    assert torch.equal(cached["target"].float() * 4.0, encode_images(vae.eval(), batch["target"]))
    with torch.no_grad():
        vae.encoder.conv_in.bias.add_(1.0)  # same path, other weights
    vae.save_pretrained(base / "vae")
    with pytest.raises(CacheError, match="built with base_hash='sha256:"):
        _cache(data, tmp_path / "c", base=str(base), frozen_dtype="fp32", dtype="fp32")


def _run_cfg(tmp_path, cache=None, **over):
    values = {"train.steps": "3", "train.export": "false", "train.warmup_steps": "0", "train.optimizer": "adamw",
              "data.num_workers": "1", **({"data.cache": str(cache)} if cache else {}), **over}
    return run_config(tmp_path / "run", overrides=values)


def test_run_expectations_name_every_key(data, tmp_path):
    _cache(data, tmp_path / "c")
    bf16 = torch.bfloat16
    CachedDataset(tmp_path / "c", run_expectations(_run_cfg(tmp_path), bf16))  # matches
    cases = [({"model.variant": "fbc"}, "variant='fc'"), ({"train.seed": "1"}, "seed=0"),
             ({"model.size": "full", "data.resolution": "256"}, "resolution=64"),
             ({"model.base": str(tmp_path)}, "base=None"), ({"model.frozen_dtype": "fp32"}, "frozen_dtype='bf16'"),
             ({"model.env_shape": "8,16"}, "env_shape=[16, 32]"), ({"data.path": str(tmp_path)}, "no manifest")]
    for over, needle in cases:
        with pytest.raises(CacheError, match=needle.replace("[", "\\[")):
            CachedDataset(tmp_path / "c", run_expectations(_run_cfg(tmp_path, **over), bf16))
    with pytest.raises(CacheError, match="frozen_dtype='bf16' but this run has frozen_dtype='fp32'"):
        CachedDataset(tmp_path / "c", run_expectations(_run_cfg(tmp_path), torch.float32))  # fp32 DeepSpeed JSON


def test_trainer_refuses_a_cache_for_another_resolution(data, tmp_path):
    from iclight_ds.train.trainer import Trainer

    _cache(data, tmp_path / "c")
    with pytest.raises(CacheError, match="resolution=64 but this run has resolution=32"):
        Trainer(_run_cfg(tmp_path, tmp_path / "c", **{"data.resolution": "32"}))


def test_trainer_trains_from_cache_as_it_would_on_the_fly(data, tmp_path, monkeypatch):
    """No VAE or text encoder is built; the loss is finite, the weights change, and since a bf16 cache of the bf16
    encoders is exact, the per-step losses equal those of the same run conditioning on the fly."""
    from iclight_ds.model import arch, frozen
    from iclight_ds.train.trainer import Trainer

    _cache(data, tmp_path / "c", seed=0)  # the defaults: tiny, bf16 encoders (cpu.json), bf16 storage

    def trained_losses(trainer):
        before = [p.detach().clone() for p in trainer.engine.module.parameters()]
        trainer.train()
        after = list(trainer.engine.module.parameters())
        assert any(not torch.equal(a, b) for a, b in zip(before, after))
        return list(losses(trainer.out_dir).values())

    on_the_fly = trained_losses(Trainer(_run_cfg(tmp_path / "a", None, **{"data.path": str(data)})))

    def no_frozen(*a, **k):
        raise AssertionError("the VAE / text encoder must not be built when training from a cache")

    patch_everywhere(monkeypatch, frozen, "build_frozen", no_frozen)
    patch_everywhere(monkeypatch, arch, "build_vae", no_frozen)
    patch_everywhere(monkeypatch, arch, "build_text_encoder", no_frozen)
    trainer = Trainer(_run_cfg(tmp_path / "b", tmp_path / "c", **{"data.path": str(data)}))
    assert trainer.vae is None and trainer.text_encoder is None and isinstance(trainer.dataset, CachedDataset)
    cached = trained_losses(trainer)
    assert len(cached) == 3 and all(map(torch.isfinite, torch.tensor(cached)))
    assert cached == on_the_fly


def test_cache_auto_encodes_once_and_trains_as_on_the_fly(data, synthetic, tmp_path, monkeypatch):
    """data.cache=auto: the trainer writes <output_dir>/latent_cache, steps through it with the losses of the same run
    conditioning on the fly (a bf16 cache of bf16 encoders is exact), keeps the frozen encoders for its previews and
    evaluation, and a resumed launch reuses the cache without encoding a sample again; the folder reused with other
    data refuses it."""
    from iclight_ds.train.trainer import Trainer

    on_the_fly = Trainer(_run_cfg(tmp_path / "a", None, **{"data.path": str(data)}))
    on_the_fly.train()
    auto = Trainer(_run_cfg(tmp_path / "b", "auto", **{"data.path": str(data)}))
    meta = json.loads((auto.out_dir / "latent_cache" / "cache.json").read_text())
    assert meta["complete"] and meta["identity"]["num_samples"] == 12
    assert isinstance(auto.train_set, CachedDataset) and isinstance(auto.dataset, RelightDataset)
    assert auto.vae is not None and auto.text_encoder is not None
    before = [p.detach().clone() for p in auto.engine.module.parameters()]
    auto.train()
    assert any(not torch.equal(a, b) for a, b in zip(before, auto.engine.module.parameters()))
    assert list(losses(auto.out_dir).values()) == list(losses(on_the_fly.out_dir).values())
    evals = [m for m in metrics(auto.out_dir) if "eval/psnr" in m]
    assert len(evals) == 1 and math.isfinite(evals[0]["eval/psnr"])  # the final evaluation decoded through the VAE
    assert list((auto.out_dir / "previews").glob("step_*.png"))

    def no_encoding(*a, **k):
        raise AssertionError("a complete latent cache must not be encoded again")

    monkeypatch.setattr(cache_mod, "encode_samples", no_encoding)
    resumed = Trainer(_run_cfg(tmp_path / "b", "auto", **{"data.path": str(data), "train.steps": "4",
                                                          "train.resume": "latest"}))
    assert resumed.step == 3 and len(resumed.train_set) == 12
    # the run folder reused with another dataset: its cache is refused by the key that differs, before step 1
    other = synthetic(6, size=RES, seed=6, extras=False)
    with pytest.raises(CacheError, match="dataset_hash"):
        Trainer(_run_cfg(tmp_path / "b", "auto", **{"data.path": str(other)}))


def test_cache_auto_with_real_weights_loads_the_base_once_and_writes_what_the_cache_command_writes(data, tmp_path,
                                                                                                   monkeypatch):
    """data.cache=auto with a base (VAE and text encoder stored in fp16; the trainer loads them in fp32): the trainer
    loads the base once and encodes with its own frozen encoders, and its cache equals, identity hash and tensors,
    the one `python -m iclight_ds.cache --base` writes for the same run from the weights as stored."""
    from iclight_ds.model import base as base_mod
    from iclight_ds.train.trainer import Trainer

    unet, vae, text_encoder, tok = tiny_parts(seed=4)
    base = write_base_folder(tmp_path / "sd15", (unet, vae.half(), text_encoder.half(), tok))
    loads, load_base = [], base_mod.load_base

    def counted(*a, **k):
        loads.append(a[0])
        return load_base(*a, **k)

    patch_everywhere(monkeypatch, base_mod, "load_base", counted)
    trainer = Trainer(_run_cfg(tmp_path / "b", "auto", **{"data.path": str(data), "model.base": str(base)}))
    assert len(loads) == 1
    frozen = dtype_name(next(trainer.vae.parameters()).dtype)
    reference = tmp_path / "reference"
    _cache(data, reference, base=str(base), seed=trainer.cfg.train.seed, frozen_dtype=frozen, dtype=frozen,
           batch_size=trainer.run.geometry.micro_batch, shard_size=256)
    auto = trainer.out_dir / "latent_cache"
    ours, theirs = (json.loads((d / "cache.json").read_text()) for d in (auto, reference))
    assert ours["identity"] == theirs["identity"] and ours["identity"]["base_hash"].startswith("sha256:")
    assert [s["file"] for s in ours["shards"]] == [s["file"] for s in theirs["shards"]]
    for shard in ours["shards"]:
        with safe_open(str(auto / shard["file"]), "pt") as a, safe_open(str(reference / shard["file"]), "pt") as b:
            assert sorted(a.keys()) == sorted(b.keys())
            for key in a.keys():
                assert torch.equal(a.get_tensor(key), b.get_tensor(key)), key
    trainer.train()  # and it trains from that cache, the frozen encoders kept for the final evaluation
    assert any("eval/psnr" in m for m in metrics(trainer.out_dir))


def test_cache_auto_is_refused_with_skip_bad(tmp_path):
    from iclight_ds.config import ConfigError

    with pytest.raises(ConfigError, match="data.skip_bad with data.cache=auto"):
        _run_cfg(tmp_path, "auto", **{"data.skip_bad": "true"})


"""A latent cache: every sample VAE- and text-encoded once by the frozen models, read back instead of encoded.

`python -m iclight_ds.cache --data DIR --out CACHE [--base MODEL | --size tiny|full --seed S] [--variant fc|fbc]
[--resolution R] [--batch-size B] [--split-variants K] [--dtype bf16|fp16|fp32] ...` writes

  CACHE/cache.json                    format, identity (what the cache is valid for), shards, complete flag
  CACHE/shard_00000.safetensors ...   `--shard-size` samples each, tensors stacked on a leading sample axis

Per sample (h, w = resolution / the VAE's downsampling, 8 or 4; K = split variants; c = split cells):
  target, foreground       (4, h, w)  UNSCALED VAE posterior mode (`--dtype`); the scaling factor is applied when read
  text                     (77, D)    text-encoder last hidden state (`--dtype`)
  mask                     (1, h, w)  fp32, area-downsampled as condition_batch does
  env                      (3, He, We) fp32, FC only: the raw HDR map, split at train time as now
  background               (4, h, w)  FBC only
  background_parts         (K, 2, 4, h, w)  FBC only: the background split in linear light under K random masks
                                      (m and 1 - m), each part VAE-encoded
  split_grid               (K, 1, c, 2c) uint8, FBC only: the masks, on their cell grid (m = nearest upsampling)
  index                    ()         int64, the sample's position in the manifest (RelightDataset index)
Sample ids are in each shard's metadata.

`CachedDataset(cache_dir, expect)` reads it (lazily, one memory-mapped shard handle per worker process) and
`conditioning.condition_cached_batch` turns a batch of it into the same ConditionedBatch `condition_batch` makes.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..config import DEFAULT_ENV_SHAPE
from ..dtypes import DTYPES, dtype_name
from ..model.arch import freeze
from ..model.base import is_run_dir, load_base, unet_hash
from ..model.frozen import build_frozen, encode_posterior_mode, vae_identity
from ..model.tokenizer import build_char_tokenizer
from .dataset import MANIFEST, RelightDataset, read_manifest
from .split import split_background, split_grid
from .validate import validate_dataset

log = logging.getLogger(__name__)

FORMAT, VERSION = "iclight-ds-latent-cache", 1
META = "cache.json"

# Identity key -> (run config key, cache CLI flag): named in every mismatch message.
KEYS = {
    "base": ("model.base", "--base"),
    "base_hash": ("model.base", "--base"),
    "size": ("model.size", "--size"),
    "vae": ("model.vae", "--vae"),
    "seed": ("train.seed", "--seed"),
    "frozen_dtype": ("model.frozen_dtype (auto: the DeepSpeed JSON's precision)", "--frozen-dtype"),
    "variant": ("model.variant", "--variant"),
    "resolution": ("data.resolution", "--resolution"),
    "env_shape": ("model.env_shape", "--env-shape"),
    "split_variants": ("-", "--split-variants"),
    "split_cells": ("objective.split_cells", "--split-cells (null: built with --split-variants 0)"),
    "dtype": ("-", "--dtype"),
    "dataset_hash": ("data.path", "--data (the manifest changed?)"),
    "num_samples": ("-", "--data"),
    "shard_size": ("-", "--shard-size"),
    "tokenizer": ("-", "--base"),
}


class CacheError(ValueError):
    """A cache folder that cannot be used (missing, incomplete, or built for something else); says which key."""



def manifest_hash(root: str | Path) -> str:
    """'sha256:<hex>' of the dataset's manifest.jsonl bytes (the image files themselves are not hashed)."""

    path = Path(root) / MANIFEST
    if not path.is_file():
        raise CacheError(f"no {MANIFEST} in {root}")
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


def identity_hash(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _mismatch(where: str, key: str, cached: Any, wanted: Any, wanted_by: str) -> str:
    cfg_key, flag = KEYS.get(key, ("-", "-"))
    names = "; ".join(f"{what}: {name}" for what, name in (("run config", cfg_key), ("cache CLI", flag)) if name != "-")
    return f"{where}: the cache was built with {key}={cached!r} but {wanted_by} has {key}={wanted!r} ({names})"


def check_identity(identity: dict, expect: dict, *, where: str, wanted_by: str) -> None:
    """Raise CacheError naming the first key (in `expect`'s order) whose value differs, with both values."""
    for key, wanted in expect.items():
        cached = identity.get(key, "<absent>")
        if cached != wanted:
            raise CacheError(_mismatch(where, key, cached, wanted, wanted_by))


def read_meta(cache_dir: str | Path) -> dict:
    path = Path(cache_dir) / META
    if not path.is_file():
        raise CacheError(f"{cache_dir}: no {META}: not a latent cache (make one with python -m iclight_ds.cache)")
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise CacheError(f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}; this code reads "
                         f"{FORMAT!r} version {VERSION}")
    return meta


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# What a training run expects of a cache


def run_expectations(cfg, training_dtype: torch.dtype) -> dict:
    """The identity keys a run config (`config.RunConfig`) needs a cache to have, with the run's values."""
    frozen = training_dtype if cfg.model.frozen_dtype == "auto" else DTYPES[cfg.model.frozen_dtype]
    expect: dict[str, Any] = {"variant": cfg.model.variant, "resolution": cfg.data.resolution}
    if cfg.model.base:
        expect["base"] = str(Path(cfg.model.base).resolve())
    else:  # random frozen models: rebuilt by conditioning.build_frozen from (size, seed, dtype)

        expect.update(base=None, size=cfg.model.size, vae=vae_identity(cfg.model.size, cfg.model.vae),
                      seed=cfg.train.seed)
    expect["frozen_dtype"] = dtype_name(frozen)
    if cfg.model.env_input:
        expect["env_shape"] = list(cfg.model.env_shape)
    elif cfg.model.variant == "fc":  # text-lit FC: no env maps cached (caches of env-lit FC have no such key)
        expect["light_input"] = cfg.model.light_input
    elif cfg.objective.lambda_consistency > 0:
        expect["split_cells"] = cfg.objective.split_cells
    if cfg.data.path:
        expect["dataset_hash"] = manifest_hash(cfg.data.path)
    return expect


class CachedDataset(torch.utils.data.Dataset):
    """Samples of a complete latent cache, in manifest order (index i here is RelightDataset index i).

    `expect`: identity keys and the values the caller needs (see `run_expectations`); a difference raises
    CacheError naming the key and both values. Shards are opened lazily with safetensors' memory map, once per
    process (the handles are not pickled: DataLoader workers open their own), and one sample is read per item.
    """

    def __init__(self, cache_dir: str | Path, expect: dict | None = None):
        self.root = Path(cache_dir)
        meta = read_meta(self.root)
        if not meta.get("complete"):
            done = sum(1 for s in meta["shards"] if (self.root / s["file"]).is_file())
            raise CacheError(f"{self.root}: incomplete cache ({done}/{len(meta['shards'])} shards): rerun the "
                             f"python -m iclight_ds.cache command that made it to finish it")
        self.identity = meta["identity"]
        check_identity(self.identity, expect or {}, where=str(self.root), wanted_by="this run")
        self.latent_scale = float(meta["latent_scale"])
        self.files = [self.root / s["file"] for s in meta["shards"]]
        self.starts = [s["first"] for s in meta["shards"]]
        self.length = self.identity["num_samples"]
        missing = [str(f) for f in self.files if not f.is_file()]
        if missing:
            raise CacheError(f"{self.root}: shard file(s) missing: {', '.join(missing[:3])}")
        self._handles: dict[int, Any] = {}

    def __len__(self) -> int:
        return self.length

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_handles": {}}

    def _shard(self, s: int):

        if s not in self._handles:
            self._handles[s] = safe_open(str(self.files[s]), framework="pt")
        return self._handles[s]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        s = bisect.bisect_right(self.starts, index) - 1
        f, j = self._shard(s), index - self.starts[s]
        sample: dict[str, Any] = {k: f.get_slice(k)[j] for k in f.keys()}
        sample["index"] = int(sample["index"])
        sample["latent_scale"] = self.latent_scale
        return sample


# ---------------------------------------------------------------------------------------------------------
# Building a cache


def split_seed(seed: int, index: int) -> int:
    """Seed of sample `index`'s K split masks: they depend only on (seed, index), so a resumed cache is identical."""
    return int.from_bytes(hashlib.sha256(f"iclight-ds split {seed} {index}".encode()).digest()[:7], "little")


def split_grids(count: int, cells: int, generator: torch.Generator) -> torch.Tensor:
    """(count, 1, cells, 2*cells) bool: the cell grids conditioning.split_masks draws (it upsamples them, nearest)."""
    return split_grid(count, cells, generator)


def _encode_latents(vae, images: torch.Tensor, chunk: int) -> torch.Tensor:
    """Unscaled posterior modes of (N, 3, H, W), `chunk` images per VAE call; no call gets a single image (on
    CPU a batch of one takes another convolution path whose last bits differ from the trainer's batches)."""

    bounds = list(range(0, images.shape[0], max(2, chunk))) + [images.shape[0]]
    if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
        del bounds[-2]
    return torch.cat([encode_posterior_mode(vae, images[a:b]) for a, b in zip(bounds, bounds[1:])])


@torch.no_grad()
def encode_samples(batch: dict, vae, text_encoder, *, variant: str, split_variants: int, split_cells: int, seed: int,
                   device, chunk: int, with_env: bool = True) -> dict[str, torch.Tensor]:
    """One collated RelightDataset batch -> the cached tensors (on the CPU, in the encoders' dtypes; mask/env fp32).
    with_env=False: FC without env maps (model.light_input=text)."""

    target = batch["target"].to(device)  # (B, 3, R, R)
    bsz = target.shape[0]
    images = [target, batch["foreground"].to(device)]
    grids = None
    if variant == "fbc":
        bg = batch["background"].to(device)
        images.append(bg)
        if split_variants:
            grids = torch.stack([split_grids(split_variants, split_cells, torch.Generator().manual_seed(
                split_seed(seed, int(i)))) for i in batch["index"]])  # (B, K, 1, c, 2c)
            masks = F.interpolate(grids.flatten(0, 1).float(), size=bg.shape[-2:], mode="nearest").to(device)
            images += list(split_background(bg.repeat_interleave(split_variants, 0), masks))  # 2 x (B*K, 3, R, R)
    latents = _encode_latents(vae, torch.cat(images), chunk).cpu()  # (N, 4, h, w)
    h, w = latents.shape[-2:]
    out = {
        "target": latents[:bsz],
        "foreground": latents[bsz: 2 * bsz],
        "text": text_encoder(batch["input_ids"].to(device)).last_hidden_state.cpu(),  # (B, 77, D)
        "mask": F.interpolate(batch["mask"].to(device).float(), size=(h, w), mode="area").cpu(),  # (B, 1, h, w)
        "index": torch.as_tensor(batch["index"], dtype=torch.int64),
    }
    if variant == "fc":
        if with_env:
            out["env"] = batch["env"].float()  # (B, 3, He, We)
    else:
        out["background"] = latents[2 * bsz: 3 * bsz]
        if grids is not None:
            parts = latents[3 * bsz:].view(2, bsz, split_variants, 4, h, w)  # (under m | under 1 - m, B, K, ...)
            out["background_parts"] = parts.permute(1, 2, 0, 3, 4, 5)  # (B, K, 2, 4, h, w)
            out["split_grid"] = grids.to(torch.uint8)
    return out


class FrozenModels(NamedTuple):
    """Frozen encoders a caller already has, for `build_cache(frozen=...)` (the trainer's, with data.cache=auto)."""

    vae: Any
    text_encoder: Any
    tokenizer: Any
    identity: dict  # `frozen_identity` of them (empty where no cache is written)


def frozen_identity(*, base, vae_model, text_encoder, real_tokenizer: bool, size: str, vae: str = "auto") -> dict:
    """The cache identity entries of frozen encoders: for a random base its (size, vae); for real weights at `base`
    the content hash of the VAE and text encoder, which `unet_hash` takes over fp32 values, so weights loaded in
    fp32 hash as they were stored in fp16 or bf16 (hash them before they are cast to a frozen dtype)."""
    if base is None:
        return {"base": None, "base_hash": None, "size": size, "vae": vae_identity(size, vae), "tokenizer": "char"}
    state = {f"vae.{k}": v for k, v in vae_model.state_dict().items()}
    state.update({f"text_encoder.{k}": v for k, v in text_encoder.state_dict().items()})
    return {"base": str(Path(base).resolve()), "base_hash": unet_hash(state), "size": None,
            "tokenizer": "base" if real_tokenizer else "char"}


def _frozen_models(*, base, size, seed, frozen_dtype, device, vae="auto") -> FrozenModels:
    """The frozen models of a random base of `size`, or of the real weights at `base` (loaded here)."""

    if base is None:
        tokenizer = build_char_tokenizer()  # what the trainer uses with random models
        vae_model, text_encoder = build_frozen(size, seed=seed, tokenizer=tokenizer, dtype=frozen_dtype,
                                               device=device, vae=vae)
        return FrozenModels(vae_model, text_encoder, tokenizer, frozen_identity(
            base=None, vae_model=vae_model, text_encoder=text_encoder, real_tokenizer=False, size=size, vae=vae))
    if vae != "auto":
        raise CacheError(f"--vae {vae}: with --base the base's own VAE is used (leave --vae auto)")
    path = Path(base).resolve()
    if path.is_dir() and is_run_dir(path):
        raise CacheError(f"--base {base} is an iclight-ds run folder; for a run with random weights use "
                         "--size <its model.size> --seed <its train.seed>, otherwise pass its model.base")
    loaded = load_base(path, dtype=None)
    identity = frozen_identity(base=path, vae_model=loaded.vae, text_encoder=loaded.text_encoder,
                               real_tokenizer=loaded.real_tokenizer, size=size)
    return FrozenModels(freeze(loaded.vae, frozen_dtype, device), freeze(loaded.text_encoder, frozen_dtype, device),
                        loaded.tokenizer, identity)


def _shard_is_complete(path: Path, ident: str, count: int) -> bool:

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # truncated or not a safetensors file: encode it again
        return False
    return meta.get("identity") == ident and meta.get("count") == str(count)


def build_cache(
    data: str | Path,
    out: str | Path,
    *,
    base: str | None = None, size: str = "tiny", vae: str = "auto", seed: int = 0, frozen_dtype: str = "bf16",
    variant: str = "fc", light_input: str = "env", resolution: int = 64, env_shape: tuple[int, int] = DEFAULT_ENV_SHAPE,
    split_variants: int = 4, split_cells: int = 4, dtype: str = "bf16", batch_size: int = 8, shard_size: int = 256,
    num_workers: int = 0, device: str | None = None, validate: bool = True, progress: bool = True,
    frozen: FrozenModels | None = None,
) -> dict:
    """Encode every sample of the dataset at `data` into the cache at `out` (resuming one that was interrupted).

    frozen: the encoders to use, already built by the caller for these (base, size, vae, seed, frozen_dtype, device);
    None builds them here (for real weights by loading the base).

    Returns {"samples": encoded now, "skipped_shards": already complete, "encode_s": seconds spent encoding and
    writing (models not counted), "build_s": seconds building the frozen models, "samples_per_s"}.
    """
    data, out = Path(data), Path(out)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    split_variants = split_variants if variant == "fbc" else 0  # FC splits its env map at train time: no VAE
    env_input = variant == "fc" and light_input == "env"  # text-lit FC: the light is in the prompt, no env maps
    samples, problems = read_manifest(data, require_background=variant == "fbc", require_env=env_input)
    if problems:
        raise CacheError(f"{data}: {len(problems)} manifest problem(s), e.g. {problems[0].format()}; "
                         f"python -m iclight_ds.data.validate {data} lists them")
    partial = {  # everything but the model identity, checked before any model is built
        "seed": seed, "frozen_dtype": frozen_dtype, "variant": variant, "resolution": resolution,
        "env_shape": list(env_shape) if env_input else None, "split_variants": split_variants,
        "split_cells": split_cells if split_variants else None, "dtype": dtype,
        "dataset_hash": manifest_hash(data), "num_samples": len(samples), "shard_size": shard_size,
        **({"light_input": light_input} if variant == "fc" and not env_input else {}),
    }
    old = _existing_cache(out, partial, base=base, size=size, vae=vae)
    if validate and old is None:
        bad = validate_dataset(data, env_shape=env_shape, require_background=variant == "fbc",
                               require_env=env_input)
        if bad:
            raise CacheError(f"{data}: {len(bad)} problem(s), e.g. {bad[0].format()}; python -m "
                             f"iclight_ds.data.validate {data} lists them (--no-validate skips this check)")
    t0 = time.perf_counter()
    vae, text_encoder, tokenizer, model_identity = frozen or _frozen_models(
        base=base, size=size, seed=seed, frozen_dtype=DTYPES[frozen_dtype], device=device, vae=vae)
    build_s = time.perf_counter() - t0
    identity = {**model_identity, **partial}
    if old is not None:  # the content hash of real weights is only known now
        check_identity(old["identity"], identity, where=str(out), wanted_by="this command")
    ident = identity_hash(identity)
    shards = [{"file": f"shard_{s:05d}.safetensors", "first": a, "count": min(shard_size, len(samples) - a)}
              for s, a in enumerate(range(0, len(samples), shard_size))]
    meta = {"format": FORMAT, "version": VERSION, "identity": identity, "identity_hash": ident,
            "latent_scale": float(vae.config.scaling_factor), "dataset": str(data.resolve()), "shards": shards,
            "complete": False}
    out.mkdir(parents=True, exist_ok=True)
    for tmp in out.glob("*.tmp"):  # left by an interrupted run
        tmp.unlink()
    _write_json(out / META, meta)

    todo = [s for s in shards if not _shard_is_complete(out / s["file"], ident, s["count"])]
    ds = RelightDataset(data, resolution, tokenizer, env_shape=env_shape, require_background=variant == "fbc",
                        require_env=env_input)
    bar = tqdm(total=len(samples), initial=len(samples) - sum(s["count"] for s in todo), unit="sample",
               desc=f"cache {out.name}", dynamic_ncols=True, disable=not progress)
    t0 = time.perf_counter()
    encode = dict(variant=variant, with_env=env_input, split_variants=split_variants, split_cells=split_cells,
                  seed=seed, device=device,
                  chunk=2 * batch_size)
    _encode_shards(ds, todo, out, [s.id for s in samples], vae, text_encoder, encode=encode, storage=DTYPES[dtype],
                   ident=ident, batch_size=batch_size, num_workers=num_workers, bar=bar)
    bar.close()
    encode_s = time.perf_counter() - t0
    meta["complete"] = True
    _write_json(out / META, meta)
    done = sum(s["count"] for s in todo)
    return {"samples": done, "skipped_shards": len(shards) - len(todo), "encode_s": encode_s, "build_s": build_s,
            "samples_per_s": done / encode_s if encode_s > 0 else float("nan")}


def _existing_cache(out: Path, partial: dict, *, base: str | None, size: str, vae: str) -> dict | None:
    """The metadata of the cache already at `out` (checked against this command, before any model is built), None
    for a new one; a folder that holds something else is refused."""
    if (out / META).is_file():
        old = read_meta(out)
        model_keys = {"size": size, "vae": vae_identity(size, vae)} if base is None else {}
        wanted_base = None if base is None else str(Path(base).resolve())
        check_identity(old["identity"], {"base": wanted_base, **model_keys, **partial}, where=str(out),
                       wanted_by="this command")
        return old
    if out.is_dir() and any(p for p in out.iterdir() if not p.name.endswith(".tmp")):
        raise CacheError(f"{out} exists and is not a latent cache (no {META}): choose an empty or new folder")
    return None


def _encode_shards(ds, todo: list[dict], out: Path, ids: list[str], vae, text_encoder, *, encode: dict,
                   storage: torch.dtype, ident: str, batch_size: int, num_workers: int, bar) -> None:
    """Encode the samples of the shards in `todo` in batches and write each shard as soon as it is whole."""
    batches = [list(range(a, min(a + batch_size, s["first"] + s["count"])))
               for s in todo for a in range(s["first"], s["first"] + s["count"], batch_size)]
    pending: list[dict] = []
    shard_iter = iter(todo)
    shard = next(shard_iter, None)
    for batch in DataLoader(ds, batch_sampler=batches, num_workers=num_workers):
        pending.append(encode_samples(batch, vae, text_encoder, **encode))
        bar.update(len(batch["index"]))
        if sum(len(p["index"]) for p in pending) == shard["count"]:
            _write_shard(out / shard["file"], pending, storage, ident,
                         ids[shard["first"]:shard["first"] + shard["count"]], save_file)
            pending, shard = [], next(shard_iter, None)


def _write_shard(path: Path, parts: list[dict], storage: torch.dtype, ident: str, ids: list[str], save_file) -> None:
    """Stack the batches' tensors and write them atomically (tmp + rename): a shard file is always complete."""
    tensors = {}
    for key in parts[0]:
        t = torch.cat([p[key] for p in parts])
        if key in ("target", "foreground", "text", "background", "background_parts"):
            t = t.to(storage)
            if not torch.isfinite(t).all():
                raise CacheError(f"{path.name}: {key} is not finite in {dtype_name(storage)} (fp16 overflow? use "
                                 "--dtype bf16)")
        tensors[key] = t.contiguous()
    first = int(tensors["index"][0])
    if not torch.equal(tensors["index"], torch.arange(first, first + len(ids))):
        raise CacheError(f"{path.name}: samples out of order (a dataset that skips bad samples?)")
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={"identity": ident, "count": str(len(ids)), "ids": json.dumps(ids)})
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------------------
# CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m iclight_ds.cache", description=(
        "Encode a relighting dataset once with the frozen VAE and text encoder; train from it with "
        "--data.cache CACHE. Rerunning the same command resumes an interrupted cache."))
    p.add_argument("--data", required=True, help="dataset folder with manifest.jsonl")
    p.add_argument("--out", required=True, help="cache folder (created; an existing cache is resumed)")
    p.add_argument("--base", default=None, help="SD1.5 weights (diffusers folder or single file); default: random "
                   "models built from configs, as the trainer builds them for --model.size/--train.seed")
    p.add_argument("--size", choices=("tiny", "full"), default="tiny", help="random models' size (model.size)")
    p.add_argument("--vae", default="auto", help="model.vae of the run (random models only): auto (the shipped "
                   "trained tiny VAE for --size tiny), tiny-4x (the shipped 4x one), random, or a file from python -m iclight_ds.tiny_vae")
    p.add_argument("--seed", type=int, default=0, help="the run's train.seed (random frozen models; split masks)")
    p.add_argument("--frozen-dtype", choices=tuple(DTYPES), default="bf16",
                   help="dtype the VAE/text encoder run in: the run's model.frozen_dtype, 'auto' there meaning the "
                   "DeepSpeed JSON's precision (bf16 in every shipped config)")
    p.add_argument("--variant", choices=("fc", "fbc"), default="fc")
    p.add_argument("--light-input", choices=("env", "text"), default="env",
                   help="FC: model.light_input of the run (text: no env maps are read or stored)")
    p.add_argument("--resolution", type=int, default=64, help="data.resolution")
    p.add_argument("--env-shape", type=int, nargs=2, default=DEFAULT_ENV_SHAPE, metavar=("H", "W"), help="model.env_shape")
    p.add_argument("--split-variants", type=int, default=4,
                   help="FBC: random light splits cached per sample; training picks one per step (0: none)")
    p.add_argument("--split-cells", type=int, default=4, help="objective.split_cells")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bf16", help="storage dtype of latents and text")
    p.add_argument("--batch-size", type=int, default=8, help="samples per encoding step")
    p.add_argument("--shard-size", type=int, default=256, help="samples per shard file")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers decoding images")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--no-validate", action="store_true", help="skip decoding and checking every file first")
    args = p.parse_args(argv)
    if args.resolution % 8 or args.resolution < 32:
        p.error("--resolution must be a multiple of 8 and >= 32")
    if args.split_variants < 0 or args.split_cells < 1 or args.batch_size < 1 or args.shard_size < 1:
        p.error("--split-variants >= 0, --split-cells, --batch-size and --shard-size >= 1")
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        stats = build_cache(
            args.data, args.out, base=args.base, size=args.size, vae=args.vae, seed=args.seed,
            frozen_dtype=args.frozen_dtype,
            variant=args.variant, light_input=args.light_input, resolution=args.resolution, env_shape=tuple(args.env_shape),
            split_variants=args.split_variants, split_cells=args.split_cells, dtype=args.dtype,
            batch_size=args.batch_size, shard_size=args.shard_size, num_workers=args.num_workers,
            device=args.device, validate=not args.no_validate)
    except ValueError as e:  # CacheError, DatasetError (a file that fails to load), BaseModelError: one line each
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: {stats['samples']} sample(s) encoded ({stats['samples_per_s']:.1f}/s), "
          f"{stats['skipped_shards']} complete shard(s) kept")
    return 0


if __name__ == "__main__":
    sys.exit(main())

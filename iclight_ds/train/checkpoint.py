"""Checkpoints: DeepSpeed's engine state plus a small client state, written so a crash never damages the last one.

Layout under <output_dir>/checkpoints/:
    step_00000100/          DeepSpeed files + config.json + resolved.json (the optimizer and config `auto` chose) +
                            rng_rank<R>.pt (each rank's random streams)
    latest                  the tag of the newest COMPLETE checkpoint (replaced atomically after the rename)
A save goes to `.tmp-<tag>/` first; only a finished folder is renamed to its tag, and only then `latest` moves.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from .. import config
from ..config import RESOLVED_FILE
from . import engine as eng

log = logging.getLogger(__name__)

LATEST = "latest"
MANIFEST = "manifest.json"  # written last, before the rename: every file's relative path, size and sha256
MANIFEST_FORMAT = "iclight-ds checkpoint manifest v1"
RESOLVED = RESOLVED_FILE  # the run's resolved record (train/resolve.py), beside each checkpoint's config.json


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rng_state(generator: torch.Generator) -> dict:
    """Every random stream of this rank, as tensors and plain values (loadable with weights_only=True)."""
    state = {
        "torch": torch.get_rng_state(),
        "generator": generator.get_state(),
        "numpy": _numpy_state_to_tensors(np.random.get_state()),
        "python": repr(random.getstate()),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict, generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    generator.set_state(state["generator"])
    np.random.set_state(_numpy_state_from_tensors(state["numpy"]))
    random.setstate(ast.literal_eval(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _numpy_state_to_tensors(st) -> dict:
    return {"keys": torch.from_numpy(st[1].astype(np.int64)), "pos": st[2], "has_gauss": st[3], "gauss": st[4]}


def _numpy_state_from_tensors(d) -> tuple:
    return ("MT19937", d["keys"].numpy().astype(np.uint32), int(d["pos"]), int(d["has_gauss"]), float(d["gauss"]))


class CheckpointError(RuntimeError):
    """A save failed (disk full, permission...); the previous checkpoint and `latest` are untouched."""


def save(engine, root: Path, *, step: int, client_state: dict, config: dict, generator, rank: int,
         keep: int = 0, resolved: dict | None = None, rank0_files: dict | None = None) -> Path:
    """Collective: every rank calls it, and every rank learns whether it succeeded. Returns the final folder.

    `resolved`: what the run's `auto` settings resolved to (resolved.json), so that a resume builds the same.
    `rank0_files`: {file name: write(path)} that rank 0 adds to the checkpoint (the EMA weights).

    Ranks write their parts into `.tmp-<tag>/`; only when all succeeded does rank 0 rename it to `<tag>/` and
    move `latest`. On any failure the temporary folder is removed and CheckpointError says why.
    """
    tag = tag_for(step)
    tmp, final = root / f".tmp-{tag}", root / tag
    error = ""
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)  # debris of an earlier crashed save
    except OSError as e:
        error = f"{e}"
    eng.barrier()
    try:
        eng.save_checkpoint(engine, root, tmp.name, client_state)
        torch.save(rng_state(generator), tmp / f"rng_rank{rank}.pt")
        if rank == 0:
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            if resolved is not None:
                (tmp / RESOLVED).write_text(json.dumps(resolved, indent=2) + "\n")
            for name, write in (rank0_files or {}).items():
                write(tmp / name)
    except Exception as e:  # noqa: BLE001  any failed write (OSError; torch.save's RuntimeError on a full disk;
        # safetensors' own error) must reach the all-reduce below, so that every rank learns of it
        error = error or f"{type(e).__name__}: {e}"
    failed = eng.all_reduce_max(torch.tensor(1.0 if error else 0.0)).item() > 0
    if not failed and rank == 0:
        try:
            write_manifest(tmp)
            if final.exists():  # re-saving the same step (e.g. after a resume): the new one replaces it
                shutil.rmtree(final)
            os.replace(tmp, final)
            _write_atomic(root / LATEST, tag)
        except OSError as e:
            error = f"{e}"
    failed = eng.all_reduce_max(torch.tensor(1.0 if error else 0.0)).item() > 0
    if failed:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        eng.barrier()
        previous = latest_tag(root)
        raise CheckpointError(
            f"saving checkpoint {final} failed ({error or 'on another rank'}); "
            f"the previous checkpoint is untouched: {root / previous if previous else 'none yet'}"
        )
    if rank == 0 and keep > 0:
        prune(root, keep)
    eng.barrier()
    return final


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints; never the one `latest` names."""
    current = latest_tag(root)
    tags = sorted(p for p in root.glob("step_*") if p.is_dir())
    doomed = [p for p in tags[:-keep] if p.name != current]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def latest_tag(root: Path) -> str | None:
    path = root / LATEST
    return path.read_text().strip() if path.is_file() else None


def resolve(resume: str, default_root: Path) -> tuple[Path, str]:
    """'latest' -> (root, tag from the latest file); a checkpoint folder -> (its parent, its name)."""
    if resume == "latest":
        tag = latest_tag(default_root)
        if tag is None:
            raise FileNotFoundError(f"--resume latest: no complete checkpoint in {default_root} (no '{LATEST}' file)")
        return default_root, tag
    path = Path(resume)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"--resume {resume}: not a checkpoint folder (expected {path / 'config.json'})")
    return path.parent, path.name


def read_resolved(folder: Path) -> dict:
    """A checkpoint's resolved record ({} for a checkpoint without one); an unreadable one is a CheckpointError."""
    try:
        return config.read_resolved(folder)
    except config.ConfigError as e:
        raise CheckpointError(str(e)) from e


def _sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_manifest(folder: Path) -> Path:
    """Record every file of a checkpoint folder (relative path, size, sha256) in MANIFEST, atomically."""
    files = [{"path": p.relative_to(folder).as_posix(), "size": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST]
    _write_atomic(folder / MANIFEST, json.dumps({"format": MANIFEST_FORMAT, "files": files}, indent=1) + "\n")
    return folder / MANIFEST


def verify(folder: Path, *, unverified_ok: bool = False) -> None:
    """Check a checkpoint folder against its MANIFEST before anything in it is unpickled (DeepSpeed reads its own
    files with weights_only=False): a modified, truncated, missing or extra file is refused by name. A folder
    without a manifest is refused unless `unverified_ok` (--resume-unverified), which logs that it was not checked."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        if unverified_ok:
            log.warning("%s has no %s: loading it unverified, as asked (--resume-unverified)", folder, MANIFEST)
            return
        raise CheckpointError(f"{folder}: no {MANIFEST}, so its files cannot be checked before DeepSpeed unpickles "
                              "them; if you trust this checkpoint, pass --resume-unverified (train.resume_unverified)")
    try:
        record = json.loads(manifest.read_text())
        listed = {e["path"]: e for e in record["files"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest}: unreadable ({e})") from e
    if record.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"{manifest}: not a '{MANIFEST_FORMAT}' manifest")
    present = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    problems = [f"{name}: missing" for name in sorted(set(listed) - present)]
    problems += [f"{name}: not in the manifest (an extra file)" for name in sorted(present - set(listed))]
    for name in sorted(set(listed) & present):
        size = (folder / name).stat().st_size
        if size != listed[name]["size"]:
            problems.append(f"{name}: {size} bytes, the manifest says {listed[name]['size']} (truncated?)")
        elif _sha256(folder / name) != listed[name]["sha256"]:
            problems.append(f"{name}: its sha256 differs from the manifest's (modified)")
    if problems:
        raise CheckpointError(f"{folder} fails its manifest, refused before loading: " + "; ".join(problems))


def load(engine, root: Path, tag: str, *, generator, rank: int, unverified_ok: bool = False) -> dict:
    """Collective: verify the checkpoint (rank 0, against its manifest), then restore the engine and this rank's
    random streams, and return the client state."""
    error = None
    if rank == 0:
        try:
            verify(root / tag, unverified_ok=unverified_ok)
        except CheckpointError as e:
            error = e
    box = [error]
    if torch.distributed.is_initialized():
        torch.distributed.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise box[0]
    saved_ranks = len(list((root / tag).glob("rng_rank*.pt")))
    world_size = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    if saved_ranks != world_size:
        raise RuntimeError(
            f"{root / tag} was written by {saved_ranks} rank(s), this run has {world_size}: exact resume needs the "
            "same world size (per-rank random streams and data shards); relaunch with the original rank count"
        )
    client_state = eng.load_checkpoint(engine, root, tag)
    restore_rng_state(torch.load(root / tag / f"rng_rank{rank}.pt", weights_only=True), generator)
    return client_state

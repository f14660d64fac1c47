"""Checkpoint integrity: every save writes a manifest (path, size, sha256 of each file) last; resume and export check
it before anything is unpickled, refusing a modified, truncated, missing or extra file by name."""

import json
import shutil

import pytest

from iclight_ds.config import load_config
from iclight_ds.train import checkpoint as ckpt
from iclight_ds.train.checkpoint import MANIFEST, CheckpointError, verify
from iclight_ds.train.export import main as export_main
from iclight_ds.train.trainer import Trainer

QUIET = {"logging.wandb": False, "logging.progress": False, "logging.preview_every": 0, "logging.eval_every": 0,
         "logging.tensorboard": False, "data.num_workers": 0, "train.ds_config": "cpu-1rank", "train.export": False}


@pytest.fixture(scope="module")
def data(synthetic):
    return synthetic(16, seed=5)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data):
    """A 2-step run of the tiny model; its checkpoint is copied for each test that damages it."""
    out = tmp_path_factory.mktemp("integrity") / "run"
    Trainer(load_config(None, {**QUIET, "train.output_dir": str(out), "data.path": str(data),
                               "train.steps": 2})).train()
    return out


@pytest.fixture
def run(trained, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


@pytest.fixture
def resume_over(data, run):
    return {**QUIET, "train.output_dir": str(run), "data.path": str(data), "train.steps": 3,
            "train.resume": "latest"}


def _step(run):
    return run / "checkpoints" / "step_00000002"


def test_a_save_writes_a_manifest_of_every_file(run):
    folder = _step(run)
    record = json.loads((folder / MANIFEST).read_text())
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST}
    assert {e["path"] for e in record["files"]} == files
    assert {"config.json", "resolved.json", "rng_rank0.pt", "mp_rank_00_model_states.pt"} <= files
    assert all(len(e["sha256"]) == 64 and e["size"] == (folder / e["path"]).stat().st_size for e in record["files"])
    verify(folder)  # an intact checkpoint passes


@pytest.mark.parametrize("damage, message", [
    ("modify", "mp_rank_00_model_states.pt: its sha256 differs"),
    ("truncate", "mp_rank_00_model_states.pt: .* bytes, the manifest says .* \\(truncated\\?\\)"),
    ("remove", "rng_rank0.pt: missing"),
    ("extra", "payload.pt: not in the manifest"),
])
def test_a_damaged_checkpoint_is_refused_by_name(run, damage, message):
    folder = _step(run)
    states = folder / "mp_rank_00_model_states.pt"
    if damage == "modify":
        data = bytearray(states.read_bytes())
        data[len(data) // 2] ^= 0xFF
        states.write_bytes(bytes(data))
    elif damage == "truncate":
        states.write_bytes(states.read_bytes()[:-100])
    elif damage == "remove":
        (folder / "rng_rank0.pt").unlink()
    else:
        (folder / "payload.pt").write_bytes(b"not ours")
    with pytest.raises(CheckpointError, match=message):
        verify(folder)


def test_resume_checks_the_manifest_before_loading(run, resume_over):
    cfg = load_config(None, resume_over)
    states = _step(run) / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[100] ^= 0x01  # one bit
    states.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="fails its manifest.*mp_rank_00_model_states.pt"):
        Trainer(cfg)


def test_a_checkpoint_without_manifest_needs_resume_unverified(run, resume_over):
    (_step(run) / MANIFEST).unlink()
    with pytest.raises(CheckpointError, match="--resume-unverified"):
        Trainer(load_config(None, resume_over))
    trainer = Trainer(load_config(None, {**resume_over, "train.resume_unverified": True}))
    assert trainer.step == 2
    trainer.train()
    ckpt.verify(run / "checkpoints" / "step_00000003")  # the new save has its manifest again


def test_export_verifies_too(run, tmp_path, capsys):
    states = _step(run) / "mp_rank_00_model_states.pt"
    states.write_bytes(states.read_bytes() + b"tail")
    assert export_main(["--run", str(run), "--out", str(tmp_path / "out")]) == 2
    assert "mp_rank_00_model_states.pt" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    (_step(run) / MANIFEST).unlink()
    assert export_main(["--run", str(run), "--out", str(tmp_path / "out")]) == 2
    states.write_bytes(states.read_bytes()[:-4])  # the bytes as saved, now without a manifest
    assert export_main(["--run", str(run), "--out", str(tmp_path / "out"), "--unverified"]) == 0
    assert (tmp_path / "out" / "unet.safetensors").is_file()

"""The trainer's own synthetic scenes (iclight_ds.train.build.make_synthetic): rewritten for another count, and
rendered by the generator's CLI in a separate interpreter when the set is big."""

from __future__ import annotations

from pathlib import Path

from helpers import file_bytes
from iclight_ds.config import load_config
from iclight_ds.data import synth
from iclight_ds.train import build


def _make_synthetic(root: Path, n: int, seed: int, target_shift: float = 0.0) -> None:
    """What the trainer does for data.synth_samples=n with the default config."""
    cfg = load_config(None)
    build.make_synthetic(root, n, seed=seed, resolution=cfg.data.resolution, env_shape=cfg.model.env_shape,
                         target_shift=target_shift)


def test_the_trainer_rewrites_its_synthetic_folder_for_another_count(tmp_path):
    """A run folder reused with another data.synth_samples gets that many scenes, not the old set."""
    root = tmp_path / "data"
    _make_synthetic(root, 3, seed=0)
    first = (root / "target" / "000001.png").read_bytes()
    _make_synthetic(root, 5, seed=0)
    assert len((root / "manifest.jsonl").read_text().splitlines()) == 5
    assert (root / "target" / "000001.png").read_bytes() == first  # scene i depends on (seed, i) only
    stamp = (root / "manifest.jsonl").stat().st_mtime_ns
    _make_synthetic(root, 5, seed=0)  # the same count: kept as it is
    assert (root / "manifest.jsonl").stat().st_mtime_ns == stamp


def test_the_trainer_renders_big_sets_in_a_separate_interpreter(tmp_path, monkeypatch):
    """With several render processes the trainer runs the generator's CLI (its pool workers then import numpy, not
    the trainer's torch/deepspeed); the files are those of the in-process generator."""
    monkeypatch.setattr(build, "SCENES_PER_RENDER_PROCESS", 2)
    monkeypatch.setattr(build.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    runs = []
    real_run = build.subprocess.run
    monkeypatch.setattr(build.subprocess, "run", lambda cmd, **kw: runs.append(cmd) or real_run(cmd, **kw))
    _make_synthetic(tmp_path / "cli", 4, seed=5)
    (cmd,) = runs
    assert cmd[1:3] == ["-m", "iclight_ds.data.synth"] and cmd[cmd.index("--workers") + 1] == "2"
    in_process = synth.generate(tmp_path / "direct", 4, size=64, seed=5)
    assert file_bytes(tmp_path / "cli") == file_bytes(in_process)
    _make_synthetic(tmp_path / "shifted", 4, seed=5, target_shift=0.5)  # imperfect supervision through the CLI too
    assert file_bytes(tmp_path / "shifted") == file_bytes(synth.generate(tmp_path / "direct-shifted", 4, size=64,
                                                                         seed=5, target_shift=0.5))

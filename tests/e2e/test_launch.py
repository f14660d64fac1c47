"""launch/train.sh itself: which interpreter it runs, and what it passes on."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from helpers import REPO


def _fake_python3(bin_dir: Path, record: Path, gpus: int) -> None:
    """A stand-in `python3` that answers the GPU count and records how the trainer would be started."""
    script = bin_dir / "python3"
    script.write_text(f'#!/bin/sh\nif [ "$1" = "-c" ]; then echo {gpus}; exit 0; fi\necho "$@" > "{record}"\n')
    script.chmod(0o755)


def test_runs_python3_where_there_is_no_python(tmp_path):
    """CUDA images often have only python3; the launcher used to count 1 GPU silently when `python` was missing."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    record = tmp_path / "argv.txt"
    _fake_python3(bin_dir, record, gpus=1)
    env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
    env["PATH"] = f"{bin_dir}:/usr/bin:/bin"  # no `python` on this PATH (the image's /usr/bin has only python3)
    assert subprocess.run(["sh", "-c", "command -v python"], env=env, capture_output=True).returncode != 0
    proc = subprocess.run(["bash", "launch/train.sh", "--launcher", "python", "--train.steps", "3"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert record.read_text().split() == ["-m", "iclight_ds.train", "--train.steps", "3"]


def test_gpu_count_failure_is_an_error_not_one_gpu(tmp_path):
    """A python that cannot import torch must stop the launch, not start one rank on a many-GPU machine."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    broken = bin_dir / "python"
    broken.write_text('#!/bin/sh\necho "ModuleNotFoundError: No module named torch" >&2\nexit 1\n')
    broken.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:/usr/bin:/bin")
    env.pop("PYTHON", None)
    proc = subprocess.run(["bash", "launch/train.sh", "--launcher", "python"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "could not count the GPUs with" in proc.stderr and "is torch installed" in proc.stderr

"""Where a bench result comes from, written into every JSON under bench/results/ as its `provenance` field.

    from bench.provenance import provenance, write_result
    result = {"provenance": provenance("bench/memory.py", sys.argv[1:]), ...}
    write_result(out, result)

    python bench/provenance.py SCRIPT [ARG ...]   # the same as JSON on stdout, for a shell script's result

The fields: `script` and `command` (the full command line); `git_commit` and `git_dirty` (tracked files other than
bench/results/ changed against that commit: an earlier result rewritten does not count); `date` (UTC, ISO 8601);
`cpu` and `cores`; `gpu` and `gpu_count` (torch's name of CUDA device 0 and the device count; null and 0 without
one); `versions` (python, torch, its CUDA, deepspeed, diffusers, transformers, bitsandbytes, peft: the installed
version, null where a package is not installed).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("torch", "deepspeed", "diffusers", "transformers", "bitsandbytes", "peft")
FIELDS = ("script", "command", "git_commit", "git_dirty", "date", "cpu", "cores", "gpu", "gpu_count", "versions")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True,
                              timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def gpus() -> tuple[str | None, int]:
    """torch's name of CUDA device 0 and the device count; (None, 0) without CUDA or without torch."""
    try:
        import torch
    except ImportError:
        return None, 0
    if not torch.cuda.is_available():
        return None, 0
    return torch.cuda.get_device_name(0), torch.cuda.device_count()


def write_result(path: str | Path, result: dict, *, indent: int = 2) -> Path:
    """Write a bench result as JSON (its folder made if needed) and say where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=indent) + "\n")
    print(f"wrote {path}")
    return path


def provenance(script: str, argv: list[str], *, command: str | None = None) -> dict:
    """`script` relative to the repository (bench/x.py), `argv` its arguments; `command` replaces the command
    line built from them (`python SCRIPT ARGS`, `bash SCRIPT ARGS` for a .sh), e.g. to add the environment."""
    runner = "bash" if script.endswith(".sh") else Path(sys.executable).name
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ".", ":(exclude)bench/results")
    gpu, gpu_count = gpus()
    versions = {"python": platform.python_version(), **{name: _version(name) for name in PACKAGES}}
    try:
        import torch

        versions.update(torch=torch.__version__, cuda=torch.version.cuda)  # the local tag (+cu130) too
    except ImportError:
        versions["cuda"] = None
    return {"script": script, "command": command or shlex.join([runner, script, *argv]),
            "git_commit": _git("rev-parse", "HEAD"), "git_dirty": None if status is None else bool(status),
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "cpu": cpu_name(), "cores": os.cpu_count(),
            "gpu": gpu, "gpu_count": gpu_count, "versions": versions}


if __name__ == "__main__":
    if len(sys.argv) < 2:
        raise SystemExit("usage: provenance.py SCRIPT [ARG ...]")
    print(json.dumps(provenance(sys.argv[1], sys.argv[2:])))

"""How busy the GPU is: nvidia-smi's utilization.gpu sampled in the background, for a block of code or a command.

    python bench/gpu_busy.py --out FILE [--limit-s S] [--metrics RUN/metrics.jsonl] [--gpu I] -- COMMAND ...

utilization.gpu is the share of the driver's last sample period (1/6 s to 1 s, by GPU) in which at least one kernel
ran: 100% means the GPU never waited for the host, not that its SMs were full. The sampler polls every 100 ms and
keeps (time, value) pairs; `busy()` is their mean, from a given time on. Where nvidia-smi cannot be run (a CPU-only
machine) every answer is None: nothing is estimated.

The command form runs COMMAND (e.g. `bash launch/train.sh --output-dir RUN`) under the sampler for at most --limit-s
seconds (then SIGTERM to its process group, whose trainer saves a checkpoint and exits), and writes JSON: the mean
over the whole run and over its training window, which starts when --metrics first holds a logged loss, plus the
samples/s the trainer logged there.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import provenance  # noqa: E402

QUERY = ["--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"]


def nvidia_smi_index(torch_index: int = 0) -> str:
    """nvidia-smi's index of torch's device `torch_index` (CUDA_VISIBLE_DEVICES renumbers torch's devices)."""
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return visible[torch_index] if torch_index < len(visible) else str(torch_index)


class BusySampler:
    """`with BusySampler() as s: ...; s.busy()`: the GPU's mean utilization (0..1) while the block ran, or None."""

    def __init__(self, gpu: str = "0", period_ms: int = 100, command: str = "nvidia-smi"):
        self.gpu, self.period_ms, self.command = gpu, period_ms, command
        self.samples: list[tuple[float, float]] = []  # (time.monotonic(), utilization 0..1)
        self._proc = None
        self._reader = None

    def __enter__(self) -> "BusySampler":
        exe = shutil.which(self.command)
        if exe is None:
            return self
        cmd = [exe, *QUERY, "-i", self.gpu, f"--loop-ms={self.period_ms}"]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        return self

    def _read(self) -> None:
        for line in self._proc.stdout:
            try:
                self.samples.append((time.monotonic(), float(line.strip()) / 100))
            except ValueError:  # "[N/A]" or a message: not a sample
                continue

    def __exit__(self, *exc) -> None:
        if self._proc is not None:
            self._proc.terminate()
            self._proc.wait()
            self._reader.join(timeout=2)

    @property
    def available(self) -> bool:
        return self._proc is not None

    def busy(self, since: float | None = None, until: float | None = None) -> float | None:
        """Mean utilization (0..1) of the samples taken in [since, until] (monotonic times); None without any."""
        values = [v for t, v in self.samples if (since is None or t >= since) and (until is None or t <= until)]
        return sum(values) / len(values) if values else None


def first_loss_time(metrics: Path, deadline: float, proc) -> float | None:
    """Wait (while `proc` runs, until `deadline`) for the first logged loss in `metrics`; its monotonic time."""
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and any('"loss"' in line for line in metrics.read_text().splitlines()):
            return time.monotonic()
        time.sleep(0.2)
    return None


def logged_rates(metrics: Path) -> list[float]:
    if not metrics.is_file():
        return []
    records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    return [r["samples_per_s"] for r in records if "samples_per_s" in r]


def wait_for_group(pgid: int, grace_s: float = 45.0) -> None:
    """Wait until no process of group `pgid` (the command's own session) is left; SIGKILL it after `grace_s`."""
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.5)
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def measure_command(cmd: list[str], *, limit_s: float, metrics: Path | None, gpu: str) -> dict:
    """Run `cmd` under the sampler for at most `limit_s` seconds; what it measured."""
    start = time.monotonic()
    with BusySampler(gpu) as sampler:
        proc = subprocess.Popen(cmd, start_new_session=True)
        train_start = first_loss_time(metrics, start + limit_s, proc) if metrics else None
        try:
            rc = proc.wait(timeout=max(1.0, start + limit_s - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)  # the trainer saves a checkpoint on SIGTERM and exits
            rc = proc.wait()
        end = time.monotonic()
        wait_for_group(proc.pid)  # the deepspeed launcher returns while its ranks still save: they hold the GPU
    rates = logged_rates(metrics) if metrics else []
    return {"command": cmd, "limit_s": limit_s, "wall_s": end - start, "rc": rc,
            "stopped_by_limit": end - start >= limit_s,
            "sampler": "nvidia-smi utilization.gpu" if sampler.available else "unavailable (no nvidia-smi)",
            "gpu_busy_whole_run": sampler.busy(),
            "training_started_after_s": None if train_start is None else train_start - start,
            "gpu_busy_training": sampler.busy(since=train_start) if train_start is not None else None,
            "samples": len(sampler.samples), "logged_samples_per_s": rates}


def where(gpu: str) -> dict:
    """The device measured on: nvidia-smi's name of GPU `gpu` and the count (None without nvidia-smi)."""
    def run(cmd: list[str]) -> str | None:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=10).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            return None

    return {"device_name": run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", gpu])
            or "no nvidia-smi here: not a GPU measurement",
            "device_count": len((run(["nvidia-smi", "-L"]) or "").splitlines()) or None}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        raise SystemExit("usage: gpu_busy.py --out FILE [--limit-s S] [--metrics FILE] [--gpu I] -- COMMAND ...")
    split = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--limit-s", type=float, default=120.0)
    p.add_argument("--metrics", type=Path, default=None, help="the run's metrics.jsonl: where training starts")
    p.add_argument("--gpu", default=None, help="nvidia-smi index (default: torch's device 0)")
    p.add_argument("--label", default=None, help="what the command measures, written into the JSON")
    args = p.parse_args(argv[:split])
    result = {"provenance": provenance("bench/gpu_busy.py", argv), "label": args.label,
              **where(args.gpu or nvidia_smi_index(0)),
              **measure_command(argv[split + 1:], limit_s=args.limit_s, metrics=args.metrics,
                                gpu=args.gpu or nvidia_smi_index(0))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    busy = result["gpu_busy_training"]
    print(f"GPU busy while training: {'n/a' if busy is None else f'{100 * busy:.0f}%'} "
          f"({result['samples']} samples, {result['sampler']}); wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The CPU default run's step rate under its speed switches, each against the same baseline measured in this run.

python bench/cpu_default_speed.py [--out bench/results/cpu-default-speed-cpu.json] [--steps 60] [--samples 256]

The CPU default's setup (iclight_ds/train/presets/default-cpu.yaml: the tiny pretrained base, FC, vanilla objective,
ds_configs/cpu-1rank.json, 64 px) through the real Trainer, one case after another in this process: the training
dtype (bf16, the DeepSpeed config's, or fp32: train.precision), the conditioning (the frozen VAE and text encoder
every step, or a latent cache the trainer writes first: data.cache=auto) and the micro-batch (8, that of
ds_configs/cpu-1rank.json; 16; 32, that of ds_configs/default-cpu.json, which the preset trains with in fp32). Per case: the median optimizer-step time over --steps steps after 5 warm-up steps, samples/s, and the ratio
of its samples/s to the first case's (bf16, encoding every step, micro-batch 8); for the cached cases also the time
the trainer took to write its cache. The numbers are for the CPU, torch thread count and load recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.provenance import cpu_name, provenance  # noqa: E402

PRESET = REPO / "iclight_ds" / "train" / "presets" / "default-cpu.yaml"
# (name, train.precision, data.cache, micro-batch); the first is the baseline of every ratio
CASES = [
    ("bf16, encoding every step", "bf16", None, 8),
    ("fp32, encoding every step", "fp32", None, 8),
    ("bf16, latent cache", "bf16", "auto", 8),
    ("fp32, latent cache", "fp32", "auto", 8),
    ("fp32, latent cache, micro-batch 16", "fp32", "auto", 16),
    ("fp32, latent cache, micro-batch 32 (the CPU default)", "fp32", "auto", 32),
]


def ds_config_with(micro_batch: int, folder: Path) -> Path:
    """ds_configs/cpu-1rank.json with another micro-batch."""
    from iclight_ds.train import engine as eng

    cfg = eng.read_ds_config(eng.resolve_ds_config_path("cpu-1rank"))
    cfg = {k: v for k, v in cfg.items() if k != "_comment"}
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    path = folder / f"cpu-1rank-mb{micro_batch}.json"
    path.write_text(json.dumps(cfg, indent=2) + "\n")
    return path


def measure(case: tuple, data: Path, tmp: Path, steps: int) -> dict:
    from iclight_ds.config import load_config
    from iclight_ds.train.trainer import Trainer

    name, precision, cache, micro = case
    out = tmp / f"run-{precision}-{cache}-{micro}"
    values = {"train.output_dir": str(out), "data.path": str(data), "train.precision": precision,
              "train.ds_config": str(ds_config_with(micro, tmp)), "train.export": "false", "logging.wandb": "false",
              "logging.progress": "false", "data.num_workers": "1", **({"data.cache": cache} if cache else {})}
    t0 = time.perf_counter()
    trainer = Trainer(load_config(str(PRESET), values))
    start_s = time.perf_counter() - t0
    for _ in range(5):  # warm-up: first-call allocations, the loader's worker start
        trainer.train_step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    row = {"case": name, "precision": precision, "cache": cache or "none", "micro_batch": micro,
           "step_s_median": step_s, "samples_per_s": micro / step_s, "trainer_start_s": start_s,
           "steps_timed": steps}
    if cache:
        row["cache_bytes"] = sum(p.stat().st_size for p in (out / "latent_cache").glob("shard_*.safetensors"))
    del trainer
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu-default-speed-cpu.json"))
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--samples", type=int, default=256, help="synthetic scenes (64 px) the cases train on")
    args = p.parse_args(argv)
    from iclight_ds.data.synth import generate
    from iclight_ds.train import engine as eng

    result: dict = {"provenance": provenance("bench/cpu_default_speed.py", sys.argv[1:] if argv is None else argv),
                    "device": f"cpu: {cpu_name()}", "torch_threads": torch.get_num_threads(),
                    "load_average_at_start": os.getloadavg()[0], "rows": []}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(tmp / "data", args.samples, size=64, seed=0, extras=False)
        for case in CASES:
            result["rows"].append(measure(case, tmp / "data", tmp, args.steps))
            print(f"  {case[0]:<40} {result['rows'][-1]['samples_per_s']:>7.1f} samples/s", flush=True)
    eng.shutdown()
    base = result["rows"][0]["samples_per_s"]
    for row in result["rows"]:
        row["ratio_to_first"] = row["samples_per_s"] / base
    result["load_average_at_end"] = os.getloadavg()[0]
    print(f"\ndevice: {result['device']}, torch threads {result['torch_threads']}, load average "
          f"{result['load_average_at_start']:.1f} -> {result['load_average_at_end']:.1f}")
    print(f"  {'case':<40} {'step ms':>8} {'samples/s':>10} {'x first':>8}")
    for row in result["rows"]:
        print(f"  {row['case']:<40} {1e3 * row['step_s_median']:>8.1f} {row['samples_per_s']:>10.1f} "
              f"{row['ratio_to_first']:>8.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The CPU default run's step rate under its speed switches, each against the same baseline measured in this run.

python bench/cpu_default_speed.py [--out bench/results/cpu-default-speed-cpu.json] [--steps 60] [--rounds 6]
                                  [--samples 256]

The CPU default's setup (iclight_ds/train/presets/default-cpu.yaml: the tiny pretrained base, FC, vanilla objective,
one rank, ZeRO stage 0, 64 px) through the real Trainer, in this process, under: the training dtype (bf16, the
DeepSpeed config's, or fp32: train.precision), the conditioning (the frozen VAE and text encoder every step, or a
latent cache the trainer writes first: data.cache=auto) and the micro-batch (8, that of ds_configs/cpu-1rank.json;
16; 32, that of ds_configs/default-cpu.json, which the preset trains with in fp32), and the CPU default under each
speed switch alone (model.channels_last, model.compile with inductor). Every case's Trainer is built
(and warmed up over 5 steps) first; then the cases take turns, --rounds times --steps / --rounds steps each, so that
a change of the machine's speed during the run (a shared virtual machine's is large) reaches them alike. Per case:
the median optimizer-step time, samples/s, and the ratio of its samples/s to the first case's (bf16, encoding every
step, micro-batch 8); the time its Trainer took to start, for the cached cases writing the cache included, and
that of its first 5 steps (torch.compile compiles at the first). The
numbers are for the CPU, torch thread count and load recorded.
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

from bench.provenance import cpu_name, provenance, write_result  # noqa: E402

PRESET = REPO / "iclight_ds" / "train" / "presets" / "default-cpu.yaml"
DEFAULT = "fp32, latent cache, micro-batch 32 (the CPU default)"
# (name, train.precision, data.cache, micro-batch, further overrides); the first is the baseline of every ratio
CASES = [
    ("bf16, encoding every step", "bf16", None, 8, {}),
    ("fp32, encoding every step", "fp32", None, 8, {}),
    ("bf16, latent cache", "bf16", "auto", 8, {}),
    ("fp32, latent cache", "fp32", "auto", 8, {}),
    ("fp32, latent cache, micro-batch 16", "fp32", "auto", 16, {}),
    (DEFAULT, "fp32", "auto", 32, {}),
    # the speed switches, each alone on the CPU default
    ("the CPU default + model.channels_last", "fp32", "auto", 32, {"model.channels_last": "true"}),
    ("the CPU default + model.compile (inductor)", "fp32", "auto", 32, {"model.compile": "true"}),
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


def build(case: tuple, data: Path, tmp: Path):
    """The case's Trainer, warmed up (first-call allocations, the loader's worker start), and its start-up time."""
    from iclight_ds.config import load_config
    from iclight_ds.train.trainer import Trainer

    name, precision, cache, micro, switches = case
    out = tmp / f"run-{CASES.index(case)}"
    values = {"train.output_dir": str(out), "data.path": str(data), "train.precision": precision,
              "train.ds_config": str(ds_config_with(micro, tmp)), "train.export": "false", "logging.wandb": "false",
              "logging.progress": "false", "data.num_workers": "1", "data.cache": cache or "none", **switches}
    t0 = time.perf_counter()
    trainer = Trainer(load_config(str(PRESET), values))
    start_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(5):  # model.compile compiles at the first step
        trainer.train_step()
    return trainer, start_s, time.perf_counter() - t0


def measure(cases: list[tuple], data: Path, tmp: Path, steps: int, rounds: int) -> list[dict]:
    """Every case's Trainer built first, then `rounds` rounds of steps // rounds steps of each case in turn, so that a
    change in the machine's speed during the run reaches every case alike; each case's median step time."""
    built = [build(case, data, tmp) for case in cases]
    times: list[list[float]] = [[] for _ in cases]
    for _ in range(rounds):
        for (trainer, _, _), own in zip(built, times):
            for _ in range(max(1, steps // rounds)):
                t = time.perf_counter()
                trainer.train_step()
                own.append(time.perf_counter() - t)
    rows = []
    for (name, precision, cache, micro, switches), (trainer, start_s, warmup_s), own in zip(cases, built, times):
        step_s = statistics.median(own)
        row = {"case": name, "precision": precision, "cache": cache or "none", "micro_batch": micro,
               "switches": switches, "step_s_median": step_s, "samples_per_s": micro / step_s,
               "trainer_start_s": start_s, "warmup_5_steps_s": warmup_s, "steps_timed": len(own), "rounds": rounds}
        if cache:
            row["cache_bytes"] = sum(p.stat().st_size for p in (trainer.out_dir / "latent_cache").glob("shard_*"))
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu-default-speed-cpu.json"))
    p.add_argument("--steps", type=int, default=60, help="steps timed per case, over all rounds")
    p.add_argument("--rounds", type=int, default=6, help="rounds in which every case takes its share of the steps")
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
        result["rows"] = measure(CASES, tmp / "data", tmp, args.steps, args.rounds)
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
    print()
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

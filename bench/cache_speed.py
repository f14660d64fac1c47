"""What the latent cache buys: reading a micro-batch vs one training step, and how fast caching itself runs.

python bench/cache_speed.py [--out bench/results/cache-speed-cpu.json] [--steps 10] [--full-samples 8]

(a) the default CPU configuration (tiny FC, ds_configs/cpu.json: micro-batch 8, bf16, ZeRO-2, AdamW8bit,
    gradient checkpointing): the time to read one micro-batch from a cache (8 random samples, read and collated in
    this process) vs one optimizer step of the real Trainer training from that cache (median over --steps after 2
    warm-up steps); the same step conditioning on the fly (PNG decode + VAE + text encoder) for comparison.
(b) caching throughput (samples/s, encoding and writing; building the models not counted) for the tiny models
    (FC at 64 px; FBC at 64 px with 4 split variants) and for the FULL-size SD1.5 VAE + text encoder with random
    weights (models.SD15_* configs) at 256 px, FC, bf16 and fp32 encoders.
Everything runs in one process on this machine's CPU; the numbers are for the device and thread count recorded.
"""

from __future__ import annotations

import argparse
import os
import random
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
from torch.utils.data import default_collate  # noqa: E402

from bench.provenance import cpu_name, provenance, write_result  # noqa: E402


def trainer_for(out: Path, **over: str):
    from iclight_ds.config import load_config
    from iclight_ds.train.trainer import Trainer

    values = {"train.ds_config": "cpu", "train.output_dir": str(out), "train.export": "false",
              "train.optimizer": "adamw8bit", "model.gradient_checkpointing": "true",  # as measured (the README)
              "logging.wandb": "false", "logging.progress": "false", **over}
    return Trainer(load_config(None, values))


def time_steps(trainer, steps: int) -> list[float]:
    for _ in range(2):  # warm-up: first-call allocations, the loader's worker start
        trainer.train_step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t)
    return times


def time_reads(dataset, batch: int, repeats: int) -> list[float]:
    rng = random.Random(0)
    times = []
    for _ in range(repeats):
        idx = rng.sample(range(len(dataset)), batch)
        t = time.perf_counter()
        default_collate([dataset[i] for i in idx])
        times.append(time.perf_counter() - t)
    return times


def cache_throughput(data: Path, out: Path, **kw) -> dict:
    from iclight_ds.data.cache import build_cache

    stats = build_cache(data, out, progress=False, validate=False, **kw)
    size = sum(p.stat().st_size for p in out.glob("shard_*.safetensors"))
    return {"samples": stats["samples"], "samples_per_s": stats["samples_per_s"], "encode_s": stats["encode_s"],
            "model_build_s": stats["build_s"], "bytes_per_sample": size / stats["samples"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(REPO / "bench" / "results" / "cache-speed-cpu.json"))
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--samples", type=int, default=128, help="tiny dataset size (64 px)")
    p.add_argument("--full-samples", type=int, default=8, help="samples for the full-size SD1.5 encoders (256 px)")
    p.add_argument("--skip-full", action="store_true")
    args = p.parse_args(argv)
    from iclight_ds.train import engine as eng
    from iclight_ds.data.cache import CachedDataset
    from iclight_ds.data.synth import generate

    result: dict = {"provenance": provenance("bench/cache_speed.py", sys.argv[1:] if argv is None else argv),
                    "device": f"cpu: {cpu_name()}", "torch_threads": torch.get_num_threads(),
                    "cpu_count": os.cpu_count(), "load_average_at_start": os.getloadavg()[0],
                    "torch": torch.__version__}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data64"
        generate(data, args.samples, size=64, seed=0, extras=False)

        # (b) tiny throughput first: its FC cache also feeds (a)
        tiny_fc = cache_throughput(data, tmp / "tiny-fc", size="tiny", variant="fc", resolution=64)
        tiny_fbc = cache_throughput(data, tmp / "tiny-fbc", size="tiny", variant="fbc", resolution=64,
                                    split_variants=4)

        # (a) one micro-batch read vs one training step
        micro = eng.batch_geometry(eng.read_ds_config(eng.resolve_ds_config_path("cpu")), 1).micro_batch
        reads = time_reads(CachedDataset(tmp / "tiny-fc"), micro, repeats=200)
        cached_trainer = trainer_for(tmp / "run-cached", **{"data.cache": str(tmp / "tiny-fc")})
        cached_steps = time_steps(cached_trainer, args.steps)
        del cached_trainer
        fly_trainer = trainer_for(tmp / "run-fly", **{"data.path": str(data)})
        fly_steps = time_steps(fly_trainer, args.steps)
        del fly_trainer
        read_s, step_s, fly_s = (statistics.median(x) for x in (reads, cached_steps, fly_steps))
        result["read_vs_step"] = {
            "config": "tiny FC, ds_configs/cpu.json (micro-batch 8, bf16, ZeRO-2, adamw8bit), 64 px, 1 rank",
            "micro_batch": micro,
            "cache_read_batch_s_median": read_s,
            "cache_read_batch_s_p90": sorted(reads)[int(0.9 * len(reads))],
            "train_step_from_cache_s_median": step_s,
            "train_step_on_the_fly_s_median": fly_s,
            "step_over_read": step_s / read_s,
            "steps_timed": args.steps,
        }
        result["caching_throughput"] = {"tiny_fc_64px_bf16": tiny_fc, "tiny_fbc_64px_bf16_k4": tiny_fbc}
        if not args.skip_full:
            data256 = tmp / "data256"
            generate(data256, args.full_samples, size=256, seed=0, extras=False)
            for frozen in ("bf16", "fp32"):
                result["caching_throughput"][f"full_sd15_fc_256px_{frozen}"] = cache_throughput(
                    data256, tmp / f"full-{frozen}", size="full", variant="fc", resolution=256, frozen_dtype=frozen,
                    batch_size=4, shard_size=args.full_samples)
    eng.shutdown()
    result["load_average_at_end"] = os.getloadavg()[0]

    r = result["read_vs_step"]
    print(f"device: {result['device']}, torch threads {result['torch_threads']}, load average at start "
          f"{result['load_average_at_start']:.1f}, at end {result['load_average_at_end']:.1f}")
    print(f"\n(a) {r['config']}")
    read_label = f"read one micro-batch of {micro} from the cache"
    print(f"  {read_label:<48} {1e3 * r['cache_read_batch_s_median']:>9.2f} ms")
    print(f"  {'one training step from the cache':<48} {1e3 * r['train_step_from_cache_s_median']:>9.1f} ms")
    print(f"  {'one training step conditioning on the fly':<48} {1e3 * r['train_step_on_the_fly_s_median']:>9.1f} ms")
    print(f"  {'step / read':<48} {r['step_over_read']:>9.0f} x")
    print(f"\n(b) caching throughput\n  {'models':<32} {'samples/s':>10} {'KB/sample':>10} {'build s':>8}")
    for name, t in result["caching_throughput"].items():
        print(f"  {name:<32} {t['samples_per_s']:>10.2f} {t['bytes_per_sample'] / 1024:>10.1f} "
              f"{t['model_build_s']:>8.1f}")
    print()
    write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())

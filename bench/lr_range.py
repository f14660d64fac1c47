"""LR range test for the default run: the learning rate grows exponentially while the loss is recorded.

python bench/lr_range.py [--out bench/results/lr-range-cpu.json] [--steps 300] [--lr-min 1e-6] [--lr-max 1e-1]
                         [--optimizer adamw8bit|adamw]

The real Trainer on the default setup (tiny FC, synthetic data, ds_configs/cpu.json, consistency on) with
--optimizer (default AdamW8bit, as the committed lr-range-cpu.json was measured; adamw: torch's fused AdamW, what
train.optimizer=auto picks on a CPU, in lr-range-cpu-adamw.json) and gradient checkpointing,
with its LR schedule replaced by lr(s) = lr_min * (lr_max / lr_min) ** (s / steps) (no warm-up). The loss is
smoothed (EMA 0.9); the table shows it per LR decade. Reported: the LR where the smoothed loss falls fastest
(steepest descent in log-LR), the LR of its minimum, and the LR where it first exceeds 1.5x the minimum
(divergence). The usual choice for a peak LR is between the steepest point and a few times below the minimum.
"""

from __future__ import annotations

import argparse
import math
import os
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


def run(args: argparse.Namespace) -> dict:
    from iclight_ds.config import load_config
    from iclight_ds.train import build
    from iclight_ds.train.trainer import Trainer

    ratio = args.lr_max / args.lr_min
    build.lr_scheduler = lambda opt, cfg: torch.optim.lr_scheduler.LambdaLR(  # multiplier of train.lr = lr_min
        opt, lambda s: ratio ** (s / args.steps))
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, {"train.ds_config": "cpu", "train.output_dir": tmp, "train.export": "false",
                                 "train.optimizer": args.optimizer, "model.gradient_checkpointing": "true",
                                 "train.lr": str(args.lr_min), "train.steps": str(args.steps),
                                 "data.synth_samples": str(args.samples), "logging.wandb": "false",
                                 "logging.progress": "false", "data.num_workers": "0"})
        trainer = Trainer(cfg)
        records = []
        ema = None
        start = time.perf_counter()
        for s in range(args.steps):
            lr = trainer.engine.get_lr()[0]
            loss = trainer.train_step()["loss"].item()
            if not math.isfinite(loss):
                records.append({"step": s, "lr": lr, "loss": loss, "smoothed": float("inf")})
                break
            ema = loss if ema is None else 0.9 * ema + 0.1 * loss
            records.append({"step": s, "lr": lr, "loss": loss, "smoothed": ema})
            if ema > 4 * min(r["smoothed"] for r in records) and s > 20:
                break
        seconds = time.perf_counter() - start
    finite = [r for r in records[10:] if math.isfinite(r["smoothed"])]  # skip the EMA's start-up
    best = min(finite, key=lambda r: r["smoothed"])
    slopes = []  # d(smoothed loss) / d(log10 lr) over a 10-step window
    for a, b in zip(finite, finite[10:]):
        if b["step"] <= best["step"]:
            slopes.append(((b["smoothed"] - a["smoothed"]) / math.log10(b["lr"] / a["lr"]), a, b))
    steepest = min(slopes, key=lambda x: x[0])
    diverged = next((r for r in finite if r["step"] > best["step"] and r["smoothed"] > 1.5 * best["smoothed"]), None)
    return {
        "provenance": provenance("bench/lr_range.py", sys.argv[1:]),
        "device": f"CPU: {cpu_name()} ({torch.get_num_threads()} threads)",
        "setup": "default run: tiny FC, synthetic 64 px, ds_configs/cpu.json (micro-batch 8, bf16, ZeRO-2), "
                 f"{args.optimizer}, lambda_c 0.1",
        "lr_min": args.lr_min, "lr_max": args.lr_max, "steps": len(records), "seconds": round(seconds, 1),
        "steepest_lr": math.sqrt(steepest[1]["lr"] * steepest[2]["lr"]),
        "min_loss_lr": best["lr"], "min_smoothed_loss": best["smoothed"],
        "divergence_lr": diverged["lr"] if diverged else None,
        "records": records,
    }


def table(result: dict) -> str:
    lines = [f"LR range test on {result['device']}", f"{'lr':>10}{'smoothed loss':>15}"]
    seen = set()
    for r in result["records"]:
        decade = round(math.log10(r["lr"]) * 2) / 2  # every half decade
        if decade not in seen:
            seen.add(decade)
            lines.append(f"{r['lr']:>10.1e}{r['smoothed']:>15.4f}")
    lines.append(f"steepest descent at lr {result['steepest_lr']:.1e}; minimum {result['min_smoothed_loss']:.4f} at "
                 f"lr {result['min_loss_lr']:.1e}; diverges at "
                 + (f"{result['divergence_lr']:.1e}" if result["divergence_lr"] else "(not within the range)"))
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "lr-range-cpu.json")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--lr-min", type=float, default=1e-6)
    p.add_argument("--lr-max", type=float, default=1e-1)
    p.add_argument("--optimizer", choices=["adamw8bit", "adamw"], default="adamw8bit",
                   help="train.optimizer (default: AdamW8bit, as lr-range-cpu.json was measured)")
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    result = run(args)
    print(table(result))
    write_result(args.out, result)


if __name__ == "__main__":
    main()

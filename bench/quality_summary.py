"""Collect the runs of bench/quality_sweep.sh into one JSON and print a table.

python bench/quality_summary.py WORK_DIR [--out bench/results/quality-sweep.json] [--device NAME] [--train-seconds S]

Reads every `WORK_DIR/<run>/metrics.jsonl` (its evaluation records: `eval/*` every 250 steps on 8 scenes), the
run's `config.json`, the VAE training logs (`vae_*.log`, whose last lines are the VAE's JSON info) and `rc.txt`
(124: the run was stopped at the time limit, so its last evaluation is its last point).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EVAL_KEYS = ("psnr", "baseline_psnr", "ssim", "vae_psnr", "additivity_error", "chroma_drift")


def vae_info(log: Path) -> dict:
    text = log.read_text()
    start = text.rfind("\n{")
    if start < 0:
        raise SystemExit(f"{log}: no VAE info JSON at its end (did the VAE training finish?)")
    return json.loads(text[start:text.rindex("}") + 1])


def eval_data(cfg: dict) -> str:
    """What the run's training-time evaluation scored (the trainer's rule, config.py `logging.eval_data`)."""
    if cfg["logging"]["eval_data"]:
        return cfg["logging"]["eval_data"]
    if cfg["data"]["path"] is None:
        return "held-out synthetic scenes generated into <run>/eval_data"
    return "the last training scenes (no logging.eval_data)"


def run_summary(run: Path, rc: dict) -> dict:
    cfg = json.loads((run / "config.json").read_text())
    ds = json.loads((run / "ds_config.json").read_text())
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    evals = [{"step": r["step"], **{k: round(r[f"eval/{k}"], 4) for k in EVAL_KEYS if f"eval/{k}" in r}}
             for r in records if "eval/psnr" in r]
    final = None
    if (run / "eval32.json").is_file():  # the finished run scored on 32 held-out scenes
        final = {k: round(v, 4) for k, v in json.loads((run / "eval32.json").read_text())["summary"].items()
                 if k in EVAL_KEYS}
    return {
        "vae": cfg["model"]["vae"], "eval_data": eval_data(cfg), "micro_batch": ds["train_micro_batch_size_per_gpu"],
        "lambda_c": cfg["objective"]["lambda_consistency"], "steps_planned": cfg["train"]["steps"],
        "steps_reached": train[-1]["step"] if train else 0, "rc": rc.get(run.name),
        "samples_per_s": round(sum(r["samples_per_s"] for r in train[-5:]) / max(1, len(train[-5:])), 1),
        "final_loss": round(train[-1]["loss"], 4) if train else None, "evals": evals, "final_eval_32": final,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("work", type=Path)
    p.add_argument("--out", type=Path, default=Path("bench/results/quality-sweep.json"))
    p.add_argument("--device", help="device name to record (default: this machine's GPU, else 'cpu')")
    p.add_argument("--train-seconds", type=int, help="the sweep's per-run time limit, recorded")
    args = p.parse_args(argv)
    device = args.device
    if device is None:
        import torch

        device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else "cpu"
    rc = {}
    if (args.work / "rc.txt").is_file():
        rc = {n: int(c) for n, _, c in (line.split() for line in (args.work / "rc.txt").read_text().splitlines())}
    vaes = {log.stem: vae_info(log) for log in sorted(args.work.glob("vae_*.log"))}
    runs = {d.name: run_summary(d, rc) for d in sorted(args.work.iterdir()) if (d / "metrics.jsonl").is_file()}
    if not runs:
        sys.exit(f"{args.work}: no runs (no */metrics.jsonl)")
    result = {"device": device, "train_seconds_limit": args.train_seconds, "vaes": vaes, "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")

    print(f"device: {device}; per-run limit {args.train_seconds} s; eval: 8 scenes every 250 steps")
    for name, v in vaes.items():
        print(f"  {name}: widths {v['channels']}, {v['steps']} steps, held-out full-frame PSNR {v['psnr_heldout_db']} dB")
    steps = sorted({e["step"] for r in runs.values() for e in r["evals"]})
    print(f"{'run':12s} {'batch':>5s} {'lc':>4s} {'reached':>7s} {'smp/s':>6s} {'copy':>6s} {'VAE':>6s} "
          + " ".join(f"{'@' + str(s):>6s}" for s in steps) + "  additivity(last)")
    for name, r in runs.items():
        by_step = {e["step"]: e for e in r["evals"]}
        last = r["evals"][-1] if r["evals"] else {}
        print(f"{name:12s} {r['micro_batch']:5d} {r['lambda_c']:4g} {r['steps_reached']:7d} {r['samples_per_s']:6.1f} "
              f"{last.get('baseline_psnr', float('nan')):6.2f} {last.get('vae_psnr', float('nan')):6.2f} "
              + " ".join(f"{by_step[s]['psnr']:6.2f}" if s in by_step else f"{'-':>6s}" for s in steps)
              + f"  {last.get('additivity_error', float('nan')):.3f}"
              + (f"  final (32 held-out): {r['final_eval_32']['psnr']:.2f} dB" if r["final_eval_32"] else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

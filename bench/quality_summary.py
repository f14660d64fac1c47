"""Collect the runs of bench/quality_sweep.sh or bench/quality_scale.sh into one JSON and print a table.

python bench/quality_summary.py WORK_DIR [--out bench/results/quality-sweep.json] [--device NAME] [--train-seconds S]

Reads every `WORK_DIR/<run>/metrics.jsonl` (its evaluation records `eval/*`, every `logging.eval_every` steps), the
run's `config.json`, the VAE training logs (`vae_*.log`, whose last lines are the VAE's JSON info) and `rc.txt`
(its last line per run: 124 = stopped at the time limit) and the 32-scene scores `eval32.json` (and
`eval32-step<N>.json`, where a stopped run was scored before it was resumed).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.provenance import provenance, write_result  # noqa: E402

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
    def eval32(path: Path) -> dict:
        return {k: round(v, 4) for k, v in json.loads(path.read_text())["summary"].items() if k in EVAL_KEYS}

    final = eval32(run / "eval32.json") if (run / "eval32.json").is_file() else None  # scored on 32 held-out scenes
    # scored where a time limit stopped the run, before it was resumed (bench/quality_scale.sh RESUME=1)
    earlier = {int(p.stem.removeprefix("eval32-step")): eval32(p) for p in run.glob("eval32-step*.json")}
    log = run.parent / f"{run.name}.log"  # the trainer's log: where a time limit stopped it (SIGTERM, a save)
    stops = [int(m) for m in re.findall(r"saving at step (\d+)", log.read_text())] if log.is_file() else []
    return {
        "vae": cfg["model"]["vae"], "eval_data": eval_data(cfg), "micro_batch": ds["train_micro_batch_size_per_gpu"],
        "lambda_c": cfg["objective"]["lambda_consistency"], "steps_planned": cfg["train"]["steps"],
        "steps_reached": max([train[-1]["step"] if train else 0, *stops]), "stopped_at_steps": stops,
        "rc": rc.get(run.name),
        "samples_per_s": round(sum(r["samples_per_s"] for r in train[-5:]) / max(1, len(train[-5:])), 1),
        "final_loss": round(train[-1]["loss"], 4) if train else None, "evals": evals, "final_eval_32": final,
        "stopped_eval_32": {str(k): earlier[k] for k in sorted(earlier)},
        "logging": {k: cfg["logging"][k] for k in ("eval_every", "eval_samples")},
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
    result = {"provenance": provenance("bench/quality_summary.py", sys.argv[1:] if argv is None else argv),
              "device": device, "train_seconds_limit": args.train_seconds, "vaes": vaes, "runs": runs}
    write_result(args.out, result, indent=1)

    log = next(iter(runs.values()))["logging"]
    print(f"device: {device}; per-run limit {args.train_seconds} s; "
          f"eval: {log['eval_samples']} scenes every {log['eval_every']} steps")
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
              + (f"  final (32 held-out): {r['final_eval_32']['psnr']:.2f} dB (copy {r['final_eval_32']['baseline_psnr']:.2f}),"
                 f" SSIM {r['final_eval_32']['ssim']:.3f}, additivity {r['final_eval_32']['additivity_error']:.3f}"
                 if r["final_eval_32"] else ""))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

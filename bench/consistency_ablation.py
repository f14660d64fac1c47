"""Does the light-transport consistency objective do what IC-Light claims? lambda_c = 0.1 vs 0, all else equal.

python bench/consistency_ablation.py [--out bench/results/consistency-ablation.json] [--steps N] [--samples 32]

Trains the default tiny setup twice (launch/train.sh --launcher python: same seed, data, steps, LR schedule and
DeepSpeed config; only objective.lambda_consistency differs), then scores both with `python -m iclight_ds.eval`
on the same held-out synthetic scenes (seed 20000, with ground-truth light parts). Writes the JSON result and a
PNG (loss curves and the metrics side by side) beside it, and prints a table. Runs on whatever device the
trainer picks (the CPU here); the device is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
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

ARMS = {"lambda_c=0.1": "0.1", "lambda_c=0": "0"}
METRICS = (("psnr", "PSNR fg (dB)", "higher"), ("ssim", "SSIM fg", "higher"),
           ("chroma_drift", "albedo chroma drift", "lower"), ("additivity_error", "additivity error", "lower"))


def train_arm(out: Path, lambda_c: str, args: argparse.Namespace) -> float:
    cmd = ["bash", str(REPO / "launch" / "train.sh"), "--launcher", "python", "--output-dir", str(out),
           "--objective.lambda_consistency", lambda_c, "--train.seed", str(args.seed),
           "--logging.preview_every", "0", "--logging.eval_every", "0", "--logging.progress", "false",
           "--logging.wandb", "false", "--logging.every", "10"]
    if args.steps:
        cmd += ["--train.steps", str(args.steps)]
    if args.data:
        cmd += ["--data.path", str(args.data)]
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def evaluate_arm(run: Path, held: Path, args: argparse.Namespace) -> dict:
    out = run / "eval.json"
    subprocess.run([sys.executable, "-m", "iclight_ds.eval", "--run", str(run), "--data", str(held), "--samples",
                    str(args.samples), "--steps", str(args.eval_steps), "--seed", str(args.seed), "--out", str(out)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def losses(run: Path) -> list[dict]:
    return [m for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in (m := json.loads(line))]


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(METRICS), figsize=(4 * (1 + len(METRICS)), 3.6))
    colours = {"lambda_c=0.1": "tab:blue", "lambda_c=0": "tab:orange"}
    for arm, data in result["arms"].items():
        steps = [m["step"] for m in data["losses"]]
        axes[0].plot(steps, [m["loss_vanilla"] for m in data["losses"]], label=f"{arm}: vanilla", color=colours[arm])
        if arm != "lambda_c=0":
            axes[0].plot(steps, [m["loss_consistency"] for m in data["losses"]], "--", color=colours[arm],
                         label=f"{arm}: consistency")
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7)
    for ax, (key, name, better) in zip(axes[1:], METRICS):
        names = list(result["arms"])
        values = [result["arms"][a]["eval"][key] for a in names]
        ax.bar(names, values, color=[colours[a] for a in names])
        if key == "psnr":
            ax.axhline(result["baseline"]["psnr"], color="grey", ls=":", label="copy input")
            ax.legend(fontsize=7)
        ax.set(title=f"{name} ({better} is better)")
        for i, v in enumerate(values):
            ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    fig.suptitle(f"consistency ablation, {result['steps']} steps, {result['eval_samples']} held-out scenes "
                 f"({result['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "consistency-ablation.json")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the default run's)")
    p.add_argument("--data", type=Path, default=None, help="training data (default: the default run's synthetic)")
    p.add_argument("--samples", type=int, default=32, help="held-out scenes scored")
    p.add_argument("--eval-steps", type=int, default=20, help="sampler steps of the evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder (default: a temp folder)")
    args = p.parse_args()

    from iclight_ds.config import RunConfig
    from iclight_ds.data.synth import generate

    defaults = RunConfig()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        held = root / "heldout"
        if not (held / "manifest.jsonl").is_file():
            generate(held, args.samples, size=defaults.data.resolution, seed=20000, env_shape=defaults.model.env_shape)
        arms = {}
        for name, lambda_c in ARMS.items():
            run = root / name.replace("=", "_")
            seconds = train_arm(run, lambda_c, args)
            result = evaluate_arm(run, held, args)
            arms[name] = {"lambda_consistency": float(lambda_c), "train_seconds": round(seconds, 1),
                          "eval": result["summary"], "losses": losses(run)}
            print(f"{name}: trained in {seconds:.0f} s, PSNR {result['summary']['psnr']:.2f} dB, additivity "
                  f"{result['summary']['additivity_error']:.3f}", flush=True)
        config = json.loads((root / "lambda_c_0.1" / "config.json").read_text())
    with_c, without = arms["lambda_c=0.1"]["eval"], arms["lambda_c=0"]["eval"]
    ratio = with_c["additivity_error"] / without["additivity_error"]
    result = {
        "provenance": provenance("bench/consistency_ablation.py", sys.argv[1:]),
        "device": f"CPU: {cpu_name()} ({os.cpu_count()} cores)" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "steps": config["train"]["steps"], "lr": config["train"]["lr"], "seed": args.seed,
        "eval_samples": args.samples, "eval_steps": args.eval_steps, "heldout_seed": 20000,
        "baseline": {"psnr": with_c["baseline_psnr"], "ssim": with_c["baseline_ssim"],
                     "chroma_drift": with_c["baseline_chroma_drift"], "additivity_error": 1.0},
        "additivity_floor": with_c.get("additivity_floor"),
        "additivity_ratio": ratio, "target_ratio": 0.7, "target_met": ratio <= 0.7,
        "arms": arms,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    plot(result, png)
    print(f"\n{'metric':<22}{'lambda_c=0.1':>14}{'lambda_c=0':>12}{'copy input':>12}")
    for key, name, _ in METRICS:
        base = result["baseline"][key]
        print(f"{name:<22}{with_c[key]:>14.4f}{without[key]:>12.4f}{base:>12.4f}")
    print(f"additivity ratio (0.1 / 0): {ratio:.3f} (target <= 0.7: {'met' if ratio <= 0.7 else 'NOT met'})")
    print(f"device: {result['device']}\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()

"""Does the light-transport consistency objective do what IC-Light claims? Vanilla, the paper's term and the x0 term
(phi started as the mean or as the sum), all else equal, over several seeds.

python bench/consistency_ablation.py [--out bench/results/consistency-ablation-base.json] [--config PRESET|none]
                                     [--steps 1000] [--seeds 0 1 2] [--samples 32]
                                     [--arms vanilla paper x0 x0-sum x0-sum-high x0-sum-high-5 x0-sum-noise
                                             x0-sum-noise-high linear]
                                     [--target-shift S] [--keep DIR]

Each arm trains through launch/train.sh --launcher python from the same config (by default the CPU default run's
preset: the shipped tiny pretrained base; `--config none`: the plain defaults from random weights), with the same
seed, data, steps and LR schedule; only the objective differs:

    vanilla   objective.lambda_consistency 0
    paper     objective.lambda_consistency 0.1, objective.consistency paper (phi merges eps_1 and eps_2)
    x0        objective.lambda_consistency 0.1, objective.consistency x0 (the merge done on the x0 estimates)
    x0-sum    the same with model.merger_init sum (phi starts as the sum of the two x0 estimates, not their mean)
    x0-sum-high  x0-sum with objective.consistency_min_timestep 500 and objective.lambda_consistency 1.0: the term
              only where the noise leaves the light open (t >= 500 of 1000 carries 4% of the Min-SNR-capped x0
              weights, hence the larger lambda)
    x0-sum-high-5  the same with objective.lambda_consistency 5.0
    x0-sum-noise  x0-sum with objective.consistency_weighting noise (each sample weighs 1 - abar_t: a weight rising
              with the noise instead of a step) at lambda_c 0.1, whose mean weight per sample (0.063) is about
              x0-sum-high's (0.051)
    x0-sum-noise-high  the same at t >= 500 only (mean weight 0.046)
    linear    objective.lambda_consistency 1.0, objective.consistency linear (the x0 estimates decoded by the frozen
              VAE into linear light and summed there; its squared errors in [0, 1] images are about a tenth of the
              latent ones, hence lambda 1.0)

Every run is scored with `python -m iclight_ds.eval` on the same held-out synthetic scenes (seed 20000, with
ground-truth light parts) with the same sampler seed, so that the seeds vary the training only. Writes the JSON (each
run, and each arm's mean and spread over the seeds), a PNG beside it and prints a table; the additivity ratio of an
arm is its additivity error over the vanilla arm's at the same seed. With --keep, finished runs are kept and not
trained again when the script is run again. Runs on whatever device the trainer picks (the CPU here); the device is
recorded. `--target-shift S` trains every arm on imperfect supervision (data.synth_target_shift: each target
under a random exposure and white balance its input does not share), the held-out scenes exact: the paper's argument
for the term is that it keeps the albedo where the targets disagree.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
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

from bench.provenance import cpu_name, provenance, write_result  # noqa: E402

# arm -> (objective.lambda_consistency, objective.consistency, model.merger_init, objective.consistency_min_timestep,
#         objective.consistency_weighting)
ARMS = {"vanilla": ("0", "paper", "mean", 0, "snr"), "paper": ("0.1", "paper", "mean", 0, "snr"),
        "x0": ("0.1", "x0", "mean", 0, "snr"), "x0-sum": ("0.1", "x0", "sum", 0, "snr"),
        "x0-sum-high": ("1.0", "x0", "sum", 500, "snr"), "x0-sum-high-5": ("5.0", "x0", "sum", 500, "snr"),
        "x0-sum-noise": ("0.1", "x0", "sum", 0, "noise"), "x0-sum-noise-high": ("0.1", "x0", "sum", 500, "noise"),
        "linear": ("1.0", "linear", "mean", 0, "snr")}
METRICS = (("psnr", "PSNR fg (dB)", "higher"), ("ssim", "SSIM fg", "higher"),
           ("chroma_drift", "albedo chroma drift", "lower"), ("additivity_error", "additivity error", "lower"))
PRESET = "iclight_ds/train/presets/default-cpu.yaml"
HELDOUT_SEED = 20000
EVAL_SEED = 0
TARGET_RATIO = 0.7


def train_run(out: Path, arm: str, seed: int, args: argparse.Namespace) -> float:
    lambda_c, form, merger_init, min_timestep, weighting = ARMS[arm]
    cmd = ["bash", str(REPO / "launch" / "train.sh"), "--launcher", "python", "--output-dir", str(out)]
    if args.config != "none":
        cmd += ["--config", args.config]
    cmd += ["--objective.lambda_consistency", lambda_c, "--objective.consistency", form, "--model.merger_init",
            merger_init, "--objective.consistency_min_timestep", str(min_timestep),
            "--objective.consistency_weighting", weighting, "--train.seed", str(seed),
            "--train.steps", str(args.steps), "--logging.preview_every", "0", "--logging.eval_every", "0",
            "--logging.progress", "false", "--logging.wandb", "false", "--logging.every", "10",
            "--data.synth_target_shift", str(args.target_shift)]
    start = time.perf_counter()
    with open(out.parent / f"{out.name}.log", "w") as log:
        subprocess.run(cmd, check=True, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    return time.perf_counter() - start


def evaluate(run: Path, held: Path, args: argparse.Namespace) -> dict:
    out = run / "eval.json"
    subprocess.run([sys.executable, "-m", "iclight_ds.eval", "--run", str(run), "--data", str(held), "--samples",
                    str(args.samples), "--steps", str(args.eval_steps), "--seed", str(EVAL_SEED), "--out", str(out)],
                   check=True, cwd=REPO, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())["summary"]


def losses(run: Path) -> list[dict]:
    return [m for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in (m := json.loads(line))]


def one_run(root: Path, held: Path, arm: str, seed: int, args: argparse.Namespace) -> dict:
    """Train and score one arm at one seed; a run kept from before (its record.json) is read back instead."""
    run = root / f"{arm}-seed{seed}"
    record = root / f"{arm}-seed{seed}.json"
    if record.is_file():
        return json.loads(record.read_text())
    seconds = train_run(run, arm, seed, args)
    result = {"seed": seed, "train_seconds": round(seconds, 1), "eval": evaluate(run, held, args),
              "losses": losses(run), "steps": json.loads((run / "config.json").read_text())["train"]["steps"]}
    record.write_text(json.dumps(result))
    return result


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarise(arms: dict[str, list[dict]]) -> dict:
    """Each arm's per-metric spread over its seeds and, against the vanilla arm at the same seed, its additivity
    ratio and PSNR and drift differences; `target_met`: mean ratio <= 0.7 at equal or better mean PSNR and drift."""
    out = {}
    vanilla = {r["seed"]: r["eval"] for r in arms.get("vanilla", [])}
    for arm, runs in arms.items():
        entry = {"lambda_consistency": float(ARMS[arm][0]), "consistency": ARMS[arm][1], "merger_init": ARMS[arm][2],
                 "consistency_min_timestep": ARMS[arm][3], "consistency_weighting": ARMS[arm][4], "runs": runs,
                 "metrics": {key: spread([r["eval"][key] for r in runs]) for key, _, _ in METRICS},
                 "train_seconds": spread([r["train_seconds"] for r in runs])}
        paired = [(r["eval"], vanilla[r["seed"]]) for r in runs if r["seed"] in vanilla]
        if arm != "vanilla" and paired:
            ratios = [e["additivity_error"] / v["additivity_error"] for e, v in paired]
            entry["additivity_ratio"] = {"per_seed": ratios, **spread(ratios)}
            entry["psnr_gain_db"] = spread([e["psnr"] - v["psnr"] for e, v in paired])
            entry["drift_change"] = spread([e["chroma_drift"] - v["chroma_drift"] for e, v in paired])
            entry["target_met"] = (entry["additivity_ratio"]["mean"] <= TARGET_RATIO
                                   and entry["psnr_gain_db"]["mean"] >= 0 and entry["drift_change"]["mean"] <= 0)
        out[arm] = entry
    return out


COLOURS = {"vanilla": "tab:orange", "paper": "tab:blue", "x0": "tab:green", "x0-sum": "tab:red",
           "x0-sum-high": "tab:brown", "x0-sum-high-5": "tab:pink", "x0-sum-noise": "tab:olive",
           "x0-sum-noise-high": "tab:cyan", "linear": "tab:purple"}


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 1 + len(METRICS), figsize=(4 * (1 + len(METRICS)), 3.6))
    for arm, data in result["arms"].items():
        first = data["runs"][0]
        steps = [m["step"] for m in first["losses"]]
        axes[0].plot(steps, [m["loss_vanilla"] for m in first["losses"]], color=COLOURS[arm],
                     label=f"{arm}: vanilla loss (seed {first['seed']})")
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[0].legend(fontsize=7)
    names = list(result["arms"])
    for ax, (key, name, better) in zip(axes[1:], METRICS):
        means = [result["arms"][a]["metrics"][key]["mean"] for a in names]
        stds = [result["arms"][a]["metrics"][key]["std"] for a in names]
        ax.bar(names, means, yerr=stds, capsize=4, color=[COLOURS[a] for a in names])
        for i, arm in enumerate(names):  # every seed's value over its arm's bar
            values = [r["eval"][key] for r in result["arms"][arm]["runs"]]
            ax.plot([i] * len(values), values, "k.", ms=4)
        if key == "psnr":
            ax.axhline(result["baseline"]["psnr"], color="grey", ls=":", label="copy input")
            ax.legend(fontsize=7)
        ax.set(title=f"{name} ({better} is better)")
    fig.suptitle(f"consistency ablation: {result['steps']} steps, seeds {result['seeds']}, mean and std, "
                 f"{result['eval_samples']} held-out scenes ({result['device']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def print_table(result: dict) -> None:
    names = list(result["arms"])
    print(f"\n{'metric (mean +- std)':<24}" + "".join(f"{a:>18}" for a in names) + f"{'copy input':>12}")
    for key, name, _ in METRICS:
        cells = "".join(f"{result['arms'][a]['metrics'][key]['mean']:>11.3f} +-{result['arms'][a]['metrics'][key]['std']:.3f}"
                        for a in names)
        print(f"{name:<24}{cells}{result['baseline'][key]:>12.3f}")
    for arm in names:
        if "additivity_ratio" in result["arms"][arm]:
            r = result["arms"][arm]["additivity_ratio"]
            met = "met" if result["arms"][arm]["target_met"] else "NOT met"
            print(f"{arm}: additivity ratio against vanilla {r['mean']:.3f} +- {r['std']:.3f} "
                  f"(per seed {', '.join(f'{x:.3f}' for x in r['per_seed'])}; target <= {TARGET_RATIO} at equal or "
                  f"better PSNR and drift: {met})")
    print(f"device: {result['device']}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "consistency-ablation-base.json")
    p.add_argument("--config", default=PRESET, help=f"the config every arm trains from (default {PRESET}; none: "
                                                    "the plain defaults, random weights)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (each arm runs each)")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--samples", type=int, default=32, help="held-out scenes scored")
    p.add_argument("--eval-steps", type=int, default=20, help="sampler steps of the evaluation")
    p.add_argument("--target-shift", type=float, default=0.0,
                   help="imperfect supervision: data.synth_target_shift of every run (the held-out scenes stay exact)")
    p.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder (default: a temp folder)")
    return p.parse_args(argv)


def main() -> None:
    args = parse_args()
    from iclight_ds.config import RunConfig
    from iclight_ds.data.synth import generate

    defaults = RunConfig()
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        held = root / "heldout"
        if not (held / "manifest.jsonl").is_file():
            generate(held, args.samples, size=defaults.data.resolution, seed=HELDOUT_SEED,
                     env_shape=defaults.model.env_shape)
        arms: dict[str, list[dict]] = {arm: [] for arm in args.arms}
        for seed in args.seeds:  # seed by seed: an interrupted ablation has whole seeds to compare
            for arm in args.arms:
                r = one_run(root, held, arm, seed, args)
                arms[arm].append(r)
                print(f"{arm}, seed {seed}: trained in {r['train_seconds']:.0f} s, PSNR {r['eval']['psnr']:.2f} dB, "
                      f"additivity {r['eval']['additivity_error']:.3f}", flush=True)
        config = json.loads((root / f"{args.arms[0]}-seed{args.seeds[0]}" / "config.json").read_text())
    first = arms[args.arms[0]][0]["eval"]
    result = {
        "provenance": provenance("bench/consistency_ablation.py", sys.argv[1:]),
        "device": f"CPU: {cpu_name()} ({os.cpu_count()} cores)" if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "config": args.config, "base": config["model"].get("base"), "steps": args.steps, "lr": config["train"]["lr"],
        "ds_config": config["train"]["ds_config"], "seeds": args.seeds, "eval_samples": args.samples,
        "eval_steps": args.eval_steps, "target_shift": args.target_shift, "eval_seed": EVAL_SEED,
        "heldout_seed": HELDOUT_SEED,
        "baseline": {"psnr": first["baseline_psnr"], "ssim": first["baseline_ssim"],
                     "chroma_drift": first["baseline_chroma_drift"], "additivity_error": 1.0},
        "additivity_floor": first.get("additivity_floor"), "target_ratio": TARGET_RATIO,
        "arms": summarise(arms),
    }
    write_result(args.out, result)
    png = args.out.with_suffix(".png")
    plot(result, png)
    print_table(result)
    print(f"wrote {png}")


if __name__ == "__main__":
    main()

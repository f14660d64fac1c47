#!/bin/bash
# The default run as a user starts it (`bash launch/train.sh`, nothing but a run folder), scored on the 32 held-out
# scenes of every result in docs/quality.md (seed 20000) against copy-the-input (the target: >= 6 dB better).
#
#   bash bench/default_run.sh [RESULT_JSON]   env: R (/tmp/default_run: work folder), LIMIT_S (0: none; else stop
#                                             the training after LIMIT_S seconds, saving a checkpoint),
#                                             RESUME (0; 1: continue the run left in R from its checkpoint),
#                                             LAUNCHER (deepspeed: launch/train.sh's default),
#                                             ARGS (more launch/train.sh arguments, e.g. another seed:
#                                             "--config iclight_ds/train/presets/default-cpu.yaml --train.seed 1"),
#                                             SCORE_ONLY (1: score the run left in R as it is, no training),
#                                             BASE_SCORE (1: a run with a model.base also scores that base as the
#                                             run starts from it, conv_in widened with zero channels: 1 step at LR
#                                             1e-12, the smallest the config takes; 0: skip)
#
# On a CPU-only machine that is the CPU default; with a CUDA GPU the trainer takes the GPU default run's preset
# (iclight_ds/train/presets/default-gpu.yaml). A run stopped by LIMIT_S is exported from its checkpoint and scored there
# (the JSON says at which step); RESUME=1 finishes its schedule. The evaluation runs on the CPU in fp32, like every
# README score, whatever trained the model.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled  # env, not an override: the default run stays so
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
R=${R:-/tmp/default_run}; RESULT=${1:-bench/results/default-run.json}; LIMIT_S=${LIMIT_S:-0}; RESUME=${RESUME:-0}
LAUNCHER=${LAUNCHER:-deepspeed}; BASE_SCORE=${BASE_SCORE:-1}; SCORE_ONLY=${SCORE_ONLY:-0}; read -r -a extra <<< "${ARGS:-}"
py="${PYTHON:-$(command -v python || command -v python3)}"
run="$R/run"
mkdir -p "$R"
if [[ "$SCORE_ONLY" == 1 ]]; then
  [[ -f "$run/unet.safetensors" ]] || { echo "SCORE_ONLY=1: $run has no unet.safetensors to score" >&2; exit 2; }
else  # the training
if [[ "$RESUME" == 1 ]]; then
  [[ -f "$run/checkpoints/latest" ]] || { echo "RESUME=1: $run has no checkpoint to continue" >&2; exit 2; }
  rm -f "$run/unet.safetensors"
  args=(--resume latest)
else
  rm -rf "$run" "$R/train.log" "$R/wall.txt"
  args=()
fi
cut -d' ' -f1-3 /proc/loadavg > "$R/load_start.txt"  # the machine may be shared: its load as the training starts
t0=$(date +%s)
# timeout (0: no limit) signals the whole group: every rank saves a checkpoint on SIGTERM and exits. timeout runs it
# in a process group of its own, so a Ctrl-C in the terminal does not reach the training: stop it with kill.
timeout "$LIMIT_S" bash launch/train.sh --launcher "$LAUNCHER" --output-dir "$run" "${args[@]}" "${extra[@]}" \
  >> "$R/train.log" 2>&1
rc=$?
# the deepspeed runner returns at once on a signal while its ranks still save: wait for them (it kills them at 30 s)
for _ in $(seq 60); do pgrep -f "iclight_ds.train .*$run" > /dev/null || break; sleep 1; done
echo "$(( $(date +%s) - t0 )) $rc" >> "$R/wall.txt"
echo "training: rc $rc after $(( $(date +%s) - t0 )) s ($R/train.log)"
if [[ ! -f "$run/checkpoints/latest" ]] || [[ $rc != 0 && $rc != 124 ]]; then  # failed, not just stopped
  tr '\r' '\n' < "$R/train.log" | grep -v "^train:" | tail -30; exit 1
fi
if [[ ! -f "$run/unet.safetensors" ]]; then  # stopped by LIMIT_S: export the checkpoint it saved
  "$py" -m iclight_ds.export --run "$run" >> "$R/train.log" 2>&1 || { tr '\r' '\n' < "$R/train.log" | tail -20; exit 1; }
fi
fi
[[ -f "$R/held/manifest.jsonl" ]] || "$py" -m iclight_ds.data.synth --out "$R/held" --n 32 --seed 20000 > /dev/null
CUDA_VISIBLE_DEVICES= "$py" -m iclight_ds.eval --run "$run" --data "$R/held" --samples 32 --steps 20 --seed 0 \
  --out "$R/eval32.json" --grid "$R/eval32.png" > "$R/eval.log" 2>&1 || { tail -20 "$R/eval.log"; exit 1; }
base=$("$py" -c "import json, sys; print(json.load(open(sys.argv[1]))['model']['base'] or '')" "$run/config.json")
rm -f "$R/eval32-base.json"
if [[ -n "$base" && "$BASE_SCORE" == 1 ]]; then  # the same config (the run's own), trained for no measurable change
  rm -rf "$R/base_run"
  CUDA_VISIBLE_DEVICES= "$py" -m iclight_ds.train --config "$run/config.json" --train.output_dir "$R/base_run" \
    --train.resume null --train.steps 1 --train.lr 1e-12 --train.warmup_steps 0 --logging.eval_every 0 \
    --logging.preview_every 0 --logging.wandb false > "$R/base_run.log" 2>&1 || { tail -20 "$R/base_run.log"; exit 1; }
  CUDA_VISIBLE_DEVICES= "$py" -m iclight_ds.eval --run "$R/base_run" --data "$R/held" --samples 32 --steps 20 \
    --seed 0 --out "$R/eval32-base.json" --grid "$R/eval32-base.png" > "$R/eval-base.log" 2>&1 || {
    tail -20 "$R/eval-base.log"; exit 1; }
fi
"$py" - "$R" "$RESULT" "$0 $*" "${ARGS:-}" <<'PY'
import datetime, json, os, subprocess, sys
from importlib.metadata import version
from pathlib import Path

import torch

from bench.provenance import cpu_name, provenance
from iclight_ds.train.engine import batch_geometry, read_ds_config

R, result, script, extra = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], sys.argv[4]
run = R / "run"
cfg = json.loads((run / "config.json").read_text())
ds = read_ds_config(run / "ds_config.json")
records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
evals = [{k.removeprefix("eval/"): v for k, v in r.items() if k == "step" or k.startswith("eval/")}
         for r in records if "eval/psnr" in r]
losses = [r for r in records if "loss" in r]
final = json.loads((R / "eval32.json").read_text())["summary"]
calls = [line.split() for line in (R / "wall.txt").read_text().splitlines()]
cores = len(os.sched_getaffinity(0))
device = f"cuda ({torch.cuda.get_device_name(0)})" if torch.cuda.is_available() else f"cpu ({cpu_name()}, {cores} cores)"
git = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True).stdout
out = {
    "provenance": provenance("bench/default_run.sh", sys.argv[2:3], command=sys.argv[3]),
    "device": device,
    "torch": torch.__version__,
    "versions": {name: version(name) for name in ("deepspeed", "diffusers", "transformers")},
    "cores": cores,
    "git_commit": git + (" (with uncommitted changes)" if dirty.strip() else ""),
    "script": script,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "load_avg_1_5_15_min": {"training_start": [float(x) for x in (R / "load_start.txt").read_text().split()]
                                              if (R / "load_start.txt").is_file() else None,
                            "end": [round(x, 2) for x in os.getloadavg()]},  # the machine may be shared
    "command": "bash launch/train.sh --output-dir RUN" + (f" {extra}" if extra else "")
               + " (+ --resume latest per further call)",
    "seed": cfg["train"]["seed"],
    "calls": [{"wall_s": int(w), "rc": int(rc)} for w, rc in calls],
    "preset": "default-gpu" if cfg["train"]["ds_config"] == "default-gpu" else "cpu default",
    "steps_planned": cfg["train"]["steps"],
    "steps_reached": int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_")),
    "batch_per_rank": batch_geometry(ds, world_size=1).effective_batch,
    "vae": cfg["model"]["vae"],
    "base": Path(cfg["model"]["base"]).name if cfg["model"]["base"] else None,
    "synth_samples": cfg["data"]["synth_samples"],
    "final_loss": losses[-1]["loss"] if losses else None,
    "samples_per_s": losses[-1].get("samples_per_s") if losses else None,
    "train_evals": evals,
    "eval_32": final,
}
if (R / "eval32-base.json").is_file():  # the base as the run starts from it (BASE_SCORE)
    out["eval_32_base_before_finetune"] = json.loads((R / "eval32-base.json").read_text())["summary"]
result.parent.mkdir(parents=True, exist_ok=True)
result.write_text(json.dumps(out, indent=1) + "\n")
s = final
print(f"{out['device']}: {out['preset']}, step {out['steps_reached']}/{out['steps_planned']}, "
      f"batch {out['batch_per_rank']} per rank; 32 held-out scenes: PSNR {s['psnr']:.2f} dB vs copy {s['baseline_psnr']:.2f} "
      f"({s['psnr'] - s['baseline_psnr']:+.2f}), SSIM {s['ssim']:.3f}, additivity {s['additivity_error']:.3f}")
if "eval_32_base_before_finetune" in out:
    b = out["eval_32_base_before_finetune"]
    print(f"the base before fine-tuning (conv_in widened, zero): PSNR {b['psnr']:.2f} dB, SSIM {b['ssim']:.3f}, "
          f"additivity {b['additivity_error']:.3f}")
print(f"wrote {result}")
PY

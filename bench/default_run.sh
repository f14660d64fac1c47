#!/bin/bash
# The default run as a user starts it (`bash launch/train.sh`, nothing but a run folder), scored on the 32 held-out
# scenes of every result in docs/quality.md (seed 20000) against copy-the-input (the target: >= 6 dB better).
#
#   bash bench/default_run.sh [RESULT_JSON]   env: R (/tmp/default_run: work folder), LIMIT_S (0: none; else stop
#                                             the training after LIMIT_S seconds, saving a checkpoint),
#                                             RESUME (0; 1: continue the run left in R from its checkpoint),
#                                             LAUNCHER (deepspeed: launch/train.sh's default)
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
LAUNCHER=${LAUNCHER:-deepspeed}
py="${PYTHON:-$(command -v python || command -v python3)}"
run="$R/run"
mkdir -p "$R"
if [[ "$RESUME" == 1 ]]; then
  [[ -f "$run/checkpoints/latest" ]] || { echo "RESUME=1: $run has no checkpoint to continue" >&2; exit 2; }
  rm -f "$run/unet.safetensors"
  args=(--resume latest)
else
  rm -rf "$run" "$R/train.log" "$R/wall.txt"
  args=()
fi
t0=$(date +%s)
# timeout (0: no limit) signals the whole group: every rank saves a checkpoint on SIGTERM and exits. timeout runs it
# in a process group of its own, so a Ctrl-C in the terminal does not reach the training: stop it with kill.
timeout "$LIMIT_S" bash launch/train.sh --launcher "$LAUNCHER" --output-dir "$run" "${args[@]}" \
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
[[ -f "$R/held/manifest.jsonl" ]] || "$py" -m iclight_ds.data.synth --out "$R/held" --n 32 --seed 20000 > /dev/null
CUDA_VISIBLE_DEVICES= "$py" -m iclight_ds.eval --run "$run" --data "$R/held" --samples 32 --steps 20 --seed 0 \
  --out "$R/eval32.json" --grid "$R/eval32.png" > "$R/eval.log" 2>&1 || { tail -20 "$R/eval.log"; exit 1; }
command="R=$R LIMIT_S=$LIMIT_S RESUME=$RESUME LAUNCHER=$LAUNCHER bash bench/default_run.sh $*"  # for the provenance
"$py" - "$R" "$RESULT" "$command" <<'PY'
import json, os, sys
from pathlib import Path

import torch

from bench.provenance import cpu_name, provenance
from iclight_ds.train.engine import batch_geometry, read_ds_config

R, result = Path(sys.argv[1]), Path(sys.argv[2])
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
out = {
    "provenance": provenance("bench/default_run.sh", sys.argv[2:3], command=sys.argv[3]),
    "device": device,
    "torch": torch.__version__,
    "cores": cores,
    "command": "bash launch/train.sh --output-dir RUN (+ --resume latest per further call)",
    "calls": [{"wall_s": int(w), "rc": int(rc)} for w, rc in calls],
    "preset": "default-gpu" if cfg["train"]["ds_config"] == "default-gpu" else "cpu default",
    "steps_planned": cfg["train"]["steps"],
    "steps_reached": int((run / "checkpoints" / "latest").read_text().strip().removeprefix("step_")),
    "batch_per_rank": batch_geometry(ds, world_size=1).effective_batch,
    "vae": cfg["model"]["vae"],
    "synth_samples": cfg["data"]["synth_samples"],
    "final_loss": losses[-1]["loss"] if losses else None,
    "samples_per_s": losses[-1].get("samples_per_s") if losses else None,
    "train_evals": evals,
    "eval_32": final,
}
result.parent.mkdir(parents=True, exist_ok=True)
result.write_text(json.dumps(out, indent=1) + "\n")
s = final
print(f"{out['device']}: {out['preset']}, step {out['steps_reached']}/{out['steps_planned']}, "
      f"batch {out['batch_per_rank']} per rank; 32 held-out scenes: PSNR {s['psnr']:.2f} dB vs copy {s['baseline_psnr']:.2f} "
      f"({s['psnr'] - s['baseline_psnr']:+.2f}), SSIM {s['ssim']:.3f}, additivity {s['additivity_error']:.3f}")
print(f"wrote {result}")
PY

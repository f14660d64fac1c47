#!/bin/bash
# Does the tiny setup reach the quality targets (docs/quality.md) with ~10x the samples of the longest CPU run? (GPU)
#
#   bash bench/quality_scale.sh [RESULT_JSON]   env: B (512: micro-batch), STEPS (1000), TRAIN_S (420),
#                                               NBIG (12288: training scenes), EVAL_EVERY (250), WORKERS (3),
#                                               RUNS (f4-lc0.1 f4-lc0 f8-lc0.1 f8-lc0), R (/tmp/quality_scale),
#                                               RESUME (0; 1: continue the RUNS already in R)
#
# Trains side by side on one device, each for at most TRAIN_S seconds, the default tiny FC setup with a large
# micro-batch (B; ZeRO stage 0, bf16, no gradient checkpointing, lr 3e-3 cosine over STEPS):
#   f4-lc0.1 / f4-lc0   the shipped 4x VAE (iclight_ds/model/assets/tiny_vae_4x.safetensors), lambda_c 0.1 / 0
#   f8-lc0.1 / f8-lc0   the shipped 8x VAE (the default), lambda_c 0.1 / 0
# on NBIG synthetic scenes (seed 0), evaluating every EVAL_EVERY steps on 16 held-out scenes (seed 20000). A run the
# time limit stops saves a checkpoint on SIGTERM and is exported from there. Every run is then scored on 32 held-out
# scenes (`python -m iclight_ds.eval`: <run>/eval32.json and the grid eval32.png), and bench/quality_summary.py
# writes RESULT_JSON. RESUME=1 continues stopped runs from their checkpoints (exact resume, same schedule) for
# another TRAIN_S seconds; their earlier 32-scene scores are kept as eval32-step<N>.json.
# On one GPU the runs share it; their steps/s says how much each got. The trainer picks the device (CUDA if any).
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=2
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
B=${B:-512}; STEPS=${STEPS:-1000}; TRAIN_S=${TRAIN_S:-420}; NBIG=${NBIG:-12288}
EVAL_EVERY=${EVAL_EVERY:-250}; WORKERS=${WORKERS:-3}; RUNS=${RUNS:-f4-lc0.1 f4-lc0 f8-lc0.1 f8-lc0}
R=${R:-/tmp/quality_scale}; RESULT=${1:-bench/results/quality-scale.json}; RESUME=${RESUME:-0}
py="${PYTHON:-$(command -v python || command -v python3)}"
t0=$(date +%s); el() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
train() {  # name port args...: one run, stopped (saving) after TRAIN_S seconds
  local n=$1 p=$2; shift 2
  timeout "$TRAIN_S" bash launch/train.sh --launcher python --master-port "$p" "$@" >> "$R/$n.log" 2>&1
  echo "$n rc $?" >> "$R/rc.txt"
}
if [[ "$RESUME" == 1 ]]; then
  port=29630
  for n in $RUNS; do
    d="$R/$n"
    [[ -f "$d/checkpoints/latest" ]] || { echo "RESUME=1: $d has no checkpoint to continue"; exit 2; }
    step=$(sed 's/^step_0*//' "$d/checkpoints/latest")
    [[ -f "$d/eval32.json" ]] && mv "$d/eval32.json" "$d/eval32-step$step.json"
    rm -f "$d/unet.safetensors" "$d/eval32.png"
    port=$((port + 1))
    train "$n" "$port" --config "$d/config.json" --train.resume latest &
  done
else
  mkdir -p "$R"; rm -f "$R/rc.txt"
  cat > "$R/ds.json" <<J
{"train_micro_batch_size_per_gpu": $B, "gradient_accumulation_steps": 1, "bf16": {"enabled": true},
 "zero_optimization": {"stage": 0}, "gradient_clipping": 1.0, "steps_per_print": 1000000000}
J
  "$py" -m iclight_ds.data.synth --out "$R/held" --n 32 --seed 20000 > /dev/null || exit 1
  "$py" -m iclight_ds.data.synth --out "$R/big" --n "$NBIG" --workers "$(nproc)" > /dev/null || exit 1
  el "rendered $NBIG scenes"
  port=29610
  for n in $RUNS; do
    case $n in
      f4-*) vae=iclight_ds/model/assets/tiny_vae_4x.safetensors ;;
      f8-*) vae=auto ;;
      *) echo "unknown run $n (f4-lc<lambda> or f8-lc<lambda>)"; exit 2 ;;
    esac
    port=$((port + 1)); rm -rf "${R:?}/$n" "$R/$n.log" "$R/$n.eval.log"
    train "$n" "$port" --output-dir "$R/$n" --data.path "$R/big" --data.validate false --data.num_workers "$WORKERS" \
      --train.ds_config "$R/ds.json" --train.steps "$STEPS" --model.vae "$vae" --model.gradient_checkpointing false \
      --objective.lambda_consistency "${n##*-lc}" --logging.wandb false --logging.progress false \
      --logging.preview_every 0 --logging.every 25 --logging.eval_every "$EVAL_EVERY" --logging.eval_samples 16 \
      --logging.eval_data "$R/held" &
  done
fi
wait; el trained; cat "$R/rc.txt"
for n in $RUNS; do
  d="$R/$n"
  [[ -f "$d/unet.safetensors" ]] || "$py" -m iclight_ds.export --run "$d" >> "$d.log" 2>&1  # stopped at the limit
  [[ -f "$d/unet.safetensors" ]] || continue
  CUDA_VISIBLE_DEVICES= "$py" -m iclight_ds.eval --run "$d" --data "$R/held" --samples 32 --steps 20 --seed 0 \
    --out "$d/eval32.json" --grid "$d/eval32.png" > "$d.eval.log" 2>&1 &
done
wait; el evaluated
"$py" bench/quality_summary.py "$R" --out "$RESULT" --train-seconds "$TRAIN_S"

#!/bin/bash
# How far does the default tiny setup get with more compute and a 4x VAE? (run on a GPU)
#
#   bash bench/quality_sweep.sh [RESULT_JSON]      env: DEV (cuda), TRAIN_S (330), STEPS (1500), VSTEPS (6000),
#                                                  NBIG (8192), R (/tmp/quality_sweep: work folder)
#
# 1. trains two tiny VAEs with 4x downsampling (16x16 latents at 64 px) with `python -m iclight_ds.tiny_vae`:
#    widths 32/64/64 and 48/96/96, and renders 8192 synthetic scenes;
# 2. trains, side by side on one device, each for at most TRAIN_S seconds, evaluating every 250 steps on 8 held-out
#    scenes (seed 20000; the committed H200 sweep scored its batch-64 runs on 8 of their training scenes instead,
#    see docs/quality.md):
#      f8-b64      shipped 8x VAE, micro-batch 64 (8x the default), 8192 scenes
#      f4-b8       4x VAE, the default run otherwise (micro-batch 8, 1024 scenes)
#      f4-b64      4x VAE, micro-batch 64, 8192 scenes;  f4-b64-lc0: the same with lambda_c = 0
#      f4w-b64     wider 4x VAE, micro-batch 64, 8192 scenes
#    (ZeRO stage 0, bf16, lr 3e-3 cosine over STEPS);
# 3. scores every run that finished on 32 held-out scenes (`python -m iclight_ds.eval`, <run>/eval32.json), and
#    bench/quality_summary.py collects everything into RESULT_JSON and prints a table.
set -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled OMP_NUM_THREADS=2
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
DEV=${DEV:-cuda}; TRAIN_S=${TRAIN_S:-330}; STEPS=${STEPS:-1500}; VSTEPS=${VSTEPS:-6000}; NBIG=${NBIG:-8192}
R=${R:-/tmp/quality_sweep}; RESULT=${1:-bench/results/quality-sweep.json}
py="${PYTHON:-$(command -v python || command -v python3)}"
mkdir -p "$R"; rm -f "$R/rc.txt"
for b in 8 64; do cat > "$R/b$b.json" <<J
{"train_micro_batch_size_per_gpu": $b, "gradient_accumulation_steps": 1, "bf16": {"enabled": true},
 "zero_optimization": {"stage": 0}, "gradient_clipping": 1.0, "steps_per_print": 1000000000}
J
done
"$py" -m iclight_ds.tiny_vae --device "$DEV" --out "$R/vae_f4.safetensors" --channels 32 64 64 --steps "$VSTEPS" \
  --batch 64 > "$R/vae_f4.log" 2>&1 &
"$py" -m iclight_ds.tiny_vae --device "$DEV" --out "$R/vae_f4w.safetensors" --channels 48 96 96 --steps "$VSTEPS" \
  --batch 64 > "$R/vae_f4w.log" 2>&1 &
"$py" -m iclight_ds.data.synth --out "$R/held" --n 32 --seed 20000 > /dev/null
"$py" -m iclight_ds.data.synth --out "$R/big" --n "$NBIG" --workers 6 > /dev/null
run() {  # name port args...
  local n=$1 p=$2; shift 2
  timeout "$TRAIN_S" bash launch/train.sh --launcher python --master-port "$p" --output-dir "$R/$n" \
    --logging.wandb false --logging.progress false --logging.preview_every 0 --logging.eval_every 250 \
    --logging.every 25 --logging.eval_data "$R/held" --train.steps "$STEPS" "$@" > "$R/$n.log" 2>&1
  echo "$n rc $?" >> "$R/rc.txt"
}
big=(--data.path "$R/big" --train.ds_config "$R/b64.json" --data.num_workers 2)
run f8-b64 29601 "${big[@]}" &
wait %1 %2
run f4-b8 29602 --model.vae "$R/vae_f4.safetensors" --train.ds_config "$R/b8.json" &
run f4-b64 29603 --model.vae "$R/vae_f4.safetensors" "${big[@]}" &
run f4-b64-lc0 29604 --model.vae "$R/vae_f4.safetensors" "${big[@]}" --objective.lambda_consistency 0 &
run f4w-b64 29605 --model.vae "$R/vae_f4w.safetensors" "${big[@]}" &
wait
for unet in "$R"/*/unet.safetensors; do  # the runs that finished (and exported)
  [[ -f "$unet" ]] || continue
  run_dir="$(dirname "$unet")"
  CUDA_VISIBLE_DEVICES= "$py" -m iclight_ds.eval --run "$run_dir" --data "$R/held" --samples 32 --steps 20 --seed 0 \
    --out "$run_dir/eval32.json" > "$run_dir.eval.log" 2>&1 &
done
wait
"$py" bench/quality_summary.py "$R" --out "$RESULT" --train-seconds "$TRAIN_S"

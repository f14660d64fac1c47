#!/bin/bash
# Every GPU measurement of docs/performance.md in one run of about 8 minutes; JSON is written after every case, so a
# run cut short keeps what it finished.
#
#   bash bench/gpu_all.sh [RESULTS_DIR]      (default bench/results/; a dry run's default /tmp/iclight-gpu-all-dry)
#
# env: BUDGET_S (480: the whole run, preparation included), BUSY_S (90: the default run's time under the sampler),
#      FIRST_CASES / LATER_CASES (bench/throughput.py case lists, below), LOGS (the logs' folder; default a new one
#      under /tmp), DRY_RUN (0; 1: the same sequence with the tiny model at 64 px, micro-batches 1 and 2, compile
#      through aot_eager, on whatever device this is: it proves the script end to end on a CPU and never writes into
#      bench/results/). An empty case list or BUSY_S=0 skips
#      that part, and the table is appended to (a measured row is kept over one not run), so a later run can
#      measure what an earlier one left, e.g. FIRST_CASES= BUSY_S=0 LATER_CASES=compile bash bench/gpu_all.sh
#
# 1. In parallel, before anything is timed: DeepSpeed's CPU Adam op is built (the offload cases step with it), and
#    the default run's synthetic scenes are rendered into its run folder by the trainer's own function, with the
#    config `bash launch/train.sh` takes on this machine (the trainer then finds them and renders nothing).
# 2. bench/throughput.py, FIRST_CASES: ZeRO-2 at micro-batches 1-16 (base), channels-last, fused AdamW, ZeRO-2 with
#    optimizer offload (CPU Adam) and ZeRO-3 with parameter and optimizer offload (CPU Adam) -> throughput-<dev>.json
# 3. The default run, `bash launch/train.sh --output-dir RUN`, for BUSY_S seconds under bench/gpu_busy.py (the GPU
#    default preset on a GPU of 16 GiB or more) -> default-run-busy-<dev>.json: GPU busy over its training window.
# 4. bench/throughput.py --append, LATER_CASES until the budget is spent: gradient checkpointing, torch.compile,
#    xformers (recorded as unavailable where it does not load), ZeRO stage 0, the offload variants of
#    bench/ds_variants/ (overlap, buckets, pinning, sub-group size, SuperOffload).
set -u -o pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=disabled
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"; cd "$repo"
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
py="${PYTHON:-$(command -v python || command -v python3)}"
T0=$(date +%s)
DRY_RUN=${DRY_RUN:-0}  # the case lists below default only when unset: an empty one skips its part
FIRST_CASES=${FIRST_CASES-base,channels-last,fused-adamw,offload,zero3-offload}
LATER_CASES=${LATER_CASES-checkpointing,compile,xformers,stage0,offload-buckets-200m,offload-no-overlap,zero3-superoffload,zero3-offload-subgroup-1e8,offload-unpinned,zero3-offload-subgroup-1e9}
if [[ "$DRY_RUN" == 1 ]]; then
  OUT=${1:-/tmp/iclight-gpu-all-dry}; BUDGET_S=${BUDGET_S:-1500}; BUSY_S=${BUSY_S:-90}
  bench=(--size tiny --resolution 64 --micro-batches 1,2 --steps 1 --warmup 1 --min-time-s 0
         --compile-backend aot_eager)
  case "$(cd "$(dirname "$OUT")" 2>/dev/null && pwd)/$(basename "$OUT")" in
    "$repo/bench/results"*) echo "DRY_RUN=1 writes no results into bench/results/: give another folder" >&2; exit 2 ;;
  esac
else
  OUT=${1:-bench/results}; BUDGET_S=${BUDGET_S:-480}; BUSY_S=${BUSY_S:-90}
  bench=(--size full --resolution 512 --min-case-s 45)  # a full-size case needs ~30 s before its first step
  "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" || {
    echo "bench/gpu_all.sh: no CUDA GPU here; DRY_RUN=1 runs the same sequence with tiny settings" >&2; exit 2; }
fi
logs=${LOGS:-$(mktemp -d /tmp/gpu-all-logs.XXXX)}; mkdir -p "$OUT" "$logs"
left() { local s=$(( BUDGET_S - ($(date +%s) - T0) - ${1:-0} )); echo $(( s < 1 ? 1 : s )); }
dev=$("$py" -c "import sys; sys.path.insert(0, 'bench'); import throughput as t; print(t.device_slug(t.device_info()))")
run="$(mktemp -d /tmp/gpu-all-run.XXXX)/default-run"  # its scenes and checkpoints stay out of the results
echo "gpu_all: device $dev, budget ${BUDGET_S} s, results in $OUT, logs in $logs"

# 1. preparation, in parallel; neither is timed by any case
timeout 240 "$py" -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" \
  > "$logs/cpu_adam.log" 2>&1 &
adam=$!
render=""
if (( BUSY_S > 0 )); then  # the default run's scenes; BUSY_S=0 skips the default run
  timeout 150 "$py" - "$run" > "$logs/render.log" 2>&1 <<'PY' &
import sys
from pathlib import Path

import torch

from iclight_ds.config import load_config
from iclight_ds.train.build import make_synthetic
from iclight_ds.train.cli import default_config_file

run = sys.argv[1]
gib = torch.cuda.get_device_properties(0).total_memory / 2**30 if torch.cuda.is_available() else None
cfg = load_config(default_config_file(None, {"train.output_dir": run}, gib), {"train.output_dir": run})
make_synthetic(Path(run) / "data", cfg.data.synth_samples, seed=cfg.data.synth_seed, resolution=cfg.data.resolution,
               env_shape=cfg.model.env_shape)
print(f"rendered {cfg.data.synth_samples} scenes for the default run into {run}/data")
PY
  render=$!
fi
wait $adam || echo "gpu_all: building CPU Adam failed ($logs/cpu_adam.log); the offload cases will say so"
[[ -z "$render" ]] || wait $render || echo "gpu_all: rendering failed ($logs/render.log); the default run renders its own scenes"
echo "gpu_all: prepared after $(( $(date +%s) - T0 )) s"

# 2. the throughput table's first cases; leave the default run (3) its time
if [[ -n "$FIRST_CASES" ]]; then
  "$py" bench/throughput.py "${bench[@]}" --cases "$FIRST_CASES" --budget-s "$(left $(( BUSY_S + 60 )))" --append \
    --out "$OUT/throughput-$dev.json" 2>&1 | tee "$logs/throughput-first.log" | grep -E "^case |^wrote|Error" || true
fi

# 3. the default run as a user starts it, under the busy sampler
if (( BUSY_S > 0 )); then
  "$py" bench/gpu_busy.py --out "$OUT/default-run-busy-$dev.json" --limit-s "$BUSY_S" \
    --metrics "$run/metrics.jsonl" --label "bash launch/train.sh --output-dir RUN, stopped after ${BUSY_S} s" \
    -- bash launch/train.sh --output-dir "$run" > "$logs/default-run.log" 2>&1
  tail -1 "$logs/default-run.log"
fi

# 4. the rest of the table, as far as the budget goes
if [[ -n "$LATER_CASES" ]]; then
  "$py" bench/throughput.py "${bench[@]}" --cases "$LATER_CASES" --budget-s "$(left)" --append \
    --out "$OUT/throughput-$dev.json" 2>&1 | tee "$logs/throughput-later.log" | grep -E "^case |^wrote|Error" || true
fi

"$py" - "$OUT/throughput-$dev.json" "$OUT/default-run-busy-$dev.json" <<'PY'
import json, os, sys

table = json.loads(open(sys.argv[1]).read()) if os.path.isfile(sys.argv[1]) else {"device_name": "-", "rows": [],
                                                                                  "summary": {}}
busy = json.loads(open(sys.argv[2]).read()) if os.path.isfile(sys.argv[2]) else None
print(f"\n{table['device_name']}: {len(table['rows'])} rows")
for r in table["rows"]:
    mfu = f"{r['mfu']:.3f}" if r.get("mfu") is not None else "-"
    sps = f"{r['samples_per_s']:.2f}" if r.get("samples_per_s") else "-"
    print(f"  {r['case']:<28} mb {r['micro_batch']:>2}  samples/s {sps:>8}  MFU {mfu:>6}  {r.get('error') or ''}"[:140])
print("summary:", json.dumps(table["summary"]))
if busy is not None:
    b = busy["gpu_busy_training"]
    print(f"default run: GPU busy while training {'n/a' if b is None else f'{100 * b:.0f}%'}, logged samples/s "
          f"{busy['logged_samples_per_s'][-3:]}")
PY
echo "gpu_all: done in $(( $(date +%s) - T0 )) s (budget ${BUDGET_S} s); logs in $logs"

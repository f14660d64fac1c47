#!/usr/bin/env bash
# Train an IC-Light model. With no arguments: the built-in default (synthetic relighting data, tiny models) into
# runs/default/, or with a GPU of 16 GiB or more the GPU default run (iclight_ds/train/presets/default-gpu.yaml) into
# runs/default-gpu/.
#
#   bash launch/train.sh [--num-gpus N] [--hostfile FILE [--no-ssh --node-rank R --master-addr HOST]]
#                        [--ds-config NAME|FILE|auto] [--config FILE]
#                        [--output-dir DIR] [--resume latest|CHECKPOINT_DIR] [--resume-unverified]
#                        [--launcher deepspeed|torchrun|python] [--master-port P] [--section.key VALUE ...]
#
# --num-gpus    ranks on this machine (default: every visible GPU, or 1 on a CPU-only machine; on CPU each
#               rank is a process, e.g. --num-gpus 2 gives two CPU ranks over gloo)
# --hostfile    DeepSpeed hostfile for several nodes ("host slots=N" per line); deepspeed launcher only
# --no-ssh      with --hostfile: start only this node's ranks (run the same command on every node with its own
#               --node-rank; --master-addr is node 0's address), instead of reaching the others over ssh/pdsh
# --ds-config   a file in ds_configs/ (name with or without .json), a path, or auto (the memory planner picks)
# --launcher    deepspeed (default), torchrun, or python (one process, no launcher)
# Anything else (--train.steps 100, --model.variant fbc, ...) is passed to the trainer as a config override.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# the interpreter: $PYTHON, else python, else python3 (some images, e.g. CUDA ones, have only python3)
py="${PYTHON:-$(command -v python || command -v python3 || true)}"
[[ -n "$py" ]] || { echo "launch/train.sh: no python or python3 on PATH (or set PYTHON)" >&2; exit 2; }
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
export WANDB_MODE="${WANDB_MODE:-offline}"

num_gpus=""
hostfile=""
launcher="deepspeed"
master_port="${MASTER_PORT:-29512}"
no_ssh=""
node_rank=""
master_addr=""
passthrough=()
need_value() { [[ $# -ge 2 && -n "$2" ]] || { echo "launch/train.sh: $1 needs a value" >&2; exit 2; }; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    --num-gpus) need_value "$@"; num_gpus="$2"; shift 2 ;;
    --hostfile) need_value "$@"; hostfile="$2"; shift 2 ;;
    --launcher) need_value "$@"; launcher="$2"; shift 2 ;;
    --master-port) need_value "$@"; master_port="$2"; shift 2 ;;
    --no-ssh) no_ssh=1; shift ;;
    --node-rank) need_value "$@"; node_rank="$2"; shift 2 ;;
    --master-addr) need_value "$@"; master_addr="$2"; shift 2 ;;
    --ds-config) need_value "$@"; passthrough+=(--train.ds_config "$2"); shift 2 ;;
    --output-dir) need_value "$@"; passthrough+=(--train.output_dir "$2"); shift 2 ;;
    --resume) need_value "$@"; passthrough+=(--train.resume "$2"); shift 2 ;;
    --resume-unverified) passthrough+=(--train.resume_unverified true); shift ;;
    --config) need_value "$@"; passthrough+=(--config "$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo pipefail/{/^#/p}' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) passthrough+=("$1"); shift ;;
  esac
done

if [[ -z "$num_gpus" ]]; then
  num_gpus=$("$py" -c "import torch; print(max(1, torch.cuda.device_count()))") || {
    echo "launch/train.sh: could not count the GPUs with $py (is torch installed for it?)" >&2; exit 2; }
fi

case "$launcher" in
  deepspeed)
    args=(--num_gpus "$num_gpus" --master_port "$master_port")
    [[ -n "$hostfile" ]] && args=(--hostfile "$hostfile" --master_port "$master_port")
    if [[ -n "$no_ssh" ]]; then
      [[ -n "$hostfile" && -n "$node_rank" && -n "$master_addr" ]] || {
        echo "launch/train.sh: --no-ssh needs --hostfile, --node-rank and --master-addr" >&2; exit 2; }
      args+=(--no_ssh --node_rank "$node_rank" --master_addr "$master_addr")
    elif [[ -n "$node_rank$master_addr" ]]; then
      echo "launch/train.sh: --node-rank and --master-addr go with --no-ssh" >&2; exit 2
    fi
    exec deepspeed "${args[@]}" --no_local_rank --module iclight_ds.train "${passthrough[@]}"
    ;;
  torchrun)
    [[ -n "$hostfile" ]] && { echo "launch/train.sh: --hostfile needs --launcher deepspeed" >&2; exit 2; }
    exec torchrun --nproc_per_node "$num_gpus" --master_port "$master_port" -m iclight_ds.train "${passthrough[@]}"
    ;;
  python)
    [[ "$num_gpus" == 1 && -z "$hostfile" ]] || { echo "launch/train.sh: --launcher python runs one process" >&2; exit 2; }
    exec "$py" -m iclight_ds.train "${passthrough[@]}"
    ;;
  *) echo "launch/train.sh: unknown --launcher $launcher (deepspeed, torchrun, python)" >&2; exit 2 ;;
esac

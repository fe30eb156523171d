#!/usr/bin/env bash
# Train dgan on one machine: torchrun --standalone, one worker per GPU (one worker on a CPU box).
#
# Needs:  the dgan venv active (or VENV=/path/to/venv).
#         Optional: NPROC (workers; default: the GPUs in CUDA_VISIBLE_DEVICES or nvidia-smi, else 1),
#         OMP_NUM_THREADS (default: CPU cores / NPROC), SHUTDOWN_TIMEOUT (default 60 s).
# Usage:  launch/train_single_node.sh --config configs/my.yaml [--resume auto|PATH] [dotted.override=value ...]
#         e.g. NPROC=2 launch/train_single_node.sh --config configs/my.yaml log.run_name=myrun
#
# Stopping: this script becomes torchrun (exec), so SIGTERM or SIGUSR1 to its pid reaches torchrun,
#   which passes it to every worker. The workers finish their step, save a checkpoint and exit with
#   75 (EX_TEMPFAIL, "requeue me"); torchrun then waits up to SHUTDOWN_TIMEOUT s for them and
#   exits 1 (it does not pass 75 on). To continue: the same command with --resume auto and the
#   same log.run_name.
# Exit codes: 0 training finished; 2 a usage error; otherwise torchrun's code (1 when a worker failed
#   or after a signal).

set -euo pipefail

die() {
    echo "launch/train_single_node.sh: error: $*" >&2
    exit 2
}

# Print the number of visible GPUs (0 if none): CUDA_VISIBLE_DEVICES wins over nvidia-smi.
count_gpus() {
    local -a ids lines
    local line n=0
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        if [[ -z "$CUDA_VISIBLE_DEVICES" || "$CUDA_VISIBLE_DEVICES" == -1 ]]; then
            echo 0
            return
        fi
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        echo "${#ids[@]}"
        return
    fi
    if command -v nvidia-smi >/dev/null 2>&1; then
        mapfile -t lines < <(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null || true)
        for line in "${lines[@]}"; do
            [[ "$line" =~ ^[[:space:]]*[0-9]+[[:space:]]*$ ]] && n=$((n + 1))
        done
    fi
    echo "$n"
}

if [[ -n "${VENV:-}" ]]; then
    # shellcheck source=/dev/null
    source "$VENV/bin/activate"
fi
(($# > 0)) || die "no arguments; usage: launch/train_single_node.sh --config CONFIG.yaml [--resume auto] [overrides ...]"

gpus=$(count_gpus)
nproc_per_node=${NPROC:-$((gpus > 0 ? gpus : 1))}
[[ "$nproc_per_node" =~ ^[1-9][0-9]*$ ]] || die "NPROC=$nproc_per_node is not a positive integer"
cpus=$(nproc)

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export NO_ALBUMENTATIONS_UPDATE="${NO_ALBUMENTATIONS_UPDATE:-1}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((cpus / nproc_per_node > 0 ? cpus / nproc_per_node : 1))}"

exec torchrun \
    --standalone \
    --nproc_per_node="$nproc_per_node" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-60}" \
    -m dgan.train "$@"

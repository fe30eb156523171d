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

DGAN_PROG=launch/train_single_node.sh
# Find the checkout: DGAN_HOME, next to this script, or where sbatch was run (sbatch runs a copy).
for dgan_home in "${DGAN_HOME:-}" "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)" "${SLURM_SUBMIT_DIR:-}"; do
    [[ -n "$dgan_home" && -f "$dgan_home/launch/common.sh" ]] && break
done
if [[ ! -f "$dgan_home/launch/common.sh" ]]; then
    echo "$DGAN_PROG: error: cannot find launch/common.sh; run from the dgan checkout or set DGAN_HOME" >&2
    exit 2
fi
# shellcheck source=launch/common.sh
source "$dgan_home/launch/common.sh"

activate_venv
(($# > 0)) || die "no arguments; usage: launch/train_single_node.sh --config CONFIG.yaml [--resume auto] [overrides ...]"

gpus=$(count_gpus)
nproc_per_node=${NPROC:-$((gpus > 0 ? gpus : 1))}
require_positive_int NPROC "$nproc_per_node"
export_runtime_env "$(nproc)" "$nproc_per_node"

exec torchrun \
    --standalone \
    --nproc_per_node="$nproc_per_node" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-60}" \
    -m dgan.train "$@"

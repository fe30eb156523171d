#!/usr/bin/env bash
# Train dgan on several machines without SLURM: run this same command on every node;
# torchrun's c10d rendezvous gathers them.
#
# Needs:  the dgan venv active (or VENV=/path/to/venv) on every node, and these variables:
#           NNODES         number of nodes, e.g. 2 (or a range MIN:MAX for elastic runs)
#           RDZV_ENDPOINT  host:port of one of the nodes, reachable from all (e.g. node01:29500)
#           RDZV_ID        any id shared by the nodes of this run and by no other (e.g. myrun-1)
#         Optional: NPROC_PER_NODE (default: the GPUs in CUDA_VISIBLE_DEVICES or nvidia-smi, else 1),
#         OMP_NUM_THREADS (default: CPU cores / NPROC_PER_NODE), SHUTDOWN_TIMEOUT (default 60 s).
# Usage:  NNODES=2 RDZV_ENDPOINT=node01:29500 RDZV_ID=myrun-1 \
#           launch/train_multi_node.sh --config configs/my.yaml --resume auto log.run_name=myrun
#
# Stopping: this script becomes torchrun (exec); SIGTERM or SIGUSR1 to torchrun on any node makes its
#   workers finish their step; all ranks agree, save a checkpoint and exit with 75 (EX_TEMPFAIL,
#   "requeue me"); torchrun exits 1 (it does not pass 75 on). To continue: the same command,
#   --resume auto and the same log.run_name.
# Exit codes: 0 training finished; 2 a usage error (a variable is missing); otherwise torchrun's code.

set -euo pipefail

DGAN_PROG=launch/train_multi_node.sh
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

nnodes=${NNODES:-}
rdzv_endpoint=${RDZV_ENDPOINT:-}
rdzv_id=${RDZV_ID:-}
missing=()
[[ -n "$nnodes" ]] || missing+=(NNODES)
[[ -n "$rdzv_endpoint" ]] || missing+=(RDZV_ENDPOINT)
[[ -n "$rdzv_id" ]] || missing+=(RDZV_ID)
if ((${#missing[@]} > 0)); then
    die "missing required environment variable(s): ${missing[*]}
  usage: NNODES=2 RDZV_ENDPOINT=node01:29500 RDZV_ID=myrun-1 launch/train_multi_node.sh --config CONFIG.yaml [overrides ...]
  (run the same command on every node; see the header of this script)"
fi
[[ "$nnodes" =~ ^[1-9][0-9]*(:[1-9][0-9]*)?$ ]] || die "NNODES=$nnodes is not a number of nodes (N or MIN:MAX)"
[[ "$rdzv_endpoint" =~ ^.+:[0-9]+$ ]] || die "RDZV_ENDPOINT=$rdzv_endpoint is not host:port (e.g. node01:29500)"

activate_venv
(($# > 0)) || die "no arguments; usage: launch/train_multi_node.sh --config CONFIG.yaml [--resume auto] [overrides ...]"

gpus=$(count_gpus)
nproc_per_node=${NPROC_PER_NODE:-$((gpus > 0 ? gpus : 1))}
require_positive_int NPROC_PER_NODE "$nproc_per_node"
export_runtime_env "$(nproc)" "$nproc_per_node"

exec torchrun \
    --nnodes="$nnodes" \
    --nproc_per_node="$nproc_per_node" \
    --rdzv_id="$rdzv_id" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$rdzv_endpoint" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="${SHUTDOWN_TIMEOUT:-60}" \
    -m dgan.train "$@"

#!/usr/bin/env bash
# Evaluate a dgan run on SLURM (FID, KID, PSNR, SSIM): one torchrun agent per node (srun),
# c10d rendezvous; the workers share the sample generation.
#
# Needs:  RUN_DIR=path/to/run (a run directory of slurm/train.sh, e.g. runs/dgan-train-123456).
#         The dgan venv active when you submit (sbatch passes your environment on), or
#         VENV=/path/to/venv. Edit the #SBATCH lines (and `module load`) to fit your cluster.
#         FID/KID need the Inception weights on disk (compute nodes are offline): see dgan.evaluate.
#         Optional: NUM_SAMPLES (-> --num-samples), NPROC_PER_NODE (default: GPUs per node),
#         RDZV_PORT (default 29500 + job id % 1000).
# Submit: RUN_DIR=runs/dgan-train-123456 sbatch slurm/evaluate.sh [more dgan.evaluate options]
# Exit codes: 0 done; 2 a usage error (for example RUN_DIR is not set); any other code is the
#             failing srun/torchrun's exit code. Evaluation does not resume: it is not requeued.
#
#SBATCH --job-name=dgan-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --no-requeue

set -euo pipefail

DGAN_PROG=slurm/evaluate.sh
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

# module load cuda    # cluster-specific; uncomment and edit if needed
activate_venv
[[ -n "${SLURM_JOB_ID:-}" ]] || die "SLURM_JOB_ID is not set; submit this script with sbatch"
[[ -n "${RUN_DIR:-}" ]] || die "RUN_DIR is not set; submit with: RUN_DIR=runs/<run name> sbatch slurm/evaluate.sh"
[[ -d "$RUN_DIR" ]] || die "RUN_DIR=$RUN_DIR: no such directory (relative paths start at $PWD)"
slurm_job # sets head_node, nnodes, nproc_per_node, rdzv_port, srun_args; the offline/threads environment

# --run-dir, not --run: torchrun would take --run as an abbreviation of its own --run-path
eval_args=(--fid --kid --psnr --ssim --run-dir "$RUN_DIR")
if [[ -n "${NUM_SAMPLES:-}" ]]; then
    eval_args+=(--num-samples "$NUM_SAMPLES")
fi

echo "slurm/evaluate.sh: job $SLURM_JOB_ID, run $RUN_DIR, $nnodes node(s) x $nproc_per_node," \
    "rendezvous $head_node:$rdzv_port"
exec srun "${srun_args[@]}" \
    torchrun \
    --nnodes="$nnodes" \
    --nproc_per_node="$nproc_per_node" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$head_node:$rdzv_port" \
    -m dgan.evaluate "${eval_args[@]}" "$@"

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

die() {
    echo "slurm/evaluate.sh: error: $*" >&2
    exit 2
}

# module load cuda    # cluster-specific; uncomment and edit if needed
if [[ -n "${VENV:-}" ]]; then
    # shellcheck source=/dev/null
    source "$VENV/bin/activate"
fi

[[ -n "${SLURM_JOB_ID:-}" ]] || die "SLURM_JOB_ID is not set; submit this script with sbatch"
[[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_NODELIST is not set; submit this script with sbatch"
[[ -n "${RUN_DIR:-}" ]] || die "RUN_DIR is not set; submit with: RUN_DIR=runs/<run name> sbatch slurm/evaluate.sh"
[[ -d "$RUN_DIR" ]] || die "RUN_DIR=$RUN_DIR: no such directory (relative paths start at $PWD)"

# Read all host names at once; `scontrol ... | head -n1` would die of SIGPIPE under pipefail.
mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
((${#nodes[@]} > 0)) || die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host names"
head_node=${nodes[0]}
nnodes=${SLURM_NNODES:-${#nodes[@]}}
nproc_per_node=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
[[ "$nproc_per_node" =~ ^[1-9][0-9]*$ ]] || die "NPROC_PER_NODE=$nproc_per_node is not a positive integer"
rdzv_port=${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}

export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export NO_ALBUMENTATIONS_UPDATE="${NO_ALBUMENTATIONS_UPDATE:-1}"
cpus=${SLURM_CPUS_PER_TASK:-$(nproc)}
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((cpus / nproc_per_node > 0 ? cpus / nproc_per_node : 1))}"

# --run-dir, not --run: torchrun would take --run as an abbreviation of its own --run-path
eval_args=(--fid --kid --psnr --ssim --run-dir "$RUN_DIR")
if [[ -n "${NUM_SAMPLES:-}" ]]; then
    eval_args+=(--num-samples "$NUM_SAMPLES")
fi
# srun no longer passes --cpus-per-task on to the step (Slurm >= 22.05), so pass it explicitly.
srun_args=(--nodes="$nnodes" --ntasks-per-node=1)
if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
    srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
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

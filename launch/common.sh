# shellcheck shell=bash
# Shared by launch/*.sh and slurm/*.sh (sourced, never run): usage errors, the venv, GPU counting,
# the offline/threads environment and the SLURM node list. Each script sets DGAN_PROG (its name in
# messages) before sourcing this file.
#
# Finding this file from a script: sbatch runs a *copy* of the job script from its spool folder, so
# the script's own folder is not the checkout there. The scripts look in $DGAN_HOME, then next to
# themselves, then in $SLURM_SUBMIT_DIR (the folder sbatch was run from).

# Print "<prog>: error: <message>" on stderr and exit 2 (a usage error: nothing was started).
die() {
    echo "${DGAN_PROG:-dgan}: error: $*" >&2
    exit 2
}

# Activate VENV when set; otherwise the caller's environment (sbatch passes it on) is used.
activate_venv() {
    if [[ -n "${VENV:-}" ]]; then
        [[ -f "$VENV/bin/activate" ]] || die "VENV=$VENV has no bin/activate; point it at the dgan virtualenv"
        # shellcheck source=/dev/null
        source "$VENV/bin/activate"
    fi
}

# require_positive_int NAME VALUE: die unless VALUE is an integer >= 1.
require_positive_int() {
    [[ "$2" =~ ^[1-9][0-9]*$ ]] || die "$1=$2 is not a positive integer"
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

# export_runtime_env CPUS NPROC: compute nodes are offline (no hub or update checks), and each of the
# NPROC workers gets its share of CPUS threads unless OMP_NUM_THREADS is already set.
export_runtime_env() {
    local cpus=$1 nproc=$2
    export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
    export NO_ALBUMENTATIONS_UPDATE="${NO_ALBUMENTATIONS_UPDATE:-1}"
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$((cpus / nproc > 0 ? cpus / nproc : 1))}"
}

# slurm_job [SRUN_ARG ...]: check that this runs under sbatch and set head_node, nnodes, nproc_per_node,
# rdzv_port and srun_args (one torchrun agent per node, then the SRUN_ARGs) for the caller.
# shellcheck disable=SC2034 # the variables it sets are the caller's
slurm_job() {
    local -a nodes
    [[ -n "${SLURM_JOB_ID:-}" ]] || die "SLURM_JOB_ID is not set; submit this script with sbatch"
    [[ -n "${SLURM_JOB_NODELIST:-}" ]] || die "SLURM_JOB_NODELIST is not set; submit this script with sbatch"
    # Read all host names at once; `scontrol ... | head -n1` would die of SIGPIPE under pipefail.
    mapfile -t nodes < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
    ((${#nodes[@]} > 0)) || die "scontrol show hostnames '$SLURM_JOB_NODELIST' printed no host names"
    head_node=${nodes[0]}
    nnodes=${SLURM_NNODES:-${#nodes[@]}}
    nproc_per_node=${NPROC_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
    require_positive_int NPROC_PER_NODE "$nproc_per_node"
    # 29500 + job id % 1000: two jobs that share a node do not share a rendezvous store
    rdzv_port=${RDZV_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
    # srun no longer passes --cpus-per-task on to the step (Slurm >= 22.05), so pass it explicitly.
    srun_args=(--nodes="$nnodes" --ntasks-per-node=1 "$@")
    if [[ -n "${SLURM_CPUS_PER_TASK:-}" ]]; then
        srun_args+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
    fi
    export_runtime_env "${SLURM_CPUS_PER_TASK:-$(nproc)}" "$nproc_per_node"
}

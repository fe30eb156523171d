#!/usr/bin/env bash
# Train dgan on SLURM: one torchrun agent per node (srun), c10d rendezvous, requeue on preemption.
#
# Needs:  CONFIG=path/to/config.yaml. The dgan venv active when you submit (sbatch passes your
#         environment on), or VENV=/path/to/venv. Edit the #SBATCH lines (and the `module load`
#         line, if your cluster uses modules) to fit your cluster.
#         Optional: RUN_NAME (default <job name>-<job id>, which stays the same across requeues),
#         NPROC_PER_NODE (default: GPUs per node), RDZV_PORT (default 29500 + job id % 1000, so two
#         jobs that share a node do not share a rendezvous store), SHUTDOWN_TIMEOUT (default 60 s).
# Submit: CONFIG=configs/my.yaml sbatch slurm/train.sh [dotted.override=value ...]
#         e.g. CONFIG=configs/my.yaml RUN_NAME=pneu-64px sbatch slurm/train.sh train.batch_size=16
#         Runs go to <log.root>/<run name> (log.root defaults to runs/ in the submit directory).
#
# Preemption: 90 s before the time limit SLURM sends USR1 to this script (--signal=B:USR1@90).
#   The trap passes it to srun, srun to the torchrun on every node, torchrun to every worker.
#   The workers finish their step, save a checkpoint and exit with 75 (EX_TEMPFAIL: "requeue me").
#   torchrun then exits non-zero (it does not pass 75 on), and this script runs
#   `scontrol requeue`: the job keeps its id and run name, and --resume auto continues the run.
#   To checkpoint and requeue now: scancel --signal=USR1 --batch <jobid>
#   SIGTERM (scancel, a time limit, preemption) also makes the workers save and exit, but this script
#   does NOT requeue on SIGTERM, so a plain `scancel` still stops the job.
# Exit codes: 0   training finished, or it saved and the job was requeued;
#             75  it stopped on SIGTERM, or the requeue failed: resubmit with the same RUN_NAME
#                 (printed in the log) to continue;
#             2   a usage error (for example CONFIG is not set);
#             any other code is the failing srun/torchrun's exit code.
#
#SBATCH --job-name=dgan-train
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=32
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --signal=B:USR1@90
#SBATCH --requeue

set -euo pipefail

DGAN_PROG=slurm/train.sh
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
[[ -n "${CONFIG:-}" ]] || die "CONFIG is not set; submit with: CONFIG=configs/my.yaml sbatch slurm/train.sh"
[[ -f "$CONFIG" ]] || die "CONFIG=$CONFIG: no such file (relative paths start at $PWD)"
# Sets head_node, nnodes, nproc_per_node, rdzv_port, srun_args and the offline/threads environment.
# --kill-on-bad-exit=0: on preemption the nodes exit one after the other; a node that exits
# first must not get the others killed while rank 0 is still writing the checkpoint.
slurm_job --kill-on-bad-exit=0
shutdown_timeout=${SHUTDOWN_TIMEOUT:-60} # must fit in the 90 s of --signal=B:USR1@90
run_name=${RUN_NAME:-${SLURM_JOB_NAME:-dgan}-$SLURM_JOB_ID}

echo "slurm/train.sh: job $SLURM_JOB_ID, run name $run_name, $nnodes node(s) x $nproc_per_node," \
    "rendezvous $head_node:$rdzv_port"

# Signals. bash runs a trap only between commands, so srun runs in the background and we `wait`.
# Each signal is passed on once: a second signal to a torchrun agent makes it restart its shutdown.
first_signal="" # USR1 or TERM, whichever came first
forwarded=0
srun_pid=""
forward_signal() {
    if [[ -n "$first_signal" && -n "$srun_pid" && "$forwarded" == 0 ]]; then
        forwarded=1
        kill -s "$first_signal" "$srun_pid" 2>/dev/null || true
    fi
}
# shellcheck disable=SC2329 # called by the traps below
on_signal() {
    echo "slurm/train.sh: got SIG$1; telling the workers to save a checkpoint and stop" >&2
    [[ -n "$first_signal" ]] || first_signal=$1
    forward_signal
}
trap 'on_signal USR1' USR1
trap 'on_signal TERM' TERM

srun "${srun_args[@]}" \
    torchrun \
    --nnodes="$nnodes" \
    --nproc_per_node="$nproc_per_node" \
    --rdzv_id="$SLURM_JOB_ID" \
    --rdzv_backend=c10d \
    --rdzv_endpoint="$head_node:$rdzv_port" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="$shutdown_timeout" \
    -m dgan.train --config "$CONFIG" --resume auto "log.run_name=$run_name" "$@" &
srun_pid=$!
forward_signal # a signal that came before srun started

# `wait` returns early (status > 128) when a trapped signal arrives; then wait again.
while true; do
    rc=0
    wait "$srun_pid" || rc=$?
    if ((rc > 128)) && kill -0 "$srun_pid" 2>/dev/null; then
        continue
    fi
    break
done

if ((rc == 0)); then
    echo "slurm/train.sh: training finished"
    exit 0
fi
case "$first_signal" in
USR1)
    echo "slurm/train.sh: training stopped (exit $rc) after SIGUSR1; requeueing job $SLURM_JOB_ID" >&2
    if scontrol requeue "$SLURM_JOB_ID"; then
        exit 0
    fi
    echo "slurm/train.sh: scontrol requeue failed; to continue, resubmit with" \
        "RUN_NAME=$run_name CONFIG=$CONFIG" >&2
    exit 75
    ;;
TERM)
    echo "slurm/train.sh: training stopped (exit $rc) after SIGTERM; not requeued. To continue," \
        "resubmit with RUN_NAME=$run_name CONFIG=$CONFIG" >&2
    exit 75
    ;;
*)
    echo "slurm/train.sh: training failed with exit code $rc" >&2
    exit "$rc"
    ;;
esac

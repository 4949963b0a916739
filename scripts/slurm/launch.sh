#!/bin/bash
# Multi-node training under Slurm, shared by the sbatch files beside it (docs/RECIPES.md: "Several nodes (Slurm)").
#
#   scripts/slurm/launch.sh SCRIPT [the script's flags and key=value overrides ...]
#
# Runs inside an sbatch job, from the repository root. One srun task per node starts the script in the form of
# NVlabs/CMD's commands, `python SCRIPT --nnodes=N --nproc_per_node=G ...`, which re-executes itself as torchrun on
# that node; the nodes meet through c10d rendezvous on the job's first host. train.resume=auto makes every start of
# the job, a requeued one included, continue the newest matching run of the stage in --results-dir.
#
# Before the time limit (the sbatch files ask for `--signal=B:USR1@120`) this shell gets SIGUSR1, sends SIGTERM to
# the trainers, which save a checkpoint at a step boundary and exit 0, and then requeues the job. The trainers are
# torchrun's children on each node, or, with one GPU per node (the script then runs without torchrun), the started
# process itself.
#
# Environment: PYTHON (default python), GPUS_PER_NODE (default: Slurm's SLURM_GPUS_ON_NODE), RDZV_PORT (default
# derived from the job id, so that two jobs whose first host is the same do not collide).
set -euo pipefail

self="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
# The pid of the process started on this node (torchrun, or the lone trainer), for the SIGTERM before the time limit
# (node-local: one file per node).
pidfile="${TMPDIR:-/tmp}/cmd-torchrun-${SLURM_JOB_ID:-none}-$(hostname -s)"

case "${1:-}" in
--on-node)  # srun runs this on every node: record the pid of what it starts (torchrun or the trainer), start it.
    shift
    echo "$$" > "$pidfile"
    # Every trainer must get SIGTERM exactly once: it saves on the first and dies on a second one (a user pressing
    # Ctrl-C twice). Slurm signals every process of a step, torchrun included, and torchrun would forward its copy
    # as a second SIGTERM. An ignored signal stays ignored across exec, and PET_SIGNALS_TO_HANDLE keeps torchrun
    # (PyTorch >= 2.9) from installing its own SIGTERM handler; the trainers install theirs. (Older torchruns
    # handle SIGTERM anyway: there, only the time-limit stop below, which bypasses torchrun, saves cleanly.)
    trap '' TERM
    export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
    exec "$@"
    ;;
--signal-trainers)  # srun runs this on every node: SIGTERM to the trainers only, never twice to one.
    if [[ -f $pidfile ]]; then
        pid=$(cat "$pidfile")
        # One GPU per node: `python SCRIPT --nproc_per_node=1` does not re-execute as torchrun, so the recorded
        # process is the trainer; its children are its data loader workers, which must not get the signal.
        if ps -o args= -p "$pid" 2>/dev/null | grep -q 'torch\.distributed\.run'; then
            pkill -TERM -P "$pid" || true
        else
            kill -TERM "$pid" 2>/dev/null || true
        fi
    fi
    exit 0
    ;;
esac

: "${SLURM_JOB_ID:?launch.sh runs inside an sbatch job; submit one of scripts/slurm/*.sbatch}"
if [[ $# -lt 1 ]]; then
    echo "usage: launch.sh SCRIPT [ARGS...]" >&2
    exit 2
fi
script=$1
shift

nodes=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
gpus_per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
if [[ -z $gpus_per_node ]]; then
    echo "error: set GPUS_PER_NODE (Slurm set no SLURM_GPUS_ON_NODE; request GPUs with --gpus-per-node)" >&2
    exit 2
fi
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
rdzv_port=${RDZV_PORT:-$((20000 + SLURM_JOB_ID % 10000))}
# srun does not inherit sbatch's --cpus-per-task since Slurm 22.05; the data loaders need those CPUs.
if [[ -n ${SLURM_CPUS_PER_TASK:-} ]]; then
    export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
fi

echo "launch.sh: job $SLURM_JOB_ID, start $((${SLURM_RESTART_COUNT:-0} + 1)): $script on $nodes node(s) x" \
     "$gpus_per_node GPU(s), rendezvous $head_node:$rdzv_port" >&2

requeue=0
# shellcheck disable=SC2329  # invoked by the trap below
on_time_limit() {
    requeue=1
    echo "launch.sh: time limit near: SIGTERM to the trainers, then requeue" >&2
    # To the trainers alone, so that no torchrun version can add a second SIGTERM; scancel (all processes of the
    # job steps, not this shell) where an overlapping step cannot start.
    srun --overlap --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 bash "$self" --signal-trainers \
        || scancel --signal=TERM "$SLURM_JOB_ID"
}
trap on_time_limit USR1
# A plain scancel, or a pre-emption on a cluster without PreemptParameters=send_user_signal, sends SIGTERM to every
# process of the job, srun included, and srun answers it by killing its tasks: the run then continues from its last
# periodic checkpoint when the job starts again. Waiting for srun keeps its exit status the job's.
trap 'echo "launch.sh: SIGTERM: the job is ending" >&2' TERM

srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 --kill-on-bad-exit=1 \
    bash "$self" --on-node "${PYTHON:-python}" "$script" \
    --nnodes="$nodes" --nproc_per_node="$gpus_per_node" \
    --rdzv_backend=c10d --rdzv_endpoint="$head_node:$rdzv_port" --rdzv_id="$SLURM_JOB_ID" \
    train.resume=auto "$@" &
srun_pid=$!

# `wait` returns early when a trapped signal arrives; wait again while srun still runs.
status=0
wait "$srun_pid" || status=$?
while [[ $status -gt 128 ]] && kill -0 "$srun_pid" 2>/dev/null; do
    status=0
    wait "$srun_pid" || status=$?
done

if [[ $requeue -eq 1 && $status -eq 0 ]]; then
    echo "launch.sh: the trainers saved and exited; requeueing job $SLURM_JOB_ID (train.resume=auto continues it)" >&2
    scontrol requeue "$SLURM_JOB_ID"
fi
exit "$status"

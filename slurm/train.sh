#!/usr/bin/env bash
# Train the experts of a config as a SLURM array job: array task N trains expert N into the store.
#
#   mkdir -p slurm-logs
#   sbatch slurm/train.sh jobs/quickstart.toml          # no --array: resubmits itself as an array
#                                                       # of the config's size, then exits
#   sbatch --array=$(hpcsoup train --config jobs/quickstart.toml --array-spec) \
#          slurm/train.sh jobs/quickstart.toml          # the same, explicitly (e.g. --array=0-9)
#   sbatch slurm/train.sh jobs/x.toml experts.epochs=50 store=runs/x.zarr   # more args: --set k=v
#   sbatch slurm/train.sh jobs/x.toml --set experts.epochs=50                # (this form works too)
#   bash slurm/train.sh jobs/x.toml                     # outside SLURM: `hpcsoup train --all`
#
# Arguments: the config (default jobs/quickstart.toml), then any number of key=value overrides
# (each may be preceded by --set).
# Environment: HPCSOUP_PYTHON, the interpreter with hpcsoup installed (default: python).
# Resources: the #SBATCH lines below, overridden by sbatch's command line (--time, --partition,
# --cpus-per-task, --gpus-per-task ...); `hpcsoup submit` sets them from the config's [slurm].
#
# Pre-emption: SLURM sends USR1 to this script 90 s before the time limit (--signal=B:USR1@90);
# the script forwards it (and TERM) to the trainer, which finishes its epoch, saves a resume
# checkpoint beside the store and exits with 75; the script then requeues this array task
# (--requeue), whose next run resumes from the checkpoint. Rerunning a finished task is a no-op.
#SBATCH --job-name=hpcsoup-train
#SBATCH --output=slurm-logs/%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@90
#SBATCH --requeue
set -uo pipefail

CONFIG="${1:-jobs/quickstart.toml}"
(( $# > 0 )) && shift
PY="${HPCSOUP_PYTHON:-python}"
ARGS=("$@")
SETS=()
while (( $# > 0 )); do  # overrides as `key=value` or as `--set key=value` (what `hpcsoup submit` passes)
    case "$1" in
        --set) SETS+=(--set "${2:?train.sh: --set needs key=value}"); shift 2 ;;
        --set=*) SETS+=(--set "${1#--set=}"); shift ;;
        *) SETS+=(--set "$1"); shift ;;
    esac
done
PREEMPTED=75

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "train.sh: not inside SLURM: training every expert here (hpcsoup train --all)" >&2
    exec "$PY" -m hpcsoup train --config "$CONFIG" "${SETS[@]}" --all
fi

if [[ -z "${SLURM_ARRAY_TASK_ID:-}" ]]; then
    # Submitted without --array: resubmit this script as an array of the size the config needs.
    spec="$("$PY" -m hpcsoup train --config "$CONFIG" "${SETS[@]}" --array-spec | tail -n 1)" || {
        echo "train.sh: cannot read the array size from $CONFIG" >&2; exit 1; }
    mkdir -p slurm-logs
    job="$(sbatch --parsable --array="$spec" \
        ${SLURM_JOB_PARTITION:+--partition="$SLURM_JOB_PARTITION"} \
        ${SLURM_JOB_ACCOUNT:+--account="$SLURM_JOB_ACCOUNT"} \
        "$0" "$CONFIG" "${ARGS[@]}")" || { echo "train.sh: resubmitting as an array failed" >&2; exit 1; }
    echo "train.sh: submitted array job ${job%%;*} (--array=$spec) for $CONFIG" >&2
    echo "${job%%;*}"
    exit 0
fi

echo "train.sh: task $SLURM_ARRAY_TASK_ID of array job ${SLURM_ARRAY_JOB_ID:-?} (job $SLURM_JOB_ID)" \
     "on $(hostname), restart ${SLURM_RESTART_COUNT:-0}, config $CONFIG" >&2
"$PY" -m hpcsoup train --config "$CONFIG" "${SETS[@]}" --task-id "$SLURM_ARRAY_TASK_ID" &
child=$!
# SLURM signals this shell (B:); the trainer checkpoints on USR1/TERM.
trap 'kill -USR1 "$child" 2>/dev/null' USR1
trap 'kill -TERM "$child" 2>/dev/null' TERM
# `wait` returns early when a trapped signal arrives: wait until the trainer has really exited.
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
wait "$child"
rc=$?
if (( rc == PREEMPTED )); then
    echo "train.sh: task $SLURM_ARRAY_TASK_ID checkpointed on a signal; requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID" || echo "train.sh: requeue failed: resubmit task" \
        "$SLURM_ARRAY_TASK_ID to resume" >&2
fi
exit "$rc"

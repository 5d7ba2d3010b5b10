#!/usr/bin/env bash
# Soup the experts of an experiment on a SLURM allocation: partition learned souping (PLS) on MPI
# ranks that each hold a shard of the partitioned graph, then the single-process methods.
#
#   mkdir -p slurm-logs                                    # once: SLURM opens the log file there
#   sbatch slurm/soup.sh                                   # jobs/quickstart.toml, 2 ranks
#   sbatch slurm/soup.sh jobs/X.toml --set soup.pls.per_step=8
#   sbatch --ntasks=8 --time=02:00:00 -p gpu --gpus-per-task=1 slurm/soup.sh jobs/X.toml --set device=\"cuda\"
#   sbatch --ntasks=4 --overcommit slurm/soup.sh jobs/X.toml   # more ranks than cores (testing)
#
# Arguments: [CONFIG] [options...] -- the config file (default jobs/quickstart.toml), then anything
# `hpcsoup soup` accepts: --set key=value (repeatable), --method NAME (repeatable), --store PATH,
# --json; a bare key=value is taken as --set key=value (as slurm/train.sh does).
#
# Resources come from the #SBATCH lines below; options given to sbatch override them (ranks:
# --ntasks, time: --time, partition: -p, GPUs: --gpus-per-task, log: --output). The number of MPI
# ranks is the number of tasks; soup.pls.ranks in the config is for `hpcsoup run`, not for SLURM.
#
# What runs: a one-task step that partitions the graph into the store if needed
# (python -m hpcsoup.distributed.shards: the only process that ever loads the whole graph for PLS), then
# one step `srun --mpi=pmi2 -n $SLURM_NTASKS hpcsoup soup ...`. Inside it,
#   - pls runs on all ranks, each holding only its partitions of the graph (hpcsoup.distributed);
#   - the other methods of the config (uniform, greedy, gis, learned) are single-process: rank 0
#     runs them after PLS while the other ranks have already exited (MPI_Finalize waits without
#     spinning, measured), so they never compete with PLS for the cores.
# The methods share one step, not one each, so that PLS's ranks start at once and the experts are
# read once; --kill-on-bad-exit ends every rank when one fails (the ranks also MPI_Abort).
#
# Environment:
#   HPCSOUP_PYTHON   interpreter with hpcsoup installed (default: python on PATH); tests use .venv
#   HPCSOUP_SRUN     extra srun options, e.g. "--cpu-bind=cores"
#
# Log: slurm-logs/<job name>-<job id>.out under the submission directory (with --json, rank 0 prints
# one JSON line of results). The directory must exist when the job starts: SLURM cannot create it.
#
#SBATCH --job-name=hpcsoup-soup
#SBATCH --ntasks=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=slurm-logs/%x-%j.out
#SBATCH --signal=TERM@60
set -euo pipefail

PY="${HPCSOUP_PYTHON:-python}"
CONFIG="jobs/quickstart.toml"
if [[ $# -gt 0 && "$1" != -* && "$1" != *=* ]]; then  # the first argument, unless an option
    CONFIG="$1"
    shift
fi
# the rest goes to `hpcsoup soup` as given: it reads bare key=value as --set and names a bad
# option or a missing config file itself (exit 2)

if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "soup.sh: not inside SLURM: souping here in one process (hpcsoup soup)" >&2
    exec "$PY" -m hpcsoup soup --config "$CONFIG" "$@"
fi

NTASKS="${SLURM_NTASKS:-1}"
echo "soup.sh: job ${SLURM_JOB_ID:-?} on $(hostname -s): $NTASKS rank(s), config $CONFIG $*" >&2
echo "soup.sh: $("$PY" -c 'import sys, hpcsoup; print(sys.executable, "hpcsoup", hpcsoup.__version__)')" >&2

# ranks x threads <= cores: each rank takes its share of the cores it may run on (hpcsoup.distributed),
# unless the config sets `threads`. OMP/MKL follow torch's setting, not the node size.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"

# Step 1 (one task): partition the graph into the store unless that was done, so that no PLS rank
# ever loads the whole graph (a no-op when PLS is not asked for or the partitions are there).
# shellcheck disable=SC2086  # HPCSOUP_SRUN is a list of options
srun --ntasks=1 --mpi=none ${HPCSOUP_SRUN:-} \
    "$PY" -m hpcsoup.distributed.shards --config "$CONFIG" "$@"

# Step 2 (all tasks): the MPI ranks.
# shellcheck disable=SC2086
exec srun --mpi=pmi2 --kill-on-bad-exit=1 --ntasks="$NTASKS" ${HPCSOUP_SRUN:-} \
    "$PY" -m hpcsoup soup --config "$CONFIG" "$@"

#!/usr/bin/env bash
# Merge an experiment's heterogeneous specialists with H-GRAMA (training-free, one process).
#
#   mkdir -p slurm-logs                                   # once: SLURM opens the log file there
#   sbatch slurm/merge.sh                                 # jobs/quickstart.toml
#   sbatch slurm/merge.sh jobs/X.toml merge.threshold=0.3 --set merge.alignment=\"permutation\"
#   sbatch slurm/merge.sh jobs/X.toml --parents gcn-s0,gat-s1 --json
#   bash slurm/merge.sh jobs/X.toml                       # outside SLURM: runs here
#
# Arguments: [CONFIG] [options...] -- the config file (default jobs/quickstart.toml), then anything
# `hpcsoup merge` accepts: --set key=value (repeatable), --parents ID,ID, --store PATH, --json; a
# bare key=value is taken as --set key=value (as slurm/train.sh and slurm/soup.sh do).
#
# Resources come from the #SBATCH lines below; options given to sbatch override them. The merge
# needs no labels and no training: a few seconds to minutes on one core; it times the child
# against the ensemble with one torch thread.
#
# Environment:
#   HPCSOUP_PYTHON   interpreter with hpcsoup installed (default: python on PATH); tests use .venv
#
# Log: slurm-logs/<job name>-<job id>.out under the submission directory (with --json, the last
# line is one JSON object of results). The directory must exist when the job starts.
#
#SBATCH --job-name=hpcsoup-merge
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --output=slurm-logs/%x-%j.out
set -euo pipefail

PY="${HPCSOUP_PYTHON:-python}"
CONFIG="jobs/quickstart.toml"
if [[ $# -gt 0 && "$1" != -* && "$1" != *=* ]]; then  # the first argument, unless an option
    CONFIG="$1"
    shift
fi
# the rest goes to `hpcsoup merge` as given: it reads bare key=value as --set and names a bad
# option or a missing config file itself (exit 2)

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "merge.sh: not inside SLURM: merging here (hpcsoup merge)" >&2
else
    echo "merge.sh: job ${SLURM_JOB_ID} on $(hostname -s): config $CONFIG $*" >&2
fi
exec "$PY" -m hpcsoup merge --config "$CONFIG" "$@"

#!/usr/bin/env bash
# Write the report of an experiment's store (tables, plots, JSON) once its stages are done.
#
#   sbatch --dependency=afterok:<soup job>:<merge job> slurm/report.sh jobs/X.toml [--set k=v ...]
#
# Arguments: the config (default jobs/quickstart.toml), then `hpcsoup report` options.
# Environment: HPCSOUP_PYTHON, the interpreter with hpcsoup installed (default: python).
#SBATCH --job-name=hpcsoup-report
#SBATCH --output=slurm-logs/%x-%j.out
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=1
#SBATCH --time=00:10:00
set -euo pipefail

CONFIG="jobs/quickstart.toml"
if [[ $# -gt 0 && "$1" != -* ]]; then
    CONFIG="$1"
    shift
fi
exec "${HPCSOUP_PYTHON:-python}" -m hpcsoup report --config "$CONFIG" "$@"

"""The sbatch scripts of the pipeline's stages, rendered from a config by pure functions.

The scripts travel with the package (a wheel needs no source tree): ``hpcsoup submit``
renders each stage for the experiment's config into the log folder and submits those
files; ``hpcsoup slurm init DIR`` writes editable copies; the scripts in the
repository's ``slurm/`` folder are the generic rendering (``render_stage(stage)``,
kept equal by a test).

The config's ``[slurm]`` section holds the site, as dask-jobqueue and submitit take it:
per-stage resources (``[slurm.train]``, ``[slurm.soup]``... over the defaults in
``[slurm]``), ``partition``, ``account``, ``qos``, ``constraint``, ``extra`` sbatch
options (``job_extra_directives`` / ``slurm_additional_parameters``), ``setup`` shell
lines run before each stage (``job_script_prologue`` / ``slurm_setup``: module loads,
venv activation), the srun MPI plugin (``mpi``), the interpreter (``python``) and the
log folder (``log_dir``). A script rendered for a config asks for
``--export=NONE``: it names its interpreter itself and needs nothing from the
submitting shell.

Example::

    print(render_stage("soup", load_config("jobs/x.toml")))
    write_scripts("my-slurm/", load_config("jobs/x.toml"))
"""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

from hpcsoup.config import build_config
from hpcsoup.errors import ConfigError
from hpcsoup.slurm import render_sbatch_script

STAGES = ("train", "soup", "merge", "report")

#: the generic scripts (repository slurm/, `hpcsoup slurm init` without a config): the quickstart's
#: two soup ranks, jobs named hpcsoup-<stage>, the interpreter `python` (or $HPCSOUP_PYTHON)
GENERIC = {"name": "hpcsoup", "soup": {"pls": {"ranks": 2}}}

_ARGS = """\
Arguments: [CONFIG] [options...] -- the config file (default jobs/quickstart.toml), then anything
`hpcsoup {stage}` accepts; a bare key=value is taken as --set key=value."""

_HEADERS = {
    "train": """\
Train the experts of a config as a SLURM array job: array task N trains expert N into the store.

  sbatch slurm/train.sh jobs/quickstart.toml          # no --array: submits itself as an array of
                                                      # the config's size and waits for it, so
  sbatch --wait slurm/train.sh jobs/quickstart.toml   # returns when every expert is done (or failed)
  sbatch --array=$(hpcsoup train --config jobs/quickstart.toml --array-spec) \\
         slurm/train.sh jobs/quickstart.toml          # the array directly (e.g. --array=0-9)
  sbatch slurm/train.sh jobs/x.toml experts.epochs=50 store=runs/x.zarr   # more args: --set k=v
  bash slurm/train.sh jobs/x.toml                     # outside SLURM: `hpcsoup train --all`

Arguments: the config (default jobs/quickstart.toml), then key=value overrides (each may be
preceded by --set). The waiting job needs a --time that covers the whole array.
Environment: HPCSOUP_PYTHON overrides the interpreter named below.

Pre-emption: the trainer runs as a job step, so `scancel --signal=USR1 <job>` reaches it, and a
signal to this script (--signal=B:USR1@90 before the time limit, `scancel -b`) is forwarded to it.
On USR1/TERM the trainer finishes its epoch, saves a resume checkpoint beside the store and exits
75; a trainer killed by the signal before it could listen (at start-up) counts the same. The script
then requeues this array task (scontrol requeue) and says whether SLURM took it; the next run
resumes from the checkpoint. A job that was cancelled is not requeued. Rerunning a finished task is
a no-op.""",
    "soup": """\
Soup the experts of an experiment on a SLURM allocation: partition learned souping (PLS) on MPI
ranks that each hold a shard of the partitioned graph, then the single-process methods.

  sbatch slurm/soup.sh jobs/quickstart.toml
  sbatch slurm/soup.sh jobs/X.toml --set soup.pls.per_step=8 --allow-partial
  sbatch --ntasks=8 -p gpu --gpus-per-task=1 slurm/soup.sh jobs/X.toml --set device=\\"cuda\\"
  sbatch --ntasks=4 --overcommit slurm/soup.sh jobs/X.toml   # more ranks than cores (testing)

{args}
The number of MPI ranks is the number of tasks (--ntasks). Soup refuses to run while experts
that the config asks for are missing (it names them), unless --allow-partial.

What runs: a one-task step that partitions the graph into the store if needed
(hpcsoup partition: the only process that ever loads the whole graph for PLS), then
one step of all tasks running `hpcsoup soup`: pls on all ranks, each holding its partitions; the
other methods on rank 0 after PLS. --kill-on-bad-exit ends every rank when one fails.
Environment: HPCSOUP_PYTHON overrides the interpreter named below; HPCSOUP_SRUN adds srun
options (e.g. "--cpu-bind=cores").""",
    "merge": """\
Merge an experiment's heterogeneous specialists with H-GRAMA (training-free, one process).

  sbatch slurm/merge.sh jobs/quickstart.toml
  sbatch slurm/merge.sh jobs/X.toml merge.threshold=0.3 --parents gcn-s0,gat-s1 --json
  bash slurm/merge.sh jobs/X.toml                       # outside SLURM: runs here

{args}
Environment: HPCSOUP_PYTHON overrides the interpreter named below.""",
    "report": """\
Write the report of an experiment's store (tables, plots, JSON) once its stages are done.

  sbatch --dependency=afterok:<soup job>:<merge job> slurm/report.sh jobs/X.toml

{args}
Environment: HPCSOUP_PYTHON overrides the interpreter named below.""",
}

_TRAIN = """\
CONFIG="${1:-jobs/quickstart.toml}"
(( $# > 0 )) && shift
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
    # Submitted without --array: submit this script again as an array of the size the config
    # needs, and wait for it, so that this job (and `sbatch --wait`) ends when the experts do.
    spec="$("$PY" -m hpcsoup train --config "$CONFIG" "${SETS[@]}" --array-spec | tail -n 1)" || {
        echo "train.sh: cannot read the array size from $CONFIG" >&2; exit 1; }
    mkdir -p __LOG_DIR__
    echo "train.sh: submitting --array=$spec for $CONFIG and waiting until every task has ended" >&2
    sbatch --wait --parsable --array="$spec" \\
        ${SLURM_JOB_PARTITION:+--partition="$SLURM_JOB_PARTITION"} \\
        ${SLURM_JOB_ACCOUNT:+--account="$SLURM_JOB_ACCOUNT"} \\
        "$0" "$CONFIG" "${ARGS[@]}" | while read -r job; do
            echo "train.sh: submitted array job ${job%%;*} (--array=$spec)" >&2; echo "${job%%;*}"
        done
    rc="${PIPESTATUS[0]}"
    echo "train.sh: array finished: $([[ $rc == 0 ]] && echo "every task completed" \\
        || echo "a task failed (exit $rc); see its log")" >&2
    exit "$rc"
fi

echo "train.sh: task $SLURM_ARRAY_TASK_ID of array job ${SLURM_ARRAY_JOB_ID:-?} (job $SLURM_JOB_ID)" \\
     "on $(hostname), restart ${SLURM_RESTART_COUNT:-0}, config $CONFIG" >&2
# A job step: `scancel --signal=USR1 <job>` signals steps, so it reaches the trainer directly.
srun --ntasks=1 --mpi=none "$PY" -m hpcsoup train --config "$CONFIG" "${SETS[@]}" \\
    --task-id "$SLURM_ARRAY_TASK_ID" &
child=$!
# Signals to this shell (--signal=B:USR1@90, scancel -b) go on to the step; srun passes them on.
trap 'kill -USR1 "$child" 2>/dev/null' USR1
trap 'kill -TERM "$child" 2>/dev/null' TERM
# `wait` returns early when a trapped signal arrives: wait until the trainer has really exited.
while kill -0 "$child" 2>/dev/null; do wait "$child"; done
wait "$child"
rc=$?
case "$rc" in
    "$PREEMPTED") why="checkpointed on a signal" ;;
    138|140|143) why="was stopped by a signal before it could checkpoint (exit $rc)" ;;  # USR1/2, TERM
    *) exit "$rc" ;;
esac
state() { scontrol show job "$SLURM_JOB_ID" 2>/dev/null | grep -o "$1=[^ ]*" | head -n 1 | cut -d= -f2; }
if [[ "$(state JobState)" == CANCELLED ]]; then
    echo "train.sh: task $SLURM_ARRAY_TASK_ID $why; the job was cancelled: not requeueing" >&2
    exit "$rc"
fi
echo "train.sh: task $SLURM_ARRAY_TASK_ID $why; requeueing job $SLURM_JOB_ID" >&2
scontrol requeue "$SLURM_JOB_ID"
requeue_rc=$?
restarts="$(state Restarts)"
if (( requeue_rc == 0 )) || (( ${restarts:-0} > ${SLURM_RESTART_COUNT:-0} )); then
    echo "train.sh: job $SLURM_JOB_ID requeued: when it runs again it continues from its last" \
         "checkpoint, if any" >&2
else
    echo "train.sh: SLURM refused the requeue (scontrol exit $requeue_rc, state $(state JobState));" \\
         "resubmit task $SLURM_ARRAY_TASK_ID to resume: sbatch --array=$SLURM_ARRAY_TASK_ID" \\
         "<this script> $CONFIG ${ARGS[*]}" >&2
fi
exit "$PREEMPTED"
"""

_SOUP = """\
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
srun --ntasks=1 --mpi=none ${HPCSOUP_SRUN:-} \\
    "$PY" -m hpcsoup partition --config "$CONFIG" "$@"

# Step 2 (all tasks): the MPI ranks.
# shellcheck disable=SC2086
exec srun __MPI__--kill-on-bad-exit=1 --ntasks="$NTASKS" ${HPCSOUP_SRUN:-} \\
    "$PY" -m hpcsoup soup --config "$CONFIG" "$@"
"""

_ONE_PROCESS = """\
CONFIG="jobs/quickstart.toml"
if [[ $# -gt 0 && "$1" != -* && "$1" != *=* ]]; then  # the first argument, unless an option
    CONFIG="$1"
    shift
fi
# the rest goes to `hpcsoup __STAGE__` as given (bare key=value is read as --set key=value)

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    echo "__STAGE__.sh: not inside SLURM: running hpcsoup __STAGE__ here" >&2
else
    echo "__STAGE__.sh: job $SLURM_JOB_ID on $(hostname -s): config $CONFIG $*" >&2
fi
exec "$PY" -m hpcsoup __STAGE__ --config "$CONFIG" "$@"
"""

_BODIES = {"train": _TRAIN, "soup": _SOUP, "merge": _ONE_PROCESS, "report": _ONE_PROCESS}

#: what a stage asks of SLURM beyond its resources
_FIXED = {
    "train": {"open_mode": "append", "signal": "B:USR1@90", "requeue": True},
    "soup": {"signal": "TERM@60"},
    "merge": {},
    "report": {},
}


def _check_stage(stage: str) -> None:
    if stage not in STAGES:
        raise ConfigError(f"unknown stage {stage!r}; choose from {list(STAGES)}")


def job_name(cfg, stage: str) -> str:
    """``<experiment name>-<stage>``: what squeue shows and what the logs are named after."""
    return f"{cfg.name}-{stage}"


def log_pattern(cfg, stage: str) -> str:
    """The ``--output`` of a stage: ``<log_dir>/%x-%A_%a.out`` for the array, else ``%x-%j.out``."""
    return f"{cfg.slurm.log_dir.rstrip('/')}/%x-" + ("%A_%a.out" if stage == "train" else "%j.out")


def stage_options(cfg, stage: str) -> dict:
    """sbatch options of ``stage``: ``[slurm.<stage>]`` over ``[slurm]`` (empty values dropped)."""
    _check_stage(stage)
    s, own = cfg.slurm, cfg.slurm[stage]
    gpus = own.gpus_per_task if own.gpus_per_task >= 0 else s.gpus_per_task
    ntasks = own.ntasks or (cfg.soup.pls.ranks if stage == "soup" else 1)
    return {"job_name": job_name(cfg, stage), "output": log_pattern(cfg, stage),
            "partition": s.partition, "account": s.account, "qos": s.qos,
            "constraint": s.constraint, "time": own.time or s.time, "ntasks": ntasks,
            "cpus_per_task": own.cpus_per_task or s.cpus_per_task, "mem": own.mem or s.mem,
            "gpus_per_task": gpus or None, **_FIXED[stage]}


def _extra(cfg, stage: str) -> list[str]:
    lines = []
    for option in [*cfg.slurm.extra, *cfg.slurm[stage].extra]:
        option = option.strip()
        if option.startswith("#SBATCH"):
            option = option[len("#SBATCH"):].strip()
        if not option.startswith("-"):
            raise ConfigError(f"config key 'slurm.extra' / 'slurm.{stage}.extra' holds {option!r}; "
                              f"give sbatch options such as '--mail-type=END' or '--exclusive'")
        lines.append(f"#SBATCH {option}")
    return lines


def render_stage(stage: str, cfg=None, python: str | None = None) -> str:
    """The sbatch script of ``stage`` for ``cfg`` (a pure function of its arguments).

    Args:
        stage: ``train``, ``soup``, ``merge`` or ``report``.
        cfg: the experiment's config (default: the generic script of the repository's
            ``slurm/``: no ``--export=NONE``, the interpreter ``python``).
        python: the interpreter on the compute nodes (default: ``slurm.python``, else this one).
    """
    _check_stage(stage)
    generic = cfg is None
    cfg = build_config(GENERIC) if generic else cfg
    if generic:
        python = "python"
    python = python or cfg.slurm.python or sys.executable
    options = stage_options(cfg, stage)
    if not generic:
        options["export"] = "NONE"  # the script names its interpreter; nothing comes from the shell
    header = _HEADERS[stage].format(args=_ARGS.format(stage=stage))
    header += ("\n\nGenerated by hpcsoup (hpcsoup/jobscripts.py); `hpcsoup slurm init DIR --config X` "
               "writes\ncopies with an experiment's [slurm] settings.")
    site = list(cfg.slurm.setup)
    if site:
        site = ["# site set-up ([slurm] setup)"] + site
    mpi = f"--mpi={cfg.slurm.mpi} " if cfg.slurm.mpi else ""
    body = (_BODIES[stage].replace("__STAGE__", stage).replace("__MPI__", mpi)
            .replace("__LOG_DIR__", shlex.quote(cfg.slurm.log_dir)))
    setup = site + [
        "set -uo pipefail" if stage == "train" else "set -euo pipefail",
        "# srun steps and resubmissions keep this environment, also where sbatch runs --export=NONE",
        "export SLURM_EXPORT_ENV=ALL",
        f'PY="${{HPCSOUP_PYTHON:-{shlex.quote(python)}}}"',
        "",
    ]
    text = render_sbatch_script(body.rstrip("\n"), header=header, setup=setup, **options)
    extra = _extra(cfg, stage)
    if extra:  # after the generated directives: sbatch lets the last one win
        lines = text.split("\n")
        last = max(i for i, line in enumerate(lines) if line.startswith("#SBATCH"))
        text = "\n".join(lines[:last + 1] + extra + lines[last + 1:])
    return text


def write_scripts(folder: str | Path, cfg=None, python: str | None = None,
                  stages=STAGES) -> dict[str, Path]:
    """Write ``<folder>/<stage>.sh`` for each stage (executable); returns ``{stage: path}``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for stage in stages:
        path = folder / f"{stage}.sh"
        path.write_text(render_stage(stage, cfg, python))
        path.chmod(0o755)
        out[stage] = path
    return out

"""SLURM: the one module that reads ``SLURM_*`` variables and writes sbatch scripts.

- :class:`SlurmEnv` reads a job's environment (array task id, job id, ranks,
  CPUs, GPUs...): nothing else in hpcsoup looks at ``SLURM_*``.
- :func:`render_sbatch_script` and :func:`sbatch_command` are pure functions
  from parameters to text (``snake_case`` keys become ``--kebab-case`` options,
  values are quoted), as in submitit and dask-jobqueue, so that they can be
  tested against stored expected text.
- :func:`sbatch` submits and returns the job id; stages are chained with
  ``dependency=afterok(...)``.

The stage scripts themselves are rendered by :mod:`hpcsoup.jobscripts`.

Example::

    job = sbatch("slurm/train.sh", ["jobs/quickstart.toml"], array=array_spec(10), time="02:00:00")
    sbatch("slurm/soup.sh", ["jobs/quickstart.toml"], dependency=afterok(job))
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Iterable, Mapping, Sequence

from hpcsoup.errors import HpcsoupError


class SlurmError(HpcsoupError, RuntimeError):
    """SLURM is missing or refused a request (the message carries its answer)."""


def _int(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    match = re.match(r"^\s*(\d+)", value)  # e.g. SLURM_CPUS_ON_NODE "2", SLURM_TASKS_PER_NODE "2(x3)"
    return int(match.group(1)) if match else None


@dataclasses.dataclass(frozen=True)
class SlurmEnv:
    """What SLURM tells a job about itself (all ``None`` outside SLURM)."""

    job_id: str | None = None
    job_name: str | None = None
    array_job_id: str | None = None
    array_task_id: int | None = None
    array_task_count: int | None = None
    array_task_min: int | None = None
    array_task_max: int | None = None
    procid: int | None = None          # global rank of this task in a step
    localid: int | None = None         # rank on this node
    ntasks: int | None = None
    nodeid: int | None = None
    num_nodes: int | None = None
    cpus_per_task: int | None = None
    cpus_on_node: int | None = None
    gpus: str | None = None            # e.g. "0,1" (SLURM_JOB_GPUS / SLURM_STEP_GPUS)
    gpus_per_task: str | None = None
    partition: str | None = None
    submit_dir: str | None = None
    restart_count: int = 0             # times the job was requeued

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> "SlurmEnv":
        """Read ``environ`` (default: ``os.environ``)."""
        env = os.environ if environ is None else environ
        get = env.get
        return cls(
            job_id=get("SLURM_JOB_ID") or get("SLURM_JOBID"),
            job_name=get("SLURM_JOB_NAME"),
            array_job_id=get("SLURM_ARRAY_JOB_ID"),
            array_task_id=_int(get("SLURM_ARRAY_TASK_ID")),
            array_task_count=_int(get("SLURM_ARRAY_TASK_COUNT")),
            array_task_min=_int(get("SLURM_ARRAY_TASK_MIN")),
            array_task_max=_int(get("SLURM_ARRAY_TASK_MAX")),
            procid=_int(get("SLURM_PROCID")),
            localid=_int(get("SLURM_LOCALID")),
            ntasks=_int(get("SLURM_NTASKS")),
            nodeid=_int(get("SLURM_NODEID")),
            num_nodes=_int(get("SLURM_JOB_NUM_NODES") or get("SLURM_NNODES")),
            cpus_per_task=_int(get("SLURM_CPUS_PER_TASK")),
            cpus_on_node=_int(get("SLURM_CPUS_ON_NODE")),
            gpus=get("SLURM_STEP_GPUS") or get("SLURM_JOB_GPUS"),
            gpus_per_task=get("SLURM_GPUS_PER_TASK"),
            partition=get("SLURM_JOB_PARTITION"),
            submit_dir=get("SLURM_SUBMIT_DIR"),
            restart_count=_int(get("SLURM_RESTART_COUNT")) or 0,
        )

    @property
    def in_job(self) -> bool:
        """True inside a SLURM job (batch script or step)."""
        return self.job_id is not None

    @property
    def task_label(self) -> str | None:
        """``<array job>_<task>`` for array tasks, else the job id (what ``scontrol`` accepts)."""
        if self.array_job_id and self.array_task_id is not None:
            return f"{self.array_job_id}_{self.array_task_id}"
        return self.job_id

    def to_dict(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


# --------------------------------------------------------------------- rendering

def _option(key: str, value) -> str | None:
    """``("cpus_per_task", 2)`` -> ``"--cpus-per-task=2"``; True -> flag; None/False/"" -> omitted."""
    if value is None or value is False or value == "":
        return None
    name = "--" + key.replace("_", "-")
    if value is True:
        return name
    if isinstance(value, (list, tuple)):
        value = ",".join(map(str, value))
    return f"{name}={value}"


def sbatch_options(options: Mapping[str, object]) -> list[str]:
    """Options as ``--kebab-case=value`` strings, in the given order; empty values dropped."""
    return [o for o in (_option(k, v) for k, v in options.items()) if o is not None]


def _directive(option: str) -> str:
    # sbatch reads #SBATCH lines with its own parser: it honours double quotes, not shell quoting.
    name, sep, value = option.partition("=")
    if sep and (not value or re.search(r"[\s\"'#\\$`]", value)):
        value = '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return f"#SBATCH {name}{sep}{value}"


def render_sbatch_script(commands: str | Sequence[str], *, shebang: str = "#!/usr/bin/env bash",
                         header: str | None = None, setup: Iterable[str] = (),
                         **options) -> str:
    """An sbatch script: shebang, optional comment header, ``#SBATCH`` lines, setup, commands.

    Args:
        commands: shell lines to run (a string, or a list of lines).
        shebang: the first line (default: ``#!/usr/bin/env bash``).
        header: comment text put above the directives (default: none).
        setup: shell lines before the commands, e.g. ``set -euo pipefail`` (default: none).
        **options: sbatch options, ``snake_case`` (``cpus_per_task=2`` -> ``--cpus-per-task=2``).
    """
    lines = [shebang]
    if header:
        lines += [f"# {line}".rstrip() for line in header.splitlines()]
    lines += [_directive(o) for o in sbatch_options(options)]
    lines += list(setup)
    lines += [commands] if isinstance(commands, str) else list(commands)
    return "\n".join(lines) + "\n"


def sbatch_command(script: str | Path, script_args: Sequence[str] = (), *, parsable: bool = True,
                   executable: str = "sbatch", **options) -> list[str]:
    """The argv of an sbatch submission: ``sbatch [--parsable] --opt=v ... SCRIPT ARGS...``."""
    argv = [executable] + (["--parsable"] if parsable else []) + sbatch_options(options)
    return argv + [str(script)] + [str(a) for a in script_args]


def format_command(argv: Sequence[str]) -> str:
    """A shell-quoted command line (for printing and dry runs)."""
    return shlex.join(str(a) for a in argv)


def array_spec(tasks: int, max_parallel: int = 0) -> str:
    """``--array`` value for ``tasks`` tasks: ``"0-7"``, or ``"0-7%2"`` with a throttle."""
    if tasks < 1:
        raise SlurmError(f"an array job needs at least one task, got {tasks}; check experts.count "
                         f"and specialists.archs in the config")
    return f"0-{tasks - 1}" + (f"%{max_parallel}" if max_parallel else "")


def afterok(*job_ids: str | Iterable[str]) -> str:
    """``--dependency`` value that waits for every job to succeed: ``"afterok:12:13"``."""
    ids: list[str] = []
    for j in job_ids:
        ids += [j] if isinstance(j, (str, int)) else list(j)
    return "afterok:" + ":".join(str(j) for j in ids)


# --------------------------------------------------------------------- submitting

def sbatch(script: str | Path, script_args: Sequence[str] = (), *, env: Mapping[str, str] | None = None,
           cwd: str | Path | None = None, dry_run: bool = False, **options) -> str:
    """Submit ``script`` with ``options``; returns the job id (the command line when ``dry_run``).

    The folder of an ``output`` / ``error`` option is created first: SLURM cannot start a
    job whose log file cannot be opened.
    """
    argv = sbatch_command(script, script_args, **options)
    if dry_run:
        return format_command(argv)
    if shutil.which("sbatch") is None:
        raise SlurmError("sbatch is not installed or not on PATH; on one machine start a local "
                         "cluster with `slurm/local-cluster.sh up` and export SLURM_CONF")
    for key in ("output", "error"):
        if options.get(key):
            Path(cwd or ".", str(options[key])).parent.mkdir(parents=True, exist_ok=True)
    # The script's own #SBATCH --output lines need their folder too.
    try:
        for line in Path(cwd or ".", str(script)).read_text().splitlines():
            m = re.match(r"#SBATCH\s+(?:--output|--error|-o|-e)[= ]\"?([^\"\s]+)", line)
            if m and "/" in m.group(1):
                Path(cwd or ".", m.group(1)).parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=cwd,
                          env=None if env is None else dict(env))
    if proc.returncode != 0:
        raise SlurmError(f"`{format_command(argv)}` failed (exit {proc.returncode}): "
                         f"{proc.stderr.strip() or proc.stdout.strip()}")
    job_id = proc.stdout.strip().splitlines()[-1].split(";")[0]
    if not job_id:
        raise SlurmError(f"`{format_command(argv)}` printed no job id: {proc.stdout!r}")
    return job_id

"""The whole pipeline: train -> soup -> merge -> report.

- :func:`run_local` runs every stage on this machine (the embedded default):
  experts in Dask worker processes, PLS under ``mpiexec`` when
  ``soup.pls.ranks > 1``, then the merge of the specialists and the report.
- :func:`submit` submits the same stages as SLURM jobs chained with
  ``--dependency=afterok`` (each stage is also a plain script in ``slurm/``).
- :func:`require_experts` is the gate between training and the stages that read
  its experts: soup and merge refuse a partial set (naming what is missing)
  unless asked to use it (``--allow-partial``).
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hpcsoup.config import Section
from hpcsoup.data.footprint import STAGE_FACTORS, check_fits, slurm_bytes
from hpcsoup.errors import ConfigError, HpcsoupError
from hpcsoup.memory import available_bytes
from hpcsoup.progress import duration, verbosity_flags

log = logging.getLogger(__name__)


def _log(message: str) -> None:
    log.info("run: %s", message)


def find_mpiexec() -> str | None:
    """The ``mpiexec`` next to this Python (the mpich wheel), else the one on PATH."""
    beside = Path(sys.executable).with_name("mpiexec")
    return str(beside) if beside.exists() else shutil.which("mpiexec")


def _soup_under_mpiexec(cfg: Section, ranks: int) -> dict:
    """Run ``hpcsoup soup --method pls`` in ``ranks`` MPI processes; return its JSON result."""
    mpiexec = find_mpiexec()
    if mpiexec is None:
        raise HpcsoupError(f"soup.pls.ranks = {ranks} needs an MPI launcher, but no mpiexec was "
                           f"found; install the 'mpi' extra (pip install -e '.[mpi]') or set "
                           f"--set soup.pls.ranks=1")
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as handle:
        json.dump(cfg.to_dict(), handle)
    command = [mpiexec, "-n", str(ranks), sys.executable, "-m", "hpcsoup", "soup",
               "--config", handle.name, "--method", "pls", "--json", *verbosity_flags()]
    log.debug("run: %s", " ".join(command))
    try:
        done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if done.returncode != 0:
        killed = done.returncode in (9, 137, -9)  # SIGKILL: most often the out-of-memory killer
        hint = ("a rank was killed (signal 9), most often for running out of memory: give each "
                "rank more memory or run more ranks" if killed else "see the rank errors above")
        raise HpcsoupError(f"distributed PLS with {ranks} ranks failed (exit {done.returncode}); "
                           f"{hint}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_local(cfg: Section) -> dict:
    """Every stage of ``cfg`` on this machine; returns each stage's summary."""
    from hpcsoup.merge.run import run_merge
    from hpcsoup.report import report
    from hpcsoup.soup.run import run_soup
    from hpcsoup.train.run import run_train

    stages = ["train", "soup"] + (["merge"] if cfg.specialists.archs else [])
    largest = max(stages, key=STAGE_FACTORS.get)  # the stages run one after another
    check_fits(cfg.data.dataset, cfg.data.nodes, available_bytes(), "this machine",
               STAGE_FACTORS[largest], f"the {largest} stage")
    start = time.perf_counter()
    results: dict = {}
    _log(f"train: {cfg.experts.count} experts + {len(cfg.specialists.archs)} specialists")
    results["train"] = run_train(cfg, all_tasks=True)

    methods = list(cfg.soup.methods)
    ranks = cfg.soup.pls.ranks
    distributed = "pls" in methods and ranks > 1
    in_process = [m for m in methods if not (distributed and m == "pls")]
    if cfg.experts.count and in_process:
        _log(f"soup: {', '.join(in_process)}")
        results["soup"] = run_soup(cfg, methods=in_process)
    if cfg.experts.count and distributed:
        _log(f"soup: pls on {ranks} MPI ranks")
        results["soup_pls"] = _soup_under_mpiexec(cfg, ranks)

    if cfg.specialists.archs:
        _log(f"merge: {' + '.join(cfg.specialists.archs)} with H-GRAMA")
        results["merge"] = run_merge(cfg)

    results["report"] = report(cfg.store)
    results["seconds"] = time.perf_counter() - start
    _log(f"done in {duration(results['seconds'])}")
    return results


def submit(cfg: Section, config_path: str | None, overrides: list[str] = (),
           dry_run: bool = False) -> dict:
    """Submit train -> (soup, merge) -> report as SLURM jobs chained with ``afterok``.

    Each stage's script is rendered from the config (:func:`hpcsoup.jobscripts.render_stage`:
    per-stage resources and the site's options from ``[slurm]``, this interpreter unless
    ``slurm.python`` names another) into ``<slurm.log_dir>/scripts/``, and submitted with
    ``--export=NONE`` with the same config file and ``--set`` overrides. A failed stage
    cancels the stages after it (``--kill-on-invalid-dep=yes``). Prints the store, the log
    folder, each job with its dependency and the commands to follow them. Returns the job
    ids (with ``dry_run``, the sbatch command lines instead, and nothing is written).
    """
    from hpcsoup.jobscripts import render_stage, stage_options
    from hpcsoup.slurm import afterok, array_spec, sbatch
    from hpcsoup.train.sweep import array_size

    for stage in ("train", "soup", "merge"):  # each loads the whole graph
        mem = stage_options(cfg, stage)["mem"]
        check_fits(cfg.data.dataset, cfg.data.nodes, slurm_bytes(mem),
                   f"the {stage} job (slurm mem = {mem!r})", STAGE_FACTORS[stage],
                   f"the {stage} stage")
    if not config_path:
        raise ConfigError("hpcsoup submit needs the config as a file that the compute nodes can "
                          "read, e.g. `hpcsoup submit jobs/quickstart.toml`")
    args = [str(Path(config_path).absolute())] + [a for kv in overrides for a in ("--set", kv)]
    logs = Path(cfg.slurm.log_dir).absolute()
    scripts = logs / "scripts"
    chain = dict(kill_on_invalid_dep="yes", export="NONE", dry_run=dry_run)
    stages = ["train"] + (["soup"] if cfg.experts.count and cfg.soup.methods else []) \
        + (["merge"] if cfg.specialists.archs else []) + ["report"]
    if not dry_run:
        scripts.mkdir(parents=True, exist_ok=True)

    jobs: dict = {}
    after: dict = {}

    def run(stage: str, waits_for: list[str], **options) -> None:
        script = scripts / f"{cfg.name}-{stage}.sh"
        if not dry_run:
            script.write_text(render_stage(stage, cfg))
        dependency = afterok(*[ref(s) for s in waits_for]) if waits_for else None
        jobs[stage] = sbatch(script, args, dependency=dependency, **options, **chain)
        after[stage] = waits_for

    def ref(stage: str) -> str:
        return f"<{stage}>" if dry_run else jobs[stage]

    run("train", [], array=array_spec(array_size(cfg), cfg.slurm.max_parallel))
    for stage in ("soup", "merge"):
        if stage in stages:
            run(stage, ["train"])
    run("report", [s for s in ("soup", "merge") if s in jobs] or ["train"])
    return {"dry_run": dry_run, "jobs": jobs, "after": {s: w for s, w in after.items() if w},
            "store": str(Path(cfg.store).absolute()), "logs": str(logs), "scripts": str(scripts)}

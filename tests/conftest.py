"""Shared test set-up: one thread, MPI safety, dataset root in tmp, SLURM and mpiexec fixtures.

Markers (``mpi``, ``slurm``, ``slow``) are registered in setup.cfg. The test command (README,
Tests; ``.ci/run`` runs it) has two legs:

1. ``python -m pytest -n 2 --dist worksteal`` -- every test in two plain worker processes
   (pytest-xdist), each test where a worker is free. ``mpi`` tests that run *inside* a rank see a
   world of size 1 here; ``mpi`` tests that launch their own ranks (the ``mpiexec`` fixture) run
   here, and only here. Two SLURM or MPI tests may run at once: the local cluster oversubscribes
   its 2 CPUs and every wait in those tests is bounded generously.
2. ``mpiexec -n 2 python -m pytest -m mpi`` -- the in-rank ``mpi`` tests again, in every rank of a
   world of size 2. So an in-rank test must work for any communicator size, 1 included, and every
   rank must run the same collectives in the same order (skip on all ranks or on none).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ci_support import missing as _missing

#: environment variables that MPI launchers (mpich/hydra, Open MPI, SLURM's PMI2) set in each rank
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE")
_LAUNCHER_VARS = _LAUNCHER_SIZE_VARS + ("PMI_RANK", "PMI_FD", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")


def _launched_size() -> int:
    """The number of ranks the launcher started (1 when not launched by MPI)."""
    for var in _LAUNCHER_SIZE_VARS:
        try:
            return int(os.environ[var])
        except (KeyError, ValueError):
            continue
    return 1


def pytest_configure(config):
    # The 2 cores are shared: torch with several threads runs small sparse ops ~100x slower when
    # another process holds a core.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)


def _abort_world(code: int) -> None:
    """``MPI.COMM_WORLD.Abort(code)`` when launched by MPI with several ranks; else nothing."""
    if _launched_size() <= 1:
        return
    try:
        from mpi4py import MPI
    except ImportError:
        return
    if MPI.Is_finalized() or MPI.COMM_WORLD.Get_size() <= 1:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    # Abort kills every process at once; give the launcher a moment to forward what was just
    # written, or the failure report can vanish with it (seen 1 run in 6 with mpich's hydra)
    time.sleep(0.5)
    MPI.COMM_WORLD.Abort(code)


def pytest_runtest_logreport(report):
    """Under ``mpiexec -n N`` (N > 1), the first failure aborts every rank.

    A rank that fails before a collective would leave its peers waiting in it for ever, or
    carry on and pair its next collective with their old one. ``Abort`` ends the job at once
    (well under a second) with exit code 1; the failure is printed first, since pytest's own
    summary never comes.
    """
    if report.failed and _launched_size() > 1:
        rank = next((os.environ[v] for v in ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
                     if v in os.environ), "?")
        sys.stderr.write(f"\n===== rank {rank}: FAILED {report.nodeid} ({report.when}); aborting "
                         f"the MPI job =====\n{report.longreprtext}\n")
        _abort_world(1)


def pytest_sessionfinish(session, exitstatus):
    session.config._hpcsoup_exitstatus = int(exitstatus)


def pytest_unconfigure(config):
    """A session that failed outside a test (e.g. a collection error) aborts the MPI job too.

    This runs after pytest's summary is printed, so the report is not lost.
    """
    code = getattr(config, "_hpcsoup_exitstatus", 0)
    if code not in (0, int(pytest.ExitCode.NO_TESTS_COLLECTED)):
        _abort_world(code)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """A session-wide dataset root in tmp: ``processed/`` files never land in the repo or ../shared."""
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="session")
def cora(data_root):
    """Cora (public split) from the shipped copy; tests must not modify it."""
    from hpcsoup.data import load_dataset

    return load_dataset("Cora", root=data_root)


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts with one torch thread, whatever the previous test set."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def slurm_cluster() -> str:
    """The ``SLURM_CONF`` of a running cluster (``slurm/local-cluster.sh up``); skips without one."""
    conf = os.environ.get("SLURM_CONF")
    if not conf:
        _missing("no SLURM: SLURM_CONF is not set (start one: "
                 "eval \"$(slurm/local-cluster.sh up | tail -n 1)\")")
    if not Path(conf).is_file():
        _missing(f"no SLURM: SLURM_CONF={conf} does not exist (slurm/local-cluster.sh up)")
    if shutil.which("sinfo") is None:
        _missing("no SLURM: sinfo is not installed (slurm/local-cluster.sh up installs it)")
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        _missing(f"no SLURM: sinfo did not answer in 20 s (SLURM_CONF={conf})")
    if out.returncode != 0 or not out.stdout.strip():
        _missing(f"no SLURM: sinfo failed with SLURM_CONF={conf}: {out.stderr.strip()[-300:]}")
    return conf


def mpiexec_path() -> Path | None:
    """The ``mpiexec`` of the pip ``mpich`` wheel, next to this Python (None when absent)."""
    path = Path(sys.executable).parent / "mpiexec"
    return path if path.is_file() and os.access(path, os.X_OK) else None


@pytest.fixture(scope="session")
def mpiexec() -> Path:
    """Path of the venv's ``mpiexec`` (pip ``mpich``), for tests that launch their own ranks.

    Skips when it or mpi4py is missing, and inside an MPI job (the ``mpiexec -n 2 pytest -m mpi``
    leg of the test command): a launcher test runs once, in the plain pytest leg, not once per rank
    with a nested launcher.
    """
    if any(var in os.environ for var in _LAUNCHER_VARS):
        pytest.skip("launches its own mpiexec: runs in the plain pytest leg, not inside MPI ranks")
    path = mpiexec_path()
    if path is None:
        _missing(f"no mpiexec next to {sys.executable} (pip install -e '.[mpi]')")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        _missing("mpi4py is not installed (pip install -e '.[mpi]')")
    return path

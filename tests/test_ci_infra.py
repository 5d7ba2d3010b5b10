"""The test infrastructure itself: a real SLURM, real MPI ranks, and no hang when a rank fails."""
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

PYTHON = sys.executable
TESTS = Path(__file__).parent


def _clean_env():
    """This environment without an enclosing MPI job's variables (so a launched job is its own)."""
    return {k: v for k, v in os.environ.items()
            if not k.startswith(("PMI_", "PMIX_", "OMPI_", "HYDI_", "HYDRA_", "MPIR_"))}


@pytest.mark.slurm
def test_sbatch_array_runs_every_task(slurm_cluster, tmp_path):
    result = subprocess.run(
        ["sbatch", "--wait", "--array=0-1", "--job-name=hpcsoup-ci-array", f"--chdir={tmp_path}",
         f"--output={tmp_path}/slurm-%A_%a.out",
         "--wrap", 'echo "task $SLURM_ARRAY_TASK_ID of $SLURM_ARRAY_JOB_ID" > task-$SLURM_ARRAY_TASK_ID.txt'],
        capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    for task in (0, 1):
        assert (tmp_path / f"task-{task}.txt").read_text().startswith(f"task {task} of ")


@pytest.mark.slurm
def test_srun_pmi2_gives_one_world(slurm_cluster):
    """``MpiDefault=pmi2``: 2 tasks form one world of size 2 (not two worlds of size 1)."""
    pytest.importorskip("mpi4py")
    # One line from rank 0 (gathered): the ranks' own prints may interleave mid-line.
    code = textwrap.dedent("""
        from mpi4py import MPI
        c = MPI.COMM_WORLD
        rows = c.gather(f"{c.Get_rank()}/{c.Get_size()}")
        if rows is not None:
            print(" ".join(rows))
    """)
    result = subprocess.run(["srun", "--mpi=pmi2", "-n", "2", PYTHON, "-c", code],
                            capture_output=True, text=True, timeout=120, env=_clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["0/2", "1/2"], result.stdout


@pytest.mark.mpi
def test_mpiexec_allreduce(mpiexec):
    code = textwrap.dedent("""
        import numpy as np
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        total = np.zeros(3)
        comm.Allreduce(np.full(3, comm.Get_rank() + 1.0), total, op=MPI.SUM)
        rows = comm.gather((comm.Get_rank(), comm.Get_size(), total.tolist()))
        if rows is not None:  # rank 0 prints one line: the ranks' own prints may interleave
            print(rows)
    """)
    result = subprocess.run([str(mpiexec), "-n", "2", PYTHON, "-c", code],
                            capture_output=True, text=True, timeout=60, env=_clean_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str([(0, 2, [3.0] * 3), (1, 2, [3.0] * 3)])


@pytest.mark.mpi
def test_rank_raising_before_collective_ends_the_job(mpiexec, tmp_path):
    """``python -m mpi4py``: one rank's exception aborts the job; the peer does not hang."""
    script = tmp_path / "fail.py"
    script.write_text(textwrap.dedent("""
        from mpi4py import MPI
        comm = MPI.COMM_WORLD
        if comm.Get_rank() == 1:
            raise RuntimeError("rank 1 fails before the collective")
        comm.allreduce(1)
    """))
    start = time.monotonic()
    result = subprocess.run([str(mpiexec), "-n", "2", PYTHON, "-m", "mpi4py", str(script)],
                            capture_output=True, text=True, timeout=60, env=_clean_env())
    elapsed = time.monotonic() - start
    assert result.returncode != 0
    assert "rank 1 fails before the collective" in result.stderr
    assert elapsed < 10, f"the job took {elapsed:.1f} s to end"


@pytest.mark.mpi
def test_failed_pytest_rank_aborts_the_mpi_job(mpiexec, tmp_path):
    """conftest's rule: under ``mpiexec -n 2 pytest``, a rank failing before a collective aborts all."""
    shutil.copy(TESTS / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(TESTS / "ci_support.py", tmp_path / "ci_support.py")
    (tmp_path / "test_hang.py").write_text(textwrap.dedent("""
        from mpi4py import MPI

        def test_rank1_fails_before_allreduce():
            comm = MPI.COMM_WORLD
            assert comm.Get_rank() != 1, "rank 1 fails"
            comm.allreduce(1)
    """))
    result = subprocess.run(
        [str(mpiexec), "-n", "2", PYTHON, "-m", "pytest", "-q", "-p", "no:cacheprovider",
         "test_hang.py"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=_clean_env())
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert "rank 1: FAILED test_hang.py::test_rank1_fails_before_allreduce" in output, output


@pytest.mark.mpi
def test_world_allreduce_in_rank():
    """Runs inside every rank of the test command's MPI leg, and in the plain leg as a world of size 1."""
    MPI = pytest.importorskip("mpi4py.MPI")
    comm = MPI.COMM_WORLD
    size = comm.Get_size()
    assert comm.allreduce(comm.Get_rank() + 1) == size * (size + 1) // 2


def test_ci_runs_the_readme_test_command():
    """.ci/run runs, as a command line of its own, the test command README.md gives under Tests."""
    readme = (TESTS.parent / "README.md").read_text()
    tests_section = readme.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    command = tests_section.split("```bash\n", 1)[1].split("\n```", 1)[0].strip()
    assert "-m pytest" in command
    ci_lines = [line.strip() for line in (TESTS.parent / ".ci" / "run").read_text().splitlines()]
    assert any(line.startswith(command) for line in ci_lines if not line.startswith(("#", "step"))), \
        f".ci/run does not run README's test command {command!r}"

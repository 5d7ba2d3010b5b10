"""The whole pipeline: `hpcsoup run` here, and `hpcsoup submit` on a real SLURM."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hpcsoup.pipeline import submit
from hpcsoup.config import load_config
from hpcsoup.store import Store

REPO = Path(__file__).resolve().parent.parent
QUICKSTART = REPO / "jobs" / "quickstart.toml"
TINY = ["experts.count=2", "experts.epochs=3", "specialists.epochs=3",
        'soup.methods=["uniform","pls"]', "soup.pls.partitions=4", "soup.pls.steps=5"]


def _check_store(path: Path) -> None:
    store = Store.open(path)
    experts = store.groups("experts")
    assert sorted(g.id for g in experts) == ["gat-s1", "gcn-s0", "sage-e000", "sage-e001"]
    soups = {g.attrs["method"]: g.attrs for g in store.groups("soups")}
    assert set(soups) == {"uniform", "pls"}
    assert soups["pls"]["ranks"] == 2
    assert 0 < soups["uniform"]["metrics"]["test"] <= 1
    merges = store.groups("merges")
    assert len(merges) == 1 and sorted(merges[0].attrs["parents"]) == ["gat-s1", "gcn-s0"]
    assert set(merges[0].attrs["metrics"]["retention"]) == {"gat-s1", "gcn-s0"}
    report = Path(str(path) + ".report")
    assert "## Soups (2)" in (report / "report.md").read_text()


@pytest.mark.slow
def test_run_every_stage_locally(tmp_path, data_root, mpiexec):
    """`hpcsoup run` of a small quickstart: results on stdout, a short log on a non-terminal stderr."""
    store = tmp_path / "run.zarr"
    args = ["run", str(QUICKSTART), "--store", str(store),
            "--set", f'data.root="{data_root}"'] + [a for kv in TINY for a in ("--set", kv)]
    done = subprocess.run([sys.executable, "-m", "hpcsoup", *args], capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_store(store)
    err = done.stderr.splitlines()
    # the line budget of a quickstart on a SLURM log or a pipe: no per-epoch or per-step detail
    assert len(err) <= 60, f"{len(err)} lines on stderr:\n{done.stderr}"
    assert not any(" epoch 1/" in line for line in err), done.stderr
    assert any(line.startswith("train: 12/12 epochs in ") for line in err), done.stderr
    assert any(line.startswith("merge: 4/4 phases in ") for line in err), done.stderr
    # the results, on stdout
    out = done.stdout
    assert "sage-e000  trained" in out and "pls (2 ranks)" in out and "merge: gcn-s0 + gat-s1" in out
    assert f"report: {store}.report/report.md" in out


def test_submit_dry_run_chains_stages(tmp_path):
    cfg = load_config(QUICKSTART, TINY)
    jobs = submit(cfg, str(QUICKSTART), TINY, dry_run=True)["jobs"]
    assert "--array=0-3" in jobs["train"]
    assert "--dependency=afterok:<train>" in jobs["soup"] and "--ntasks=2" in jobs["soup"]
    assert "--dependency=afterok:<train>" in jobs["merge"]
    assert "--dependency=afterok:<soup>:<merge>" in jobs["report"]
    assert all("--kill-on-invalid-dep=yes" in jobs[s] for s in ("soup", "merge", "report"))


def test_submit_needs_a_config_file():
    with pytest.raises(ValueError, match="needs the config as a file"):
        submit(load_config(None), None)


def _wait(job_id: str, timeout: float = 600) -> str:
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        state = out.split("JobState=")[1].split()[0] if "JobState=" in out else "GONE"
        if state not in ("PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED"):
            return state
        time.sleep(2)
    raise TimeoutError(f"job {job_id} still running after {timeout} s")


@pytest.mark.slurm
@pytest.mark.slow
def test_submit_runs_the_chain_on_slurm(slurm_cluster, tmp_path, data_root, monkeypatch):
    monkeypatch.chdir(tmp_path)  # logs land in ./slurm-logs
    store = tmp_path / "submit.zarr"
    args = ["submit", str(QUICKSTART), "--store", str(store), "--json",
            "--set", f'data.root="{data_root}"'] + [a for kv in TINY for a in ("--set", kv)]
    done = subprocess.run([sys.executable, "-m", "hpcsoup"] + args, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    jobs = json.loads(done.stdout.strip().splitlines()[-1])["jobs"]
    assert _wait(jobs["report"]) == "COMPLETED", (tmp_path / "slurm-logs").glob("*")
    _check_store(store)

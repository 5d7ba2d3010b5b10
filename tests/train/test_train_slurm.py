"""slurm/train.sh on a real SLURM (slurm/local-cluster.sh up): arrays, self-resubmission, pre-emption.

Each test submits jobs from a tmp folder (logs land in its slurm-logs/) with
HPCSOUP_PYTHON pointing at this interpreter, waits for them, and checks the store.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hpcsoup.config import build_config
from hpcsoup.store import Store
from hpcsoup.train.run import run_train

pytestmark = pytest.mark.slurm

REPO = Path(__file__).resolve().parents[2]
TRAIN_SH = REPO / "slurm" / "train.sh"


def _config(tmp_path: Path, data_root: Path, store: str, **experts) -> Path:
    values = {"name": "slurm-test", "store": str(tmp_path / store), "threads": 1,
              "data": {"dataset": "Cora", "root": str(data_root)},
              "experts": {"arch": "sage", "count": 8, "epochs": 3, "hidden": 16, "progress_every": 1,
                          **experts}}
    path = tmp_path / f"{store}.json"
    path.write_text(json.dumps(values))
    return path


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") or k == "SLURM_CONF"}
    return dict(env, HPCSOUP_PYTHON=sys.executable, OMP_NUM_THREADS="1")


def _sbatch(tmp_path: Path, *args: str, wait: bool = False) -> str:
    (tmp_path / "slurm-logs").mkdir(exist_ok=True)
    cmd = ["sbatch", "--parsable"] + (["--wait"] if wait else []) + list(args)
    proc = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"{cmd}: {proc.stderr}\n{_logs(tmp_path)}"
    return proc.stdout.strip().splitlines()[0].split(";")[0]


def _wait_gone(job: str, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout
        if not out.strip():
            return
        time.sleep(1)
    pytest.fail(f"job {job} still queued after {timeout} s")


def _state(job: str) -> str:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return ",".join(re.findall(r"JobState=(\w+)", out))


def _logs(tmp_path: Path) -> str:
    return "\n".join(f"== {p.name}\n{p.read_text()[-2000:]}"
                     for p in sorted((tmp_path / "slurm-logs").glob("*.out")))


def _same_weights(a: Store, b: Store, ids: list[str]) -> bool:
    for gid in ids:
        sa, sb = a.load_group("experts", gid)[0], b.load_group("experts", gid)[0]
        if list(sa) != list(sb) or not all(torch.equal(sa[k], sb[k]) for k in sa):
            return False
    return True


@pytest.mark.slow
def test_sbatch_array_gives_the_same_experts_as_train_all(slurm_cluster, tmp_path, data_root):
    """8 SAGE experts as a real `sbatch --array=0-7` of slurm/train.sh == `hpcsoup train --all`."""
    config = _config(tmp_path, data_root, "array.zarr")
    job = _sbatch(tmp_path, "--array=0-7", str(TRAIN_SH), str(config), wait=True)
    assert _state(job).split(",") == ["COMPLETED"] * 8, _logs(tmp_path)
    array = Store.open(tmp_path / "array.zarr")
    ids = [f"sage-e{i:03d}" for i in range(8)]
    assert [g.id for g in array.groups("experts")] == ids
    for g in array.groups("experts"):
        assert g.attrs["slurm"]["array_job_id"] == job and g.attrs["threads"] == 1
    local = build_config(json.loads(config.read_text()), [f"store='{tmp_path / 'all.zarr'}'"])
    assert run_train(local, all_tasks=True)["trained"] == 8
    assert _same_weights(array, Store.open(tmp_path / "all.zarr"), ids)


def test_plain_sbatch_resubmits_itself_as_an_array(slurm_cluster, tmp_path, data_root):
    config = _config(tmp_path, data_root, "plain.zarr", count=2, epochs=2)
    launcher = _sbatch(tmp_path, str(TRAIN_SH), str(config), "experts.hidden=8", wait=True)
    log = (tmp_path / "slurm-logs").glob(f"hpcsoup-train-{launcher}_*.out")
    text = "".join(p.read_text() for p in log)
    match = re.search(r"submitted array job (\d+) \(--array=0-1\)", text)
    assert match, _logs(tmp_path)
    _wait_gone(match.group(1))
    store = Store.open(tmp_path / "plain.zarr")
    assert [g.id for g in store.groups("experts")] == ["sage-e000", "sage-e001"], _logs(tmp_path)
    assert store.groups("experts")[0].attrs["model"]["hidden"] == 8  # the override travelled


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


@pytest.mark.slow
def test_usr1_before_the_time_limit_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path, data_root):
    """What --signal=B:USR1@90 does near the time limit, triggered now with scancel.

    SLURM holds a requeued job back for its credential lifetime (cred_expire, 120 s by default)
    before running it again; rather than idle that long, the test checks that the task was
    requeued, cancels the requeued copy and reruns the same task id, as a user would.
    """
    config = _config(tmp_path, data_root, "pre.zarr", count=1, epochs=25, checkpoint_every=100)
    job = _sbatch(tmp_path, "--array=0", str(TRAIN_SH), str(config))
    log = tmp_path / "slurm-logs" / f"hpcsoup-train-{job}_0.out"
    _wait_for(lambda: log.exists() and "epoch 3/25" in log.read_text(), 300, "epoch 3")
    subprocess.run(["scancel", "--signal=USR1", "--batch", f"{job}_0"], check=True)
    _wait_for(lambda: "requeueing job" in log.read_text(), 120, "the requeue")
    text = log.read_text()
    assert "stopped by SIGUSR1" in text and "checkpoint saved" in text, text[-3000:]
    _wait_for(lambda: "Restarts=1" in subprocess.run(["scontrol", "show", "job", f"{job}_0"],
                                                     capture_output=True, text=True).stdout,
              60, "SLURM to requeue the task")
    store = Store.open(tmp_path / "pre.zarr")
    assert store.groups("experts") == [] and (store.path / ".checkpoints" / "sage-e000.pt").is_file()
    subprocess.run(["scancel", job], check=True)
    _wait_gone(job)
    rerun = _sbatch(tmp_path, "--array=0", str(TRAIN_SH), str(config), wait=True)
    text = (tmp_path / "slurm-logs" / f"hpcsoup-train-{rerun}_0.out").read_text()
    assert "resuming after epoch" in text and "resumed: val" in text, text[-3000:]
    (info,) = store.groups("experts")
    assert info.attrs["resumed_from_epoch"] >= 3 and info.attrs["slurm"]["array_job_id"] == rerun
    reference = build_config(json.loads(config.read_text()), [f"store='{tmp_path / 'ref.zarr'}'"])
    run_train(reference, task_id=0)
    assert _same_weights(store, Store.open(tmp_path / "ref.zarr"), ["sage-e000"])

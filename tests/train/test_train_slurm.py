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
    # progress lines every half second: the pre-emption test follows the epochs through them
    return dict(env, HPCSOUP_PYTHON=sys.executable, OMP_NUM_THREADS="1",
                HPCSOUP_PROGRESS_SECONDS="0.5")


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


@pytest.mark.slow
def test_sbatch_wait_on_a_plain_submission_returns_when_every_expert_is_done(
        slurm_cluster, tmp_path, data_root):
    """`sbatch --wait slurm/train.sh X` submits the array and waits for it (it used to return at once)."""
    config = _config(tmp_path, data_root, "plain.zarr", count=2, epochs=2)
    launcher = _sbatch(tmp_path, str(TRAIN_SH), str(config), "experts.hidden=8", wait=True)
    store = Store.open(tmp_path / "plain.zarr")  # complete when sbatch returns: no polling
    assert [g.id for g in store.groups("experts")] == ["sage-e000", "sage-e001"], _logs(tmp_path)
    assert store.groups("experts")[0].attrs["model"]["hidden"] == 8  # the override travelled
    text = "".join(p.read_text() for p in (tmp_path / "slurm-logs").glob(f"hpcsoup-train-{launcher}_*"))
    match = re.search(r"submitted array job (\d+) \(--array=0-1\)", text)
    assert match and "array finished: every task completed" in text, _logs(tmp_path)
    assert _state(match.group(1)).split(",") == ["COMPLETED"] * 2 and _state(launcher) == "COMPLETED"


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout} s waiting for {what}")


def _restarts(job: str) -> int:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    found = re.findall(r"Restarts=(\d+)", out)
    return int(found[0]) if found else -1


@pytest.mark.slow
def test_an_array_task_preempted_twice_resumes_to_the_uninterrupted_weights(
        slurm_cluster, tmp_path, data_root):
    """Two real pre-emptions of one array task, each requeued by SLURM itself (no resubmission).

    The first signal goes to the job's steps (`scancel --signal=USR1`: the trainer runs as a step),
    the second to the batch script (`scancel -b`, as --signal=B:USR1@90 does before the time limit),
    which forwards it. Each time the trainer checkpoints and exits 75, train.sh requeues the task,
    and SLURM runs it again (after cred_expire, 10 s on the local cluster); the final weights equal
    an uninterrupted run's, bit for bit.
    """
    config = _config(tmp_path, data_root, "pre.zarr", count=1, epochs=60, checkpoint_every=1000)
    job = _sbatch(tmp_path, "--array=0", str(TRAIN_SH), str(config))
    task = f"{job}_0"
    log = tmp_path / "slurm-logs" / f"hpcsoup-train-{job}_0.out"

    def text() -> str:
        return log.read_text() if log.exists() else ""

    def epochs_done() -> int:  # the task's progress lines ("train sage-e000: 7/60 epochs ...")
        found = re.findall(r"train sage-e000: (\d+)/60 epochs", text())
        return int(found[-1]) if found else 0

    _wait_for(lambda: epochs_done() >= 3, 300, "epoch 3 of the first run")
    subprocess.run(["scancel", "--signal=USR1", task], check=True)
    _wait_for(lambda: _restarts(task) == 1, 120, "SLURM to requeue the task")
    _wait_for(lambda: "resuming after epoch" in text(), 300, "the requeued run to resume")
    first_stop = int(re.findall(r"resuming after epoch (\d+)", text())[0])
    _wait_for(lambda: epochs_done() >= first_stop + 3, 300, "three more epochs")
    subprocess.run(["scancel", "-b", "--signal=USR1", task], check=True)
    _wait_for(lambda: _restarts(task) == 2, 120, "the second requeue")
    _wait_gone(job, 600)

    out = text()
    assert out.count("checkpointed on a signal; requeueing job") == 2, out[-4000:]
    assert out.count("requeued: when it runs again it continues from its last") == 2, out[-4000:]
    assert "refused" not in out
    assert _state(task) == "COMPLETED", out[-4000:]
    store = Store.open(tmp_path / "pre.zarr")
    (info,) = store.groups("experts")
    assert info.attrs["slurm"]["restart_count"] == 2 and info.attrs["resumed_from_epoch"] > first_stop
    reference = build_config(json.loads(config.read_text()), [f"store='{tmp_path / 'ref.zarr'}'"])
    run_train(reference, task_id=0)
    assert _same_weights(store, Store.open(tmp_path / "ref.zarr"), ["sage-e000"])

"""``sbatch slurm/soup.sh`` on a real (local) SLURM gives the soup that ``mpiexec -n 2`` gives."""
from __future__ import annotations

import pytest
import torch

from distributed_support import REPO, copy_store, last_json, launch, python, write_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def test_sbatch_soup_sh_equals_mpiexec(slurm_cluster, cora_store, data_root, mpiexec, tmp_path):
    from hpcsoup.store import Store

    # mpiexec -n 2 on one copy of the store
    config = write_config(tmp_path / "mpi.toml", copy_store(cora_store, tmp_path / "mpi.zarr"),
                          data_root)
    rc, stdout, stderr, _ = launch([str(mpiexec), "-n", "2", python(), "-m", "hpcsoup", "soup",
                                    "--config", str(config), "--json"], timeout=600)
    assert rc == 0, stderr[-3000:]
    by_mpiexec = last_json(stdout)["soups"][0]

    # sbatch slurm/soup.sh on another: 2 tasks from the script's #SBATCH lines; the job runs in
    # tmp_path, so its log lands in tmp_path/slurm-logs/ (the script's default --output)
    store = copy_store(cora_store, tmp_path / "sbatch.zarr")
    (tmp_path / "slurm-logs").mkdir()
    rc, stdout, stderr, seconds = launch(
        ["sbatch", "--wait", "--parsable", f"--chdir={tmp_path}", str(REPO / "slurm" / "soup.sh"),
         str(config), "--store", str(store), "--json", "soup.seed=3"],
        timeout=900, env={"HPCSOUP_PYTHON": python(), "SLURM_CONF": slurm_cluster})
    job = stdout.strip().splitlines()[-1].split(";")[0] if stdout.strip() else "?"
    logs = list((tmp_path / "slurm-logs").glob(f"hpcsoup-soup-{job}.out"))
    log = logs[0].read_text() if logs else ""
    assert rc == 0, f"sbatch exit {rc}: {stderr[-2000:]}\n{log[-4000:]}"
    assert logs, f"no slurm-logs/hpcsoup-soup-{job}.out in {list(tmp_path.iterdir())}"
    by_sbatch = last_json(log)  # rank 0's JSON line (other ranks' stderr may follow it)
    assert by_sbatch["ranks"] == 2
    soup = by_sbatch["soups"][0]
    assert soup["id"] == by_mpiexec["id"] and soup["extras"]["ranks"] == 2
    assert '"partitioned": ' in log  # the graph was partitioned in its own one-task step (--json)

    a = torch.tensor(Store.open(tmp_path / "mpi.zarr").group_attrs("soups", soup["id"])["coefficients"])
    b = torch.tensor(Store.open(store).group_attrs("soups", soup["id"])["coefficients"])
    diff = float((a - b).abs().max())
    print(f"\nsbatch vs mpiexec -n 2: max |coefficient difference| {diff:.1e} (sbatch {seconds:.0f} s)")
    assert diff <= 1e-6

"""Distributed PLS as users run it: ``mpiexec -n P hpcsoup soup`` launched by the test itself.

- the coefficients do not depend on P (1, 2, 4; P = 1 is the single-process method);
- each rank holds about 1 / P of the validation nodes plus their receptive fields, never the
  whole graph;
- a rank that raises (or is killed) mid-run ends the whole job non-zero within seconds;
- a missing expert or partition file is one clear error on every rank, and no hang.
"""
from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from distributed_support import copy_store, last_json, launch, python, write_config

#: not `mpi`: these tests start mpiexec themselves (never run them inside ranks)
pytestmark = pytest.mark.slow

CORA_NODES = 2708
CORA_VAL = 500

#: runs hpcsoup's CLI with a failure injected into one rank's allreduce hook (test-only: the
#: production code has no fault-injection switch)
INJECT = """
import os, sys, time
import hpcsoup.distributed.pls as dpls
rank, call, mode = int(os.environ["FAIL_RANK"]), int(os.environ["FAIL_CALL"]), os.environ["FAIL_MODE"]
original = dpls.Counted.__call__
def hooked(self, tensor):
    if self.comm.rank == rank and self.calls == call:
        print(f"INJECTED {mode} AT {time.time():.3f}", file=sys.stderr, flush=True)
        if mode == "kill":
            os.kill(os.getpid(), 9)
        raise MemoryError(f"injected failure on rank {rank}")
    return original(self, tensor)
dpls.Counted.__call__ = hooked
from hpcsoup.cli import main
sys.exit(main(sys.argv[1:]))
"""


def soup_command(mpiexec, ranks: int, config: Path, *extra: str) -> list[str]:
    return [str(mpiexec), "-n", str(ranks), python(), "-m", "hpcsoup", "soup", "--config",
            str(config), "--json", *extra]


def stored_coefficients(store: Path, soup_id: str) -> torch.Tensor:
    from hpcsoup.store import Store
    return torch.tensor(Store.open(store).group_attrs("soups", soup_id)["coefficients"],
                        dtype=torch.float64)


@pytest.fixture(scope="module")
def runs(cora_store, data_root, tmp_path_factory, mpiexec) -> dict:
    """``mpiexec -n P hpcsoup soup --method pls`` for P = 1, 2, 4, each on its own store copy."""
    out = {}
    base = tmp_path_factory.mktemp("launch")
    for ranks in (1, 2, 4):
        store = copy_store(cora_store, base / f"p{ranks}.zarr")
        config = write_config(base / f"p{ranks}.toml", store, data_root)
        rc, stdout, stderr, seconds = launch(soup_command(mpiexec, ranks, config), timeout=600)
        assert rc == 0, f"mpiexec -n {ranks} failed ({rc}):\n{stderr[-4000:]}"
        summary = last_json(stdout)
        soup = summary["soups"][0]
        out[ranks] = {"summary": summary, "soup": soup, "store": store, "config": config,
                      "coefficients": stored_coefficients(store, soup["id"]), "seconds": seconds,
                      "stderr": stderr}
    return out


def test_coefficients_do_not_depend_on_the_number_of_ranks(runs):
    reference = runs[1]["coefficients"]
    ones = torch.ones(len(reference), dtype=torch.float64)
    assert reference.shape[1] == 3 and torch.allclose(reference.sum(1), ones, atol=1e-5)
    assert float((reference - reference.mean(1, keepdim=True)).abs().max()) > 1e-3  # it learned
    diffs = {p: float((runs[p]["coefficients"] - reference).abs().max()) for p in (2, 4)}
    print(f"\nmax |coefficients(P) - coefficients(1)|: P=2 {diffs[2]:.2e}, P=4 {diffs[4]:.2e}; "
          f"wall: " + ", ".join(f"P={p} {runs[p]['seconds']:.1f}s" for p in (1, 2, 4)))
    assert diffs[2] <= 1e-5 and diffs[4] <= 1e-5, diffs
    # the soup moved and stopped at the same check whatever P
    assert all(runs[p]["soup"]["extras"]["moved"] for p in (1, 2, 4))
    assert len({runs[p]["soup"]["extras"]["best_step"] for p in (1, 2, 4)}) == 1
    assert len({runs[p]["soup"]["extras"]["steps"] for p in (1, 2, 4)}) == 1
    # one id per rank count: the runs of a scaling study never overwrite each other
    assert len({runs[p]["soup"]["id"] for p in (1, 2, 4)}) == 3
    assert runs[2]["soup"]["id"].startswith("sage-pls-r2-")


def test_recorded_scores_are_the_full_graph_scores_of_the_stored_weights(runs, data_root):
    from hpcsoup.data import load_dataset
    from hpcsoup.soup import Evaluator
    from hpcsoup.store import Store

    graph = load_dataset("Cora", data_root)
    for p in (1, 2, 4):
        state, attrs = Store.open(runs[p]["store"]).load_group("soups", runs[p]["soup"]["id"])
        from hpcsoup.models import ModelSpec
        evaluator = Evaluator(ModelSpec.from_dict(attrs["model"]), graph)
        truth = evaluator.metrics(state)
        assert attrs["metrics"]["val"] == pytest.approx(truth["val"], abs=1e-6), p
        assert attrs["metrics"]["test"] == pytest.approx(truth["test"], abs=1e-6), p
        if p > 1:  # gathered on the ranks from the set's scoring fields: no rank loaded the graph
            assert attrs["metrics"]["scored_on"] == "partitions' validation and test fields (exact)"
            assert len(attrs["extras"]["score_peak_rss_bytes_per_rank"]) == p
            assert "no scoring fields" not in runs[p]["stderr"]


def test_distributed_runs_report_ranks_and_communication(runs):
    # a row per drawn partition: the gradient of R plus the loss term, float32
    per_step = runs[2]["soup"]["extras"]["per_step"]
    logits_bytes = 4 * per_step * (runs[1]["coefficients"].numel() + 1)
    for p in (2, 4):
        extras = runs[p]["soup"]["extras"]
        assert extras["ranks"] == p and runs[p]["summary"]["ranks"] == p
        assert extras["allreduce_bytes_per_step"] == logits_bytes
        assert len(extras["peak_rss_bytes_per_rank"]) == p
    assert "ranks" not in runs[1]["soup"]["extras"]  # one rank: the single-process method


def test_each_rank_holds_about_one_pth_of_the_graph(runs):
    """The default scope "field": a partition's core is its validation nodes (Cora: 500)."""
    from hpcsoup.distributed.shards import open_parts, owned_partitions

    for p in (2, 4):
        extras = runs[p]["soup"]["extras"]
        core, resident = extras["core_nodes_per_rank"], extras["resident_nodes_per_rank"]
        attrs = open_parts(extras["shards"])
        sizes = attrs["sizes"]
        assert attrs["scope"] == "field"
        print(f"\nP={p}: validation nodes per rank {core}, with their receptive fields "
              f"{resident} (of {CORA_NODES}; ideal core {CORA_VAL / p:.0f})")
        assert sum(core) == CORA_VAL
        for rank in range(p):
            assert abs(core[rank] - CORA_VAL / p) <= 0.25 * CORA_VAL / p
            assert resident[rank] == sum(sizes[k] for k in owned_partitions(len(sizes), rank, p))
            assert resident[rank] < 0.8 * CORA_NODES  # never the whole graph
    assert max(runs[4]["soup"]["extras"]["resident_nodes_per_rank"]) < \
        0.7 * min(runs[2]["soup"]["extras"]["resident_nodes_per_rank"])


@pytest.mark.parametrize("mode", ["raise", "kill"])
def test_a_failing_rank_ends_the_job_within_seconds(runs, mpiexec, tmp_path, mode):
    store = copy_store(runs[2]["store"], tmp_path / "s.zarr")  # partitioned graph already there
    shutil.rmtree(store / "soups" / runs[2]["soup"]["id"])
    config = write_config(tmp_path / "c.toml", store, _data_root(runs[2]["config"]), steps=200)
    command = [str(mpiexec), "-n", "2", python(), "-c", INJECT, "soup", "--config", str(config)]
    rc, stdout, stderr, seconds = launch(command, timeout=120,
                                         env={"FAIL_RANK": "1", "FAIL_CALL": "5", "FAIL_MODE": mode})
    ended = time.time()
    match = re.search(r"INJECTED \w+ AT ([\d.]+)", stderr)
    assert match, f"the failure was not injected:\n{stderr[-3000:]}"
    after = ended - float(match.group(1))
    print(f"\n{mode}: job ended {after:.2f} s after the failure, exit code {rc}")
    assert rc != 0
    assert after < 10
    if mode == "raise":  # the failing rank's error, printed once, with its rank and its step
        assert stderr.count("MemoryError: injected failure on rank 1") == 1, stderr[-3000:]
        assert "[rank 1/2] out of memory while running the PLS steps (MemoryError)" in stderr
    from hpcsoup.store import Store
    assert not Store.open(store).groups("soups")  # nothing was written


def _data_root(config: Path) -> Path:
    import tomllib
    return Path(tomllib.loads(config.read_text())["data"]["root"])


def test_missing_experts_are_one_clear_error_on_every_rank(mpiexec, tmp_path, runs):
    from hpcsoup.store import Store

    store = tmp_path / "empty.zarr"
    Store.create(store)
    config = write_config(tmp_path / "c.toml", store, _data_root(runs[2]["config"]))
    rc, stdout, stderr, seconds = launch(soup_command(mpiexec, 2, config), timeout=120)
    print(f"\nmissing experts: exit {rc} after {seconds:.1f} s")
    assert rc == 2
    # one error per rank (the launcher may join their lines: split on the prefix, not on lines)
    errors = stderr.split("hpcsoup soup: error:")[1:]
    assert len(errors) == 2 and all("no complete experts" in e for e in errors), stderr[-3000:]
    assert "MPI_Abort" not in stderr


def test_a_missing_partition_is_one_clear_error_on_every_rank(mpiexec, tmp_path, runs):
    store = copy_store(runs[2]["store"], tmp_path / "s.zarr")
    shards = Path(str(runs[2]["soup"]["extras"]["shards"]).replace(str(runs[2]["store"]), str(store)))
    shutil.rmtree(shards / "p00003")  # held by rank 1 of 2
    config = write_config(tmp_path / "c.toml", store, _data_root(runs[2]["config"]))
    rc, stdout, stderr, seconds = launch(soup_command(mpiexec, 2, config), timeout=120)
    print(f"\nmissing partition: exit {rc} after {seconds:.1f} s")
    assert rc == 2
    errors = stderr.split("hpcsoup soup: error:")[1:]
    assert len(errors) == 2, stderr[-3000:]
    for error in errors:
        assert "partition 3 is missing" in error and "rank(s) 1 of 2" in error

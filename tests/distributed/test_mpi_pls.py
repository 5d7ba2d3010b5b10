"""Distributed pieces, run INSIDE every rank: ``mpiexec -n 2 python -m pytest -m mpi tests/distributed``.

Every test passes for any communicator size, 1 included, and runs the same body under
``COMM_SELF`` and ``COMM_WORLD`` (mpi4py's own test practice).
"""
from __future__ import annotations

import shutil

import pytest
import torch

from hpcsoup.distributed.mpi import CollectiveError, Comm, agree, self_comm, world
from hpcsoup.errors import StoreError, StoreNotFoundError

pytestmark = pytest.mark.mpi


@pytest.fixture(params=["self", "world"])
def comm(request) -> Comm:
    return self_comm() if request.param == "self" else world()


def test_allreduce_sums_over_ranks_on_every_rank(comm):
    local = torch.tensor([1.0, comm.rank + 1.0], dtype=torch.float32)
    total = comm.allreduce(local)
    p = comm.size
    assert total.tolist() == [float(p), p * (p + 1) / 2]
    assert local.tolist() == [1.0, comm.rank + 1.0]  # the input is not modified
    assert total.dtype == torch.float32


def test_allreduce_counts_bytes(comm):
    before = comm.bytes_allreduced
    comm.allreduce(torch.zeros(3, 5, dtype=torch.float64))
    assert comm.bytes_allreduced - before == 3 * 5 * 8


def test_allreduce_max_and_bad_op(comm):
    assert comm.allreduce(torch.tensor([comm.rank]), op="max").item() == comm.size - 1
    if comm.size > 1:
        with pytest.raises(ValueError, match="op 'prod' is unknown"):
            comm.allreduce(torch.ones(1), op="prod")


def test_allgather_tensor_concatenates_in_rank_order(comm):
    local = torch.full((comm.rank + 1, 2), float(comm.rank))
    out = comm.allgather_tensor(local)
    expected = torch.cat([torch.full((r + 1, 2), float(r)) for r in range(comm.size)])
    assert torch.equal(out, expected)


def test_bcast_and_allgather_objects(comm):
    assert comm.bcast({"seed": 7} if comm.rank == 0 else None) == {"seed": 7}
    assert comm.allgather(comm.rank) == list(range(comm.size))


def test_agree_raises_on_every_rank_when_one_rank_fails(comm):
    def read():
        if comm.rank == comm.size - 1:
            raise StoreNotFoundError("expert 'sage-e007' is not in store 'x.zarr'")
        return comm.rank

    with pytest.raises(StoreNotFoundError, match="sage-e007") as info:
        agree(comm, read, "reading the experts")
    assert isinstance(info.value, CollectiveError)
    if comm.size > 1:
        assert f"rank(s) {comm.size - 1} of {comm.size}" in str(info.value)
    assert agree(comm, lambda: comm.rank * 2, "doubling") == comm.rank * 2


def test_agree_keeps_the_error_class(comm):
    with pytest.raises(StoreError, match="corrupt"):
        agree(comm, lambda: (_ for _ in ()).throw(StoreError("chunk corrupt")), "reading")


# --------------------------------------------------------------------------- shards and PLS


@pytest.fixture
def shared_dir(tmp_path):
    """One folder that every rank of the world sees (rank 0's tmp_path)."""
    return world().bcast(tmp_path)


def _prepared(comm, shared_dir, graph, partitions, halo, field=None):
    """Rank 0 partitions ``graph`` into a store in ``shared_dir`` while the others wait (as in a
    real run); ``field``: the model whose receptive fields are stored (scope "field")."""
    from hpcsoup.distributed.shards import prepare, shard_path
    from hpcsoup.store import Store

    path = shard_path(shared_dir / "s.zarr", f"{graph.name}-{comm.size}", partitions, halo, 0,
                      field)
    if comm.rank == 0:
        if not (shared_dir / "s.zarr").exists():
            Store.create(shared_dir / "s.zarr")
        prepare(path, graph, partitions, halo, field=field)
    comm.barrier()
    return path


@pytest.mark.parametrize("arch,halo", [("sage", 0), ("gcn", 2)])
def test_a_rank_reads_only_its_partitions_as_pls_builds_them(comm, shared_dir, arch, halo):
    from distributed_support import tiny_graph
    from hpcsoup.distributed.shards import load_shard
    from hpcsoup.soup.pls import LocalPartitionSource

    graph = tiny_graph()
    path = _prepared(comm, shared_dir, graph, 6, halo)
    shard = load_shard(path, comm.rank, comm.size)
    assert sorted(shard.parts) == [k for k in range(6) if k % comm.size == comm.rank]
    local = LocalPartitionSource(graph, 6, halo)
    for k, stored in shard.parts.items():
        expected = local.part(k)
        for name in ("x", "edge_index", "y", "val_mask", "val_pos", "deg"):
            assert torch.equal(getattr(stored, name), getattr(expected, name)), name
        assert torch.equal(stored.nodes[: stored.core_count], local.nodes[k])
        assert torch.equal(stored.test_mask[: stored.core_count], graph.mask("test")[local.nodes[k]])
    # the ranks together hold every node exactly once as a core node
    assert sum(comm.allgather(shard.core_nodes)) == graph.num_nodes
    assert shard.attrs["val_counts"] == local.counts["val"].tolist()


def test_a_missing_partition_names_itself(shared_dir):
    from distributed_support import tiny_graph
    from hpcsoup.distributed.shards import load_shard, prepare, shard_path
    from hpcsoup.store import Store

    comm = self_comm()
    store = Store.create(shared_dir / f"own-{world().rank}.zarr")
    path = prepare(shard_path(store.path, "tiny", 4, 0, 0), tiny_graph(), 4, 0)
    shutil.rmtree(path / "p00002")
    with pytest.raises(StoreNotFoundError, match="partition 2 is missing.*hpcsoup partition"):
        load_shard(path, 0, 1)
    with pytest.raises(StoreNotFoundError, match="'graphs/tiny/parts-4-halo1-seed0' is not in store"):
        load_shard(shard_path(store.path, "tiny", 4, 1, 0), comm.rank, comm.size)


def _distributed_pls(comm, path, ingredients, settings, seed=5):
    from hpcsoup.distributed.pls import Counted, ShardSource
    from hpcsoup.distributed.shards import load_shard
    from hpcsoup.soup import Evaluator
    from hpcsoup.soup.pls import PartitionLearnedSoup

    shard = load_shard(path, comm.rank, comm.size)
    source = ShardSource(shard)
    evaluator = Evaluator(ingredients.spec, None, metric=shard.attrs["metric"])
    hook = Counted(comm)
    result = PartitionLearnedSoup(**settings).soup(ingredients, evaluator, seed=seed,
                                                   source=source, allreduce=hook)
    return result, hook, source, evaluator


@pytest.mark.parametrize("arch,metric,scope,halo", [
    ("sage", "accuracy", "partition", 2), ("gcn", "rocauc", "partition", 1),
    ("sage", "accuracy", "field", 0), ("gcn", "rocauc", "field", 0), ("gat", "accuracy", "field", 0),
    ("sage", "accuracy", "field", -1)])
def test_distributed_pls_equals_single_process_pls(comm, shared_dir, arch, metric, scope, halo):
    """halo -1: the greedy start (chosen by the exact partition check, on every rank alike)."""
    from distributed_support import tiny_experts, tiny_graph
    from hpcsoup.soup import Evaluator
    from hpcsoup.soup.pls import PartitionLearnedSoup

    torch.manual_seed(0)
    graph = tiny_graph(metric=metric)
    ingredients = tiny_experts(graph, arch)
    # SGD: Adam divides by the gradient's running norm, which magnifies float summation
    # order on near-zero gradient entries (seen: 2e-3 on 2 ranks); SGD keeps it at rounding
    # check "partitions" in both: "auto" would check the single process's small full graph
    init = "greedy" if halo < 0 else "uniform"
    halo = max(halo, 0)
    settings = {"partitions": 8, "per_step": 4, "scope": scope, "halo": halo, "steps": 25,
                "lr": 20.0, "optimizer": "sgd", "eval_every": 5, "patience": 1000,
                "check": "partitions", "init": init}
    single = PartitionLearnedSoup(**settings).soup(ingredients, Evaluator(ingredients.spec, graph),
                                                   seed=5)
    field = ingredients.spec if scope == "field" else None
    path = _prepared(comm, shared_dir, graph, 8, halo, field)
    result, hook, source, _ = _distributed_pls(comm, path, ingredients, settings)
    a = torch.tensor(single.coefficients)
    b = torch.tensor(result.coefficients)
    assert float((a - a.mean(1, keepdim=True)).abs().max()) > 1e-3  # the soup moved
    assert torch.equal(a, b)  # the same bits: per-partition rows, summed in draw order
    assert result.extras["best_step"] == single.extras["best_step"]
    # one allreduce per step, of each drawn partition's gradient and loss: 4 R (T n + 1) bytes,
    # plus one per check (every 5 steps and the last) of the gathered validation results
    # (the greedy start's n - 1 evaluations are checks too)
    checks = result.extras["checks"] + (ingredients.n - 1 if init == "greedy" else 0)
    assert hook.calls == 25 + checks and result.extras["checks"] == 6
    step_bytes = 25 * 4 * 4 * (ingredients.num_tensors * ingredients.n + 1)  # R = 4 rows
    val = int(source.counts["val"].sum())
    assert hook.bytes == step_bytes + checks * 8 * val * (1 + ingredients.spec.out_channels)


def test_shard_scores_equal_full_graph_scores_with_an_exact_halo(comm, shared_dir):
    from distributed_support import tiny_experts, tiny_graph
    from hpcsoup.distributed.pls import ShardSource
    from hpcsoup.distributed.shards import load_shard
    from hpcsoup.soup import Evaluator
    from hpcsoup.soup.pls import partition_scores

    graph = tiny_graph(seed=1)
    ingredients = tiny_experts(graph, "gcn", n=2, epochs=10)
    params = ingredients.mean()
    path = _prepared(comm, shared_dir, graph, 5, 2)  # halo 2 = layers: exact
    source = ShardSource(load_shard(path, comm.rank, comm.size))
    evaluator = Evaluator(ingredients.spec, None, metric=graph.metric)
    scores = partition_scores(params, evaluator, source, comm.allreduce)
    full = Evaluator(ingredients.spec, graph).metrics(params)
    assert scores["val"] == pytest.approx(full["val"], abs=1e-6)
    assert scores["test"] == pytest.approx(full["test"], abs=1e-6)


@pytest.mark.parametrize("block", [None, 16])
@pytest.mark.parametrize("arch,metric", [("sage", "accuracy"), ("gcn", "rocauc"), ("gat", "accuracy"),
                                         ("gin", "accuracy")])
def test_scoring_fields_give_the_full_graph_scores(comm, shared_dir, monkeypatch, arch, metric,
                                                   block):
    """A field set's scoring fields (each partition's validation and test nodes with their
    receptive field) score a soup as the full graph does, each rank reading its own fields.
    ``block``: the forward's row blocks and the stored fields' row chunks made small, so a
    field's features and first aggregation stay in the store and are read a block at a time."""
    import hpcsoup.distributed.shards
    import hpcsoup.models.gnn
    from distributed_support import tiny_experts, tiny_graph
    from hpcsoup.distributed.pls import ScoreFieldSource
    from hpcsoup.distributed.shards import load_shard, open_parts
    from hpcsoup.soup import Evaluator
    from hpcsoup.soup.pls import partition_scores
    from hpcsoup.store.zarr_store import RowReader

    if block:
        for module in (hpcsoup.models.gnn, hpcsoup.distributed.shards):
            monkeypatch.setattr(module, "FIRST_LAYER_BLOCK", block)
    graph = tiny_graph(seed=2, metric=metric)
    ingredients = tiny_experts(graph, arch, n=2, epochs=10)
    params = ingredients.mean()
    path = _prepared(comm, shared_dir, graph, 6, 0, ingredients.spec)
    attrs = open_parts(path)
    assert attrs["score_fields"] is True and len(attrs["score_sizes"]) == 6
    shard = load_shard(path, comm.rank, comm.size)
    source = ScoreFieldSource.of(shard)
    roots = {"val": [], "test": []}
    previous = None
    for k in source.owned():
        assert k % comm.size == comm.rank
        part = source.part(k)
        # one field at a time: the one handed out before is emptied (its storage freed)
        assert previous is None or (previous.x.size(0) == 0 and previous.aggregate.numel() == 0)
        previous = part
        assert part.is_field and part.core_count == int(part.val_mask.sum() + part.test_mask.sum())
        assert part.num_nodes == attrs["score_sizes"][k] < graph.num_nodes
        # read when the forward asks for rows, where there is a first aggregation (not GAT)
        assert isinstance(part.x, RowReader) == (arch != "gat")
        assert not block or part.num_nodes > 2 * block  # the forward runs in several blocks
        for split in roots:
            # the roots are the partition's nodes of that split, at their global positions
            ids = part.nodes[part.mask(split)]
            assert torch.equal(graph.mask(split).nonzero().view(-1)[part.positions(split)], ids)
            roots[split] += ids.tolist()
    for split, ids in roots.items():  # the ranks together score every node of the split once
        every = sorted(sum(comm.allgather(ids), []))
        assert every == graph.mask(split).nonzero().view(-1).tolist()
    evaluator = Evaluator(ingredients.spec, None, metric=graph.metric)
    scores = partition_scores(params, evaluator, source, comm.allreduce)
    full = Evaluator(ingredients.spec, graph).metrics(params)
    assert scores["val"] == pytest.approx(full["val"], abs=1e-6)
    assert scores["test"] == pytest.approx(full["test"], abs=1e-6)


@pytest.mark.parametrize("earlier", [False, True])
def test_distributed_pls_records_full_graph_scores_without_loading_the_graph(
        comm, shared_dir, tmp_path, data_root, monkeypatch, earlier):
    """``run_pls_ranks`` on a field set scores the soup on the scoring fields (no rank loads the
    graph: loading it here fails); on a set of an earlier hpcsoup, without scoring fields, rank
    0 scores the full graph. Either way the recorded scores are the full graph's."""
    import zarr

    import hpcsoup.data
    from distributed_support import PLS, write_expert_store
    from hpcsoup.config import build_config
    from hpcsoup.distributed.pls import prepare_from_config, run_pls_ranks
    from hpcsoup.distributed.shards import is_prepared, score_part_name
    from hpcsoup.models import ModelSpec
    from hpcsoup.soup import Evaluator
    from hpcsoup.store import Store

    folder = shared_dir if comm.size > 1 else tmp_path  # under COMM_SELF every rank has its own
    store = folder / f"cora-{comm.size}-{earlier}.zarr"
    cfg = build_config({"store": str(store), "threads": 1,
                        "data": {"dataset": "Cora", "root": str(data_root)},
                        "experts": {"arch": "sage", "layers": 2, "hidden": 16},
                        "soup": {"seed": 3, "pls": dict(PLS)}})
    if comm.rank == 0:
        torch.set_num_threads(1)
        write_expert_store(store, data_root, n=2, epochs=10)
        spec = ModelSpec.from_dict(Store.open(store).group_attrs("experts", "sage-e000")["model"])
        path = prepare_from_config(cfg, spec)
        if earlier:  # as an earlier hpcsoup wrote it: no scoring fields
            group = zarr.open_group(str(path), mode="r+")
            group.attrs.put({k: v for k, v in group.attrs.asdict().items()
                             if not k.startswith("score_")})
            for k in range(PLS["partitions"]):
                shutil.rmtree(path / score_part_name(k))
            assert is_prepared(path)
    comm.barrier()
    loads = []
    original = hpcsoup.data.load_from_config

    def load(*args, **kwargs):
        loads.append(comm.rank)
        if not earlier:
            raise AssertionError(f"rank {comm.rank} loaded the whole graph")
        return original(*args, **kwargs)
    monkeypatch.setattr(hpcsoup.data, "load_from_config", load)
    run = run_pls_ranks(cfg, comm)
    monkeypatch.undo()
    assert loads == ([0] if earlier and comm.rank == 0 else [])
    assert run.metrics["scored_on"] == ("full graph (rank 0)" if earlier
                                        else "partitions' validation and test fields (exact)")
    assert len(run.score_peak_rss) == comm.size and run.score_seconds > 0
    graph = hpcsoup.data.load_dataset("Cora", data_root)
    truth = Evaluator(run.ingredients.spec, graph).metrics(run.result.state_dict)
    assert run.metrics["val"] == pytest.approx(truth["val"], abs=1e-6)
    assert run.metrics["test"] == pytest.approx(truth["test"], abs=1e-6)
    assert run.result.extras["moved"]


def test_threads_per_rank_share_the_cores(comm):
    import os

    from hpcsoup.distributed.pls import threads_per_rank

    assert threads_per_rank(comm, 3) == 3
    threads = threads_per_rank(comm, 0)
    cpus, ranks = comm.node_cpus()
    assert threads >= 1 and (threads * ranks <= cpus or threads == 1)
    assert cpus <= (os.cpu_count() or 1) * max(1, ranks)


def test_rank_device(comm):
    from hpcsoup.distributed.pls import rank_device
    from hpcsoup.errors import SoupError

    assert rank_device("cpu", comm) == torch.device("cpu")
    if torch.cuda.is_available():
        device = rank_device("cuda", comm)
        assert device.type == "cuda" and device.index < torch.cuda.device_count()
    else:
        with pytest.raises(SoupError, match="no CUDA GPU"):
            rank_device("cuda", comm)


def test_abort_on_error_lets_errors_through_on_one_rank():
    from hpcsoup.distributed.mpi import abort_on_error

    with pytest.raises(KeyError):
        with abort_on_error(Comm(None)):
            raise KeyError("one process: an ordinary exception")


def test_stratified_draw_balances_round_robin_ranks():
    from hpcsoup.distributed.shards import owner_of
    from hpcsoup.errors import SoupError
    from hpcsoup.soup.pls import draw_partitions

    counts = torch.zeros(32)
    for step in range(2000):
        drawn = draw_partitions(4, step, 32, 8, "stratified")
        assert drawn == draw_partitions(4, step, 32, 8, "stratified")  # (seed, step) alone
        assert drawn == sorted(drawn) and sorted(k % 8 for k in drawn) == list(range(8))
        for ranks in (1, 2, 4, 8):  # P | R: every rank computes exactly R / P partitions
            load = torch.bincount(torch.tensor([owner_of(k, ranks) for k in drawn]), minlength=ranks)
            assert load.tolist() == [8 // ranks] * ranks
        counts[drawn] += 1
    assert float((counts / 2000 - 8 / 32).abs().max()) < 0.04  # each partition ~R/K of the steps
    assert draw_partitions(0, 0, 5, 5, "stratified") == [0, 1, 2, 3, 4]
    assert draw_partitions(0, 1, 10, 3, "stratified") != draw_partitions(1, 1, 10, 3, "stratified") \
        or draw_partitions(0, 2, 10, 3, "stratified") != draw_partitions(1, 2, 10, 3, "stratified")
    with pytest.raises(SoupError, match="draw='blocks' is unknown"):
        draw_partitions(0, 0, 8, 2, "blocks")


def test_a_full_graph_check_is_refused_alike_on_every_rank(comm):
    from hpcsoup.config import build_config
    from hpcsoup.distributed.pls import run_pls_ranks
    from hpcsoup.errors import SoupError

    cfg = build_config({"threads": 1, "soup": {"pls": {"check": "full"}}})
    with pytest.raises(SoupError, match="needs the whole graph") as info:
        run_pls_ranks(cfg, comm)
    assert isinstance(info.value, CollectiveError)


def test_launcher_detection(monkeypatch):
    from hpcsoup.distributed.mpi import LAUNCHER_VARIABLES, MPI_SWITCH, launched_under_mpi

    for name in (*LAUNCHER_VARIABLES, MPI_SWITCH):
        monkeypatch.delenv(name, raising=False)
    assert not launched_under_mpi()  # a plain process never initialises MPI
    monkeypatch.setenv("PMI_RANK", "0")  # as Hydra and srun --mpi=pmi2 set it
    assert launched_under_mpi()
    monkeypatch.setenv(MPI_SWITCH, "0")
    assert not launched_under_mpi()
    monkeypatch.delenv("PMI_RANK")
    monkeypatch.setenv(MPI_SWITCH, "1")
    assert launched_under_mpi()


def test_ranks_that_wait_in_agree_sleep_instead_of_spinning(comm):
    """Rank 0 works 1.5 s (as when it partitions the graph); the others wait in ``agree``
    without burning their core: their CPU time stays well below the wall time."""
    import time

    wall, cpu = time.perf_counter(), time.process_time()
    agree(comm, lambda: time.sleep(1.5) if comm.rank == 0 else None, "partitioning")
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    if comm.rank > 0:
        assert wall > 1.4
        assert cpu < 0.05 * wall, f"rank {comm.rank} used {cpu:.2f} s of CPU in {wall:.2f} s of waiting"


def test_hpcsoup_partition_before_the_experts_writes_the_set_pls_reads(tmp_path):
    """`hpcsoup partition` has no experts yet: the config's architecture and depth name the
    same receptive-field set that distributed PLS, given the experts' model, reads."""
    from hpcsoup.config import build_config
    from hpcsoup.distributed.pls import shards_of_config
    from hpcsoup.models import ModelSpec

    cfg = build_config({"store": str(tmp_path / "s.zarr"), "experts": {"arch": "gcn", "layers": 3}})
    experts = ModelSpec("gcn", 1433, 7, 3, 32)
    assert shards_of_config(cfg) == shards_of_config(cfg, experts)
    assert shards_of_config(cfg).name == "parts-32-field-gcn3-seed0"
    halo = build_config({"store": str(tmp_path / "s.zarr"), "soup": {"pls": {"scope": "partition"}}})
    assert shards_of_config(halo, experts).name == "parts-32-halo0-seed0"

import threading

import pytest
import torch

from hpcsoup.errors import SoupError
from hpcsoup.models.rows import GatheredRows
from hpcsoup.soup import Evaluator, get_method
from hpcsoup.soup.pls import LocalPartitionSource, draw_partitions, partition_scores

SAME = dict(optimizer="adam", lr=0.3, steps=8, patience=100, eval_every=1, init="uniform")


def test_draws_depend_on_seed_and_step_only():
    a = [draw_partitions(7, step, 16, 4) for step in range(20)]
    assert a == [draw_partitions(7, step, 16, 4) for step in range(20)]
    assert all(d == sorted(set(d)) and len(d) == 4 and 0 <= d[0] and d[-1] < 16 for d in a)
    assert len({tuple(d) for d in a}) > 10          # steps see different partitions
    assert a != [draw_partitions(8, step, 16, 4) for step in range(20)]
    assert draw_partitions(0, 3, 5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(SoupError, match="per_step=9 must be in 1..partitions=8"):
        draw_partitions(0, 0, 8, 9)


@pytest.mark.parametrize("arch", ["sage", "gcn"])
def test_halo_of_layers_makes_partition_predictions_exact(tiny_graph, arch):
    from soup_support import train_experts

    experts = train_experts(tiny_graph, arch=arch, n=2, epochs=5)
    evaluator = Evaluator(experts.spec, tiny_graph)
    weights = torch.full((experts.num_tensors, experts.n), 0.5)
    full = evaluator.evaluate(experts.mix(weights))
    source = LocalPartitionSource(tiny_graph, 6, halo=experts.spec.layers)
    scores = partition_scores(experts.mix(weights), evaluator, source)
    assert scores["val"] == pytest.approx(full, abs=1e-9)
    assert scores["test"] == pytest.approx(evaluator.evaluate(experts.mix(weights), "test"), abs=1e-9)
    # and the logits of every core node are the full graph's
    logits = evaluator.logits(experts.mix(weights))
    for k in range(6):
        part = source.part(k)
        out = evaluator.forward(experts.mix(weights), part.x, evaluator.part_adjacency(part))
        core = source.nodes[k]
        assert torch.allclose(out[:core.numel()], logits[core], atol=1e-5)


@pytest.mark.parametrize("arch", ["sage", "gcn", "gin", "gat"])
def test_receptive_fields_give_each_partitions_exact_validation_logits(tiny_graph, arch):
    """scope "field": a partition is its validation nodes' receptive field (with the first
    aggregation precomputed except for GAT); their logits and the gathered score are exact."""
    from soup_support import train_experts

    experts = train_experts(tiny_graph, arch=arch, n=2, epochs=5)
    evaluator = Evaluator(experts.spec, tiny_graph)
    params = experts.mix(torch.full((experts.num_tensors, experts.n), 0.5))
    assert not hasattr(LocalPartitionSource(tiny_graph, 6, evaluator=evaluator), "parts")  # a soup's
    source = LocalPartitionSource(tiny_graph, 6, evaluator=evaluator, keep_partition=True)
    assert source.scope == "field" and source.exact(experts.spec.layers)
    assert not source.exact(experts.spec.layers, "test")  # a field holds no test nodes
    scores = partition_scores(params, evaluator, source, splits=("val",))
    assert scores["val"] == pytest.approx(evaluator.score(evaluator.logits(params), "val"), abs=1e-9)
    logits = evaluator.logits(params)
    val = tiny_graph.mask("val")
    for k in range(6):
        part = source.part(k)
        assert part.is_field and bool(part.aggregate.numel()) == (arch != "gat")
        # rows of the validation field's, read a block at a time (GAT reads its features whole)
        assert isinstance(part.x, GatheredRows) == (arch != "gat")
        roots = source.nodes[k][val[source.nodes[k]]]
        assert part.num_nodes < tiny_graph.num_nodes
        out = evaluator.forward(params, part.x, evaluator.part_adjacency(part))
        assert torch.allclose(out[:part.core_count], logits[roots], atol=1e-5)


def test_big_fields_come_in_pieces_whose_terms_add_up_to_the_partitions(tiny_graph, tiny_experts,
                                                                        monkeypatch):
    """A field above PIECE_NODES nodes is handed to a step in pieces (their validation nodes
    split the partition's): the same soup as whole partitions, to float rounding."""
    import hpcsoup.soup.pls as pls

    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    settings = dict(SAME, partitions=3, per_step=2)
    whole = get_method("pls", **settings).soup(tiny_experts, evaluator, seed=3)
    monkeypatch.setattr(pls, "PIECE_NODES", 8)
    monkeypatch.setattr(pls, "PIECE_SHARE", 10 ** 9)
    source = LocalPartitionSource(tiny_graph, 3, evaluator=evaluator)
    for k in range(3):
        pieces = list(source.pieces(k))
        assert len(pieces) > 1
        assert torch.equal(torch.cat([p.val_pos for p in pieces]), source.part(k).val_pos)
        assert max(p.num_nodes for p in pieces) < source.part(k).num_nodes
    pieced = get_method("pls", **settings).soup(tiny_experts, evaluator, seed=3)
    assert torch.allclose(torch.tensor(pieced.extras["logits"]), torch.tensor(whole.extras["logits"]),
                          atol=1e-5)
    assert pieced.extras["best_step"] == whole.extras["best_step"]


@pytest.mark.parametrize("scope", ["field", "partition"])
def test_pls_with_all_partitions_and_exact_halo_equals_ls(tiny_graph, tiny_experts, scope):
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    ls = get_method("learned", **SAME).soup(tiny_experts, evaluator, seed=3)
    pls = get_method("pls", partitions=5, per_step=5, halo=tiny_experts.spec.layers, scope=scope,
                     **SAME).soup(tiny_experts, evaluator, seed=3)
    assert pls.extras["steps"] == ls.extras["steps"] == SAME["steps"]
    assert pls.extras["best_step"] == ls.extras["best_step"]
    assert torch.allclose(torch.tensor(pls.extras["logits"]), torch.tensor(ls.extras["logits"]),
                          atol=1e-4)
    for name in ls.state_dict:
        assert torch.allclose(pls.state_dict[name], ls.state_dict[name], atol=1e-5)


def test_pls_step_for_step_with_sgd_and_early_stopping(tiny_graph, tiny_experts):
    settings = dict(optimizer="sgd", lr=10.0, momentum=0.9, steps=40, patience=3, eval_every=2,
                    min_steps=4, init="uniform")
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    ls = get_method("learned", **settings).soup(tiny_experts, evaluator)
    pls = get_method("pls", partitions=4, per_step=4, halo=2, check="full", scope="partition",
                     **settings).soup(tiny_experts, evaluator)
    assert (pls.extras["steps"], pls.extras["checks"], pls.extras["stopped_early"]) == \
        (ls.extras["steps"], ls.extras["checks"], ls.extras["stopped_early"])
    assert torch.allclose(torch.tensor(pls.coefficients), torch.tensor(ls.coefficients), atol=1e-4)


def test_same_seed_same_soup_and_seed_changes_the_draws(tiny_graph, tiny_experts):
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    method = get_method("pls", partitions=8, per_step=2, steps=10, lr=0.3, patience=100)
    a = method.soup(tiny_experts, evaluator, seed=1)
    b = method.soup(tiny_experts, evaluator, seed=1)
    c = method.soup(tiny_experts, evaluator, seed=2)
    assert a.coefficients == b.coefficients
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
    assert a.extras["logits"] != c.extras["logits"]


class _Shard(LocalPartitionSource):
    """Partitions k with k % size == rank: what one of `size` processes would hold."""

    def __init__(self, graph, parts, rank, size, evaluator=None):
        super().__init__(graph, parts, evaluator=evaluator)
        self.rank, self.size = rank, size

    def owns(self, k):
        return k % self.size == self.rank


def test_splitting_partitions_over_workers_gives_the_same_soup(tiny_graph, tiny_experts):
    """Two threads stand in for two MPI ranks: each computes its own partitions' terms."""
    settings = dict(partitions=6, per_step=3, steps=6, lr=0.3, patience=100, eval_every=2)
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    single = get_method("pls", **settings).soup(tiny_experts, evaluator, seed=5)

    size, barrier, lock = 2, threading.Barrier(2), threading.Lock()
    slots: dict = {}

    def allreduce(tensor):
        with lock:
            slots.setdefault("sum", torch.zeros_like(tensor))
            slots["sum"] += tensor
        barrier.wait()
        total = slots["sum"].clone()
        barrier.wait()
        if threading.current_thread().name == "r0":
            slots.pop("sum")
        barrier.wait()
        return total

    results = {}

    def rank(r):
        own = Evaluator(tiny_experts.spec, tiny_graph)
        source = _Shard(tiny_graph, settings["partitions"], r, size, evaluator=own)
        results[r] = get_method("pls", **settings).soup(
            tiny_experts, own, seed=5, source=source, allreduce=allreduce)

    threads = [threading.Thread(target=rank, args=(r,), name=f"r{r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in range(size):
        assert torch.allclose(torch.tensor(results[r].coefficients),
                              torch.tensor(single.coefficients), atol=1e-6)


def test_rocauc_check_gathers_per_node_scores(tiny_graph):
    from soup_support import make_graph, train_experts

    graph = make_graph(metric="rocauc", seed=1)
    experts = train_experts(graph, n=2, epochs=5)
    evaluator = Evaluator(experts.spec, graph)
    method = get_method("pls", partitions=4, per_step=4, halo=2, steps=1, lr=1e-12)
    result = method.soup(experts, evaluator)
    assert result.extras["check_val"] == pytest.approx(evaluator.evaluate(result.state_dict),
                                                       abs=1e-9)


def test_a_validation_check_gathers_no_test_labels(tiny_graph, tiny_experts):
    """A source's labels are gathered per split when asked for: a check of the validation
    nodes leaves the test split's (most of a large graph's nodes) ungathered."""
    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    source = LocalPartitionSource(tiny_graph, 4, evaluator=evaluator)
    scores = partition_scores(tiny_experts.mean(), evaluator, source, splits=("val",))
    assert scores["val"] == pytest.approx(evaluator.evaluate(tiny_experts.mean()), abs=1e-6)
    assert list(source.labels) == ["val"]
    assert torch.equal(source.labels["test"], tiny_graph.data.y[tiny_graph.mask("test")])


def test_bad_check_is_named(tiny_graph, tiny_experts):
    with pytest.raises(SoupError, match="soup.pls.check' = 'sometimes'"):
        get_method("pls", check="sometimes", partitions=2, per_step=1).soup(
            tiny_experts, Evaluator(tiny_experts.spec, tiny_graph))


@pytest.mark.parametrize("hops", [0, 1, 2])
def test_csr_subgraphs_equal_the_foundations(tiny_graph, hops):
    from hpcsoup.data.partition import induced_subgraph_with_halo
    from hpcsoup.soup.pls import CSRNeighbours

    data = tiny_graph.data
    neighbours = CSRNeighbours.of_edge_index(data.edge_index, data.num_nodes)
    core = torch.tensor([5, 17, 3, 90, 41])
    mine = neighbours.subgraph(core, hops)
    theirs = induced_subgraph_with_halo(data.edge_index, data.num_nodes, core, hops)
    assert mine[2] == theirs[2] == 5
    assert torch.equal(mine[0][:5], core)
    assert sorted(mine[0].tolist()) == sorted(theirs[0].tolist())

    def edges(result):
        subset, local, _ = result
        return sorted(map(tuple, subset[local].t().tolist()))

    assert edges(mine) == edges(theirs)
    assert (neighbours._local == -1).all()  # the scratch map is reset


def test_where_gis_beats_uniform_learned_and_pls_move_and_beat_uniform():
    from soup_support import make_graph, train_experts

    graph = make_graph(seed=1, nodes=400)
    experts = train_experts(graph, n=4, epochs=30)
    evaluator = Evaluator(experts.spec, graph)

    def val(method, **settings):
        result = get_method(method, **settings).soup(experts, evaluator)
        return evaluator.evaluate(result.state_dict), result

    uniform, _ = val("uniform")
    gis, _ = val("gis")
    assert gis > uniform  # there is something to learn
    for method, settings in (("learned", {}), ("pls", {"partitions": 8, "per_step": 2})):
        score, result = val(method, **settings)
        assert result.extras["moved"] and result.extras["shift_from_uniform"] > 1e-3, method
        assert score >= uniform, method
        assert score == pytest.approx(evaluator.evaluate(result.state_dict))


def test_an_inexact_check_never_keeps_a_soup_worse_than_its_start():
    """halo 0 < layers: the partition check scores a graph without the cut edges; the kept soup
    is compared with its start on the full graph (seed 0: the check preferred a worse one)."""
    from soup_support import make_graph, train_experts

    graph = make_graph(seed=0, nodes=400)
    experts = train_experts(graph, n=4, epochs=30)
    evaluator = Evaluator(experts.spec, graph)
    uniform = evaluator.evaluate(experts.mean())
    result = get_method("pls", partitions=8, per_step=2, check="partitions", scope="partition",
                        init="uniform").soup(experts, evaluator)
    assert result.extras["exact_choice"] == "start" and not result.extras["moved"]
    assert evaluator.evaluate(result.state_dict) >= uniform


def test_check_auto_is_the_full_graph_where_the_process_holds_it(tiny_graph, tiny_experts):
    from hpcsoup.soup import pls

    evaluator = Evaluator(tiny_experts.spec, tiny_graph)
    shard_only = Evaluator(tiny_experts.spec, None, metric="accuracy")  # an MPI rank's
    assert pls.resolve_check("auto", evaluator) == "full"
    assert pls.resolve_check("auto", shard_only) == "partitions"
    assert pls.resolve_check("partitions", evaluator) == "partitions"
    method = get_method("pls", partitions=4, per_step=2, steps=2)
    assert method.soup(tiny_experts, evaluator).extras["check"] == "full"


def test_the_greedy_start_is_checked_once():
    """Greedy scores its candidates as the start's logits mix them, so the kept candidate's
    check is the start's: PLS makes no second check of it (one evaluation fewer)."""
    from hpcsoup.soup.learned import greedy_start
    from soup_support import make_graph, train_experts

    graph = make_graph(seed=0, nodes=400)  # greedy keeps 3 of 4
    experts = train_experts(graph, n=4, epochs=30)
    evaluator = Evaluator(experts.spec, graph)

    def check(params):
        with torch.no_grad():
            out = evaluator.val_logits(params)
        return evaluator.score_val(out), float(out.sum())

    logits, start_check = greedy_start(experts, check)
    chosen = int((logits[0] == 0).sum())
    assert chosen > 1 and start_check == check(experts.mix(logits.softmax(-1)))
    result = get_method("pls", partitions=8, per_step=2, init="greedy").soup(experts, evaluator)
    assert result.extras["start_logits"] == logits.tolist()
    # n - 1 greedy evaluations, then every check but the first (the start's) is an evaluation
    assert result.extras["start_checks"] == experts.n - 1
    assert result.extras["evaluations"] == experts.n - 1 + result.extras["checks"] - 1

    # the default start, greedy's order up to its first drop: here the best expert alone,
    # after one check (greedy's second candidate); the start is then checked once more
    prefix, prefix_check = greedy_start(experts, check, until_drop=True)
    assert int((prefix[0] == 0).sum()) == 1 and prefix_check is None
    result = get_method("pls", partitions=8, per_step=2).soup(experts, evaluator)
    assert result.extras["init"] == "greedy_prefix"
    assert result.extras["start_logits"] == prefix.tolist()
    assert result.extras["start_checks"] == 1
    assert result.extras["evaluations"] == 1 + result.extras["checks"]

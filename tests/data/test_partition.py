"""METIS partitions (balanced, deterministic, cached) and exact halo subgraphs."""
import pytest
import torch
from torch_geometric.utils import to_undirected

import hpcsoup.data.partition as partition_module
from hpcsoup.config import build_config
from hpcsoup.data.partition import (GRAPH_PATTERN, _csr, edge_cut, exact_hops, fingerprint,
                                    graph_identity, graph_partition, induced_subgraph_with_halo,
                                    part_nodes, partition, partition_cache_dir, partition_for)
from hpcsoup.data.synthetic import synthetic_products
from hpcsoup.errors import DatasetError
from hpcsoup.models.gnn import ModelSpec, build_model

# a path 0-1-2-3-4-5 plus a chord 1-4, undirected
PATH = to_undirected(torch.tensor([[0, 1, 2, 3, 4, 1], [1, 2, 3, 4, 5, 4]]))


@pytest.fixture(scope="module")
def synthetic():
    data, _ = synthetic_products(10_000, seed=0)
    return data


def check_balanced(parts, n, k):
    assert parts.dtype == torch.long and parts.shape == (n,)
    sizes = torch.bincount(parts, minlength=k)
    assert int(parts.min()) == 0 and int(parts.max()) == k - 1 and bool((sizes > 0).all())
    assert sizes.max().item() <= 1.1 * n / k, sizes.tolist()


@pytest.mark.parametrize("k", [8, 32])
def test_balanced_and_deterministic_on_cora(cora, k):
    parts = partition(cora, None, k, seed=0)
    check_balanced(parts, cora.num_nodes, k)
    assert torch.equal(parts, partition(cora.data.edge_index, cora.num_nodes, k, seed=0))
    assert edge_cut(cora.data.edge_index, parts) < 0.3          # METIS cuts few edges


@pytest.mark.parametrize("k", [8, 32])
def test_balanced_on_synthetic(synthetic, k):
    parts = partition(synthetic, None, k, seed=1)
    check_balanced(parts, synthetic.num_nodes, k)
    assert torch.equal(parts, partition(synthetic, None, k, seed=1))
    random_cut = 1 - 1 / k
    assert edge_cut(synthetic.edge_index, parts) < random_cut


def test_directed_duplicate_and_self_loop_input_gives_the_same_partition(cora):
    ei, n = cora.data.edge_index, cora.num_nodes
    one_way = ei[:, ei[0] < ei[1]]
    messy = torch.cat([one_way, one_way[:, :100], torch.arange(50).repeat(2, 1)], dim=1)
    assert torch.equal(partition(messy, n, 8), partition(ei, n, 8))


def test_trivial_and_invalid_k(cora):
    assert torch.equal(partition(cora, None, 1), torch.zeros(cora.num_nodes, dtype=torch.long))
    with pytest.raises(DatasetError, match=r"partition of 'Cora': k=2709 parts is invalid; "
                                           r"use an integer from 1 to the node count 2708"):
        partition(cora, None, 2709)
    with pytest.raises(DatasetError, match="k=0 parts is invalid"):
        partition(PATH, 6, 0)
    with pytest.raises(DatasetError, match="pass num_nodes"):
        partition(PATH, None, 2)
    with pytest.raises(DatasetError, match="refers to node 5 but num_nodes=5"):
        partition(PATH, 5, 2)


def test_cache_hit_returns_the_same_parts_without_metis(cora, tmp_path, monkeypatch):
    first = partition(cora, None, 8, seed=3, cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    fp = fingerprint(cora.data.edge_index, cora.num_nodes)
    assert [f.name for f in files] == [f"Cora-2708-k8-s3-{fp}.pt"]

    def no_metis(*args):
        raise AssertionError("METIS ran despite a cached partition")

    monkeypatch.setattr(partition_module, "_metis", no_metis)
    assert torch.equal(partition(cora, None, 8, seed=3, cache_dir=tmp_path), first)
    with pytest.raises(AssertionError, match="METIS ran"):    # another seed is another entry
        partition(cora, None, 8, seed=4, cache_dir=tmp_path)


def test_stale_or_corrupt_cache_is_never_used(cora, tmp_path):
    ei, n = cora.data.edge_index, cora.num_nodes
    parts = partition(ei, n, 4, cache_dir=tmp_path)
    changed = ei[:, 2:]                                   # another graph, same node count
    assert fingerprint(changed, n) != fingerprint(ei, n)
    edited = ei.clone()                                   # the digest kept on a tensor...
    before = fingerprint(edited, n)
    edited[0, 0] += 1                                     # ...is not reused once it is edited
    assert fingerprint(edited, n) != before == fingerprint(ei, n)
    partition(changed, n, 4, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("graph-2708-k4-s0-*.pt"))) == 2
    (path,) = [p for p in tmp_path.iterdir() if fingerprint(ei, n) in p.name]
    path.write_bytes(b"not a tensor")
    assert torch.equal(partition(ei, n, 4, cache_dir=tmp_path), parts)
    torch.save(torch.zeros(3, dtype=torch.long), path)      # wrong shape
    assert torch.equal(partition(ei, n, 4, cache_dir=tmp_path), parts)
    assert partition_cache_dir(tmp_path) == tmp_path / "partitions"


def test_graph_partition_is_computed_once_and_read_without_the_graph(cora, tmp_path, monkeypatch):
    key = graph_identity("Cora", 123, 4)
    assert key == "Cora"                      # only a generated graph's size and seed matter
    assert graph_identity("synthetic-products", 2_450_000, 1) == "synthetic-products-n2450000-seed1"
    with pytest.raises(DatasetError, match=r"no stored partition of graph 'Cora' into 8 parts "
                                           r"\(seed 3\).*pass the graph to compute it"):
        graph_partition(key, 8, 3, cache_dir=tmp_path)
    first = graph_partition(key, 8, 3, graph=cora, cache_dir=tmp_path)
    assert torch.equal(first, partition(cora, None, 8, seed=3))   # the same METIS result
    assert (tmp_path / GRAPH_PATTERN.format(key=key, k=8, seed=3)).is_file()

    def no_metis(*args):
        raise AssertionError("METIS ran despite a stored partition")

    monkeypatch.setattr(partition_module, "_metis", no_metis)
    assert torch.equal(graph_partition(key, 8, 3, cache_dir=tmp_path), first)          # a rank
    assert torch.equal(graph_partition(key, 8, 3, graph=cora, cache_dir=tmp_path), first)
    changed = cora.data.edge_index[:, 2:]          # the generator changed: never read stale parts
    with pytest.raises(AssertionError, match="METIS ran"):
        graph_partition(key, 8, 3, graph=changed.contiguous(), num_nodes=2708, cache_dir=tmp_path)


def test_partition_for_a_config_shares_one_entry_across_splits(cora, tmp_path):
    cfg = build_config({"data": {"dataset": "Cora", "root": str(tmp_path)}})
    parts = partition_for(cfg, 4, graph=cora)
    other_split = build_config({"data": {"dataset": "Cora", "root": str(tmp_path), "split": 1}})
    assert torch.equal(partition_for(other_split, 4), parts)
    assert [p.name for p in partition_cache_dir(tmp_path).glob("*.pt")] == ["Cora-k4-s0.pt"]


def _compute_in_child(path, count_file):
    import hpcsoup.data.partition as module

    real = module._metis

    def counted(*args):
        with open(count_file, "a") as handle:
            handle.write("x")
        return real(*args)
    module._metis = counted
    graph = torch.load(path, weights_only=True)
    return graph_partition("g", 8, 0, graph=graph, num_nodes=2708, cache_dir=path.parent).tolist()


def test_concurrent_callers_compute_once(cora, tmp_path):
    import multiprocessing

    path = tmp_path / "edges.pt"
    torch.save(cora.data.edge_index, path)
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(3) as pool:
        results = pool.starmap(_compute_in_child, [(path, tmp_path / "count")] * 3)
    assert results[0] == results[1] == results[2]
    assert (tmp_path / "count").read_text() == "x"       # one METIS run for three callers


def test_sparsified_metis_is_symmetric_and_cuts_close_to_full(synthetic):
    ei, n = synthetic.edge_index, synthetic.num_nodes
    xadj, adjncy = _csr(ei, n, keep=0.5, seed=0)
    rows = torch.repeat_interleave(torch.arange(n), torch.as_tensor(xadj[1:] - xadj[:-1]))
    kept = torch.stack([rows, torch.as_tensor(adjncy)])
    assert 0.45 < kept.size(1) / ei.size(1) < 0.55
    reverse = kept.flip(0)
    key = kept[0] * n + kept[1]
    assert torch.equal(key.sort().values, (reverse[0] * n + reverse[1]).sort().values)
    assert bool(torch.isin(key, ei[0] * n + ei[1]).all())                  # a subset of the edges
    full = graph_partition(None, 8, graph=synthetic)
    half = graph_partition(None, 8, graph=synthetic, max_edges=ei.size(1) // 2)
    check_balanced(half, n, 8)
    assert not torch.equal(full, half)
    assert edge_cut(ei, half) < 1.25 * edge_cut(ei, full)


def test_part_nodes_and_edge_cut_on_a_literal_graph():
    parts = torch.tensor([0, 0, 0, 1, 1, 1])
    nodes = part_nodes(parts, 3)
    assert [t.tolist() for t in nodes] == [[0, 1, 2], [3, 4, 5], []]
    # 6 undirected edges (12 entries); 2-3 and 1-4 cross: 4 entries
    assert edge_cut(PATH, parts) == pytest.approx(4 / 12)
    assert edge_cut(PATH, torch.zeros(6, dtype=torch.long)) == 0.0
    with pytest.raises(DatasetError, match=r"part ids span 0..1, outside 0..0"):
        part_nodes(parts, 1)


def test_halo_subgraph_on_a_literal_graph():
    core = torch.tensor([1, 0])
    subset, local, count = induced_subgraph_with_halo(PATH, 6, core, hops=0)
    assert subset.tolist() == [1, 0] and count == 2
    assert sorted(map(tuple, local.t().tolist())) == [(0, 1), (1, 0)]
    subset, local, count = induced_subgraph_with_halo(PATH, 6, core, hops=1)
    assert subset.tolist() == [1, 0, 2, 4] and count == 2          # core first, halo ascending
    edges = {(int(subset[a]), int(subset[b])) for a, b in local.t().tolist()}
    assert edges == {(0, 1), (1, 0), (1, 2), (2, 1), (1, 4), (4, 1)}
    subset, _, _ = induced_subgraph_with_halo(PATH, 6, core, hops=2)
    assert subset.tolist() == [1, 0, 2, 3, 4, 5]                   # the halo is ascending
    with pytest.raises(DatasetError, match="hops=-1 must be an integer >= 0"):
        induced_subgraph_with_halo(PATH, 6, core, hops=-1)


def test_exact_hops():
    assert [exact_hops(a, 2) for a in ("gcn", "sage", "gat", "gin")] == [3, 2, 2, 2]
    with pytest.raises(DatasetError, match="unknown architecture 'mlp'"):
        exact_hops("mlp", 2)


def halo_error(graph, parts, k, model, hops):
    """Largest |subgraph output - full-graph output| on the core nodes over all parts."""
    x, ei, n = graph.data.x, graph.data.edge_index, graph.num_nodes
    with torch.no_grad():
        full = model(x, ei)
        worst = 0.0
        for nodes in part_nodes(parts, k):
            subset, local, core = induced_subgraph_with_halo(ei, n, nodes, hops)
            out = model(x[subset], local)[:core]
            worst = max(worst, (out - full[nodes]).abs().max().item())
    return worst


@pytest.mark.parametrize("arch", ["gcn", "sage", "gat", "gin"])
@pytest.mark.parametrize("layers", [2, 3])
def test_halo_makes_core_outputs_exact(cora, arch, layers):
    k = 8
    parts = partition(cora, None, k)
    model = build_model(ModelSpec(arch, cora.num_features, cora.num_classes, layers=layers,
                                  hidden=16, heads=2), seed=0).eval()
    hops = exact_hops(arch, layers)
    assert halo_error(cora, parts, k, model, hops) < 1e-5
    # one hop less is not exact -- for gcn that is L hops: the degrees at distance L are short
    assert halo_error(cora, parts, k, model, hops - 1) > 1e-4

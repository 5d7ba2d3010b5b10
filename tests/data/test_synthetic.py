"""synthetic-products: seeded, products-like statistics, and a graph a GNN needs."""
import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.utils import coalesce, contains_self_loops, is_undirected, to_torch_csr_tensor

from hpcsoup.data.datasets import load_dataset
from hpcsoup.data.synthetic import edge_homophily, synthetic_products
from hpcsoup.errors import DatasetError
from hpcsoup.models.gnn import ModelSpec, build_model

#: full-batch SAGE epochs of the 1e5 calibration test (the benchmark runs 100; 25 keeps it
#: under 2 minutes of CPU)
SAGE_EPOCHS = 25
KEYS = ("x", "y", "edge_index", "train_mask", "val_mask", "test_mask")


@pytest.fixture(scope="module")
def graph():
    return synthetic_products(20_000, seed=0)


def test_same_seed_same_graph_other_seed_other_graph():
    a, _ = synthetic_products(100_000, seed=5)
    b, _ = synthetic_products(100_000, seed=5)
    for key in KEYS:
        assert torch.equal(a[key], b[key]), key
    c, _ = synthetic_products(100_000, seed=6)
    for key in KEYS:
        assert not torch.equal(a[key], c[key]), key


def test_products_like_statistics(graph):
    data, classes = graph
    n = 20_000
    assert classes == 47 and data.num_nodes == n
    assert data.x.shape == (n, 100) and data.x.dtype == torch.float32
    assert data.y.dtype == torch.long and data.edge_index.dtype == torch.long
    sizes = torch.bincount(data.y, minlength=47)
    assert sizes.min() > 0 and sizes.max() > 20 * sizes.min()       # skewed, all classes present
    # at 2e4 nodes the small classes' popular nodes cannot hold all their in-class edges: mean
    # degree 49.2 and homophily 0.794 (module docstring); 50.0 and 0.800 from 1e5 up (slow test)
    degree = data.edge_index.size(1) / n
    assert 47.5 <= degree <= 50.5
    assert abs(edge_homophily(data.edge_index, data.y) - 0.795) < 0.01
    ei = data.edge_index
    assert is_undirected(ei, num_nodes=n) and not contains_self_loops(ei)
    assert torch.equal(coalesce(ei, num_nodes=n), ei)                 # sorted, no duplicates
    counts = [int(data[m].sum()) for m in ("train_mask", "val_mask", "test_mask")]
    assert counts == [1600, 400, 18000]
    assert int((data.train_mask.int() + data.val_mask.int() + data.test_mask.int()).max()) == 1


def test_knobs_move_the_statistics():
    data, _ = synthetic_products(10_000, seed=1, avg_degree=20, homophily=0.6, classes=10,
                                 features=16)
    # measured 19.94 and 0.598: at 1e4 nodes duplicates among the popular nodes cost a little
    assert abs(data.edge_index.size(1) / 10_000 - 20) < 1.0
    assert abs(edge_homophily(data.edge_index, data.y) - 0.6) < 0.02
    assert data.x.shape == (10_000, 16) and int(data.y.max()) == 9


def _other_class_majority(data) -> float:
    """Fraction of the non-isolated nodes whose neighbours are mostly of other classes."""
    row, col = data.edge_index
    degree = torch.bincount(row, minlength=data.num_nodes).float()
    same = torch.bincount(row, weights=(data.y[row] == data.y[col]).float(), minlength=data.num_nodes)
    linked = degree > 0
    return float((same[linked] / degree[linked] < 0.5).float().mean())


def test_homophily_slope_and_group_edge_prob_shape_the_graph():
    # the edge homophily stays at its target while the slope moves the heterophilous nodes to the
    # rare ones: more nodes have mostly other-class neighbours as the slope rises (measured at
    # 1e4: 0.05, 0.41, 0.53 for slopes 0, 2.5, 5; edge homophily 0.799, 0.783, 0.769)
    shares = []
    for slope in (0.0, 2.5, 5.0):
        data, _ = synthetic_products(10_000, seed=2, homophily_slope=slope)
        assert abs(edge_homophily(data.edge_index, data.y) - 0.8) < 0.035, slope
        shares.append(_other_class_majority(data))
    assert shares[0] + 0.05 < shares[1] < shares[2] - 0.05, shares
    # group_edge_prob = 1: every cross-class edge stays inside its group of related classes
    # (class c is in group c mod 8 for 47 classes)
    for q, low, high in ((1.0, 1.0, 1.0), (0.0, 0.0, 0.2)):   # measured 1.0, 0.086
        data, _ = synthetic_products(10_000, seed=2, group_edge_prob=q)
        u, v = data.y[data.edge_index[0]], data.y[data.edge_index[1]]
        cross = u != v
        in_group = float(((u[cross] % 8) == (v[cross] % 8)).float().mean())
        assert low <= in_group <= high, (q, in_group)


@pytest.mark.parametrize("kwargs, match", [
    (dict(nodes=999), r"nodes=999 is not supported; use an integer from 1,000 to 2,500,000"),
    (dict(nodes=2_500_001), r"nodes=2500001 is not supported"),
    (dict(nodes=1e4), r"nodes=10000.0 is not supported"),
    (dict(nodes=5000, seed=-1), r"seed=-1 must be an integer >= 0"),
    (dict(nodes=5000, homophily=1.5), r"homophily=1.5 must be in \[0, 1\]"),
    (dict(nodes=5000, homophily=0.1), r"homophily=0.1 is below the chance level"),
    (dict(nodes=5000, avg_degree=0), r"avg_degree=0 must be in"),
    (dict(nodes=5000, train_frac=0.9, val_frac=0.2), r"must be > 0 with a sum below 1"),
    (dict(nodes=5000, homophily_slope=float("inf")), r"homophily_slope=inf must be a finite number"),
    (dict(nodes=5000, group_edge_prob=-0.1), r"group_edge_prob=-0.1 must be in \[0, 1\]"),
])
def test_bad_arguments_are_dataset_errors(kwargs, match):
    with pytest.raises(DatasetError, match=match):
        synthetic_products(**kwargs)


def test_load_dataset_dispatches(tmp_path_factory):
    graph = load_dataset("synthetic-products", root=tmp_path_factory.getbasetemp() / "data",
                         nodes=2000, seed=3)
    data, _ = synthetic_products(2000, seed=3)
    assert graph.name == "synthetic-products-2000" and graph.metric == "accuracy"
    assert graph.num_classes == 47 and torch.equal(graph.data.edge_index, data.edge_index)
    with pytest.raises(DatasetError, match="nodes=10 is not supported"):
        load_dataset("synthetic-products", nodes=10)


def _fit(model, data, forward, epochs):
    opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
    best_val, test = -1.0, 0.0
    for _ in range(epochs):
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(forward(model)[data.train_mask],
                                          data.y[data.train_mask]).backward()
        opt.step()
        model.eval()
        with torch.no_grad():
            pred = forward(model).argmax(-1)
        val = (pred[data.val_mask] == data.y[data.val_mask]).float().mean().item()
        if val > best_val:
            best_val = val
            test = (pred[data.test_mask] == data.y[data.test_mask]).float().mean().item()
    return test


def _sage_and_mlp(nodes: int, sage_epochs: int, mlp_epochs: int) -> tuple[float, float, Data]:
    """Test accuracy (at the best validation epoch) of a full-batch 2-layer GraphSAGE and of a
    feature-only MLP, hidden 64, on synthetic-products of ``nodes`` nodes, seed 0."""
    data, classes = synthetic_products(nodes, seed=0)
    torch.manual_seed(0)
    # the same message passing as edge_index, ~4x faster on CPU (CSR sparse-dense product)
    adj_t = to_torch_csr_tensor(data.edge_index.flip(0), size=(data.num_nodes, data.num_nodes))
    sage = build_model(ModelSpec("sage", 100, classes, layers=2, hidden=64), seed=0)
    mlp = torch.nn.Sequential(torch.nn.Linear(100, 64), torch.nn.ReLU(), torch.nn.Dropout(0.5),
                              torch.nn.Linear(64, classes))
    gnn_acc = _fit(sage, data, lambda m: m(data.x, adj_t), epochs=sage_epochs)
    mlp_acc = _fit(mlp, data, lambda m: m(data.x), epochs=mlp_epochs)
    print(f"synthetic-products {nodes:,}: SAGE {gnn_acc:.3f}, MLP {mlp_acc:.3f}")
    return gnn_acc, mlp_acc, data


@pytest.mark.filterwarnings("ignore:Sparse:UserWarning")
def test_a_gnn_beats_a_feature_only_mlp():
    # the cheap proxy of the calibration test below: 10x fewer nodes (800 training nodes), both
    # models lower than at 1e5 (measured: SAGE 0.681 / MLP 0.490 here; with the earlier homophily
    # slope 5 the SAGE had 0.624, which fails the bounds)
    gnn_acc, mlp_acc, _ = _sage_and_mlp(10_000, sage_epochs=30, mlp_epochs=60)
    assert 0.65 < gnn_acc < 0.72 and 0.44 < mlp_acc < 0.54 and gnn_acc - mlp_acc > 0.14, \
        (gnn_acc, mlp_acc)


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Sparse:UserWarning")
def test_calibrated_to_ogbn_products_difficulty():
    """ogbn-products' leaderboard: full-batch GraphSAGE 0.785-0.795, MLP 0.611. The defaults are
    calibrated to that at 2e5 nodes and 100 epochs (module docstring table); at 1e5 nodes and 25
    SAGE epochs (113 s of CPU, 1 thread) this test measured SAGE 0.714, MLP 0.599. It fails if the
    graph gets easier (saturates, as before the first calibration: 0.93 / 0.71) or harder (with
    the earlier homophily slope 5, 3 points short of products at 2e5: 0.684 / 0.599, gap 0.085),
    or the GNN's edge is lost."""
    gnn_acc, mlp_acc, data = _sage_and_mlp(100_000, sage_epochs=SAGE_EPOCHS, mlp_epochs=100)
    assert abs(edge_homophily(data.edge_index, data.y) - 0.8) < 0.005
    assert abs(data.edge_index.size(1) / data.num_nodes - 50) < 0.5
    assert 0.69 <= gnn_acc <= 0.74 and 0.565 <= mlp_acc <= 0.635, (gnn_acc, mlp_acc)
    assert gnn_acc - mlp_acc >= 0.09, (gnn_acc, mlp_acc)

"""The shipped datasets load offline with their published statistics; bad names and splits fail
clearly."""
import shutil

import pytest
import torch
from torch_geometric.utils import is_undirected

from hpcsoup.data.datasets import (SHIPPED, SHIPPED_DIR, Graph, SplitSettings, load_dataset,
                                   random_split)
from hpcsoup.errors import DatasetError

# nodes, directed edges, features, classes (shared/data/README.md); split 0 sizes; metric
STATS = {
    "Cora": (2708, 10556, 1433, 7, (140, 500, 1000), "accuracy"),
    "CiteSeer": (3327, 9104, 3703, 6, (120, 500, 1000), "accuracy"),
    "Minesweeper": (10000, 78804, 7, 2, (5000, 2500, 2500), "rocauc"),
    "Tolokers": (11758, 1038000, 10, 2, (5879, 2939, 2940), "rocauc"),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.getbasetemp() / "data"


@pytest.mark.parametrize("name", sorted(STATS))
def test_shipped_statistics(root, name):
    nodes, edges, features, classes, split, metric = STATS[name]
    graph = load_dataset(name, root=root)
    d = graph.data
    assert isinstance(graph, Graph) and graph.name == name
    assert (graph.num_nodes, d.edge_index.size(1), graph.num_features, graph.num_classes) == \
        (nodes, edges, features, classes)
    assert (int(d.train_mask.sum()), int(d.val_mask.sum()), int(d.test_mask.sum())) == split
    assert graph.metric == metric
    assert is_undirected(d.edge_index, num_nodes=nodes)
    assert d.x.dtype == torch.float32 and d.y.dtype == torch.long and d.y.shape == (nodes,)
    assert int(d.y.max()) == classes - 1
    masks = [d.train_mask, d.val_mask, d.test_mask]
    assert all(m.dtype == torch.bool and m.shape == (nodes,) for m in masks)
    assert not (masks[0] & masks[1]).any() and not (masks[0] & masks[2]).any() \
        and not (masks[1] & masks[2]).any()
    assert graph.info()["edges"] == edges
    assert set(SHIPPED) == set(STATS)


def test_score_uses_the_standard_metric(root):
    cora = load_dataset("Cora", root=root)
    perfect = torch.nn.functional.one_hot(cora.data.y, cora.num_classes).float()
    assert cora.score(perfect, "test") == 1.0
    assert cora.score(-perfect, "val") == 0.0
    mines = load_dataset("Minesweeper", root=root)
    logits = torch.nn.functional.one_hot(mines.data.y, 2).float()
    assert mines.score(logits, "test") == 1.0                         # ROC-AUC of a perfect ranking
    assert mines.score(torch.zeros_like(logits), "test") == 0.5      # a constant score


def test_heterophilous_splits_differ_and_bad_split_is_an_error(root):
    first = load_dataset("Minesweeper", root=root, split=0)
    last = load_dataset("Minesweeper", root=root, split=9)
    assert not torch.equal(first.data.train_mask, last.data.train_mask)
    with pytest.raises(DatasetError, match=r"'Minesweeper' has 10 splits; split=10 .*0\.\.9"):
        load_dataset("Minesweeper", root=root, split=10)
    with pytest.raises(DatasetError, match="split 'dev' of 'Cora' is unknown"):
        load_dataset("Cora", root=root).mask("dev")


def test_unknown_dataset_names_itself_and_the_valid_names(root):
    with pytest.raises(DatasetError, match=r"unknown dataset 'Pubmed'.*'CiteSeer', 'Cora', "
                                           r"'Minesweeper', 'Tolokers'.*synthetic-products"):
        load_dataset("Pubmed", root=root)
    with pytest.raises(DatasetError, match="did you mean 'Cora'"):
        load_dataset("cora", root=root)
    with pytest.raises(DatasetError, match="pyg/<Class>/<name>"):
        load_dataset("pyg/NoSuchClass/x", root=root)


def test_generic_pyg_path_reads_a_prepared_root(tmp_path):
    shutil.copytree(SHIPPED_DIR / "planetoid" / "Cora" / "raw", tmp_path / "Cora" / "raw")
    graph = load_dataset("pyg/Planetoid/Cora", root=tmp_path)
    assert graph.name == "pyg/Planetoid/Cora" and graph.metric == "accuracy"
    assert graph.info() | {"dataset": "Cora"} == {
        "dataset": "Cora", "nodes": 2708, "edges": 10556, "features": 1433, "classes": 7,
        "metric": "accuracy", "train": 140, "val": 500, "test": 1000, "split": "fixed"}


@pytest.fixture(scope="module")
def maskless_root(tmp_path_factory, root):
    from pyg_support import write_citationfull

    return write_citationfull(tmp_path_factory.mktemp("maskless"), load_dataset("Cora", root=root))


def _masks(graph):
    d = graph.data
    return d.train_mask, d.val_mask, d.test_mask


def test_maskless_pyg_dataset_gets_a_seeded_random_split(maskless_root):
    """PyG's own CitationFull class reads the files; the split follows RandomNodeSplit."""
    name = "pyg/CitationFull/Cora_ML"
    graph = load_dataset(name, root=maskless_root)
    train, val, test = _masks(graph)
    n = graph.num_nodes
    assert (int(val.sum()), int(test.sum()), int(train.sum())) == (120, 120, n - 240)  # 60/20/20
    assert not (train & val).any() and not (train & test).any() and not (val & test).any()
    assert "random (no fixed split; seed 0)" in graph.info()["split"]
    again = load_dataset(name, root=maskless_root)
    assert all(torch.equal(a, b) for a, b in zip(_masks(graph), _masks(again)))
    other = load_dataset(name, root=maskless_root, split_settings=SplitSettings(seed=1))
    assert not torch.equal(other.data.val_mask, val)
    counts = load_dataset(name, root=maskless_root, split_settings=SplitSettings(
        "random", num_train_per_class=5, num_val=100, num_test=0.5))
    train, val, test = _masks(counts)
    assert torch.bincount(counts.data.y[train], minlength=7).tolist() == [5] * 7
    assert (int(val.sum()), int(test.sum())) == (100, 300)


def test_random_split_keys_in_the_config_and_in_data_info(maskless_root, capsys):
    from hpcsoup.cli import main
    from hpcsoup.config import build_config
    from hpcsoup.data import load_from_config

    cfg = build_config({"data": {"dataset": "pyg/CitationFull/Cora_ML", "root": str(maskless_root),
                                 "num_val": 0.1, "num_test": 200, "seed": 3}})
    graph = load_from_config(cfg)
    assert (int(graph.data.val_mask.sum()), int(graph.data.test_mask.sum())) == (60, 200)
    assert "seed 3" in graph.info()["split"]
    assert main(["data", "info", "pyg/CitationFull/Cora_ML", "--root", str(maskless_root)]) == 0
    out = capsys.readouterr().out
    assert "split: random (no fixed split; seed 0): train the rest, val 0.2, test 0.2" in out


def test_random_split_errors_name_the_problem(maskless_root):
    from torch_geometric.data import Data

    data = Data(x=torch.zeros(10, 2), y=torch.arange(10) % 2, edge_index=torch.zeros(2, 0).long())
    with pytest.raises(DatasetError, match="num_val=6, num_test=5 does not fit 10 nodes"):
        random_split(data, num_val=6, num_test=5)
    with pytest.raises(DatasetError, match="mode 'stratified' is unknown"):
        random_split(data, mode="stratified")
    masks = random_split(data, seed=2)
    assert "train_mask" not in data and int(masks.val_mask.sum()) == 2  # a copy, 20%


def test_partial_masks_are_an_error(tmp_path):
    import torch_geometric.datasets as pyg_datasets

    class HalfSplit(pyg_datasets.KarateClub):  # PyG's KarateClub: a train_mask only
        def __init__(self, root):  # (KarateClub takes no root)
            super().__init__()

    pyg_datasets.HalfSplit = HalfSplit
    try:
        with pytest.raises(DatasetError, match="'pyg/HalfSplit' has train_mask but no val_mask"):
            load_dataset("pyg/HalfSplit", root=tmp_path)
    finally:
        del pyg_datasets.HalfSplit


def test_a_synthetic_graph_that_cannot_fit_is_a_config_error_before_generation(monkeypatch, capsys):
    """The room is mocked (1 GiB: a small SLURM --mem; this machine has more): the check must
    refuse 2.45M nodes at once, naming the key, the estimate and the room, and exit 2 from the CLI."""
    import time

    from hpcsoup.cli import main
    from hpcsoup.data import datasets
    from hpcsoup.errors import ConfigError

    monkeypatch.setattr(datasets, "available_bytes", lambda: 2**30)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match=r"data.nodes = 2,450,000: generating synthetic-products "
                                          r"needs about \d+\.\d GiB .* can get 1\.0 GiB; lower data.nodes"):
        load_dataset("synthetic-products", nodes=2_450_000)
    assert time.perf_counter() - start < 1.0  # refused, not generated
    code = main(["data", "info", "synthetic-products", "--nodes", "2450000"])
    err = capsys.readouterr().err
    assert code == 2 and "data.nodes = 2,450,000" in err and "Traceback" not in err

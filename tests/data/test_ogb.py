"""hpcsoup.data.ogb: ogb's real loader on a tiny dataset written in OGB layout, offline."""
import builtins
import functools
import http.server
import shutil
import threading
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch
from ogb.io import DatasetSaver
from ogb.nodeproppred import Evaluator

from hpcsoup.data import load_dataset
from hpcsoup.data.ogb import OFFLINE_ENV, _download, load_ogb, save_meta
from hpcsoup.errors import DatasetError, DatasetNotFoundError

NODES, CLASSES, FEATURES = 200, 4, 8
TRAIN, VALID, TEST = 120, 40, 40


@pytest.fixture(scope="module")
def tiny_ogb(tmp_path_factory):
    """A random 200-node graph saved by ``ogb.io.DatasetSaver``: (dataset folder, meta dict, arrays)."""
    rng = np.random.default_rng(0)
    edges = rng.integers(0, NODES, size=(2, 600)).astype(np.int64)
    edges = edges[:, edges[0] != edges[1]]
    labels = rng.integers(0, CLASSES, size=(NODES, 1)).astype(np.int64)
    perm = rng.permutation(NODES)
    split = {"train": perm[:TRAIN], "valid": perm[TRAIN:TRAIN + VALID], "test": perm[TRAIN + VALID:]}

    base = tmp_path_factory.mktemp("ogb-src")
    (base / "mapping").mkdir()
    (base / "mapping" / "README.md").write_text("node ids are 0..199\n")
    saver = DatasetSaver("ogbn-tiny", is_hetero=False, version=1, root=str(base / "submission"))
    saver.save_graph_list([{
        "edge_index": edges, "num_nodes": NODES, "edge_feat": None,
        "node_feat": rng.standard_normal((NODES, FEATURES)).astype(np.float32),
    }])
    saver.save_target_labels(labels)
    saver.save_split(split, "random")
    saver.copy_mapping_dir(str(base / "mapping"))
    saver.save_task_info("multiclass classification", "acc", num_classes=CLASSES)
    meta = saver.get_meta_dict()
    undirected = {(min(a, b), max(a, b)) for a, b in edges.T.tolist()}
    return saver.dataset_dir, meta, {"labels": labels[:, 0], "split": split, "edges": 2 * len(undirected)}


def _install(tiny_ogb, root):
    """Copy the tiny dataset to ``<root>/ogbn_tiny/`` with its meta.json: loadable by name."""
    src, meta, _ = tiny_ogb
    folder = root / "ogbn_tiny"
    shutil.copytree(src, folder)
    save_meta(meta, folder)
    return folder


def _check_graph(graph, arrays):
    assert graph.name == "ogbn-tiny"
    assert graph.num_nodes == NODES and graph.num_features == FEATURES
    assert graph.num_classes == CLASSES and graph.metric == "accuracy"
    info = graph.info()
    assert (info["train"], info["val"], info["test"]) == (TRAIN, VALID, TEST)
    assert info["edges"] == arrays["edges"]
    assert torch.equal(graph.data.y, torch.from_numpy(arrays["labels"]))
    test_idx = torch.from_numpy(arrays["split"]["test"])
    assert graph.data.test_mask[test_idx].all()
    assert isinstance(graph.evaluator, Evaluator)


def test_load_by_name_twice_reads_processed(tiny_ogb, data_root):
    folder = _install(tiny_ogb, data_root)
    processed = folder / "processed" / "geometric_data_processed.pt"
    first = load_dataset("ogbn-tiny", data_root)
    assert processed.is_file()
    stamp = processed.stat().st_mtime_ns
    second = load_dataset("ogbn-tiny", data_root)  # from processed/: needs the safe globals
    assert processed.stat().st_mtime_ns == stamp
    for graph in (first, second):
        _check_graph(graph, tiny_ogb[2])
    assert torch.equal(first.data.edge_index, second.data.edge_index)


def test_score_uses_ogb_evaluator(tiny_ogb, tmp_path):
    _install(tiny_ogb, tmp_path)
    graph = load_ogb("ogbn-tiny", tmp_path)
    calls = []
    evaluate = graph.evaluator.eval
    graph.evaluator.eval = lambda d: calls.append(d) or evaluate(d)

    perfect = torch.nn.functional.one_hot(graph.data.y, CLASSES).float()
    assert graph.score(perfect, "test") == 1.0
    wrong = perfect.roll(1, dims=1)
    assert graph.score(wrong, "val") == 0.0
    logits = torch.randn(NODES, CLASSES, generator=torch.Generator().manual_seed(0))
    mask = graph.mask("train")
    expected = (logits[mask].argmax(-1) == graph.data.y[mask]).float().mean().item()
    assert graph.score(logits, "train") == pytest.approx(expected)
    assert len(calls) == 3 and calls[0]["y_true"].shape == (TEST, 1)


def test_meta_dict_argument_with_bool_flags(tiny_ogb, tmp_path):
    src, meta, arrays = tiny_ogb
    folder = tmp_path / "elsewhere"
    shutil.copytree(src, folder)
    meta = {**meta, "dir_path": str(folder), "binary": True, "has_node_attr": True,
            "has_edge_attr": False, "is hetero": False, "version": "1"}
    graph = load_ogb("ogbn-tiny", tmp_path / "unused-root", meta_dict=meta)
    _check_graph(graph, arrays)


def test_missing_official_dataset_offline_names_the_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    with pytest.raises(DatasetNotFoundError, match="downloads automatically") as info:
        load_ogb("ogbn-arxiv", tmp_path)
    assert f"{tmp_path / 'ogbn_arxiv'}/" in str(info.value)
    assert "<root>/ogbn_arxiv/" in str(info.value)
    assert not (tmp_path / "ogbn_arxiv").exists()
    with pytest.raises(FileNotFoundError):  # also catchable as the built-in
        load_dataset("ogbn-products", tmp_path)


def _no_network(*args, **kwargs):
    raise urllib.error.URLError("[Errno -2] Name or service not known")


def test_missing_official_dataset_without_network(tmp_path, monkeypatch):
    monkeypatch.delenv(OFFLINE_ENV, raising=False)
    monkeypatch.setattr(urllib.request, "urlopen", _no_network)
    with pytest.raises(DatasetNotFoundError, match="ogbn_products.*downloads automatically"):
        load_ogb("ogbn-products", tmp_path)
    assert not (tmp_path / "ogbn_products").exists()


def test_folder_without_release_file_never_prompts(tmp_path, monkeypatch):
    (tmp_path / "ogbn_arxiv" / "raw").mkdir(parents=True)
    monkeypatch.setattr(builtins, "input", lambda *a: pytest.fail("ogb asked on the terminal"))
    with pytest.raises(DatasetNotFoundError, match="RELEASE_v1.txt"):
        load_ogb("ogbn-arxiv", tmp_path)


def test_unsupported_and_unknown_datasets(tmp_path):
    with pytest.raises(DatasetError, match="'ogbn-proteins' is scored by 'rocauc'"):
        load_ogb("ogbn-proteins", tmp_path)
    with pytest.raises(DatasetError, match="'ogbn-mag' is heterogeneous"):
        load_ogb("ogbn-mag", tmp_path)
    with pytest.raises(DatasetNotFoundError, match="meta.json"):
        load_dataset("ogbn-nothing", tmp_path)


def test_bad_meta_dict(tiny_ogb, tmp_path):
    meta = {k: v for k, v in tiny_ogb[1].items() if k != "split"}
    with pytest.raises(DatasetError, match=r"lacks \['split'\]"):
        load_ogb("ogbn-tiny", tmp_path, meta_dict=meta)
    with pytest.raises(DatasetError, match="'binary' = 'yes'"):
        load_ogb("ogbn-tiny", tmp_path, meta_dict={**tiny_ogb[1], "binary": "yes"})


def test_download_unzips_into_the_folder(tiny_ogb, tmp_path):
    """The download path (ogb's download_url + extract_zip, no prompts), from a local HTTP server."""
    src, meta, arrays = tiny_ogb
    served = tmp_path / "served"
    served.mkdir()
    shutil.copytree(src, tmp_path / "zipme" / "tiny")  # OGB zips hold one folder: <download_name>/
    shutil.make_archive(str(served / "tiny"), "zip", root_dir=tmp_path / "zipme", base_dir="tiny")
    handler = functools.partial(_QuietHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/tiny.zip"
        root = tmp_path / "root"
        root.mkdir()
        _download("ogbn-tiny", root, root / "ogbn_tiny", {"url": url, "download_name": "tiny",
                                                          "version": 1})
    finally:
        server.shutdown()
        server.server_close()
    assert (root / "ogbn_tiny" / "RELEASE_v1.txt").is_file()
    assert sorted(p.name for p in root.iterdir()) == ["ogbn_tiny"]  # no zip or staging left
    save_meta(meta, root / "ogbn_tiny")
    _check_graph(load_dataset("ogbn-tiny", root), arrays)


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

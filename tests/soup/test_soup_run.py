"""``run_soup`` / ``hpcsoup soup`` on Cora experts written to a real store (integration)."""
import json
import subprocess
import sys

import pytest
import torch

from hpcsoup.config import build_config
from hpcsoup.data import load_dataset
from hpcsoup.errors import SoupError
from hpcsoup.models import ModelSpec, build_model
from hpcsoup.soup import Ingredients
from hpcsoup.soup.run import run_soup
from hpcsoup.store import Store
from hpcsoup.train import evaluate, fit

pytest.importorskip("hpcsoup.data.partition", reason="METIS partitions (foundation) not there yet")

SMALL = ["soup.learned.steps=8", "soup.pls.partitions=4", "soup.pls.per_step=2",
         "soup.pls.steps=6", "soup.pls.eval_every=2", "soup.gis.granularity=3"]


def _expert_attrs(spec, graph, result, seed, role="expert"):
    return {"arch": spec.arch, "model": spec.to_dict(), "dataset": graph.name, "init_id": "init0",
            "seed": seed, "role": role, "metrics": result.metrics, "train_seconds": result.seconds,
            "train_nodes": {"split": "all", "count": int(graph.mask("train").sum())}}


@pytest.fixture(scope="module")
def cora_store(tmp_path_factory, data_root):
    """A store with 3 SAGE experts (one shared init) and 1 GCN expert of Cora."""
    graph = load_dataset("Cora", data_root)
    path = tmp_path_factory.mktemp("soup") / "cora.zarr"
    store = Store.create(path, attrs={"name": "soup-test"})
    spec = ModelSpec("sage", graph.num_features, graph.num_classes, 2, 16)
    init = build_model(spec, seed=0).state_dict()
    store.write_init("init0", init, {"arch": "sage"})
    for seed in range(3):
        model = build_model(spec)
        model.load_state_dict(init)
        result = fit(model, graph, epochs=8, lr=0.03, seed=seed)
        store.write_group("experts", f"sage-e{seed}", result.state_dict,
                          _expert_attrs(spec, graph, result, seed))
    gcn = ModelSpec("gcn", graph.num_features, graph.num_classes, 2, 16)
    result = fit(build_model(gcn, seed=0), graph, epochs=3)
    store.write_group("experts", "gcn-e0", result.state_dict, _expert_attrs(gcn, graph, result, 0))
    return path


def _cfg(path, data_root, *extra):
    return build_config({"store": str(path), "data": {"dataset": "Cora", "root": str(data_root)}},
                        SMALL + list(extra))


def test_every_method_writes_a_complete_soup_that_a_plain_model_reproduces(cora_store, data_root):
    summary = run_soup(_cfg(cora_store, data_root))
    assert [s["method"] for s in summary["soups"]] == ["uniform", "greedy", "gis", "learned", "pls"]
    assert summary["ingredients"] == ["sage-e0", "sage-e1", "sage-e2"]  # not the GCN expert
    store = Store.open(cora_store)
    graph = load_dataset("Cora", data_root)
    soups = {g.id: g.attrs for g in store.groups("soups")}
    assert len(soups) == 5
    for soup in summary["soups"]:
        state, attrs = store.load_group("soups", soup["id"])
        assert attrs["complete"] is True and attrs["method"] == soup["method"]
        assert attrs["ingredients"] == summary["ingredients"]
        assert len(attrs["coefficients"]) == len(state)
        assert all(abs(sum(row) - 1) < 1e-6 for row in attrs["coefficients"])
        assert attrs["metrics"]["metric"] == "accuracy"
        assert attrs["seconds"] >= 0 and attrs["peak_rss_bytes"] > 0 and attrs["ranks"] == 1
        model = build_model(ModelSpec.from_dict(attrs["model"]))
        model.load_state_dict(state)  # a plain PyG model, run on edge_index
        plain = evaluate(model, graph)
        assert plain["val"] == pytest.approx(attrs["metrics"]["val"], abs=1.5e-3)
        assert plain["test"] == pytest.approx(attrs["metrics"]["test"], abs=1.5e-3)
    assert soups[summary["soups"][1]["id"]]["metrics"]["val"] >= max(
        store.group_attrs("experts", i)["metrics"]["val"] for i in summary["ingredients"]) - 1e-9


def test_same_seed_gives_the_identical_soup(cora_store, data_root):
    store = Store.open(cora_store)
    first = run_soup(_cfg(cora_store, data_root), methods=["pls", "learned"])
    before = {s["id"]: store.load_group("soups", s["id"])[0] for s in first["soups"]}
    again = run_soup(_cfg(cora_store, data_root), methods=["pls", "learned"])
    assert [s["id"] for s in again["soups"]] == list(before)
    for soup in again["soups"]:
        state, attrs = store.load_group("soups", soup["id"])
        assert all(torch.equal(state[k], before[soup["id"]][k]) for k in state)
    other = run_soup(_cfg(cora_store, data_root, "soup.seed=9"), methods=["pls"])
    assert other["soups"][0]["id"] != first["soups"][0]["id"]


def test_mixed_architectures_point_to_merge(cora_store, data_root):
    store = Store.open(cora_store)
    with pytest.raises(SoupError, match="'sage' but expert 'gcn-e0' is 'gcn'.*hpcsoup merge"):
        Ingredients.from_store(store, [store.groups("experts", arch="sage")[0],
                                       *store.groups("experts", arch="gcn")][::-1])
    with pytest.raises(SoupError, match="no complete 'gat' experts.*\\['gcn', 'sage'\\]"):
        run_soup(_cfg(cora_store, data_root, 'soup.arch="gat"'), methods=["uniform"])


def test_cli_prints_one_json_line(cora_store, data_root, tmp_path):
    config = tmp_path / "soup.json"
    config.write_text(json.dumps(_cfg(cora_store, data_root).to_dict()))
    done = subprocess.run([sys.executable, "-m", "hpcsoup", "soup", "--config", str(config),
                           "--method", "uniform", "--method", "greedy", "--json"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert [s["method"] for s in result["soups"]] == ["uniform", "greedy"]
    assert "greedy" in done.stderr  # progress goes to stderr

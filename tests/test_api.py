"""The Python API for a user's own models and graphs: hpcsoup.soup, hpcsoup.merge, export, load.

Models here are trained by plain user code (Adam on the train mask), not by hpcsoup: the API must
take them as a PyG user has them.
"""
import copy
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch_geometric.nn import GCNConv
from torch_geometric.nn.models import GAT, GCN, GIN, GraphSAGE

import hpcsoup
from hpcsoup.errors import DatasetError, HpcsoupError, MergeError, ModelError, SoupError
from hpcsoup.merge.umpm import GraphOps, from_pyg
from hpcsoup.models.convert import to_expert
from hpcsoup.soup.module_evaluator import ModuleEvaluator
from tiny_support import make_graph

REPO = Path(__file__).resolve().parent.parent
METHODS = ["uniform", "greedy", "gis", "learned", "pls"]
FAST = {"gis": {"granularity": 4}, "learned": {"steps": 15},
        "pls": {"steps": 15, "partitions": 4, "per_step": 2}}


class Net(torch.nn.Module):
    """A user's own model: its own parameter names, optionally a BatchNorm."""

    def __init__(self, features, hidden, classes, norm=False):
        super().__init__()
        self.conv1 = GCNConv(features, hidden)
        self.bn = torch.nn.BatchNorm1d(hidden) if norm else torch.nn.Identity()
        self.conv2 = GCNConv(hidden, classes)

    def forward(self, x, edge_index):
        return self.conv2(self.bn(self.conv1(x, edge_index)).relu(), edge_index)


def train(model, data, mask=None, epochs=25, seed=0):
    """What a user does: Adam on the labelled nodes, then eval mode."""
    mask = data.train_mask if mask is None else mask
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=0.02, weight_decay=5e-4)
    for _ in range(epochs):
        model.train()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(data.x, data.edge_index)[mask],
                                          data.y[mask]).backward()
        opt.step()
    return model.eval()


def from_one_init(make, data, n=3, epochs=25):
    """``n`` models trained from one shared initialisation (what souping needs)."""
    torch.manual_seed(0)
    first = make()
    return [train(copy.deepcopy(first), data, epochs=epochs, seed=s) for s in range(n)]


@pytest.fixture(scope="module")
def data():
    return make_graph(240, 4, 16).data


@pytest.fixture(scope="module")
def nets(data):
    return from_one_init(lambda: Net(16, 16, 4), data)


@pytest.fixture(scope="module")
def bn_nets(data):
    return from_one_init(lambda: Net(16, 16, 4, norm=True), data)


def logits(model, data):
    with torch.no_grad():
        return model(data.x, data.edge_index)


def test_import_is_cheap_and_stages_are_callable():
    code = "import sys, hpcsoup; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
    import hpcsoup.merge.run  # noqa: F401 - the subpackages, once loaded, stay callable
    import hpcsoup.soup.run  # noqa: F401

    assert callable(hpcsoup.soup) and callable(hpcsoup.merge)
    assert hpcsoup.soup.Evaluator and hpcsoup.merge.HGramaSettings and hpcsoup.load_model


@pytest.mark.parametrize("method", METHODS)
def test_user_class_souped_by_every_method(nets, data, method):
    result = hpcsoup.soup(nets, data, method, **FAST.get(method, {}))
    assert type(result.model) is Net and all(result.model is not m for m in nets)
    assert list(result.state_dict) == list(nets[0].state_dict())
    for name, tensor in result.model.state_dict().items():
        assert torch.equal(tensor, result.state_dict[name])
    # the soup is the stated mixture of the models' tensors
    for name, row in result.coefficients.items():
        assert abs(sum(row) - 1) < 1e-6 and min(row) >= 0
        mix = sum(c * m.state_dict()[name] for c, m in zip(row, nets))
        assert torch.allclose(result.state_dict[name], mix, atol=1e-5)
    # the metrics are the soup's own scores, recomputable from the returned model
    out = logits(result.model, data)
    for split in ("val", "test"):
        mask = data[f"{split}_mask"]
        expected = (out[mask].argmax(-1) == data.y[mask]).float().mean().item()
        assert result.metrics[split] == pytest.approx(expected, abs=1e-6)
    uniform = hpcsoup.soup(nets, data, "uniform")
    if method == "uniform":
        assert all(row == [1 / 3] * 3 for row in result.coefficients.values())
    elif method in ("greedy", "gis"):  # never below the best single model on validation
        assert result.metrics["val"] >= max(_val(m, data) for m in nets)
    elif method == "learned":  # the uniform start is the first check: kept unless beaten
        assert result.metrics["val"] >= uniform.metrics["val"]


def _val(model, data):
    out = logits(model, data)
    return (out[data.val_mask].argmax(-1) == data.y[data.val_mask]).float().mean().item()


def test_learned_soup_moves_away_from_uniform(nets, data):
    result = hpcsoup.soup(nets, data, "learned", steps=10, patience=10, lr=0.5)
    rows = list(result.coefficients.values())
    assert any(abs(c - 1 / 3) > 1e-3 for row in rows for c in row)
    assert len({tuple(row) for row in rows}) > 1  # one row per tensor, learned separately


def test_batchnorm_counters_are_carried_not_mixed(bn_nets, data):
    models = [copy.deepcopy(m) for m in bn_nets]
    for k, m in enumerate(models):
        m.bn.num_batches_tracked.fill_(10 * (k + 1))
    for method in ("uniform", "learned"):
        result = hpcsoup.soup(models, data, method, **FAST.get(method, {}))
        assert result.state_dict["bn.num_batches_tracked"].item() == 10
        assert result.state_dict["bn.num_batches_tracked"].dtype == torch.long
        assert "bn.num_batches_tracked" not in result.coefficients
        row = result.coefficients["bn.running_mean"]
        mixed = sum(c * m.bn.running_mean for c, m in zip(row, models))
        assert torch.allclose(result.model.bn.running_mean, mixed, atol=1e-6)
    evaluator = ModuleEvaluator(models[0], hpcsoup.api.as_graph(data)[0])
    assert torch.allclose(evaluator.logits(result.state_dict), logits(result.model, data), atol=1e-5)


def test_module_evaluator_runs_the_users_module_on_graphs_and_partitions(nets, data):
    from hpcsoup.soup.pls import LocalPartitionSource

    graph = hpcsoup.api.as_graph(data)[0]
    evaluator = ModuleEvaluator(nets[1], graph)
    assert evaluator.metric == "accuracy" and evaluator.spec.out_channels == 4
    assert evaluator.spec.module.endswith("test_api.Net")
    params = dict(nets[2].state_dict())
    assert torch.allclose(evaluator.logits(params), logits(nets[2], data), atol=1e-6)
    assert evaluator.evaluations == 1
    part = LocalPartitionSource(graph, 4, halo=1).part(0)
    adj = evaluator.part_adjacency(part)
    assert torch.equal(adj, evaluator.adjacency(part.edge_index, part.num_nodes))
    with torch.no_grad():
        own = nets[2](part.x, part.edge_index)
    assert torch.allclose(evaluator.forward(params, part.x, adj), own, atol=1e-6)


def test_pyg_models_convert_exactly(data):
    from hpcsoup.models import ModelSpec, build_model

    torch.manual_seed(0)
    for model in (GCN(16, 8, 2, 4), GraphSAGE(16, 8, 2, 4), GAT(16, 8, 2, 4, heads=2),
                  GIN(16, 8, 3, 4), build_model(ModelSpec("gat", 16, 4, 2, 8, heads=2))):
        model.eval()
        spec, state = to_expert(model)
        parent = from_pyg(spec, state, type(model).__name__)
        own = logits(model, data)
        assert torch.allclose(parent(data.x, GraphOps(data.edge_index, data.num_nodes)), own,
                              atol=1e-4), type(model).__name__


@pytest.fixture(scope="module")
def gcn_gat(data):
    train_nodes = data.train_mask.nonzero().view(-1)
    halves = [torch.zeros_like(data.train_mask) for _ in range(2)]
    halves[0][train_nodes[: len(train_nodes) // 2]] = True
    halves[1][train_nodes[len(train_nodes) // 2:]] = True
    torch.manual_seed(1)
    gcn = train(GCN(16, 16, 2, 4), data, halves[0], epochs=40)
    gat = train(GAT(16, 16, 2, 4, heads=2), data, halves[1], epochs=40)
    return [gcn, gat], halves


@pytest.mark.parametrize("with_regions", [True, False])
def test_pyg_gcn_and_gat_merged(gcn_gat, data, with_regions):
    models, halves = gcn_gat
    result = hpcsoup.merge(models, data, trained_on=halves if with_regions else None)
    assert isinstance(result.model, torch.nn.Module)
    out = logits(result.model, data)
    assert out.shape == (data.num_nodes, 4)
    test = data.test_mask
    assert result.metrics["test"] == pytest.approx(
        (out[test].argmax(-1) == data.y[test]).float().mean().item(), abs=1e-6)
    assert set(result.metrics["retention"]) == {"gcn0", "gat1"}
    for name in result.names:  # without regions: on every test node
        assert result.metrics["retention"][name] == pytest.approx(
            result.metrics["test"] / result.metrics["parents"][name]["test"])
    target = "auto" if with_regions else "confidence"  # auto: the owner gate where predictable
    assert f"route_target='{target}'" in result.routing
    assert result.settings["route_target"] == target
    gate = result.model.gate
    assert (gate is None or gate.target == "owner") if with_regions else gate.target == target
    # better than chance, and at least as good as the worse parent less a margin
    parents = [result.metrics["parents"][n]["test"] for n in result.names]
    assert result.metrics["test"] > 0.4 and result.metrics["test"] >= min(parents) - 0.1
    # the child alone (no cache) gives the scored logits
    assert torch.allclose(out, result.model(data.x, data.edge_index))


def test_export_and_load_give_the_same_logits(tmp_path, nets, gcn_gat, data):
    souped = hpcsoup.soup(nets, data, "uniform")
    souped.save(tmp_path / "soup.pt")
    raw = torch.load(tmp_path / "soup.pt", weights_only=True)  # plain data, no pickled code
    assert raw["model"] == {"type": "module", "class": f"{Net.__module__}.Net"}
    assert raw["metrics"] == souped.metrics and set(raw["state_dict"]) == set(souped.state_dict)
    with pytest.raises(ModelError, match=r"user class '.*Net'.*model=YourClass"):
        hpcsoup.load_model(tmp_path / "soup.pt")
    loaded = hpcsoup.load_model(tmp_path / "soup.pt", model=Net(16, 16, 4))
    assert torch.equal(logits(loaded, data), logits(souped.model, data))

    pyg = from_one_init(lambda: GCN(16, 16, 2, 4), data, n=2, epochs=5)
    souped = hpcsoup.soup(pyg, data, "uniform")
    souped.save(tmp_path / "gcn.pt")
    loaded = hpcsoup.load_model(tmp_path / "gcn.pt")  # rebuilt from its kwargs
    assert type(loaded) is GCN and torch.equal(logits(loaded, data), logits(souped.model, data))

    merged = hpcsoup.merge(gcn_gat[0], data)
    merged.save(tmp_path / "merged.pt")
    loaded = hpcsoup.load_model(tmp_path / "merged.pt")
    assert torch.equal(logits(loaded, data), logits(merged.model, data))
    assert torch.load(tmp_path / "merged.pt", weights_only=True)["info"]["routing"] == merged.routing
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gcn.pt", "merged.pt", "soup.pt"]


def test_cli_export_reads_every_kind_of_group(tmp_path, gcn_gat, data, capsys):
    """Groups written by the store's own writer, as the pipeline writes them."""
    from hpcsoup.cli import main
    from hpcsoup.models import GNN, ModelSpec, build_model
    from hpcsoup.store import Store

    store = Store.create(tmp_path / "s.zarr")
    spec = ModelSpec("sage", 16, 4, 2, 8)
    expert = train(build_model(spec, seed=0), data, epochs=5)
    store.write_group("experts", "sage-e0", expert.state_dict(),
                      {"model": spec.to_dict(), "metrics": {"metric": "accuracy", "val": 0.5}})
    merged = hpcsoup.merge(gcn_gat[0], data)
    store.write_group("merges", "m0", merged.model.tensors(),
                      {"method": "hgrama", "structure": merged.model.structure(),
                       "metrics": {"test": merged.metrics["test"]}})
    for group, reference in (("experts/sage-e0", expert), ("merges/m0", merged.model)):
        out = tmp_path / f"{group.replace('/', '-')}.pt"
        assert main(["export", str(store.path), group, "--out", str(out), "--json"]) == 0
        printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert printed["out"] == str(out) and printed["group"] == group
        loaded = hpcsoup.load_model(out)
        assert isinstance(loaded, GNN) == (group.startswith("experts"))
        assert torch.equal(logits(loaded, data), logits(reference, data))
    assert main(["export", str(store.path), "soups/none", "--out", str(tmp_path / "x.pt")]) == 2
    assert "'soups/none' is not in store" in capsys.readouterr().err
    assert not (tmp_path / "x.pt").exists()


def test_bad_inputs_are_named_errors(nets, data, bn_nets):
    with pytest.raises(SoupError, match="empty list of models"):
        hpcsoup.soup([], data)
    with pytest.raises(SoupError, match="at least 2 models, got 1"):
        hpcsoup.soup(nets[:1], data)
    with pytest.raises(SoupError, match=r"models\[1\] is a GCN, models\[0\] a Net.*hpcsoup.merge"):
        hpcsoup.soup([nets[0], GCN(16, 16, 2, 4)], data)
    with pytest.raises(SoupError, match=r"'models\[1\]' tensor 'conv1.bias' has shape \(8,\), "
                                        r"expert 'models\[0\]' has \(16,\).*hpcsoup.merge\(models"):
        hpcsoup.soup([nets[0], Net(16, 8, 4)], data)
    with pytest.raises(SoupError, match=r"'models\[1\]' has tensors \['bn.*hpcsoup.merge"):
        hpcsoup.soup([nets[0], bn_nets[1]], data)
    masked = copy.copy(data)
    del masked.val_mask
    with pytest.raises(DatasetError, match="no val_mask, which souping method 'learned' needs"):
        hpcsoup.soup(nets, masked, "learned")
    assert hpcsoup.soup(nets, masked, "uniform").metrics["val"] != \
        hpcsoup.soup(nets, masked, "uniform").metrics["val"]  # nan: no validation nodes
    odd = copy.deepcopy(nets)
    for m in odd:
        m.step = torch.nn.Parameter(torch.zeros(1, dtype=torch.long), requires_grad=False)
    with pytest.raises(SoupError, match="parameter 'step' has dtype torch.int64"):
        hpcsoup.soup(odd, data)
    with pytest.raises(SoupError, match="unknown souping method 'soupy'"):
        hpcsoup.soup(nets, data, "soupy")
    with pytest.raises(SoupError, match="'learned' has no setting 'step'"):
        hpcsoup.soup(nets, data, step=3)
    with pytest.raises(DatasetError, match="data is a dict"):
        hpcsoup.soup(nets, {"x": data.x})


def test_merge_bad_inputs_name_the_module(data, nets, gcn_gat):
    models, halves = gcn_gat
    with pytest.raises(ModelError, match=r"models\[1\]\.convs\.0: is a GATv2Conv.*GCNConv"):
        hpcsoup.merge([models[0], GAT(16, 16, 2, 4, v2=True)], data)
    with pytest.raises(ModelError, match=r"models\[1\]\.norms\.0: is a BatchNorm"):
        hpcsoup.merge([models[0], GCN(16, 16, 2, 4, norm="batch_norm")], data)
    with pytest.raises(ModelError, match=r"models\[0\]: is a Net, not a model hpcsoup can read"):
        hpcsoup.merge([nets[0], models[1]], data)
    with pytest.raises(ModelError, match=r"models\[1\]\.convs\.0: GCNConv option improved"):
        hpcsoup.merge([models[0], GCN(16, 16, 2, 4, improved=True)], data)
    with pytest.raises(MergeError, match="at least 2 models, got 1"):
        hpcsoup.merge(models[:1], data)
    with pytest.raises(MergeError, match="has no setting 'routes'"):
        hpcsoup.merge(models, data, routes="ridge")
    with pytest.raises(MergeError, match="trained_on has 1 masks for 2 models"):
        hpcsoup.merge(models, data, trained_on=halves[:1])
    with pytest.raises(MergeError, match=r"trained_on\[1\] and trained_on\[0\] share"):
        hpcsoup.merge(models, data, trained_on=[halves[0], halves[0]])
    with pytest.raises(MergeError, match="route_target='owner' needs trained_on"):
        hpcsoup.merge(models, data, route_target="owner")
    assert all(issubclass(e, HpcsoupError) for e in (SoupError, MergeError, ModelError))


def _readme_snippet() -> str:
    text = (REPO / "README.md").read_text()
    section = text.split("## Use your own models", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_readme_snippet_runs(tmp_path, monkeypatch):
    """The README's "Use your own models" snippet, run as written (its Cora comes from the
    shipped raw files, laid out where Planetoid(root="data") looks, so nothing is downloaded)."""
    import shutil

    from hpcsoup.data.datasets import SHIPPED_DIR

    shutil.copytree(SHIPPED_DIR / "planetoid" / "Cora" / "raw", tmp_path / "data" / "Cora" / "raw")
    monkeypatch.chdir(tmp_path)
    exec(compile(_readme_snippet(), "README.md", "exec"), {"__name__": "readme"})
    assert (tmp_path / "soup.pt").is_file() and (tmp_path / "merged.pt").is_file()


@pytest.mark.slow
def test_maskless_pyg_dataset_through_hpcsoup_run(tmp_path, cora, capsys):
    """pyg/CitationFull/Cora_ML (no masks) with the quickstart config: data.dataset and
    data.root changed, the rest only made small; then its soup and merge exported."""
    from hpcsoup.cli import main
    from pyg_support import write_citationfull

    root = write_citationfull(tmp_path / "pyg", cora)
    store = tmp_path / "run.zarr"
    sets = ['data.dataset="pyg/CitationFull/Cora_ML"', f'data.root="{root}"',
            "experts.count=2", "experts.epochs=3", "specialists.epochs=3", "experts.workers=1",
            "soup.pls.ranks=1", "soup.pls.partitions=4", "soup.pls.steps=5",
            "soup.learned.steps=5", "soup.gis.granularity=3", "merge.repeats=1"]
    args = ["run", str(REPO / "jobs" / "quickstart.toml"), "--store", str(store), "--json"]
    assert main(args + [a for kv in sets for a in ("--set", kv)]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {s["method"] for s in result["soup"]["soups"]} == set(METHODS)
    assert result["soup"]["dataset"] == "pyg/CitationFull/Cora_ML"
    soup_id = next(s["id"] for s in result["soup"]["soups"] if s["method"] == "learned")
    for group in (f"soups/{soup_id}", f"merges/{result['merge']['merge_id']}"):
        out = tmp_path / "model.pt"
        assert main(["export", str(store), group, "--out", str(out)]) == 0
        assert hpcsoup.load_model(out)  # a module, rebuilt from plain data

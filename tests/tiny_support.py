"""A tiny seeded graph and experts trained from one shared init: shared by tests/soup and tests/distributed.

Importable from every test folder: pytest puts tests/ on sys.path for tests/conftest.py.
"""
from __future__ import annotations

import torch
from torch_geometric.data import Data
from torch_geometric.utils import coalesce, remove_self_loops, to_undirected

from hpcsoup.data import Graph
from hpcsoup.models import ModelSpec, build_model
from hpcsoup.soup import Ingredients
from hpcsoup.train import fit


def make_graph(nodes: int = 240, classes: int = 4, features: int = 16, seed: int = 0,
               metric: str = "accuracy") -> Graph:
    """A small stochastic-block graph whose features hint at the class (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, classes, (nodes,), generator=g)
    src = torch.randint(0, nodes, (nodes * 4,), generator=g)
    same = y[src].unsqueeze(1) == y.unsqueeze(0)  # [E, N]: candidate targets of the same class
    pick = torch.multinomial(same.float() * 4 + 1, 1, generator=g).view(-1)
    edge_index = remove_self_loops(to_undirected(torch.stack([src, pick]), num_nodes=nodes))[0]
    edge_index = coalesce(edge_index, num_nodes=nodes)
    centers = torch.randn(classes, features, generator=g)
    x = centers[y] + 1.5 * torch.randn(nodes, features, generator=g)
    perm = torch.randperm(nodes, generator=g)
    masks = [torch.zeros(nodes, dtype=torch.bool) for _ in range(3)]
    cut = [0, nodes // 5, nodes // 5 + nodes * 2 // 5, nodes]
    for mask, lo, hi in zip(masks, cut, cut[1:]):
        mask[perm[lo:hi]] = True
    if metric == "rocauc":
        y = (y % 2)
        classes = 2
    data = Data(x=x, y=y, edge_index=edge_index, train_mask=masks[0], val_mask=masks[1],
                test_mask=masks[2])
    return Graph(f"tiny-{seed}", data, classes, metric)


def train_experts(graph: Graph, arch: str = "sage", n: int = 4, epochs: int = 30,
                  layers: int = 2, hidden: int = 16, init_seed: int = 0) -> Ingredients:
    """``n`` experts from one shared init (build_model(spec, init_seed)), seeds 0..n-1."""
    spec = ModelSpec(arch, graph.num_features, graph.num_classes, layers, hidden,
                     heads=2 if arch == "gat" else 1)
    init = build_model(spec, seed=init_seed).state_dict()
    states, vals = [], []
    for seed in range(n):
        model = build_model(spec)
        model.load_state_dict(init)
        result = fit(model, graph, epochs=epochs, lr=0.02, seed=seed)
        states.append(result.state_dict)
        vals.append(result.metrics["val"])
    return Ingredients.from_state_dicts(spec, states, [f"e{i}" for i in range(n)], vals)

"""Full-batch training of one GNN, with model selection on the validation split."""
from __future__ import annotations

import dataclasses
import time
from typing import Callable

import torch
import torch.nn.functional as F

from hpcsoup.data import Graph


@dataclasses.dataclass
class TrainResult:
    state_dict: dict          # weights of the best epoch by validation score
    metrics: dict             # {"metric", "val", "test", "best_epoch"}
    seconds: float


@torch.no_grad()
def predict(model: torch.nn.Module, graph: Graph, device: str | torch.device = "cpu") -> torch.Tensor:
    """Full-graph logits of ``model`` in eval mode."""
    model.eval()
    data = graph.data
    return model(data.x.to(device), data.edge_index.to(device))


def evaluate(model: torch.nn.Module, graph: Graph, device: str | torch.device = "cpu") -> dict:
    """``{"metric", "val", "test"}``: the dataset's score on the validation and test splits."""
    logits = predict(model, graph, device)
    return {"metric": graph.metric, "val": graph.score(logits, "val"),
            "test": graph.score(logits, "test")}


def fit(model: torch.nn.Module, graph: Graph, *, train_mask: torch.Tensor | None = None,
        epochs: int = 200, lr: float = 0.01, weight_decay: float = 5e-4, seed: int = 0,
        device: str | torch.device = "cpu",
        on_epoch: Callable[[int, float, dict], None] | None = None) -> TrainResult:
    """Train ``model`` full-batch with Adam on ``train_mask`` (default: the graph's train split).

    The returned weights are those of the epoch with the best validation score.
    ``seed`` fixes dropout, so the same model, graph and seed give the same weights.
    """
    start = time.perf_counter()
    data = graph.data
    x, edge_index, y = data.x.to(device), data.edge_index.to(device), data.y.to(device)
    mask = (graph.mask("train") if train_mask is None else train_mask).to(device)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    best = {"val": float("-inf")}
    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        for epoch in range(epochs):
            model.train()
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x, edge_index)[mask], y[mask])
            loss.backward()
            optimizer.step()
            scores = evaluate(model, graph, device)
            if scores["val"] > best["val"]:
                best = dict(scores, best_epoch=epoch)
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if on_epoch is not None:
                on_epoch(epoch, float(loss), scores)
    finally:
        torch.random.set_rng_state(generator_state)
    return TrainResult(best_state, best, time.perf_counter() - start)

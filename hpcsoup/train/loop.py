"""Training of one GNN with model selection on the validation split.

Two regimes:

- **full batch** (small graphs): one Adam step per epoch on the whole graph;
- **cluster mini-batches** (big graphs; Cluster-GCN, Chiang et al., KDD 2019,
  https://arxiv.org/abs/1905.07953): the graph is cut once into K METIS parts;
  each epoch shuffles the parts (seeded) and takes one step per group of
  ``parts_per_batch`` parts on the subgraph they induce (edges between groups
  are dropped), so a step touches about ``parts_per_batch / K`` of the graph.
  PyG's ``ClusterLoader`` / ``NeighborLoader`` need pyg-lib or torch-sparse,
  which are not installable here; this is the same idea in plain torch.

Either way the returned weights are those of the epoch with the best validation
score (checked every ``eval_every`` epochs and at the last one, by a full-graph
inference forward). With a :class:`~hpcsoup.train.checkpoint.Checkpointer` the
run saves its whole state every few epochs, stops cleanly on a signal, and
resumes to exactly the weights an uninterrupted run gives.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch_geometric.utils import subgraph

from hpcsoup.data import Graph
from hpcsoup.errors import ConfigError
from hpcsoup.train.checkpoint import Checkpointer, Preempted, rng_state, set_rng_state


@dataclasses.dataclass
class TrainResult:
    state_dict: dict          # weights of the best epoch by validation score
    metrics: dict             # {"metric", "val", "test", "best_epoch"}
    seconds: float            # training time, including the runs before a resume
    epochs_run: int = 0       # epochs trained by this call (fewer than `epochs` after a resume)
    resumed_from: int | None = None  # last epoch of the checkpoint this call resumed from


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


class ClusterBatches:
    """Cluster-GCN mini-batches: groups of METIS parts and the subgraphs they induce.

    Args:
        edge_index: the graph's edges ``[2, E]``.
        parts: the part of every node, ``[N]`` with values ``0..K-1``
            (from :func:`hpcsoup.data.partition.partition`).
        parts_per_batch: parts joined into one mini-batch (default: ``4``).
    """

    def __init__(self, edge_index: torch.Tensor, parts: torch.Tensor, parts_per_batch: int = 4):
        if parts_per_batch < 1:
            raise ConfigError(f"parts_per_batch={parts_per_batch}: must be >= 1")
        self.edge_index = edge_index
        self.num_nodes = parts.numel()
        self.num_parts = int(parts.max()) + 1 if parts.numel() else 0
        order = torch.argsort(parts, stable=True)
        counts = torch.bincount(parts, minlength=self.num_parts).tolist()
        self.part_nodes = list(torch.split(order, counts))
        self.parts_per_batch = parts_per_batch

    def __len__(self) -> int:
        return -(-self.num_parts // self.parts_per_batch)

    def epoch(self, generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(nodes, local_edge_index)`` per step, parts shuffled with ``generator``."""
        perm = torch.randperm(self.num_parts, generator=generator)
        for start in range(0, self.num_parts, self.parts_per_batch):
            chosen = perm[start:start + self.parts_per_batch]
            nodes = torch.cat([self.part_nodes[p] for p in chosen.tolist()]).sort().values
            local, _ = subgraph(nodes, self.edge_index, relabel_nodes=True, num_nodes=self.num_nodes)
            yield nodes, local


def _clone(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def fit(model: torch.nn.Module, graph: Graph, *, train_mask: torch.Tensor | None = None,
        epochs: int = 200, lr: float = 0.01, weight_decay: float = 5e-4, seed: int = 0,
        device: str | torch.device = "cpu",
        on_epoch: Callable[[int, float, dict], None] | None = None,
        batches: ClusterBatches | None = None, eval_every: int = 1,
        checkpoint: Checkpointer | None = None) -> TrainResult:
    """Train ``model`` with Adam on ``train_mask`` (default: the graph's train split).

    Args:
        model: a GNN whose ``forward(x, edge_index)`` returns logits; trained in place.
        graph: the graph; validation and test scores use its masks and metric.
        train_mask: the nodes whose labels are used (default: ``graph.mask("train")``).
        epochs, lr, weight_decay: Adam's schedule (defaults: ``200``, ``0.01``, ``5e-4``).
        seed: fixes dropout and the mini-batch order: same model, graph and seed give
            the same weights (default: ``0``).
        device: ``"cpu"`` or ``"cuda[:N]"`` (default: ``"cpu"``).
        on_epoch: called as ``on_epoch(epoch, loss, scores)`` after every epoch; ``scores``
            is ``{}`` on epochs without a validation check.
        batches: cluster mini-batches; ``None`` trains full-batch (default: ``None``).
        eval_every: epochs between validation checks; the last epoch is always checked
            (default: ``1``).
        checkpoint: resume state and stop signals (default: none).

    The global RNG is seeded for the run and restored afterwards. Raises
    :class:`~hpcsoup.train.checkpoint.Preempted` after saving a checkpoint when the
    checkpointer's stop flag is set.
    """
    start = time.perf_counter()
    device = torch.device(device)
    data = graph.data
    x, edge_index, y = data.x.to(device), data.edge_index.to(device), data.y.to(device)
    mask = (graph.mask("train") if train_mask is None else train_mask).to(device)
    model = model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    batch_generator = torch.Generator().manual_seed(seed)
    saved_rng = rng_state(device)
    torch.manual_seed(seed)
    best: dict = {"val": float("-inf")}
    best_state = _clone(model.state_dict())
    first, earlier_seconds = 0, 0.0
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        set_rng_state(resumed["rng"], device)
        batch_generator.set_state(resumed["batch_rng"])
        best, best_state, first = resumed["best"], resumed["best_state"], resumed["epoch"] + 1
        earlier_seconds = float(resumed.get("seconds", 0.0))
    try:
        for epoch in range(first, epochs):
            model.train()
            if batches is None:
                optimizer.zero_grad()
                loss = F.cross_entropy(model(x, edge_index)[mask], y[mask])
                loss.backward()
                optimizer.step()
                loss_value = loss.item()
            else:
                loss_value = _cluster_epoch(model, optimizer, batches, batch_generator, x, y, mask,
                                            device)
            scores: dict = {}
            if (epoch + 1) % eval_every == 0 or epoch == epochs - 1:
                scores = evaluate(model, graph, device)
                if scores["val"] > best["val"]:
                    best = dict(scores, best_epoch=epoch)
                    best_state = _clone(model.state_dict())
            if on_epoch is not None:
                on_epoch(epoch, loss_value, scores)
            if checkpoint is not None and epoch < epochs - 1 and checkpoint.due(epoch):
                checkpoint.save({"epoch": epoch, "model": model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "rng": rng_state(device),
                                 "batch_rng": batch_generator.get_state(), "best": best,
                                 "best_state": best_state,
                                 "seconds": earlier_seconds + time.perf_counter() - start})
                if checkpoint.stop:
                    raise Preempted(f"{checkpoint.name}: stopped by {checkpoint.stop.reason} after "
                                    f"epoch {epoch + 1}/{epochs}; checkpoint saved to "
                                    f"'{checkpoint.path}'; rerun the same task to resume")
    finally:
        set_rng_state(saved_rng, device)
    if best["val"] == float("-inf"):  # epochs == first: nothing left to train
        best = dict(evaluate(model, graph, device), best_epoch=epochs - 1)
    return TrainResult(best_state, best, earlier_seconds + time.perf_counter() - start, epochs - first,
                       checkpoint.resumed_from if checkpoint is not None else None)


def _cluster_epoch(model, optimizer, batches: ClusterBatches, generator, x, y, mask, device) -> float:
    """One epoch of Cluster-GCN steps; returns the train-node-weighted mean loss."""
    total, count = 0.0, 0
    for nodes, local_edges in batches.epoch(generator):
        nodes = nodes.to(device)
        local_mask = mask[nodes]
        n_train = int(local_mask.sum())
        if n_train == 0:  # a group of parts without labelled nodes gives no gradient
            continue
        optimizer.zero_grad()
        out = model(x[nodes], local_edges.to(device))
        loss = F.cross_entropy(out[local_mask], y[nodes][local_mask])
        loss.backward()
        optimizer.step()
        total += loss.item() * n_train
        count += n_train
    return total / max(count, 1)

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
inference forward). With ``patience = P > 0`` training stops after ``P`` checks in
a row without a better validation score (early stopping): the epochs after the
best one buy nothing, since their weights are never returned. With a
:class:`~hpcsoup.train.checkpoint.Checkpointer` the run saves its whole state
every few epochs, stops cleanly on a signal, and resumes to exactly the weights
an uninterrupted run gives.

Every forward (training steps and the full-graph check) runs on the compact
sparse form the soups use (:func:`hpcsoup.soup.evaluate.build_adjacency`, a CSR
adjacency built once per graph or mini-batch, run through the frozen template of
:func:`hpcsoup.soup.evaluate.make_template` with the model's own tensors): one
sparse-dense product per layer instead of PyG's message per edge, which at 1M
nodes and degree 50 held a 64-wide vector for each of 50M edges. Outputs equal
the layers' on a duplicate-free ``edge_index`` (every loader's) to float rounding.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch_geometric.utils import subgraph

from hpcsoup.data import Graph
from hpcsoup.errors import ConfigError, ModelError
from hpcsoup.soup.evaluate import build_adjacency, make_template
from hpcsoup.train.checkpoint import Checkpointer, Preempted, rng_state, set_rng_state


@dataclasses.dataclass
class TrainResult:
    state_dict: dict          # weights of the best epoch by validation score
    metrics: dict             # {"metric", "val", "test", "best_epoch"}
    seconds: float            # training time, including the runs before a resume
    epochs_run: int = 0       # epochs trained by this call (fewer than `epochs` after a resume)
    resumed_from: int | None = None  # last epoch of the checkpoint this call resumed from
    last_epoch: int = -1      # the last epoch trained (before `epochs - 1` when patience stopped it)


def check_device(device: str | torch.device) -> None:
    """A clear :class:`ConfigError` when ``device`` is CUDA and this torch cannot reach it.

    ``"cuda"`` is the first visible GPU: under SLURM (``--gpus-per-task``) the one the job was
    given, since SLURM sets ``CUDA_VISIBLE_DEVICES``.
    """
    device = str(device)
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"config device={device!r}, but this torch ({torch.__version__}) sees no "
                              f"CUDA device; set device='cpu' (--set device=cpu) or install a CUDA "
                              f"build of torch")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise ConfigError(f"config device={device!r}: only {torch.cuda.device_count()} CUDA "
                              f"device(s) visible; use cuda:0..cuda:{torch.cuda.device_count() - 1}")


class CompactForward:
    """``model`` run on a compact sparse adjacency: the soups' template with the model's tensors.

    ``forward(x, adj, training)`` is ``model(x, adj)`` with dropout on when ``training``;
    gradients reach the model's parameters (the template's own are frozen).
    """

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        spec = getattr(model, "spec", None)
        if spec is None:
            raise ModelError(f"training needs an hpcsoup GNN (hpcsoup.models.build_model), "
                             f"got {type(model).__name__} without a model spec")
        self.model, self.arch = model, spec.arch
        self.template = make_template(spec, device)

    def adjacency(self, edge_index: torch.Tensor, num_nodes: int) -> torch.Tensor:
        """The CSR of a :class:`~hpcsoup.data.Graph`'s edges or of an induced subgraph of them:
        symmetric (every Graph is), so a source-sorted list is read without a sort or a copy."""
        return build_adjacency(self.arch, edge_index, num_nodes, undirected=True)

    def __call__(self, x: torch.Tensor, adj: torch.Tensor, training: bool) -> torch.Tensor:
        self.template.train(training)
        weights = dict(self.model.named_parameters())
        weights.update(self.model.named_buffers())
        return functional_call(self.template, weights, (x, adj))


@torch.no_grad()
def predict(model: torch.nn.Module, graph: Graph, device: str | torch.device = "cpu") -> torch.Tensor:
    """Full-graph logits of ``model`` in eval mode (compact sparse form)."""
    forward = CompactForward(model, device)
    adj = forward.adjacency(graph.data.edge_index.to(device), graph.num_nodes)
    return forward(graph.data.x.to(device), adj, training=False)


def evaluate(model: torch.nn.Module, graph: Graph, device: str | torch.device = "cpu") -> dict:
    """``{"metric", "val", "test"}``: the dataset's score on the validation and test splits."""
    return _scores(graph, predict(model, graph, device))


def _scores(graph: Graph, logits: torch.Tensor) -> dict:
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
        batches: ClusterBatches | None = None, eval_every: int = 1, patience: int = 0,
        checkpoint: Checkpointer | None = None) -> TrainResult:
    """Train ``model`` with Adam on ``train_mask`` (default: the graph's train split).

    Args:
        model: an hpcsoup GNN (:func:`hpcsoup.models.build_model`); trained in place.
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
        patience: stop after this many validation checks in a row without a higher
            validation score than the best so far; ``0`` trains every epoch (default: ``0``).
        checkpoint: resume state and stop signals (default: none).

    The global RNG is seeded for the run and restored afterwards. Raises
    :class:`~hpcsoup.train.checkpoint.Preempted` after saving a checkpoint when the
    checkpointer's stop flag is set.
    """
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ConfigError(f"patience={patience!r}: must be an integer >= 0 (0 = no early stop)")
    check_device(device)
    start = time.perf_counter()
    device = torch.device(device)
    data = graph.data
    x, y = data.x.to(device), data.y.to(device)
    mask = (graph.mask("train") if train_mask is None else train_mask).to(device)
    model = model.to(device)
    forward = CompactForward(model, device)
    adj = forward.adjacency(data.edge_index.to(device), data.num_nodes)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    batch_generator = torch.Generator().manual_seed(seed)
    saved_rng = rng_state(device)
    torch.manual_seed(seed)
    best: dict = {"val": float("-inf")}
    best_state = _clone(model.state_dict())
    first, earlier_seconds, stale = 0, 0.0, 0
    resumed = checkpoint.load() if checkpoint is not None else None
    if resumed is not None:
        model.load_state_dict(resumed["model"])
        optimizer.load_state_dict(resumed["optimizer"])
        set_rng_state(resumed["rng"], device)
        batch_generator.set_state(resumed["batch_rng"])
        best, best_state, first = resumed["best"], resumed["best_state"], resumed["epoch"] + 1
        earlier_seconds = float(resumed.get("seconds", 0.0))
        stale = int(resumed.get("stale", 0))
    last = first - 1
    try:
        for epoch in range(first, epochs):
            last = epoch
            if batches is None:
                optimizer.zero_grad()
                loss = F.cross_entropy(forward(x, adj, training=True)[mask], y[mask])
                loss.backward()
                optimizer.step()
                loss_value = loss.item()
            else:
                loss_value = _cluster_epoch(forward, optimizer, batches, batch_generator, x, y,
                                            mask, device)
            scores: dict = {}
            if (epoch + 1) % eval_every == 0 or epoch == epochs - 1:
                with torch.no_grad():
                    scores = _scores(graph, forward(x, adj, training=False))
                stale += 1
                if scores["val"] > best["val"]:
                    best, stale = dict(scores, best_epoch=epoch), 0
                    best_state = _clone(model.state_dict())
            if on_epoch is not None:
                on_epoch(epoch, loss_value, scores)
            if patience and stale >= patience:
                break
            if checkpoint is not None and epoch < epochs - 1 and checkpoint.due(epoch):
                checkpoint.save({"epoch": epoch, "model": model.state_dict(),
                                 "optimizer": optimizer.state_dict(), "rng": rng_state(device),
                                 "batch_rng": batch_generator.get_state(), "best": best,
                                 "best_state": best_state, "stale": stale,
                                 "seconds": earlier_seconds + time.perf_counter() - start})
                if checkpoint.stop:
                    raise Preempted(f"{checkpoint.name}: stopped by {checkpoint.stop.reason} after "
                                    f"epoch {epoch + 1}/{epochs}; checkpoint saved to "
                                    f"'{checkpoint.path}'; rerun the same task to resume")
    finally:
        set_rng_state(saved_rng, device)
    if best["val"] == float("-inf"):  # epochs == first: nothing left to train
        with torch.no_grad():
            best = dict(_scores(graph, forward(x, adj, training=False)), best_epoch=epochs - 1)
    return TrainResult(best_state, best, earlier_seconds + time.perf_counter() - start,
                       last + 1 - first, checkpoint.resumed_from if checkpoint is not None else None,
                       last)


def _cluster_epoch(forward: CompactForward, optimizer, batches: ClusterBatches, generator, x, y,
                   mask, device) -> float:
    """One epoch of Cluster-GCN steps; returns the train-node-weighted mean loss."""
    total, count = 0.0, 0
    for nodes, local_edges in batches.epoch(generator):
        nodes = nodes.to(device)
        local_mask = mask[nodes]
        n_train = int(local_mask.sum())
        if n_train == 0:  # a group of parts without labelled nodes gives no gradient
            continue
        optimizer.zero_grad()
        adj = forward.adjacency(local_edges.to(device), nodes.numel())
        out = forward(x[nodes], adj, training=True)
        loss = F.cross_entropy(out[local_mask], y[nodes][local_mask])
        loss.backward()
        optimizer.step()
        total += loss.item() * n_train
        count += n_train
    return total / max(count, 1)

"""Partition learned souping (PLS): learned souping on R of K METIS partitions per step.

Zuber, Sarkar, Jennings, Jannesari, "Enhanced Soups for Graph Neural Networks",
arXiv 2503.11612 (2025), Partition Learned Souping. The graph is split once into
:math:`K` METIS partitions :math:`V_1..V_K`; step :math:`t` draws
:math:`D_t \\subset \\{1..K\\}`, :math:`|D_t| = R`, and takes one learned-souping
step (see :mod:`hpcsoup.soup.learned`) on

.. math::
    L_t(R) = \\frac{1}{\\sum_{k \\in D_t} |V_k \\cap V_{val}|}
             \\sum_{k \\in D_t} \\; \\sum_{v \\in V_k \\cap V_{val}}
             \\mathrm{CE}\\big(f(X_{S_k}, A_{S_k}; W(R))_v, y_v\\big)

where :math:`S_k` is partition :math:`k` extended by a ``halo`` of :math:`h`
hops. :math:`h = 0` (the default) is the cheap objective the paper's memory
savings rest on: edges to other partitions are dropped, so it is biased.
:math:`h =` the number of layers makes each partition's predictions exact
(GCN keeps the full graph's degree normalisation), so PLS is then an unbiased
stochastic LS, and with :math:`R = K` it equals LS step for step.

Why this shape (it is what distributed PLS, :mod:`hpcsoup.dist`, builds on):

- the draw :math:`D_t` is a function of ``(seed, step)`` alone
  (:func:`draw_partitions`), independent of the number of processes;
- :math:`L_t` is a *sum of per-partition terms* with a global normaliser that
  every process computes from partition metadata (validation counts), so each
  term's gradient can be computed wherever the partition lives and the
  gradients added with one ``allreduce`` of a ``[P, n]`` tensor (a few KB);
- the partitions come from a :class:`PartitionSource` (``owns(k)``,
  ``part(k)``, ``val_counts``); :class:`LocalPartitionSource` slices the full
  graph; a distributed source holds a shard;
- the stopping check is a hook ``evaluate(weights) -> val score``. The default
  ``check="partitions"`` gathers per-node validation results partition by
  partition (with the source's halo: exact when ``halo >= layers``) through
  the same ``allreduce``; ``check="full"`` scores the full graph.

Partitions are processed one after another and each term is back-propagated
at once, so the peak memory of a step is that of one partition's subgraph:
memory falls with :math:`1/K`, time with :math:`R/K`.

Settings: those of LS (``steps``, ``lr``, ``optimizer``, ``momentum``,
``schedule``, ``restart``, ``init``, ``patience``, ``min_delta``, ``eval_every``) plus
``partitions`` (K), ``per_step`` (R), ``halo`` (h), ``check``,
``partition_seed`` (METIS seed), ``partition_cache`` (folder where the
partition vector is cached), ``cache`` (keep the K subgraphs in memory:
faster on small graphs, but they weigh about as much as the graph itself) and
``draw`` (``random`` | ``stratified``, see :func:`draw_partitions`; stratified
balances the ranks of a distributed run).
"""
from __future__ import annotations

import abc
import dataclasses
import logging
from typing import Callable

import torch
import torch.nn.functional as F

from hpcsoup.errors import SoupError
from hpcsoup.soup.base import Ingredients, SoupMethod, SoupResult
from hpcsoup.soup.learned import OPTIM_DEFAULTS, Progress, Stopper, init_logits, make_optimizer

log = logging.getLogger("hpcsoup.soup")


DRAWS = ("random", "stratified")


def draw_partitions(seed: int, step: int, num_parts: int, per_step: int,
                    how: str = "random") -> list[int]:
    """The ``per_step`` partitions step ``step`` uses: a function of (seed, step) alone, sorted.

    ``how="random"``: R of the K partitions uniformly without replacement.
    ``how="stratified"``: one partition drawn uniformly from each of the R strata
    ``{k : k mod R = j}``; every partition is still drawn with probability about R/K
    (exactly when R divides K), and ranks that hold partitions round-robin
    (``k mod P``, :mod:`hpcsoup.dist.shards`) each get exactly R/P of a step's
    partitions when P divides R: distributed steps are balanced.
    """
    if not 1 <= per_step <= num_parts:
        raise SoupError(f"pls per_step={per_step} must be in 1..partitions={num_parts}")
    # a fixed integer mix of (seed, step): Python's hash() is salted per process for str
    key = (int(seed) * 0x9E3779B97F4A7C15 + int(step) * 0xBF58476D1CE4E5B9 + 1) % (2 ** 63 - 1)
    generator = torch.Generator().manual_seed(key)
    if how == "stratified":
        return sorted(j + per_step * int(torch.randint(len(range(j, num_parts, per_step)), (1,),
                                                       generator=generator))
                      for j in range(per_step))
    if how != "random":
        raise SoupError(f"pls draw={how!r} is unknown; choose from {list(DRAWS)}")
    return sorted(torch.randperm(num_parts, generator=generator)[:per_step].tolist())


@dataclasses.dataclass
class Part:
    """One partition's subgraph (its ``core`` nodes first, then the halo).

    Attributes:
        x: ``[n_sub, F]`` features of the subgraph's nodes.
        edge_index: ``[2, E_sub]`` local edges (indices into the subgraph).
        y: ``[n_sub]`` labels.
        val_mask: ``[n_sub]`` bool, True on the partition's own (core) validation nodes.
        val_pos: ``[val_mask.sum()]`` their positions in the global validation order
            (the order of ``graph.mask('val').nonzero()``), to gather per-node results.
        deg: ``[n_sub]`` the nodes' degrees in the full graph (GCN normalisation) or None.
    """

    x: torch.Tensor
    edge_index: torch.Tensor
    y: torch.Tensor
    val_mask: torch.Tensor
    val_pos: torch.Tensor
    deg: torch.Tensor | None = None

    @property
    def num_nodes(self) -> int:
        return self.x.size(0)


class PartitionSource(abc.ABC):
    """Where PLS gets partitions from. Every process knows the metadata of all K.

    Attributes:
        num_parts: K.
        halo: the hops each partition's subgraph is extended by.
        val_counts: ``LongTensor[K]``, validation nodes in each partition's core.
        val_labels: ``LongTensor[num_val]``, the validation labels in global order
            (ROC-AUC needs them with the gathered scores).
    """

    num_parts: int
    halo: int
    val_counts: torch.Tensor
    val_labels: torch.Tensor

    @abc.abstractmethod
    def owns(self, k: int) -> bool:
        """Whether this process computes partition ``k``."""

    @abc.abstractmethod
    def part(self, k: int) -> Part:
        """Partition ``k``'s subgraph (only asked for partitions this process owns)."""

    @property
    def num_val(self) -> int:
        return int(self.val_counts.sum())


class CSRNeighbours:
    """Neighbour lists of a graph read straight from a row-sorted ``edge_index`` (no copy).

    Datasets here are coalesced (sorted by source, then target), so node ``i``'s
    neighbours are ``edge_index[1, ptr[i]:ptr[i+1]]``; only ``ptr`` ([N+1]) is
    built. An unsorted ``edge_index`` is sorted once (a copy). Extracting a
    partition's subgraph then costs O(edges of the partition), not O(E): PLS can
    rebuild subgraphs on the fly instead of keeping all K in memory.
    """

    def __init__(self, edge_index: torch.Tensor, num_nodes: int):
        row = edge_index[0]
        if row.numel() > 1 and not bool((row[1:] >= row[:-1]).all()):
            order = torch.argsort(row, stable=True)
            edge_index = edge_index[:, order]
            row = edge_index[0]
        self.col = edge_index[1]
        self.ptr = torch.zeros(num_nodes + 1, dtype=torch.long)
        torch.cumsum(torch.bincount(row, minlength=num_nodes), 0, out=self.ptr[1:])
        self.num_nodes = num_nodes
        # local id of each node in the subgraph being built (-1: not in it); reset after use
        self._local = torch.full((num_nodes,), -1, dtype=torch.long)

    def gather(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(owner, neighbour)``: for each edge out of ``nodes``, its position in ``nodes``
        and its other end."""
        start = self.ptr[nodes]
        count = self.ptr[nodes + 1] - start
        owner = torch.repeat_interleave(torch.arange(nodes.numel()), count)
        offset = torch.repeat_interleave(start - (torch.cumsum(count, 0) - count), count)
        return owner, self.col[offset + torch.arange(owner.numel())]

    def subgraph(self, core: torch.Tensor, hops: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(subset, local_edge_index, core_count)``: ``core`` plus ``hops`` hops of halo
        (core nodes first, then each hop's new nodes by id) and the edges among them."""
        local = self._local
        subset = core
        local[core] = torch.arange(core.numel())
        frontier = core
        try:
            for _ in range(hops):
                _, neighbours = self.gather(frontier)
                new = torch.unique(neighbours[local[neighbours] < 0])
                if new.numel() == 0:
                    break
                local[new] = torch.arange(subset.numel(), subset.numel() + new.numel())
                subset = torch.cat([subset, new])
                frontier = new
            owner, neighbours = self.gather(subset)
            target = local[neighbours]
            keep = target >= 0
            edge_index = torch.stack([owner[keep], target[keep]])
        finally:
            local[subset] = -1
        return subset, edge_index, core.numel()


class LocalPartitionSource(PartitionSource):
    """All K partitions of a graph held in this process.

    The METIS partition vector comes from :func:`hpcsoup.data.partition.partition`
    (seeded, cached on disk with ``cache_dir``). Subgraphs are cut from the full
    graph by :class:`CSRNeighbours` in O(edges of the partition) when asked for.

    Args:
        graph: the dataset.
        num_parts: K.
        halo: hops of halo around each partition (default: ``0``).
        seed: METIS seed (default: ``0``).
        cache_dir: where the partition vector is cached (default: no cache).
        cache: keep built subgraphs in memory (default: ``False``: all K together
            weigh about as much as the graph, which would undo PLS's memory saving).
    """

    def __init__(self, graph, num_parts: int, halo: int = 0, seed: int = 0,
                 cache_dir=None, cache: bool = False):
        from hpcsoup.data.partition import part_nodes, partition

        data = graph.data
        if not 1 <= num_parts <= data.num_nodes:
            raise SoupError(f"pls partitions={num_parts} must be in 1..{data.num_nodes} "
                            f"(the nodes of '{graph.name}')")
        self.graph, self.num_parts, self.halo, self.cache = graph, int(num_parts), int(halo), cache
        self.parts = partition(data.edge_index, data.num_nodes, self.num_parts, seed=seed,
                               cache_dir=cache_dir)
        self.nodes = part_nodes(self.parts, self.num_parts)
        val = graph.mask("val")
        self.val_counts = torch.tensor([int(val[n].sum()) for n in self.nodes], dtype=torch.long)
        self.val_order = torch.cumsum(val.long(), 0) - 1  # global validation position per node
        self.val_labels = data.y[val]
        self.neighbours = CSRNeighbours(data.edge_index, data.num_nodes)
        self.deg = (self.neighbours.ptr[1:] - self.neighbours.ptr[:-1])
        self._parts: dict[int, Part] = {}

    def owns(self, k: int) -> bool:
        return True

    def part(self, k: int) -> Part:
        if k in self._parts:
            return self._parts[k]
        data = self.graph.data
        subset, edge_index, core = self.neighbours.subgraph(self.nodes[k], self.halo)
        val_mask = torch.zeros(subset.numel(), dtype=torch.bool)
        val_mask[:core] = self.graph.mask("val")[subset[:core]]
        part = Part(data.x[subset], edge_index, data.y[subset], val_mask,
                    self.val_order[subset[val_mask]], self.deg[subset])
        if self.cache:
            self._parts[k] = part
        return part


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class PartitionLearnedSoup(SoupMethod):
    """Partition learned souping (PLS); see the module docstring."""

    name = "pls"
    defaults = {**OPTIM_DEFAULTS, "eval_every": 5, "patience": 3, "partitions": 32, "per_step": 4, "halo": 0,
                "check": "partitions", "partition_seed": 0, "cache": False,
                "partition_cache": None, "draw": "random"}

    def soup(self, ingredients: Ingredients, evaluator, *, seed: int = 0,
             source: PartitionSource | None = None,
             allreduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             evaluate: Callable[[torch.Tensor], float] | None = None) -> SoupResult:
        """Run PLS.

        Args:
            ingredients: the experts (their tensors on ``evaluator.device``).
            evaluator: the shared forward machinery (template model, device).
            seed: seed of the partition draws.
            source: the partitions (default: :class:`LocalPartitionSource` of
                ``evaluator.graph`` with the ``partitions``/``halo`` settings).
            allreduce: sums a tensor over processes (default: identity).
            evaluate: ``weights [P, n] -> validation score`` for the stopping check
                (default: the ``check`` setting).
        """
        s = self.settings
        steps, every, per_step = int(s["steps"]), int(s["eval_every"]), int(s["per_step"])
        cache = bool(s["cache"])
        if source is None:
            source = LocalPartitionSource(evaluator.graph, int(s["partitions"]), int(s["halo"]),
                                          seed=int(s["partition_seed"]), cache=cache,
                                          cache_dir=s["partition_cache"])
        allreduce = allreduce or _identity
        num_parts = source.num_parts
        draw_partitions(seed, 0, num_parts, per_step, s["draw"])  # validates early
        built: dict[int, tuple] = {}

        def subgraph(k: int):
            if k in built:
                return built[k]
            part = source.part(k)
            pair = part, evaluator.adjacency(part.edge_index, part.num_nodes, part.deg)
            if cache:
                built[k] = pair
            return pair

        if evaluate is None:
            if s["check"] == "full":
                def evaluate(weights):
                    return evaluator.evaluate(ingredients.mix(weights), "val")
            elif s["check"] == "partitions":
                def evaluate(weights):
                    return partition_score(ingredients, evaluator, source, subgraph, weights,
                                           allreduce)
            else:
                raise SoupError(f"pls check={s['check']!r} is unknown; choose 'partitions' or 'full'")

        start_evals = evaluator.evaluations
        logits = init_logits(ingredients, s["init"], ingredients.val_scores, evaluator.device)
        optimizer, scheduler = make_optimizer(logits, s)
        stopper = Stopper(s["patience"], s["min_delta"])
        progress = Progress(self.name, steps)
        updates, stopped, part_forwards = 0, False, 0
        loss_value = float("nan")
        for step in range(steps):
            score = None
            if step % every == 0:
                score = evaluate(logits.detach().softmax(-1))
                if stopper.check(step, score, logits):
                    progress.step(step, loss_value, score, stopper.best, force=True)
                    stopped = True
                    break
            drawn = draw_partitions(seed, step, num_parts, per_step, s["draw"])
            total = int(source.val_counts[drawn].sum())
            grad = torch.zeros_like(logits)
            loss_sum = torch.zeros((), device=logits.device)
            if total > 0:
                for k in drawn:
                    if not source.owns(k):
                        continue
                    part, adj = subgraph(k)
                    if not bool(part.val_mask.any()):
                        continue
                    out = evaluator.forward(ingredients.mix(logits.softmax(-1)),
                                            part.x.to(evaluator.device), adj)
                    mask = part.val_mask.to(evaluator.device)
                    term = F.cross_entropy(out[mask], part.y.to(evaluator.device)[mask],
                                           reduction="sum") / total
                    grad += torch.autograd.grad(term, logits)[0]
                    loss_sum += term.detach()
                    part_forwards += 1
            # one collective per step: the gradient of the logits and the loss
            reduced = allreduce(torch.cat([grad.flatten(), loss_sum.view(1)]))
            loss_value = float(reduced[-1])
            progress.step(step, loss_value, score, stopper.best)
            if total == 0:  # no validation node drawn: nothing to learn from this step
                continue
            logits.grad = reduced[:-1].view_as(logits).clone()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            updates += 1
        if not stopped:
            stopper.check(steps, evaluate(logits.detach().softmax(-1)), logits)
            progress.step(steps, loss_value, stopper.best, stopper.best, force=True)
        weights = stopper.best_logits.softmax(-1)
        return SoupResult(self.name, ingredients.mix(weights),
                          SoupResult.rows(weights, ingredients.num_tensors),
                          {"steps": updates, "partition_forwards": part_forwards,
                           "checks": stopper.checks, "best_step": stopper.best_step,
                           "val": stopper.best, "stopped_early": stopped,
                           "evaluations": evaluator.evaluations - start_evals,
                           "partitions": num_parts, "per_step": per_step,
                           "halo": source.halo, "check": s["check"],
                           "logits": stopper.best_logits.cpu().tolist()})


@torch.no_grad()
def partition_score(ingredients: Ingredients, evaluator, source: PartitionSource,
                    subgraph: Callable, weights: torch.Tensor,
                    allreduce: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """Validation score gathered partition by partition (memory of one partition at a time).

    Each owned partition writes its validation nodes' results (accuracy: 1 if
    correct; ROC-AUC: the positive-class probability) at their global positions
    of a ``[num_val]`` vector; one ``allreduce`` completes it on every process.
    With ``halo >= layers`` this equals the full-graph score.
    """
    from hpcsoup.data.metrics import score as metric_score

    per_node = torch.zeros(source.num_val, dtype=torch.float64, device=evaluator.device)
    params = ingredients.mix(weights)
    for k in range(source.num_parts):
        if not source.owns(k) or int(source.val_counts[k]) == 0:
            continue
        part, adj = subgraph(k)
        out = evaluator.forward(params, part.x.to(evaluator.device), adj)
        mask = part.val_mask.to(evaluator.device)
        out_val, y_val = out[mask], part.y.to(evaluator.device)[mask]
        if evaluator.metric == "accuracy":
            value = (out_val.argmax(-1) == y_val).double()
        else:
            value = out_val.float().softmax(-1)[:, 1].double()
        per_node[part.val_pos.to(evaluator.device)] = value
    per_node = allreduce(per_node)
    if evaluator.metric == "accuracy":
        # float32 like metrics.accuracy: sums of 0/1 are exact, so the full-graph score is met
        return float(per_node.float().mean()) if per_node.numel() else float("nan")
    return metric_score(evaluator.metric, per_node, source.val_labels.to(per_node.device))

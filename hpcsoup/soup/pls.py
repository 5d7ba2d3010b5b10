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

where :math:`S_k` is what a step computes for partition :math:`k` (``scope``):

- ``"field"`` (the default): the **receptive field** of the partition's validation
  nodes (:mod:`hpcsoup.soup.fields`, with the first layer's aggregation precomputed for
  GCN, SAGE and GIN). Their logits are exact, so :math:`L_t` is an unbiased stochastic
  estimate of LS's loss and with :math:`R = K` PLS equals LS step for step; on a large
  graph a step still costs about :math:`R/K` of an LS step (200k nodes, degree 50: one
  partition's 125 validation nodes have a field of 2-5k nodes). Measured: with the
  paper's objective below, PLS did not move from its start at 200k nodes (its check
  scored the uniform soup 68.9 where the full graph scores 71.8); with fields it learns.
- ``"partition"``: partition :math:`k` extended by a ``halo`` of :math:`h` hops.
  :math:`h = 0` is the paper's objective: edges to other partitions are dropped, so it
  is biased (METIS cut 40 % of synthetic-products' edges at 1M nodes). :math:`h =` the
  number of layers makes each partition's predictions exact (GCN keeps the full graph's degree
  normalisation) at the price of a halo that on a dense graph is most of it.

Why this shape (it is what distributed PLS, :mod:`hpcsoup.distributed`, builds on):

- the draw :math:`D_t` is a function of ``(seed, step)`` alone
  (:func:`draw_partitions`), independent of the number of processes;
- :math:`L_t` is a *sum of per-partition terms* with a global normaliser that
  every process computes from partition metadata (validation counts), so each
  term's gradient can be computed wherever the partition lives; one ``allreduce``
  gathers them as a ``[R, P n + 1]`` tensor (a row per drawn partition: its gradient
  of the logits and its term; a few KB), which every process sums in draw order, so
  the soup is the same to the bit on any number of ranks;
- the partitions come from a :class:`PartitionSource` (``owns(k)``,
  ``part(k)``, ``val_counts``); :class:`LocalPartitionSource` slices the full
  graph; a distributed source holds a shard;
- the stopping check is :func:`partition_scores`: per-node validation results
  (and loss terms) gathered partition by partition (exact for fields, and for
  subgraphs with ``halo >= layers``) through the same ``allreduce``;
  ``check="full"`` scores the full graph's validation nodes instead (``auto``, the
  default: full where this process holds the graph). Either way the check only
  steers stopping and selection (as in LS: the kept logits have the best
  checked metric, stopping follows the checked loss); the scores a runner
  *records* are computed exactly afterwards (:mod:`hpcsoup.soup.run`).

The start (``init``, default ``greedy_prefix``): the greedy soup's order
(:mod:`hpcsoup.soup.greedy`) up to the first expert that lowers validation, chosen by the
check. Greedy's :math:`n - 1` checks were a third of PLS's time at 200k nodes, where greedy
keeps the best expert alone: the prefix stops after one check there.

Partitions are processed one after another and each term is back-propagated
at once, so the peak memory of a step is that of one partition's field or subgraph:
memory falls with :math:`1/K`, time with :math:`R/K`.

Settings (:attr:`PartitionLearnedSoup.parameters`): those of LS plus
``partitions`` (K), ``per_step`` (R), ``scope``, ``halo`` (h), ``check``,
``partition_seed`` (METIS seed), ``cache`` (keep the K subgraphs in memory:
faster on small graphs, but they weigh about as much as the graph itself) and
``draw`` (``random`` | ``stratified``, see :func:`draw_partitions`; stratified
balances the ranks of a distributed run).
"""
from __future__ import annotations

import abc
import dataclasses
import functools
import logging
from typing import Callable, ClassVar, Iterator

import torch

from hpcsoup.errors import SoupError
from hpcsoup.soup.base import Ingredients, SoupMethod, SoupResult
from hpcsoup.data.metrics import score as metric_score
from hpcsoup.data.partition import part_nodes, partition
from hpcsoup.models.rows import dense
from hpcsoup.settings import Setting, nonnegative, positive
from hpcsoup.soup.fields import CSRNeighbours
from hpcsoup.soup.learned import (GREEDY_INITS, OPTIM_SETTINGS, StepProgress, Stopper,
                                  greedy_start, init_logits, learned_result, make_optimizer,
                                  resolve_objective, validation_loss)

log = logging.getLogger("hpcsoup.soup")


DRAWS = ("random", "stratified")


def draw_partitions(seed: int, step: int, num_parts: int, per_step: int,
                    how: str = "random") -> list[int]:
    """The ``per_step`` partitions step ``step`` uses: a function of (seed, step) alone, sorted.

    ``how="random"``: R of the K partitions uniformly without replacement.
    ``how="stratified"``: one partition drawn uniformly from each of the R strata
    ``{k : k mod R = j}``; every partition is still drawn with probability about R/K
    (exactly when R divides K), and ranks that hold partitions round-robin
    (``k mod P``, :mod:`hpcsoup.distributed.shards`) each get exactly R/P of a step's
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
    """One partition's subgraph: its ``core_count`` core nodes first, then the halo.

    Or, with ``scope = "field"``, the receptive field of the partition's validation nodes
    (:mod:`hpcsoup.soup.fields`): they are the core, the field's other nodes the halo, and
    ``weight`` / ``aggregate`` hold the adjacency's values and the precomputed first
    aggregation (both empty for a partition's subgraph).

    The same object in a single process (:class:`LocalPartitionSource` cuts it from the
    graph) and on an MPI rank (read from the store's partitioned graph).

    Attributes:
        x: ``[n, F]`` features of the subgraph's nodes (a local field's:
            :class:`~hpcsoup.models.rows.GatheredRows` of the validation field's, read a
            block at a time).
        edge_index: ``[2, e]`` local edges (indices into the subgraph).
        y: ``[n]`` labels.
        deg: ``[n]`` the nodes' degrees in the full graph (GCN normalisation).
        val_mask, test_mask: ``[n]`` bool, True on the core's validation / test nodes.
        val_pos, test_pos: their positions in the global validation / test order (the
            order of ``graph.mask(split).nonzero()``), to gather per-node results.
        nodes: ``[n]`` global node ids.
        core_count: number of core nodes.
        pid: partition id in ``0..K-1``.
        weight: ``[e]`` a field's adjacency values (GCN's normalisation), else empty.
        aggregate: ``[n, F]`` a field's precomputed first aggregation (rows as ``x``'s), else
            empty.
    """

    x: torch.Tensor
    edge_index: torch.Tensor
    y: torch.Tensor
    deg: torch.Tensor
    val_mask: torch.Tensor
    val_pos: torch.Tensor
    test_mask: torch.Tensor
    test_pos: torch.Tensor
    nodes: torch.Tensor
    core_count: int
    pid: int
    weight: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0))
    aggregate: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(0))

    #: the tensors a partitioned graph stores per partition
    TENSORS: ClassVar[tuple] = ("x", "edge_index", "y", "deg", "val_mask", "val_pos",
                                "test_mask", "test_pos", "nodes", "weight", "aggregate")

    @property
    def is_field(self) -> bool:
        """Whether this is a receptive field (``scope = "field"``), not a partition's subgraph."""
        return bool(self.weight.numel() or self.aggregate.numel())

    @property
    def num_nodes(self) -> int:
        return int(self.nodes.numel())

    def tensors(self) -> dict:
        """``{name: tensor}`` (a local field's rows gathered: what a partitioned graph stores)."""
        return {name: dense(getattr(self, name)) for name in self.TENSORS}

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def mask(self, split: str) -> torch.Tensor:
        return self.val_mask if split == "val" else self.test_mask

    def positions(self, split: str) -> torch.Tensor:
        return self.val_pos if split == "val" else self.test_pos


class PartitionSource(abc.ABC):
    """Where PLS gets partitions from. Every process knows the metadata of all K.

    Attributes:
        num_parts: K.
        halo: the hops each partition's subgraph is extended by.
        counts: ``{"val", "test"}`` -> ``LongTensor[K]``, each partition's core nodes of
            that split.
        labels: ``{"val", "test"}`` -> the split's labels in global order (ROC-AUC and
            the AUC objective need them beside gathered results).
        val_positives: ``LongTensor[K]``, each partition's core validation nodes of
            label 1 (the AUC objective's pair counts).
        keeps_parts: whether :meth:`part` returns partitions held in memory (their
            adjacency is then worth keeping too).
        scope: ``"partition"`` (a partition's subgraph with ``halo`` hops) or ``"field"``
            (its validation nodes' receptive field: no test nodes, exact validation).
    """

    num_parts: int
    halo: int
    scope: str = "partition"
    counts: dict
    labels: dict
    val_positives: torch.Tensor
    keeps_parts: bool = False

    @abc.abstractmethod
    def owns(self, k: int) -> bool:
        """Whether this process computes partition ``k``."""

    @abc.abstractmethod
    def part(self, k: int) -> Part:
        """Partition ``k``'s subgraph (only asked for partitions this process owns)."""

    def owned(self) -> list[int]:
        return [k for k in range(self.num_parts) if self.owns(k)]

    def pieces(self, k: int) -> Iterator[Part]:
        """Partition ``k`` as a step computes it: one :class:`Part`, or several whose
        validation nodes split the partition's (their loss terms add up to its term), cut one
        at a time as the caller asks for the next."""
        yield self.part(k)

    def exact(self, depth: int | None, split: str = "val") -> bool:
        """Whether a model of ``depth`` layers scores ``split`` exactly on these partitions."""
        if self.scope == "field":
            return split == "val"
        return depth is not None and self.halo >= depth

    def loss_terms(self, objective: str) -> torch.Tensor:
        """``LongTensor[K]``: the validation loss terms of each partition (the step's
        normaliser is their sum over the drawn partitions): nodes for ``ce``,
        positive-negative pairs for ``auc``."""
        if objective == "ce":
            return self.counts["val"]
        return self.val_positives * (self.counts["val"] - self.val_positives)


class LocalPartitionSource(PartitionSource):
    """All K partitions of a graph held in this process.

    The METIS partition vector comes from :func:`hpcsoup.data.partition.partition`
    (seeded, cached on disk with ``cache_dir``). Subgraphs are cut from the full
    graph by :class:`~hpcsoup.soup.fields.CSRNeighbours` in O(edges of the partition) when
    asked for; with ``evaluator`` (``scope = "field"``) each partition is instead the
    receptive field of its validation nodes in that evaluator's model
    (:meth:`hpcsoup.soup.evaluate.Evaluator.field_of`: exact, and on a large graph
    a fraction of the partition's subgraph).

    Args:
        graph: the dataset.
        num_parts: K.
        halo: hops of halo around each partition (default: ``0``).
        seed: METIS seed (default: ``0``).
        cache_dir: where the partition vector is cached (default: no cache).
        cache: keep built subgraphs in memory (default: ``False``: all K together
            weigh about as much as the graph, which would undo PLS's memory saving).
        parts: the partition vector when the caller has it (e.g.
            :func:`hpcsoup.data.partition.partition_for`, computed once per graph);
            ``seed`` and ``cache_dir`` then go unused.
        evaluator: cut receptive fields from this evaluator (its graph is ``graph``);
            ``halo`` then goes unused.
        keep_partition: keep the partition vector with receptive fields too (for :attr:`nodes`:
            a partitioned graph's scoring fields are cut from them); a soup does not need it.
    """

    def __init__(self, graph, num_parts: int, halo: int = 0, seed: int = 0,
                 cache_dir=None, cache: bool = False, parts: torch.Tensor | None = None,
                 evaluator=None, keep_partition: bool = False):
        data = graph.data
        if not 1 <= num_parts <= data.num_nodes:
            raise SoupError(f"pls partitions={num_parts} must be in 1..{data.num_nodes} "
                            f"(the nodes of '{graph.name}')")
        self.graph, self.num_parts, self.halo = graph, int(num_parts), int(halo)
        self.keeps_parts = bool(cache)
        parts = parts if parts is not None else partition(
            data.edge_index, data.num_nodes, self.num_parts, seed=seed, cache_dir=cache_dir)
        self.split_masks = {split: graph.mask(split) for split in ("val", "test")}
        self.counts = {split: torch.bincount(parts[mask], minlength=self.num_parts)
                       for split, mask in self.split_masks.items()}
        positive = self.split_masks["val"] & (data.y == 1)
        self.val_positives = torch.bincount(parts[positive], minlength=self.num_parts)
        # each partition's validation nodes, as ascending positions in the global validation
        # order (a receptive field's roots): all a source of fields keeps of the partition vector
        self.val_positions = part_nodes(parts[self.split_masks["val"]], self.num_parts)
        self.evaluator = evaluator
        if evaluator is None or keep_partition:  # for :attr:`nodes`; half an int64's memory
            self.parts = parts.to(torch.int32)
        if evaluator is not None:
            self.scope, self.halo = "field", 0
        else:
            self.neighbours = CSRNeighbours.of_edge_index(data.edge_index, data.num_nodes)
            self.deg = (self.neighbours.ptr[1:] - self.neighbours.ptr[:-1])
        self._parts: dict[int, Part] = {}
        self._cuts: dict = {}         # k -> the partition's FieldCut
        self._piece_cuts: dict = {}   # k -> [(validation positions, FieldCut)] of its pieces

    # per-node tables of subgraphs, built on first use: receptive fields need only
    # :attr:`val_positions` (O(validation nodes)), PLS's memory being the point
    @functools.cached_property
    def nodes(self) -> list[torch.Tensor]:
        """Each partition's node ids, ascending (a subgraph's core)."""
        return part_nodes(self.parts, self.num_parts)

    @functools.cached_property
    def order(self) -> dict:
        """``{split: LongTensor[N]}``: each node's position in the global order of its split."""
        return {split: torch.cumsum(mask.long(), 0) - 1 for split, mask in self.split_masks.items()}

    @functools.cached_property
    def labels(self) -> dict:
        """``{split: labels in global order}``, each split's gathered when first asked for (the
        test split's: 7 MB at 1M nodes, wanted only when a check scores test nodes)."""
        return SplitTable(lambda split: self.graph.data.y[self.split_masks[split]])

    def owns(self, k: int) -> bool:
        return True

    def part(self, k: int) -> Part:
        if k in self._parts:
            return self._parts[k]
        part = self._field(k) if self.evaluator is not None else self._subgraph(k)
        if self.keeps_parts:
            self._parts[k] = part
        return part

    def pieces(self, k: int) -> Iterator[Part]:
        """A receptive field above the piece limit (:data:`PIECE_NODES`, or 1/:data:`PIECE_SHARE`
        of the validation field) comes in pieces: its validation nodes split into runs (METIS
        order: neighbours stay together) whose fields are about that size, so a step's memory
        does not grow with the largest partition (the pieces' fields overlap: more nodes
        computed)."""
        if self.evaluator is None:
            yield self.part(k)
            return
        if k not in self._piece_cuts:
            field_nodes = int(self.evaluator.validation_field()[0].nodes.numel())
            limit = max(PIECE_NODES, field_nodes // PIECE_SHARE)
            count = -(-int(self._cut(k).subset.numel()) // limit)
            runs = torch.tensor_split(self.val_positions[k], count) if count > 1 else []
            self._piece_cuts[k] = [(run, self.evaluator.field_cut(run)) for run in runs]
            if runs:  # steps use the pieces: the whole field is cut afresh if asked for
                self._cuts.pop(k, None)
        if not self._piece_cuts[k]:
            yield self.part(k)
        for run, cut in self._piece_cuts[k]:
            yield self._field(k, run, cut)

    def _cut(self, k: int):
        cut = self._cuts.get(k)
        if cut is None:
            cut = self.evaluator.field_cut(self.val_positions[k])
            if not self._piece_cuts.get(k):  # kept (index tensors), the gathers are not
                self._cuts[k] = cut
        return cut

    def _field(self, k: int, positions: torch.Tensor | None = None, cut=None) -> Part:
        """Partition ``k``'s validation nodes (the core; or those at ``positions`` with their
        ``cut``) and their receptive field."""
        if positions is None:
            positions, cut = self.val_positions[k], self._cut(k)
        field = self.evaluator.field_of(positions, cut, lazy=True)  # read a block at a time
        nodes = field.nodes.cpu()
        val_mask = torch.arange(nodes.numel()) < field.roots
        aggregate = field.aggregate if field.aggregate is not None else torch.zeros(0)
        none = torch.zeros(0, dtype=torch.long)  # no degrees (the weights carry them), no test
        labels = self.graph.data.y.index_select(0, nodes)
        return Part(field.x, field.edge_index, labels, none, val_mask, positions,
                    torch.zeros_like(val_mask), none, nodes, field.roots, k, field.weight,
                    aggregate)

    def _subgraph(self, k: int) -> Part:
        """Partition ``k``'s nodes (the core) and ``halo`` hops around them."""
        data = self.graph.data
        subset, edge_index, core = self.neighbours.subgraph(self.nodes[k], self.halo)
        masks = {}
        for split, mask in self.split_masks.items():
            masks[split] = torch.zeros(subset.numel(), dtype=torch.bool)
            masks[split][:core] = mask[subset[:core]]
        return Part(data.x.index_select(0, subset), edge_index, data.y[subset], self.deg[subset],
                    masks["val"], self.order["val"][subset[masks["val"]]],
                    masks["test"], self.order["test"][subset[masks["test"]]],
                    subset, int(core), k)


class SplitTable(dict):
    """``{split: value}`` filled on first lookup by ``make(split)``."""

    def __init__(self, make: Callable[[str], torch.Tensor]):
        super().__init__()
        self.make = make

    def __missing__(self, split: str) -> torch.Tensor:
        value = self[split] = self.make(split)
        return value


def _identity(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


#: nodes of a receptive field above which a local source hands a step its partition in pieces
#: (:meth:`LocalPartitionSource.pieces`): at least :data:`PIECE_NODES`, else 1/:data:`PIECE_SHARE`
#: of the validation field, so a step's features and activations stay a fixed small share of
#: an evaluation's (LS's) at every size. Pieces overlap (neighbours shared by a partition's
#: validation nodes are computed once per piece): at 200k nodes 4096-node pieces compute 10 %
#: more nodes than the 32 whole fields; 16k-node pieces cost 10 % less time at several times a
#: step's memory; at 1M a fixed 4096 made PLS slower than LS, for no memory it saved
#: (benchmarks/RESULTS.md ``## soup`` (d))
PIECE_NODES = 4096
PIECE_SHARE = 40

SCOPES = ("field", "partition")
CHECKS = ("auto", "partitions", "full")


def resolve_scope(scope: str, evaluator) -> str:
    """``field`` or ``partition``: receptive fields need hpcsoup's own model (its depth and
    layers); a user's module (:mod:`hpcsoup.soup.module_evaluator`) gets partitions."""
    if scope not in SCOPES:
        raise SoupError(f"pls scope={scope!r} is unknown; choose from {list(SCOPES)}")
    if getattr(evaluator.spec, "layers", None) is None or evaluator.graph is None:
        return "partition"
    return scope


def resolve_check(check: str, evaluator) -> str:
    """``partitions`` or ``full`` for ``check`` (``auto``: full when this process holds the graph:
    one evaluation on the validation nodes' receptive field, exact and at most as costly as a
    pass over the K partitions). Distributed ranks hold no graph, so ``auto`` checks
    partitions there: for coefficients that do not depend on the rank count, from one rank
    up, set ``partitions``."""
    if check not in CHECKS:
        raise SoupError(f"pls check={check!r} is unknown; choose from {list(CHECKS)}")
    if check != "auto":
        return check
    return "full" if evaluator.graph is not None else "partitions"


#: PLS's settings: LS's with PLS's own defaults, and the partitioning
PLS_SETTINGS = {
    **OPTIM_SETTINGS,
    # PLS's own: more, cheaper steps; a check costs about a step on all K partitions, so it
    # checks every 10 steps (every 8, one pass over the partitions, gave the same validation
    # scores on Cora, CiteSeer and Tolokers but missed the one better check of the MPI
    # benchmark's soup: benchmarks/RESULTS.md ``## soup``, ``## mpi_pls``).
    # It starts from a prefix of the greedy soup's order (up to the first expert that lowers
    # validation), chosen by its own (exact, collective) check: greedy's n - 1 checks were
    # a third of its time at 200k nodes, where greedy keeps the best expert alone (the prefix
    # then costs one check); the same validation on Cora and Tolokers, -0.27 pt on CiteSeer
    # (benchmarks/RESULTS.md ``## soup``).
    # It stops at the first check (10 steps) whose validation loss did not fall: a second
    # such window (patience 2) kept the same soups on Cora, CiteSeer, Tolokers (3 expert sets
    # each), synthetic-products 200k and the MPI benchmark, at twice the steps where the loss
    # had stopped falling (200k: 20 -> 10 steps; benchmarks/RESULTS.md ``## soup``)
    "init": dataclasses.replace(OPTIM_SETTINGS["init"], default="greedy_prefix"),
    "steps": dataclasses.replace(OPTIM_SETTINGS["steps"], default=40),
    "lr": dataclasses.replace(OPTIM_SETTINGS["lr"], default=0.5),
    "eval_every": dataclasses.replace(OPTIM_SETTINGS["eval_every"], default=10),
    "patience": dataclasses.replace(OPTIM_SETTINGS["patience"], default=1),
    "min_steps": dataclasses.replace(OPTIM_SETTINGS["min_steps"], default=10),
    "partitions": Setting(32, (int,), **positive(), help="K, the METIS partitions of the graph"),
    "per_step": Setting(4, (int,), **positive(),
                        help="R, the partitions each step draws (at most partitions)"),
    "scope": Setting("field", (str,), choices=SCOPES,
                     help="what a step computes per partition: the receptive field of its "
                          "validation nodes (exact) or the partition's subgraph with `halo` hops"),
    "halo": Setting(0, (int,), **nonnegative(),
                    help="scope=partition: hops of halo around each partition (layers: exact)"),
    "check": Setting("auto", (str,), choices=CHECKS,
                     help="stopping check: per partition (memory of one), on the full graph's "
                          "validation nodes, or auto (full where this process holds the graph)"),
    "partition_seed": Setting(0, (int,), help="METIS seed (one partition per graph, K and seed)"),
    "cache": Setting(False, (bool,),
                     help="keep the K subgraphs in memory (faster; about the graph's size more)"),
    "draw": Setting("stratified", (str,), choices=DRAWS,
                    help="partitions per step: one from each class k mod per_step (balanced "
                         "MPI ranks) or uniformly at random"),
}


class PartitionLearnedSoup(SoupMethod):
    """Partition learned souping (PLS); see the module docstring."""

    name = "pls"
    parameters = PLS_SETTINGS

    def soup(self, ingredients: Ingredients, evaluator, *, seed: int = 0,
             source: PartitionSource | None = None,
             allreduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
             partition_cache=None) -> SoupResult:
        """Run PLS.

        Args:
            ingredients: the experts (their tensors on ``evaluator.device``).
            evaluator: the shared forward machinery (template model, device; the full
                graph only for ``check="full"`` and the default source).
            seed: seed of the partition draws.
            source: the partitions (default: :class:`LocalPartitionSource` of
                ``evaluator.graph`` with the ``partitions``/``scope``/``halo`` settings).
            allreduce: sums a tensor over processes (default: identity; one process).
            partition_cache: folder where the default source caches its METIS partition.
        """
        s = self.settings
        steps, every, per_step = int(s["steps"]), int(s["eval_every"]), int(s["per_step"])
        if source is None:
            fields = resolve_scope(s["scope"], evaluator) == "field"
            source = LocalPartitionSource(evaluator.graph, int(s["partitions"]), int(s["halo"]),
                                          seed=int(s["partition_seed"]), cache=bool(s["cache"]),
                                          cache_dir=partition_cache,
                                          evaluator=evaluator if fields else None)
        allreduce = allreduce or _identity
        num_parts = source.num_parts
        draw_partitions(seed, 0, num_parts, per_step, s["draw"])  # validates early
        objective = resolve_objective(s["objective"], evaluator.metric)
        terms = source.loss_terms(objective)
        keep = bool(s["cache"]) or source.keeps_parts

        how = resolve_check(s["check"], evaluator)
        if how == "full":
            def check_params(params):
                evaluator.evaluations += 1
                with torch.no_grad():
                    out = evaluator.val_logits(params)
                loss = float(validation_loss(out, evaluator.y[evaluator.masks["val"]], objective))
                return evaluator.score_val(out), loss
        else:
            def check_params(params):
                scores = partition_scores(params, evaluator, source, allreduce, splits=("val",),
                                          objective=objective, keep=keep)
                return scores["val"], scores["val_loss"]

        def check(weights):
            return check_params(ingredients.mix(weights))

        start_evals = evaluator.evaluations
        start_check = None  # the start's check, when choosing the start made it
        start_checks = []  # the checks that chose the start (their count is recorded)

        def start_candidate(params):
            start_checks.append(check_params(params))
            return start_checks[-1]

        if s["init"] in GREEDY_INITS:  # chosen by the check: MPI ranks can too
            logits, start_check = greedy_start(ingredients, start_candidate,
                                               until_drop=s["init"] == "greedy_prefix")
            logits = logits.to(evaluator.device).requires_grad_(True)
        else:
            logits = init_logits(ingredients, s["init"], ingredients.val_scores, evaluator.device,
                                 evaluator)
        start = logits.detach().clone()
        optimizer, scheduler = make_optimizer(logits, s)
        stopper = Stopper(s["patience"], s["min_delta"], s["min_steps"])
        progress = StepProgress(self.name, steps, show=self.show_progress)
        updates, stopped, part_forwards = 0, False, 0
        loss_value = float("nan")
        for step in range(steps + 1):
            score = None
            if step % every == 0 or step == steps:
                score, check_loss = (start_check if step == 0 and start_check is not None
                                     else check(logits.detach().softmax(-1)))
                if stopper.check(step, score, check_loss, logits):
                    stopped = step < steps
                    break
            if step == steps:
                break
            drawn = draw_partitions(seed, step, num_parts, per_step, s["draw"])
            total = int(terms[drawn].sum())
            # one row per drawn partition: its term's gradient of the logits and the term,
            # filled by the process that holds it (zeros elsewhere), so the allreduce adds
            # exact zeros and every process sums the rows in draw order: the same bits on any
            # number of ranks (Adam magnifies float summation order on near-zero gradients)
            rows = torch.zeros(per_step, logits.numel() + 1, device=logits.device)
            params = ingredients.mix(logits.softmax(-1))  # mixed once per step
            mixed = [t for t in params.values() if t.requires_grad]
            for row, k in enumerate(drawn if total > 0 else []):
                if not source.owns(k) or int(terms[k]) == 0:
                    continue
                # the partition's term and its gradient of the mixed tensors, piece by piece
                # (a cross-entropy adds up over nodes; an AUC's pairs need the whole partition)
                grads, term = None, 0.0
                for part in source.pieces(k) if objective == "ce" else [source.part(k)]:
                    out = evaluator.forward(params, part.x.to(evaluator.device),
                                            evaluator.part_adjacency(part, keep))
                    mask = part.val_mask[:out.size(0)].to(evaluator.device)  # a field: its roots
                    labels = part.y[:out.size(0)].to(evaluator.device)
                    piece = validation_loss(out[mask], labels[mask], objective,
                                            reduction="sum") / total
                    # back through the piece alone (memory of one), the mix comes after
                    piece_grads = torch.autograd.grad(piece, mixed, retain_graph=True,
                                                      allow_unused=True)
                    grads = piece_grads if grads is None else [
                        b if a is None else a if b is None else a + b
                        for a, b in zip(grads, piece_grads)]
                    term = term + piece.detach()
                    del part, out, piece, piece_grads  # before the next one is cut
                used = [(t, g) for t, g in zip(mixed, grads) if g is not None]
                if used:
                    rows[row, :-1] = torch.autograd.grad([t for t, _ in used], logits,
                                                         [g for _, g in used],
                                                         retain_graph=True)[0].flatten()
                rows[row, -1] = term
                part_forwards += 1
                del grads, used
            # one collective per step
            reduced = allreduce(rows).sum(0)
            loss_value = float(reduced[-1])
            progress.step(step, loss_value, score, stopper.best)
            if total == 0:  # no validation term drawn: nothing to learn from this step
                continue
            logits.grad = reduced[:-1].view_as(logits).clone()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            updates += 1
        progress.close()
        result = learned_result(self.name, ingredients, stopper, start, {
            "init": s["init"], "start_logits": start.cpu().tolist(),
            "start_checks": len(start_checks), "steps": updates,
            "partition_forwards": part_forwards,
            "stopped_early": stopped,
            "objective": objective, "evaluations": evaluator.evaluations - start_evals,
            "partitions": num_parts, "per_step": per_step, "scope": source.scope,
            "halo": source.halo, "check": how}, say=self.show_progress)
        depth = getattr(evaluator.spec, "layers", None)  # unknown for a user's own module
        if how != "full" and not source.exact(depth) and evaluator.graph is not None:
            start_val = evaluator.evaluate(ingredients.mix(start.softmax(-1)), "val")
            result = keep_better_than_start(result, ingredients, start, start_val,
                                            evaluator.evaluate(result.state_dict, "val"))
        return result


def keep_better_than_start(result: SoupResult, ingredients: Ingredients, start: torch.Tensor,
                           start_val: float, learned_val: float) -> SoupResult:
    """The learned soup, or its start when the start has the higher full-graph validation score.

    A check on partitions with a halo shorter than the model's depth scores a graph
    without the cut edges, so it can keep logits that the full graph scores below the
    start (measured: tiny graphs, K = 8, halo 0). One exact comparison (two inference
    forwards) makes the kept soup never worse than its start on validation.
    """
    result.extras["exact_choice"] = "learned" if learned_val >= start_val else "start"
    if learned_val >= start_val:
        return result
    log.warning("%s: the start scores %.4f on the full graph's validation nodes, the learned "
                "soup %.4f: keeping the start", result.method, start_val, learned_val)
    weights = start.softmax(-1)
    extras = {**result.extras, "moved": False, "shift_from_start": 0.0, "best_step": 0,
              "shift_from_uniform": float((weights - 1.0 / ingredients.n).abs().max()),
              "logits": start.cpu().tolist()}
    return SoupResult(result.method, ingredients.mix(weights),
                      SoupResult.rows(weights, ingredients.num_tensors), extras)


@torch.no_grad()
def partition_scores(params: dict, evaluator, source: PartitionSource,
                     allreduce: Callable[[torch.Tensor], torch.Tensor] = _identity,
                     splits: tuple = ("val", "test"), objective: str | None = None,
                     keep: bool = False) -> dict:
    """Scores of ``params`` gathered partition by partition (memory of one partition at a time).

    Each process runs the partitions it owns and writes its core nodes' results
    (accuracy: 1 if correct; ROC-AUC: the positive-class probability) at their global
    positions of one vector per split; with ``objective`` the validation nodes' logits
    are gathered too, for the validation loss. One ``allreduce`` completes everything
    on every process. With ``halo >= layers`` the scores equal the full graph's.

    Returns ``{"metric", <split>: score, ...}`` plus ``"val_loss"`` with ``objective``.
    """
    metric = evaluator.metric
    sizes = {split: int(source.counts[split].sum()) for split in splits}
    classes = int(evaluator.spec.out_channels)
    width = classes if objective is not None else 0
    offsets, total = {}, 0
    for split in splits:
        offsets[split] = total
        total += sizes[split] * (1 + (width if split == "val" else 0))
    flat = torch.zeros(total, dtype=torch.float64, device=evaluator.device)
    for k in source.owned():
        if not any(int(source.counts[split][k]) for split in splits):
            continue
        part = source.part(k)
        out = evaluator.forward(params, part.x.to(evaluator.device),
                                evaluator.part_adjacency(part, keep))
        for split in splits:
            mask = part.mask(split)[:out.size(0)].to(evaluator.device)  # a field: its roots' rows
            pos = part.positions(split).to(evaluator.device)
            out_split = out[mask]
            if metric == "accuracy":
                labels = part.y[:out.size(0)].to(evaluator.device)
                value = (out_split.argmax(-1) == labels[mask]).double()
            else:
                value = out_split.float().softmax(-1)[:, 1].double()
            flat[offsets[split] + pos] = value
            if split == "val" and width:
                block = flat[offsets[split] + sizes[split]:offsets[split] + sizes[split] * (1 + width)]
                block.view(sizes[split], width)[pos] = out_split.double()
    flat = allreduce(flat)
    scores = {"metric": metric}
    for split in splits:
        values = flat[offsets[split]:offsets[split] + sizes[split]]
        labels = source.labels[split].to(values.device)
        if metric == "accuracy":
            # float32 like metrics.accuracy: sums of 0/1 are exact, so the full-graph score is met
            scores[split] = float(values.float().mean()) if values.numel() else float("nan")
        else:
            scores[split] = metric_score(metric, values, labels)
        if split == "val" and width:
            logits = flat[offsets[split] + sizes[split]:offsets[split] + sizes[split] * (1 + width)]
            scores["val_loss"] = float(validation_loss(logits.view(sizes[split], width).float(),
                                                       labels, objective))
    return scores

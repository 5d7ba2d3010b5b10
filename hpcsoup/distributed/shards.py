"""The partitioned graph, stored once, read back one rank's shard at a time.

Distributed partition learned souping (:mod:`hpcsoup.distributed.pls`) needs every
rank to hold only the METIS partitions it computes, never the whole graph. The
graph is therefore partitioned **once** and each partition's subgraph (its core
nodes plus the halo the objective needs) is written to the store as a graph shard
set (:meth:`hpcsoup.store.Store.write_graph`, which writes and reads every byte)::

    <store>/graphs/<graph>/parts-<K>-halo<h>-seed<s>/      attrs: partitions, halo, seed, sizes...
                           parts-<K>-field-<arch><L>-seed<s>/   (scope "field": see below)
        val_labels, test_labels                   int64  the labels in global val/test order
        p00000/ nodes        int64 [n_p]     global ids, the core_count core nodes first
                edge_index   int64 [2, e_p]  local ids (the partition's subgraph)
                x            float32 [n_p, F]
                y            int64 [n_p]
                deg, val_mask, val_pos, test_mask, test_pos   (PLS's Part)
                weight, aggregate       (a receptive field's; empty for a partition's subgraph)
        p00001/ ...

With PLS's ``scope = "field"`` a stored partition is the receptive field of its validation
nodes in the experts' model (:mod:`hpcsoup.soup.fields`), which depends on the architecture
and depth (the precomputed first aggregation, GCN's normalisation): the set's name says them.
Such a set also holds each partition's **scoring field** (``s00000``, ``s00001``...: the same
arrays), the receptive field of the partition's validation *and test* nodes (roots, validation
first), cut from the full graph when the set is prepared. The soup's recorded full-graph scores
are then gathered partition by partition on the ranks (:func:`hpcsoup.soup.pls.partition_scores`:
the roots' logits are exact), and no rank loads the graph to score it; the set's attr
``score_fields`` says whether it has them (sets of an earlier hpcsoup do not).

``<graph>`` is the dataset name (plus ``-split<i>`` for multi-split sets). The store
builds the set aside and renames it into place (atomic), so a reader sees either no
partitioned graph or a complete one, and concurrent preparers cannot corrupt it; a
set left incomplete, or of another format, is rebuilt by the next :func:`prepare`.

A :class:`Shard` is what one rank holds: the partitions assigned to it.
**Assignment** (:func:`owner_of`): partition ``p`` belongs to rank ``p mod P``
(round-robin by partition id). With PLS's stratified draw (partition ids drawn
one per residue class mod R; see :mod:`hpcsoup.distributed.pls`) and ``P`` dividing
``R``, every rank then computes exactly ``R / P`` of a step's partitions; any
other draw is still correct, only less balanced.

Resident memory: a rank holds ``sum_p n_p`` node rows over its partitions, i.e.
about ``N / P`` core nodes plus their halos; :attr:`Shard.resident_nodes` and
:attr:`Shard.unique_nodes` measure it.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from hpcsoup.errors import StoreError, StoreNotFoundError
from hpcsoup.models.gnn import FIRST_LAYER_BLOCK
from hpcsoup.soup.pls import LocalPartitionSource, Part
from hpcsoup.store import GRAPHS, Store, provenance

#: the arrays each stored partition holds: PLS's own :class:`~hpcsoup.soup.pls.Part`
ARRAYS = Part.TENSORS
#: a scoring field's arrays read a block of rows at a time (chunks of FIRST_LAYER_BLOCK rows)
ROW_ARRAYS = ("x", "aggregate")
#: the set's own arrays, beside the partitions
LABELS = ("val_labels", "test_labels")


def graph_key(dataset: str, split: int = 0, data_seed: int = 0) -> str:
    """Folder name of a graph under ``graphs/``: the dataset name, ``-split<i>`` when the split
    is not 0, ``-dseed<s>`` when a generated graph's seed is not 0."""
    key = re.sub(r"[^A-Za-z0-9_.+=-]", "_", dataset)
    if split:
        key += f"-split{split}"
    if data_seed:
        key += f"-dseed{data_seed}"
    return key


def parts_key(partitions: int, halo: int, seed: int, field=None) -> str:
    """The set's name: ``field`` (a :class:`~hpcsoup.models.ModelSpec`) for receptive fields."""
    if field is not None:
        return f"parts-{partitions}-field-{field.arch}{field.layers}-seed{seed}"
    return f"parts-{partitions}-halo{halo}-seed{seed}"


def part_name(pid: int) -> str:
    """The shard name of partition ``pid`` in the stored set: ``p00003``."""
    return f"p{pid:05d}"


def shard_path(store_path: str | Path, graph_id: str, partitions: int, halo: int,
               seed: int, field=None) -> Path:
    """Where a partitioned graph lives in the store (``graph_id`` from :func:`graph_key`)."""
    return Path(store_path) / GRAPHS / graph_id / parts_key(partitions, halo, seed, field)


def score_part_name(pid: int) -> str:
    """The shard name of partition ``pid``'s scoring field (validation and test roots): ``s00003``."""
    return f"s{pid:05d}"


def owner_of(pid: int, size: int) -> int:
    """The rank that holds partition ``pid`` among ``size`` ranks: round-robin, ``pid mod size``."""
    return pid % size


def owned_partitions(partitions: int, rank: int, size: int) -> list[int]:
    """Partition ids of ``rank``: ``rank, rank + size, rank + 2 size, ...``."""
    return list(range(rank, partitions, size))


# --------------------------------------------------------------------------- building


def build_parts(source: LocalPartitionSource) -> Iterator[Part]:
    """The partitions of ``source`` (:func:`partition_source`), one :class:`Part` at a time:
    METIS partitions with a ``halo``-hop halo, or their validation nodes' receptive fields.

    They come from PLS's own :class:`~hpcsoup.soup.pls.LocalPartitionSource`
    (pymetis, seeded; or the given partition vector ``parts``), so they are the same, bit
    for bit, as in a single-process run.
    """
    for pid in range(source.num_parts):
        yield source.part(pid)


def partition_source(graph, partitions: int, halo: int, seed: int = 0,
                     parts: torch.Tensor | None = None, field=None) -> LocalPartitionSource:
    """PLS's own :class:`~hpcsoup.soup.pls.LocalPartitionSource` of ``graph`` (receptive fields
    of ``field``'s model when given), which the stored partitions are cut from."""
    from hpcsoup.soup.evaluate import Evaluator

    evaluator = None if field is None else Evaluator(field, graph)
    return LocalPartitionSource(graph, partitions, halo, seed=seed, cache=False, parts=parts,
                                evaluator=evaluator, keep_partition=True)


def build_score_fields(source: LocalPartitionSource) -> Iterator[Part]:
    """Each partition's scoring field, one :class:`Part` at a time: the receptive field of its
    validation and test nodes (the roots: validation nodes first, then test nodes, each in the
    partition's order) in the model of ``source``'s evaluator, cut from the full graph as
    :func:`~hpcsoup.soup.fields.receptive_field` cuts a field (the same nodes, edges, values and
    first aggregation), with ``val_mask``/``test_mask`` and ``val_pos``/``test_pos`` on the
    roots. A model's logits at the roots are the full graph's (to float rounding), so
    :func:`~hpcsoup.soup.pls.partition_scores` over these fields gives the full graph's scores
    with the memory of one field. Partitions without validation or test nodes get none.

    Size: with most nodes in the test split (ogbn-products: 88 %) a scoring field is about its
    partition plus the in-neighbours of its nodes (``layers - 1`` hops with a precomputed first
    aggregation, else ``layers``), each row holding the features and the first aggregation.
    """
    from hpcsoup.models.gnn import FIRST_AGGREGATION
    from hpcsoup.soup.fields import CSRNeighbours

    evaluator = source.evaluator
    if evaluator is None or evaluator.order is not None:
        raise StoreError("scoring fields are cut from a receptive-field source in the graph's "
                         "own node order")
    spec, data, adj, x = evaluator.spec, source.graph.data, evaluator.adj, evaluator.x
    neighbours = CSRNeighbours.of_adjacency(adj)  # views of the adjacency: no copy
    first = FIRST_AGGREGATION.get(spec.arch)
    # as receptive_field does, but the first aggregation of every node once (N x F): a node
    # lies in many partitions' fields (most nodes are test nodes, METIS cuts many edges); the
    # same row sums as the full forward's
    aggregate = None if not first else (torch.sparse.mm(adj, x, "mean") if first == "mean"
                                        else torch.sparse.mm(adj, x))
    depth = int(spec.layers) - 1 if first else int(spec.layers)
    values = adj.values()
    val_mask, test_mask = source.split_masks["val"], source.split_masks["test"]
    for pid in range(source.num_parts):
        nodes = source.nodes[pid]
        val, test = nodes[val_mask[nodes]], nodes[test_mask[nodes]]
        if not val.numel() + test.numel():
            continue
        roots = torch.cat([val, test])
        subset, edge_index, index = neighbours.field_edges(roots, depth)
        ids = torch.arange(subset.numel())
        is_val = ids < val.numel()
        is_test = (ids >= val.numel()) & (ids < roots.numel())
        none = torch.zeros(0, dtype=torch.long)  # no degrees: the weights carry them
        yield Part(x[subset], edge_index, data.y[subset], none, is_val, source.order["val"][val],
                   is_test, source.order["test"][test], subset, roots.numel(), pid, values[index],
                   torch.zeros(0) if aggregate is None else aggregate[subset])


def write_parts(path: str | Path, parts: Iterable[Part], attrs: dict,
                arrays: dict | None = None, score_fields: Iterable[Part] | None = None) -> Path:
    """Write partitions (and small global ``arrays``) as the store's graph shard set at ``path``;
    ``score_fields``: the partitions' scoring fields (:func:`build_score_fields`) beside them.

    :meth:`~hpcsoup.store.Store.write_graph` publishes it atomically; when another writer
    finished first, its copy is kept and this one discarded (both hold the same graph).
    The set's attrs get each partition's sizes and validation/test counts (every rank reads
    them; no rank reads the others' partitions).
    """
    store, graph_id = Store.locate_graph(path)
    totals: dict = {key: [] for key in ("sizes", "core", "edges", "val_counts", "test_counts",
                                        "val_positives")}
    with store.write_graph(graph_id, attrs, arrays) as writer:
        for part in parts:
            edges = int(part.edge_index.size(1))
            writer.add(part_name(part.pid), part.tensors(), {
                "pid": part.pid, "core_count": part.core_count, "nodes": part.num_nodes,
                "edges": edges})
            for key, value in zip(totals, (part.num_nodes, part.core_count, edges,
                                           int(part.val_mask.sum()), int(part.test_mask.sum()),
                                           int((part.y[part.val_mask] == 1).sum()))):
                totals[key].append(value)
        writer.attrs.update({"partitions": len(totals["sizes"]), **totals})
        if score_fields is not None:
            # per partition: its scoring field's nodes, edges, validation and test roots
            scored = {key: [0] * len(totals["sizes"]) for key in
                      ("score_sizes", "score_edges", "score_val_counts", "score_test_counts")}
            for part in score_fields:
                edges = int(part.edge_index.size(1))
                writer.add(score_part_name(part.pid), part.tensors(), {
                    "pid": part.pid, "core_count": part.core_count, "nodes": part.num_nodes,
                    "edges": edges}, chunk_rows=dict.fromkeys(ROW_ARRAYS, FIRST_LAYER_BLOCK))
                for key, value in zip(scored, (part.num_nodes, edges, int(part.val_mask.sum()),
                                               int(part.test_mask.sum()))):
                    scored[key][part.pid] = value
            writer.attrs.update(scored)
        writer.attrs["score_fields"] = score_fields is not None
    return Path(path)


def is_prepared(path: str | Path) -> bool:
    """Whether a complete partitioned graph of this hpcsoup's format is at ``path``."""
    store, graph_id = Store.locate_graph(path)
    return store.has_group(GRAPHS, graph_id)


def prepare(path: str | Path, graph, partitions: int, halo: int, seed: int = 0,
            builder: Callable[..., Iterable[Part]] | None = None,
            parts: torch.Tensor | None = None, field=None) -> Path:
    """Partition ``graph`` and write it to ``path`` (see :func:`shard_path`) once
    (``field``: receptive fields of the experts' model, see :func:`partition_source`, and the
    partitions' scoring fields, :func:`build_score_fields`).

    Does nothing when a complete partitioned graph is already there. Only one process
    should call this (rank 0 before the others read, or a separate preparation step):
    it needs the whole graph in memory.
    """
    path = Path(path)
    if is_prepared(path):
        return path
    if not 1 <= partitions <= graph.num_nodes:
        raise StoreError(f"cannot cut '{graph.name}' ({graph.num_nodes} nodes) into {partitions} "
                         f"partitions; set soup.pls.partitions in 1..{graph.num_nodes}")
    score_fields = None
    if builder is None:
        source = partition_source(graph, partitions, halo, seed, parts, field)
        parts = build_parts(source)
        if field is not None:  # fields hold no test nodes: the scores come from scoring fields
            score_fields = build_score_fields(source)
    else:
        parts = builder(graph, partitions, halo, seed)
    info = graph.info()
    data = graph.data
    return write_parts(path, parts, score_fields=score_fields, attrs={
        "dataset": graph.name, "halo": halo, "seed": seed, "num_nodes": graph.num_nodes,
        "scope": "partition" if field is None else "field",
        "num_features": graph.num_features, "num_classes": graph.num_classes,
        "metric": graph.metric, "info": info, "versions": provenance()}, arrays={
        "val_labels": data.y[graph.mask("val")], "test_labels": data.y[graph.mask("test")]})


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass
class Shard:
    """The partitions one rank holds (and nothing else of the graph).

    Attributes:
        path: the partitioned graph in the store.
        attrs: its metadata (every partition's sizes and validation/test counts, metric...).
        rank, size: this rank and the number of ranks.
        parts: ``{pid: Part}`` for the partitions this rank owns.
        val_labels, test_labels: the labels of the validation / test nodes in global order
            (small; ROC-AUC needs them beside the gathered scores).
    """

    path: Path
    attrs: dict
    rank: int
    size: int
    parts: dict
    val_labels: torch.Tensor
    test_labels: torch.Tensor

    @property
    def partitions(self) -> int:
        return int(self.attrs["partitions"])

    def owns(self, pid: int) -> bool:
        return pid in self.parts

    def owner(self, pid: int) -> int:
        return owner_of(pid, self.size)

    @property
    def resident_nodes(self) -> int:
        """Node rows this rank holds: its partitions' core and halo nodes (halos may repeat)."""
        return sum(p.num_nodes for p in self.parts.values())

    @property
    def core_nodes(self) -> int:
        return sum(p.core_count for p in self.parts.values())

    @property
    def unique_nodes(self) -> int:
        """Distinct graph nodes this rank holds (core or halo)."""
        if not self.parts:
            return 0
        return int(torch.cat([p.nodes for p in self.parts.values()]).unique().numel())

    @property
    def resident_bytes(self) -> int:
        return sum(p.nbytes() for p in self.parts.values())

    def stats(self) -> dict:
        return {"rank": self.rank, "partitions": sorted(self.parts), "core_nodes": self.core_nodes,
                "resident_nodes": self.resident_nodes, "unique_nodes": self.unique_nodes,
                "resident_bytes": self.resident_bytes, "graph_nodes": int(self.attrs["num_nodes"])}


def _read_part(store: Store, graph_id: str, pid: int, scoring: bool = False) -> Part:
    """Partition ``pid`` of the stored set ``graph_id`` (its arrays alone); ``scoring``: its
    scoring field (:func:`build_score_fields`) instead, whose features and first aggregation
    stay in the store as :class:`~hpcsoup.store.zarr_store.RowReader` s when it has one (the
    forward reads them a block of rows at a time: :meth:`hpcsoup.models.gnn.GNN.forward`)."""
    name = score_part_name(pid) if scoring else part_name(pid)
    rows = ROW_ARRAYS if scoring else ()
    try:
        t, attrs = store.read_graph_arrays(graph_id, [a for a in ARRAYS if a not in rows], name)
        if rows:
            t.update(store.read_graph_rows(graph_id, name, rows))
    except StoreNotFoundError:
        what = f"the scoring field of partition {pid}" if scoring else f"partition {pid}"
        raise StoreNotFoundError(f"{what} is missing from the partitioned graph "
                                 f"'{store.graph_path(graph_id)}'; "
                                 f"{store.repair_hint(f'{GRAPHS}/{graph_id}')}") from None
    if rows and t["aggregate"].size(0) == 0:  # no first aggregation (GAT): a forward needs all
        t.update({name: t[name][:] for name in rows})
    return Part(t["x"], t["edge_index"].long(), t["y"].long(), t["deg"], t["val_mask"].bool(),
                t["val_pos"].long(), t["test_mask"].bool(), t["test_pos"].long(),
                t["nodes"].long(), int(attrs["core_count"]), pid, t["weight"], t["aggregate"])


def has_score_fields(attrs: dict) -> bool:
    """Whether a stored set (its attrs) holds scoring fields (sets of an earlier hpcsoup do not)."""
    return bool(attrs.get("score_fields", False))


def read_score_field(path: str | Path, pid: int) -> Part:
    """Partition ``pid``'s scoring field from the stored set at ``path`` (that one alone)."""
    store, graph_id = Store.locate_graph(path)
    return _read_part(store, graph_id, pid, scoring=True)


def open_parts(path: str | Path) -> dict:
    """The metadata of a partitioned graph; :class:`StoreNotFoundError` when it is not there,
    :class:`StoreError` when it is incomplete or of another format."""
    store, graph_id = Store.locate_graph(path)
    return store.graph_attrs(graph_id)


def load_shard(path: str | Path, rank: int, size: int) -> Shard:
    """Read the partitions of ``rank`` (of ``size`` ranks) from the store: only those."""
    path = Path(path)
    store, graph_id = Store.locate_graph(path)
    attrs = store.graph_attrs(graph_id)
    labels = store.read_graph_arrays(graph_id, LABELS)[0]
    mine = owned_partitions(int(attrs["partitions"]), rank, size)
    return Shard(path, attrs, rank, size, {pid: _read_part(store, graph_id, pid) for pid in mine},
                 labels["val_labels"].long(), labels["test_labels"].long())

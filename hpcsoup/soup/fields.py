"""Receptive fields: the part of a graph that some nodes' logits depend on.

An :math:`L`-layer message-passing GNN's logits at a set of root nodes :math:`S_0`
depend only on the nodes :math:`S_l` within :math:`l \\le L` hops *into* them, and of
the edges only on those into :math:`S_{L-1}` (the nodes whose layer outputs are
aggregated). Every souping method needs the **validation** nodes' logits alone, which
on a large graph are a small part of it (ogbn-products: 1.6 % of the nodes):

- the full validation set (:meth:`hpcsoup.soup.evaluate.Evaluator.val_logits`: GIS's and
  greedy's evaluations, LS's steps);
- one METIS partition's validation nodes (PLS with ``scope = "field"``,
  :mod:`hpcsoup.soup.pls`): the partition's exact loss, at a fraction of a full forward.

The first layer's aggregation :math:`A X` is a fixed linear map of the input features for
GCN, SAGE and GIN (:data:`hpcsoup.models.gnn.FIRST_AGGREGATION`), so it is computed once,
for the field's nodes, and the model then starts from it (:class:`~hpcsoup.models.gnn.Precomputed`):
the field shrinks by a hop, which on a graph of degree 50 is most of it (200k nodes, one
partition's 125 validation nodes: 2.3k nodes within one hop, 60k within two). Exact, not
sampled: the logits equal the full graph's to float rounding (tested).
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import torch

from hpcsoup.models.rows import GatheredRows


def is_sorted(index: torch.Tensor) -> bool:
    return index.numel() < 2 or bool((index[1:] >= index[:-1]).all())


def csr_order(source: torch.Tensor, target: torch.Tensor,
              undirected: bool) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(rows, cols)``: the edges ``source -> target`` already in the row order of the CSR of
    :math:`A^T` (rows = targets), without a sort or a copy; ``None`` when they are not. The targets
    when they are sorted, else, for a symmetric graph (``undirected``: the caller guarantees it),
    the sources: the CSR of :math:`A^T` is then the CSR of :math:`A`."""
    if is_sorted(target):
        return target, source
    if undirected and is_sorted(source):
        return source, target
    return None


class CSRNeighbours:
    """Neighbour lists in compressed rows: node ``i``'s are ``col[ptr[i]:ptr[i+1]]`` (no copy).

    :meth:`of_edge_index` reads a row-sorted ``edge_index`` (datasets here are coalesced,
    sorted by source: an undirected graph's neighbours); :meth:`of_adjacency` reads a
    sparse CSR adjacency whose rows are targets (in-neighbours, any graph). Extracting a
    subgraph then costs O(its edges), not O(E).
    """

    def __init__(self, ptr: torch.Tensor, col: torch.Tensor):
        self.ptr, self.col = ptr, col
        self.num_nodes = ptr.numel() - 1

    @functools.cached_property
    def _local(self) -> torch.Tensor:
        """The local id of each node in the subgraph being built (-1: not in it); reset after
        use. Made on first use: reading rows (:meth:`entries`) needs none."""
        return torch.full((self.num_nodes,), -1, dtype=torch.long, device=self.col.device)

    @classmethod
    def of_edge_index(cls, edge_index: torch.Tensor, num_nodes: int) -> "CSRNeighbours":
        """Out-neighbours of ``edge_index`` (sorted once, a copy, when it is not row-sorted)."""
        row = edge_index[0]
        if not is_sorted(row):
            order = torch.argsort(row, stable=True)
            edge_index = edge_index[:, order]
            row = edge_index[0]
        ptr = torch.zeros(num_nodes + 1, dtype=torch.long, device=row.device)
        torch.cumsum(torch.bincount(row, minlength=num_nodes), 0, out=ptr[1:])
        return cls(ptr, edge_index[1])

    @classmethod
    def of_adjacency(cls, adj: torch.Tensor) -> "CSRNeighbours":
        """In-neighbours of a CSR adjacency with rows = targets (as the evaluator builds it)."""
        return cls(adj.crow_indices(), adj.col_indices())

    def entries(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(owner, index)``: each entry of the rows ``nodes``, as its row's position in
        ``nodes`` and its index into ``col`` (and into a CSR tensor's values)."""
        start = self.ptr[nodes]
        count = self.ptr[nodes + 1] - start
        owner = torch.repeat_interleave(torch.arange(nodes.numel(), device=nodes.device), count)
        offset = torch.repeat_interleave(start - (torch.cumsum(count, 0) - count), count)
        return owner, offset + torch.arange(owner.numel(), device=nodes.device)

    def gather(self, nodes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(owner, neighbour)``: for each edge of ``nodes``, its position in ``nodes`` and its
        other end."""
        owner, index = self.entries(nodes)
        return owner, self.col[index]

    def hops(self, roots: torch.Tensor, hops: int) -> tuple[torch.Tensor, list[int]]:
        """``(subset, sizes)``: ``roots`` then each hop's new nodes (by id); ``sizes[l]`` is the
        number of nodes within ``l`` hops. Leaves :attr:`_local` set on ``subset`` (the
        caller resets it)."""
        local = self._local
        subset, frontier, sizes = roots, roots, [roots.numel()]
        local[roots] = torch.arange(roots.numel(), device=roots.device)
        for _ in range(hops):
            _, neighbours = self.gather(frontier)
            new = torch.unique(neighbours[local[neighbours] < 0])
            local[new] = torch.arange(subset.numel(), subset.numel() + new.numel(),
                                      device=new.device)
            subset, frontier = torch.cat([subset, new]), new
            sizes.append(subset.numel())
        return subset, sizes

    def field_edges(self, roots: torch.Tensor,
                    depth: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(subset, local_edge_index, index)``: ``roots`` and the nodes within ``depth`` hops
        into them, and the in-edges of the nodes within ``depth - 1`` hops (the nodes whose
        outputs a later layer aggregates) as local ``source -> target`` pairs, with their
        indices into ``col`` (and a CSR tensor's values)."""
        subset = roots
        try:
            subset, sizes = self.hops(roots, depth)
            owner, index = self.entries(subset[:sizes[depth - 1]] if depth else subset[:0])
            edge_index = torch.stack([self._local[self.col[index]], owner])
        finally:
            self._local[subset] = -1
        return subset, edge_index, index

    def subgraph(self, core: torch.Tensor, hops: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        """``(subset, local_edge_index, core_count)``: ``core`` plus ``hops`` hops of halo
        (core nodes first, then each hop's new nodes by id) and the edges among them."""
        subset = core
        try:
            subset, _ = self.hops(core, hops)
            owner, neighbours = self.gather(subset)
            target = self._local[neighbours]
            keep = target >= 0
            edge_index = torch.stack([owner[keep], target[keep]])
        finally:
            self._local[subset] = -1
        return subset, edge_index, core.numel()


@dataclasses.dataclass
class Field:
    """The receptive field of ``roots`` root nodes, as a model's forward takes it.

    Attributes:
        nodes: ``[n]`` the field's node ids in the adjacency it was cut from, roots first.
        x: ``[n, F]`` their input features.
        edge_index: ``[2, e]`` local ``source -> target`` edges: every in-edge of the nodes
            whose layer outputs the roots' logits use, nothing else.
        weight: ``[e]`` the adjacency's values on those edges (GCN's normalisation).
        aggregate: ``[n, F]`` the first layer's aggregation at the field's nodes, or ``None``
            (the first layer aggregates over ``edge_index`` itself: GAT).
        roots: how many of ``nodes`` are roots.
    """

    nodes: torch.Tensor
    x: torch.Tensor
    edge_index: torch.Tensor
    weight: torch.Tensor
    aggregate: torch.Tensor | None
    roots: int


def receptive_field(adj: torch.Tensor, x: torch.Tensor, roots: torch.Tensor, layers: int,
                    first: str | None, neighbours: CSRNeighbours | None = None) -> Field:
    """The field of ``roots`` for a ``layers``-layer model, cut from a full adjacency.

    Args:
        adj: the graph's sparse CSR adjacency, rows = targets, values = what the layers
            multiply by (:func:`hpcsoup.soup.evaluate.build_adjacency`).
        x: ``[N, F]`` the graph's features (in ``adj``'s node order).
        roots: node ids (in ``adj``'s order) whose logits are wanted.
        layers: the model's depth.
        first: the first layer's aggregation (``"sum"`` / ``"mean"``, from
            :data:`hpcsoup.models.gnn.FIRST_AGGREGATION`) to precompute, or ``None``.
        neighbours: ``CSRNeighbours.of_adjacency(adj)`` when the caller keeps one.
    """
    neighbours = neighbours or CSRNeighbours.of_adjacency(adj)
    # with the first aggregation precomputed the model computes layer outputs within
    # layers - 1 hops; the aggregation itself reads one hop further, from the full graph
    depth = layers - 1 if first else layers
    subset, edge_index, index = neighbours.field_edges(roots, depth)
    values = adj.values()
    aggregate = None
    if first:
        # the rows of the field's nodes, global columns: the same sums as the full forward's
        _, rows = neighbours.entries(subset)
        crow = torch.zeros(subset.numel() + 1, dtype=torch.long, device=subset.device)
        torch.cumsum(neighbours.ptr[subset + 1] - neighbours.ptr[subset], 0, out=crow[1:])
        block = _csr(crow, neighbours.col[rows], values[rows], (subset.numel(), adj.size(1)))
        aggregate = torch.sparse.mm(block, x, "mean") if first == "mean" else torch.sparse.mm(block, x)
    return Field(subset, x.index_select(0, subset), edge_index, values[index], aggregate,
                 roots.numel())


@dataclasses.dataclass
class FieldCut:
    """Where the field of some of a field's roots lies in it: the rows ``subset``, the local
    ``edge_index`` and the ``index`` of those edges' entries in the field's adjacency;
    ``roots`` roots. Index tensors only, kept as int32 (PLS keeps its partitions' cuts and
    gathers their features afresh each step: 15 MB for the 32 partitions at 1M nodes)."""

    subset: torch.Tensor
    edge_index: torch.Tensor
    index: torch.Tensor
    roots: int


def cut_field(field: Field, adj: torch.Tensor, roots: torch.Tensor, layers: int,
              neighbours: CSRNeighbours | None = None) -> FieldCut:
    """The :class:`FieldCut` of ``field``'s roots at positions ``roots`` (see :func:`sub_field`)."""
    depth = layers - 1 if field.aggregate is not None else layers
    neighbours = neighbours or CSRNeighbours.of_adjacency(adj)
    subset, edge_index, index = neighbours.field_edges(roots, depth)
    small = torch.int32 if max(field.nodes.numel(), adj.values().numel()) < 2 ** 31 else torch.long
    return FieldCut(subset.to(small), edge_index.to(small), index.to(small), roots.numel())


def take_field(field: Field, adj: torch.Tensor, cut: FieldCut, lazy: bool = False) -> Field:
    """The sub-field at ``cut``: gathers of ``field``'s rows and ``adj``'s values. ``lazy``: a
    field with a precomputed first aggregation gets its features and aggregation as
    :class:`~hpcsoup.models.rows.GatheredRows`, read a block at a time by the forward and again
    by the backward (a PLS step's piece: 800 bytes a node not held through its backward)."""
    # index_select, not x[subset]: a row gather ten times faster on CPU (2.4 of a PLS step's
    # 8 ms per partition at 200k nodes went to two [5k, 100] gathers)
    if lazy and field.aggregate is not None:
        x, aggregate = GatheredRows(field.x, cut.subset), GatheredRows(field.aggregate, cut.subset)
    else:
        x = field.x.index_select(0, cut.subset)
        aggregate = None if field.aggregate is None else field.aggregate.index_select(0, cut.subset)
    return Field(field.nodes.index_select(0, cut.subset), x, cut.edge_index.long(),
                 adj.values().index_select(0, cut.index), aggregate, cut.roots)


def sub_field(field: Field, adj: torch.Tensor, roots: torch.Tensor, layers: int,
              neighbours: CSRNeighbours | None = None) -> Field:
    """The field of some of ``field``'s roots (positions ``roots`` among them), cut from it.

    ``adj`` is :func:`field_adjacency` of ``field`` (``neighbours``: its
    :class:`CSRNeighbours` when the caller keeps one). A field holds every in-edge of the nodes
    within ``depth - 1`` hops of all its roots, so the hops from any of them stay inside it:
    the cut is exact, and costs gathers only (no aggregation is recomputed). PLS cuts each
    partition's field from the validation field this way, in one process and when it
    prepares the shards of distributed ranks alike (so both hold the same tensors).
    """
    return take_field(field, adj, cut_field(field, adj, roots, layers, neighbours))


def field_adjacency(field_edge_index: torch.Tensor, weight: torch.Tensor,
                    num_nodes: int) -> torch.Tensor:
    """The CSR adjacency (rows = targets) of a field's edges with their stored values."""
    target, source = field_edge_index[1], field_edge_index[0]
    order = torch.argsort(target, stable=True)  # a field lists its edges by target already
    crow = torch.zeros(num_nodes + 1, dtype=torch.long, device=target.device)
    torch.cumsum(torch.bincount(target, minlength=num_nodes), 0, out=crow[1:])
    return _csr(crow, source[order], weight[order], (num_nodes, num_nodes))


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what PyG uses
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=size)

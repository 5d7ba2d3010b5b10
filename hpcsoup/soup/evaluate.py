"""The one forward every souping method uses: a template model run by ``functional_call``.

``Evaluator(spec, graph)`` builds one template :class:`~hpcsoup.models.GNN`
and runs it with any set of weights,

.. code-block:: python

    logits = torch.func.functional_call(template, params, (x, adj))

so the experts' tensors (and a soup's) never become module parameters and never
get gradients; LS and PLS differentiate through ``params`` alone.

The graph is given to the layers as a sparse CSR adjacency ``adj_t`` (row =
target node) built once here, instead of an ``edge_index``: PyG's layers then
aggregate with one sparse-dense product instead of materialising a message per
edge. Measured here (1 thread, 50k nodes, degree 50, SAGE 2x128): forward 4.7 s
-> 0.51 s, peak memory of a forward+backward 1.56 GiB -> 0.36 GiB; GCN 6.6 s ->
0.43 s. GCN's normalisation ``D^-1/2 (A+I) D^-1/2`` is computed once into the
CSR values (the layers' own ``normalize`` is switched off). The outputs equal
the plain PyG model's on ``edge_index`` to float rounding (tested). Every method
(uniform, greedy, GIS, LS, PLS) goes through this same machinery, so no method
is slowed down relative to another.

Optionally (``order``) the full graph is held with its nodes renumbered so that
each METIS partition is contiguous (:func:`locality_order`): neighbours then
sit close in memory and a full-graph forward runs 1.75x faster on CPU
(measured: 200k nodes, degree 50, SAGE 2x64, 2.1 s -> 1.2 s). PLS gets this
locality by construction (it runs one partition at a time), so the full-graph
methods get it too. Logits always come back in the graph's own node order.

Two exact savings for what the souping methods ask most often:

- **the backward of the aggregation** (:class:`Aggregate`): torch's backward of a
  CSR product ``A @ X`` rebuilds :math:`A^T` (a sort of every edge) on every call;
  here :math:`A^T` is built once per adjacency and kept, so a learned-souping step
  costs a forward and a backward instead of a forward, a backward and a sort
  (Tolokers, 1M edges: 99 -> 33 ms per LS step; forwards are unchanged);
- **the receptive field of the validation nodes** (:meth:`Evaluator.val_logits`,
  :mod:`hpcsoup.soup.fields`): an ``L``-layer message-passing GNN's logits on the
  validation nodes depend only on their in-neighbourhood, and for GCN, SAGE and GIN the
  first layer's aggregation :math:`A X` does not depend on the weights, so it is computed
  once; validation losses, gradients and scores are computed on that field, by every
  method (GIS's and greedy's evaluations as well as LS's steps). Measured at 200k nodes,
  degree 50, 2% validation nodes, SAGE 2x64, 1 thread: the field has 82k of the 200k nodes,
  and a validation evaluation costs 0.11 s instead of a full-graph forward's 1.5 s (the
  field is built once, in 1.0 s). GAT (no fixed first aggregation) uses the field
  when it is smaller than the graph by a useful margin (:data:`FIELD_FRACTION`).
"""
from __future__ import annotations

import types
import warnings

import torch
from torch.func import functional_call
from torch_geometric.nn import GCNConv, GINConv, SAGEConv
from torch_geometric.utils import add_remaining_self_loops, degree, to_torch_csr_tensor

from hpcsoup.data import Graph
from hpcsoup.data.metrics import score as metric_score
from hpcsoup.errors import SoupError
from hpcsoup.models import ModelSpec, build_model
from hpcsoup.models.aggregate import Aggregate
from hpcsoup.models.gnn import FIRST_AGGREGATION, Precomputed
from hpcsoup.soup.fields import (CSRNeighbours, csr_order, cut_field, field_adjacency, is_sorted,
                                 receptive_field, take_field)

#: without a precomputed first aggregation (GAT) the receptive field is used when it has at
#: most this fraction of the graph's nodes or edges (above it, a copy of most of the graph buys
#: little)
FIELD_FRACTION = 0.9


def build_adjacency(arch: str, edge_index: torch.Tensor, num_nodes: int,
                    deg: torch.Tensor | None = None, undirected: bool = False) -> torch.Tensor:
    """Sparse CSR ``adj_t`` (rows = targets) of ``edge_index`` for layers of ``arch``.

    For ``gcn`` the values are :math:`\\hat d_i^{-1/2} \\hat d_j^{-1/2}` with
    :math:`\\hat d = d + 1` the degree with a self-loop (exactly PyG's ``gcn_norm``
    with ``add_remaining_self_loops``). ``deg`` gives each node's degree in the
    *full* graph when ``edge_index`` is a subgraph: a partition then keeps the
    full graph's normalisation, so with a halo of ``layers`` hops its core
    nodes' predictions are exact. Other architectures get unit values.

    ``undirected``: the caller guarantees that ``edge_index`` is symmetric (every hpcsoup
    :class:`~hpcsoup.data.Graph` is, and so is any induced subgraph of one). Then an edge list
    sorted by source, as datasets store theirs, is already the CSR of :math:`A^\\top = A`
    (:func:`sorted_csr`): no sort, no copy of the edges. PyG's conversion sorts a flipped
    copy: at 2.45M nodes (122.7M edges) it was the peak of a GCN expert's training (12.1 GiB).
    """
    if deg is None and (undirected or is_sorted(edge_index[1])):
        adj = sorted_csr(arch, edge_index, num_nodes, undirected)
        if adj is not None:
            return adj
    device = edge_index.device
    if arch == "gcn":
        loops = add_remaining_self_loops(edge_index, num_nodes=num_nodes)[0]
        if deg is None:
            dhat = degree(loops[1], num_nodes, dtype=torch.float)
        else:
            has_loop = torch.zeros(num_nodes, dtype=torch.bool, device=device)
            has_loop[edge_index[0][edge_index[0] == edge_index[1]]] = True
            dhat = deg.to(device=device, dtype=torch.float) + (~has_loop).float()
        norm = dhat.pow(-0.5)
        norm[torch.isinf(norm)] = 0
        values = norm[loops[0]] * norm[loops[1]]
        edge_index = loops
    else:
        values = None
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what PyG uses
        warnings.simplefilter("ignore", UserWarning)
        return to_torch_csr_tensor(edge_index.flip(0), values, size=(num_nodes, num_nodes))


#: edges a :func:`sorted_csr` pass handles at a time: its temporaries are a few of these, never
#: one per edge of the graph
CSR_CHUNK = 1 << 22


def sorted_csr(arch: str, edge_index: torch.Tensor, num_nodes: int,
               undirected: bool) -> torch.Tensor | None:
    """:func:`build_adjacency` of an edge list already in CSR order, or ``None`` when it is not.

    Rows as :func:`~hpcsoup.soup.fields.csr_order` finds them; each row's columns must ascend
    without duplicates (a coalesced edge list), so the CSR is the one PyG's sort builds, bit for
    bit. GCN's self-loops are inserted at their sorted place in each row:
    an edge :math:`e` of row :math:`r` moves to :math:`e + r + [c_e > r]` (the loops of the rows
    before it, and its own row's when that sorts first); a graph with a self-loop of its own
    takes the general path. Every pass runs :data:`CSR_CHUNK` edges at a time.
    """
    order = csr_order(edge_index[0], edge_index[1], undirected)
    if order is None:
        return None
    rows, cols = order
    n, edges, device = int(num_nodes), cols.numel(), edge_index.device
    below = torch.zeros(n, dtype=torch.long, device=device)  # per row: columns below its own id
    merged = torch.empty(edges + n, dtype=cols.dtype, device=device) if arch == "gcn" else None
    last = -1
    for start in range(0, edges, CSR_CHUNK):
        r, c = rows[start:start + CSR_CHUNK], cols[start:start + CSR_CHUNK]
        key = r * n + c  # ascends exactly when each row's columns ascend, without duplicates
        if bool((c == r).any()) or int(key[0]) <= last or not bool((key[1:] > key[:-1]).all()):
            return None
        last = int(key[-1])
        if merged is not None:
            less = c < r
            below += torch.bincount(r[less], minlength=n)
            at = torch.arange(start, start + r.numel(), device=device) + r + (~less)
            merged[at] = c
    counts = torch.bincount(rows, minlength=n)
    crow = torch.zeros(n + 1, dtype=torch.long, device=device)
    torch.cumsum(counts, 0, out=crow[1:])
    if merged is None:
        values = torch.ones(edges, device=device)
    else:
        nodes = torch.arange(n, device=device)
        merged[crow[:-1] + nodes + below] = nodes
        cols, crow = merged, crow + torch.arange(n + 1, device=device)
        norm = (counts + 1).float().pow(-0.5)  # the degree with its self-loop
        # norm[source] * norm[target], as gcn_norm multiplies them
        values = norm.index_select(0, cols).mul_(norm.repeat_interleave(counts + 1))
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what PyG uses
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, cols, values, size=(n, n))


def permuted_csr(adj: torch.Tensor, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """The CSR ``adj`` with its nodes renumbered: new node ``i`` is old node ``order[i]``
    (``inverse`` the new number of each old node), each row's columns ascending.

    The same matrix, bit for bit, as :func:`build_adjacency` of the renumbered edge list (whose
    conversion sorts it), built a chunk of :data:`CSR_CHUNK` entries at a time: rows move
    whole, and only a chunk's entries are sorted (by row, then column) at once. At 1M nodes the
    sort of the whole renumbered list was a soup process's peak (5.3 GiB; a forward 4.6).
    """
    crow, col, values = adj.crow_indices(), adj.col_indices(), adj.values()
    n = crow.numel() - 1
    counts = (crow[1:] - crow[:-1]).index_select(0, order)
    new_crow = torch.zeros(n + 1, dtype=crow.dtype, device=crow.device)
    torch.cumsum(counts, 0, out=new_crow[1:])
    new_col, new_values = torch.empty_like(col), torch.empty_like(values)
    old = CSRNeighbours(crow, col)
    start = 0
    while start < n:  # rows [start, stop) hold about CSR_CHUNK entries (at least one row)
        stop = int(torch.searchsorted(new_crow, new_crow[start] + CSR_CHUNK, right=True)) - 1
        stop = min(max(stop, start + 1), n)
        owner, index = old.entries(order[start:stop])
        columns = inverse.index_select(0, col.index_select(0, index))
        sort = torch.sort(owner * n + columns).indices  # by row, then column
        lo, hi = int(new_crow[start]), int(new_crow[stop])
        new_col[lo:hi] = columns.index_select(0, sort)
        new_values[lo:hi] = values.index_select(0, index.index_select(0, sort))
        start = stop
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what PyG uses
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(new_crow, new_col, new_values, size=(n, n))


def make_template(spec: ModelSpec, device: str | torch.device = "cpu") -> torch.nn.Module:
    """A frozen GNN of ``spec`` in eval mode whose weights ``functional_call`` replaces."""
    model = build_model(spec, seed=0).to(device).eval()
    for module in model.modules():
        if isinstance(module, GCNConv):
            module.normalize = False  # the adjacency carries the normalisation
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _aggregate(conv, adj_t, x):
    """``message_and_aggregate`` of a sum/mean convolution through :class:`Aggregate`."""
    if not (isinstance(adj_t, torch.Tensor) and adj_t.layout == torch.sparse_csr):
        return type(conv).message_and_aggregate(conv, adj_t, x)
    source = x[0] if isinstance(x, tuple) else x
    return Aggregate.apply(adj_t, source, "mean" if conv.aggr == "mean" else "sum")


def keep_transposes(template: torch.nn.Module) -> torch.nn.Module:
    """Route the sum/mean aggregations of ``template`` (GCN, SAGE, GIN) through
    :class:`Aggregate`; GAT (attention per edge) is left as it is."""
    for module in template.modules():
        if isinstance(module, (GCNConv, SAGEConv, GINConv)) and module.aggr in ("add", "sum", "mean"):
            module.message_and_aggregate = types.MethodType(_aggregate, module)
    return template


def locality_order(parts: torch.Tensor) -> torch.Tensor:
    """Nodes sorted by partition id (stable): ``order[i]`` is the node stored at position ``i``."""
    return torch.argsort(parts, stable=True)


class Evaluator:
    """Inference of any state_dict of ``spec`` on a graph or its partitions (the shared machinery).

    Args:
        spec: model spec of the experts and their soups.
        graph: the dataset (its masks and metric define the scores), or ``None`` on an
            MPI rank that holds partitions only (then give ``metric``; :meth:`forward`
            needs explicit ``x``/``adj``).
        device: where the forwards run (default: ``"cpu"``).
        order: optional node permutation to store the graph in (e.g.
            :func:`locality_order` of a METIS partition); results do not depend on it.
        metric: the dataset's metric when there is no ``graph``.
        receptive_field: compute validation logits on the validation nodes' ``layers``-hop
            receptive field (:meth:`val_logits`; default ``True``; exact either way).

    ``evaluations`` counts inference evaluations made through :meth:`logits` and
    :meth:`evaluate` (the unit of GIS's cost model).
    """

    def __init__(self, spec: ModelSpec, graph: Graph | None, device: str | torch.device = "cpu",
                 order: torch.Tensor | None = None, metric: str | None = None,
                 receptive_field: bool = True):
        self.spec, self.graph, self.device = spec, graph, torch.device(device)
        self.template = keep_transposes(make_template(spec, self.device))
        self.evaluations = 0
        self.receptive_field = receptive_field
        self._field: tuple | None = None
        self._val_field: tuple | None = None
        self.order = None if order is None else order.long().to(self.device)
        self._part_adjacency: dict[tuple, torch.Tensor] = {}
        self._metric = metric if graph is None else graph.metric
        if graph is None:
            self.adj = self.x = self.inverse = self.y = None
            self.masks = {}
            return
        data = graph.data
        self.y = data.y.to(self.device)
        self.masks = {s: graph.mask(s).to(self.device) for s in ("train", "val", "test")}
        # a Graph's edges are symmetric: its sorted list is read as the CSR without a sort
        adj = build_adjacency(spec.arch, data.edge_index.to(self.device), data.num_nodes,
                              undirected=True)
        if order is None:
            self.x, self.inverse, self.adj = data.x.to(self.device), None, adj
        else:
            order = order.long()
            if order.numel() != data.num_nodes:
                raise SoupError(f"evaluator order has {order.numel()} entries for "
                                f"{data.num_nodes} nodes of '{graph.name}'")
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(order.numel())
            self.x = data.x[order].to(self.device)
            self.inverse = inverse.to(self.device)  # position of each node in the stored order
            self.adj = permuted_csr(adj, self.order, self.inverse)
            del adj

    @property
    def metric(self) -> str:
        return self._metric

    def part_adjacency(self, part, keep: bool = False):
        """The graph input :meth:`forward` expects for a PLS partition (a
        :class:`~hpcsoup.soup.pls.Part`): a receptive field's stored adjacency (with its
        precomputed first aggregation), or a partition's subgraph with the full graph's
        degrees; ``keep`` holds it for the next call (when the partition itself is held in
        memory anyway, rebuilding it every step would only cost time)."""
        # the id with the subgraph's size: one evaluator may see several partitionings (halos)
        key = (part.pid, part.num_nodes, int(part.edge_index.size(1)))
        if key in self._part_adjacency:
            return self._part_adjacency[key]
        if part.is_field:
            adj = self.field_input(part.edge_index, part.weight, part.num_nodes,
                                   part.aggregate if part.aggregate.numel() else None,
                                   part.core_count)
        else:
            deg = part.deg.to(self.device) if part.deg.numel() else None
            adj = build_adjacency(self.spec.arch, part.edge_index.to(self.device), part.num_nodes,
                                  deg)
        if keep:
            self._part_adjacency[key] = adj
        return adj

    def field_input(self, edge_index: torch.Tensor, weight: torch.Tensor, num_nodes: int,
                    aggregate: torch.Tensor | None, roots: int | None = None):
        """The graph input of a receptive field (:class:`~hpcsoup.soup.fields.Field`'s tensors);
        with a precomputed first aggregation and ``roots``, the forward returns the logits of the
        first ``roots`` nodes only (:class:`~hpcsoup.models.gnn.Precomputed`)."""
        adj = field_adjacency(edge_index.to(self.device), weight.to(self.device), num_nodes)
        return adj if aggregate is None else Precomputed(aggregate.to(self.device), adj, roots)

    def forward(self, params: dict[str, torch.Tensor], x: torch.Tensor | None = None,
                adj: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the model with weights ``params`` (differentiable in ``params``).

        Without ``x``/``adj``: the full graph, logits in the graph's node order.
        """
        if x is not None or adj is not None:
            return functional_call(self.template, params, (x, adj))
        if self.graph is None:
            raise SoupError("this evaluator holds partitions only (an MPI rank): give x and adj")
        out = functional_call(self.template, params, (self.x, self.adj))
        return out if self.inverse is None else out.index_select(0, self.inverse)

    @torch.no_grad()
    def logits(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Full-graph inference logits; counts one evaluation."""
        self.evaluations += 1
        return self.forward(params)

    def score(self, logits: torch.Tensor, split: str = "val") -> float:
        """The dataset's score of full-graph ``logits`` on ``split``."""
        return self.graph.score(logits, self.masks[split])

    def validation_field(self) -> tuple:
        """``(field, adj)``: the receptive field of every validation node
        (:class:`~hpcsoup.soup.fields.Field`, roots in the order of ``masks["val"]``; the first
        aggregation precomputed for GCN, SAGE and GIN) and its adjacency. Built once."""
        if self._val_field is None:
            val = self.masks["val"].nonzero().view(-1)
            roots = val if self.inverse is None else self.inverse[val]
            field = receptive_field(self.adj, self.x, roots, int(self.spec.layers),
                                    FIRST_AGGREGATION.get(self.spec.arch))
            adj = field_adjacency(field.edge_index, field.weight, field.nodes.numel())
            self._val_field, self._val_neighbours = (field, adj), CSRNeighbours.of_adjacency(adj)
        return self._val_field

    def field_of(self, positions: torch.Tensor, cut=None, lazy: bool = False):
        """The :class:`~hpcsoup.soup.fields.Field` of some validation nodes (``positions`` in
        the order of ``masks["val"]``), cut from :meth:`validation_field`; its ``nodes`` are
        global ids. ``cut``: their :meth:`field_cut`, when the caller kept it; ``lazy``: rows
        gathered when read (:func:`~hpcsoup.soup.fields.take_field`)."""
        field, adj = self.validation_field()
        part = take_field(field, adj, cut if cut is not None else self.field_cut(positions), lazy)
        if self.order is not None:
            part.nodes = self.order.index_select(0, part.nodes)
        return part

    def field_cut(self, positions: torch.Tensor):
        """Where the field of validation nodes ``positions`` lies in :meth:`validation_field`
        (:class:`~hpcsoup.soup.fields.FieldCut`: index tensors, cheap to keep)."""
        field, adj = self.validation_field()
        return cut_field(field, adj, positions.to(self.device), int(self.spec.layers),
                         self._val_neighbours)

    def field(self) -> tuple | None:
        """``(x, graph_input, count)`` of the validation nodes' receptive field for
        :meth:`val_logits` (they are its first ``count`` nodes), or ``None`` (switched off,
        depth unknown, or, without a precomputed first aggregation, nearly the whole graph)."""
        depth = getattr(self.spec, "layers", None)
        if not self.receptive_field or self.graph is None or depth is None:
            return None
        if self._field is None:
            field, adj = self.validation_field()
            if field.aggregate is None and field.nodes.numel() > FIELD_FRACTION * self.x.size(0) \
                    and field.edge_index.size(1) > FIELD_FRACTION * self.adj.values().numel():
                self._field = ()
            else:
                graph_input = (adj if field.aggregate is None
                               else Precomputed(field.aggregate, adj, field.roots))
                self._field = (field.x, graph_input, field.roots)
        return self._field or None

    def val_logits(self, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Logits of the validation nodes (in the order of ``masks["val"]``), differentiable
        in ``params``: on the receptive field (:meth:`field`) when there is one."""
        field = self.field()
        if field is None:
            return self.forward(params)[self.masks["val"]]
        x, graph_input, count = field
        return self.forward(params, x, graph_input)[:count]

    def score_val(self, val_logits: torch.Tensor) -> float:
        """The dataset's validation score of :meth:`val_logits`' output."""
        return metric_score(self.metric, val_logits, self.y[self.masks["val"]])

    def evaluate(self, params: dict[str, torch.Tensor], split: str = "val") -> float:
        """The score of ``params`` on ``split``; counts one evaluation."""
        if split != "val":
            return self.score(self.logits(params), split)
        self.evaluations += 1
        with torch.no_grad():
            return self.score_val(self.val_logits(params))

    def metrics(self, params: dict[str, torch.Tensor]) -> dict:
        """``{"metric", "val", "test"}`` of ``params`` from one forward."""
        logits = self.logits(params)
        return {"metric": self.metric, "val": self.score(logits, "val"),
                "test": self.score(logits, "test")}

"""GNN experts: GCN, GraphSAGE (mean), GAT and GIN built from PyG layers.

Every architecture is the same stack: for each layer ``l``

.. math::
    H^{(l+1)} = \\sigma\\big(\\mathrm{conv}_l(\\mathrm{dropout}(H^{(l)}), A)\\big)

with :math:`\\sigma` = ReLU on hidden layers and the identity on the last,
which outputs class logits. The convolutions:

- ``gcn``: ``GCNConv`` (Kipf & Welling, ICLR 2017), :math:`\\hat D^{-1/2}(A+I)\\hat D^{-1/2} H W`;
- ``sage``: ``SAGEConv`` mean (Hamilton et al., NeurIPS 2017), :math:`H W_s + (D^{-1}A H) W_n`;
- ``gat``: ``GATConv`` (Veličković et al., ICLR 2018), ``heads`` concatenated heads of width
  ``hidden // heads`` on hidden layers, one head on the output layer;
- ``gin``: ``GINConv`` with a learnable eps (Xu et al., ICLR 2019),
  :math:`\\mathrm{MLP}((1+\\epsilon)H + A H)`, a two-layer MLP per layer; with
  ``norm="batch"`` the MLP is ``Linear -> BatchNorm -> ReLU -> Linear`` (the GIN paper's MLP;
  Ioffe & Szegedy, ICML 2015). Unnormalised sum aggregation lets activations grow with the degree
  at every layer: a 3-layer GIN without it did not train on Cora (benchmarks/RESULTS.md, merge).
  Off by default: the soups' ``functional_call`` path takes floating-point parameters only, and
  a BatchNorm's ``num_batches_tracked`` counter is an integer.

Construction is deterministic for a seed: the shared initialisation that makes
experts soupable rests on this.
"""
from __future__ import annotations

import dataclasses
import warnings

import torch
from torch import nn
from torch_geometric.nn import GATConv, GCNConv, GINConv, SAGEConv

from hpcsoup.errors import ModelError
from hpcsoup.models.aggregate import Aggregate
from hpcsoup.models.rows import RowsLinear, dense, linear_sum

#: the architectures an expert can have
ARCHS = ("gcn", "sage", "gat", "gin")
#: normalisation inside GIN's MLP (see the module docstring)
NORMS = ("none", "batch")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """What defines a model's shape (stored with every expert as ``attrs['model']``)."""

    arch: str
    in_channels: int
    out_channels: int
    layers: int = 2
    hidden: int = 64
    heads: int = 1
    dropout: float = 0.5
    norm: str = "none"

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ModelError(f"unknown architecture {self.arch!r}; choose from {list(ARCHS)}")
        if self.layers < 1 or self.hidden < 1 or self.heads < 1:
            raise ModelError(f"model {self}: layers, hidden and heads must be >= 1")
        if self.arch == "gat" and self.layers > 1 and self.hidden % self.heads:
            raise ModelError(f"GAT hidden={self.hidden} is not divisible by heads={self.heads}; "
                             f"pick hidden as a multiple of heads")
        if self.norm not in NORMS or (self.norm != "none" and self.arch != "gin"):
            raise ModelError(f"model {self.arch}: norm={self.norm!r} is not supported; "
                             f"norm='batch' is for gin only, every architecture takes 'none'")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelSpec":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


class MeanSAGEConv(SAGEConv):
    """``SAGEConv`` (mean) that projects before it aggregates when that is cheaper.

    The mean is linear, so :math:`(D^{-1} A H) W_n = D^{-1} A (H W_n)`: aggregating
    ``out_channels`` columns instead of ``in_channels`` (1433 -> 64 on Cora) does the
    same arithmetic up to float rounding with far less edge traffic. Not when the input is
    a ``(sources, targets)`` pair (a receptive field's roots as targets: far fewer targets
    than sources), where projecting every source would cost more than the edges. Parameters
    and their names are PyG's, so state_dicts are interchangeable with ``SAGEConv``.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(in_channels, out_channels, aggr="mean")

    def forward(self, x, edge_index) -> torch.Tensor:
        if self.in_channels <= self.out_channels or isinstance(x, tuple):
            return super().forward(x, edge_index)
        projected = x @ self.lin_l.weight.t()
        out = self.propagate(edge_index, x=(projected, projected), size=None)
        if self.lin_l.bias is not None:
            out = out + self.lin_l.bias
        return out + self.lin_r(x)


def _conv(arch: str, cin: int, cout: int, heads: int, last: bool, norm: str = "none") -> nn.Module:
    if arch == "gcn":
        return GCNConv(cin, cout)
    if arch == "sage":
        return MeanSAGEConv(cin, cout)
    if arch == "gat":
        if last:
            return GATConv(cin, cout, heads=1, concat=False)
        return GATConv(cin, cout // heads, heads=heads, concat=True)
    if norm == "batch":
        mlp = nn.Sequential(nn.Linear(cin, cout), nn.BatchNorm1d(cout), nn.ReLU(),
                            nn.Linear(cout, cout))
    else:
        mlp = nn.Sequential(nn.Linear(cin, cout), nn.ReLU(), nn.Linear(cout, cout))
    return GINConv(mlp, train_eps=True)


#: how each architecture's first layer aggregates its input features, where that aggregation
#: is a fixed linear map of them (so it can be computed once for any weights): GCN sums over
#: the normalised adjacency with self-loops, SAGE takes the mean, GIN the sum. GAT's attention
#: depends on the weights: absent.
FIRST_AGGREGATION = {"gcn": "sum", "sage": "mean", "gin": "sum"}


@dataclasses.dataclass
class Precomputed:
    """A forward's graph input when the first layer's aggregation is already done.

    ``aggregate`` is :math:`A X` (the first layer's neighbourhood aggregation of the input
    features: :data:`FIRST_AGGREGATION`) for the rows of ``x``; ``adj`` is the adjacency of
    the remaining layers over the same rows. Because :math:`(A X) W = A (X W)`, the first layer
    needs no edges at all, and the logits equal the plain forward's to float rounding; an
    evaluation of the validation nodes' receptive field then touches only the nodes within
    ``layers - 1`` hops of them (:mod:`hpcsoup.soup.fields`). ``roots``: only the first
    ``roots`` rows' logits are wanted (a field's roots), so the last layer computes those rows
    alone. Inference only: dropout would have to act on ``X`` before the aggregation.

    ``aggregate`` and the forward's ``x`` are only ever sliced by row ranges (``t[a:b]``), so
    either may be a row source (:mod:`hpcsoup.models.rows`): a
    :class:`~hpcsoup.store.zarr_store.RowReader` that reads its rows from the store as they are
    asked for (a two-layer field's forward, :meth:`GNN._two_layers_in_blocks`, then holds one
    block of them, not the field's: a third of a 1M-node graph's rows when distributed PLS
    scores its soup), or :class:`~hpcsoup.models.rows.GatheredRows` (a PLS piece's rows of the
    validation field, gathered a block at a time, in the backward too).
    """

    aggregate: torch.Tensor
    adj: object
    roots: int | None = None
    _root_adj: object = dataclasses.field(default=None, init=False, repr=False)
    _column_blocks: dict = dataclasses.field(default_factory=dict, init=False, repr=False)

    def root_adjacency(self) -> torch.Tensor:
        """The roots' rows of ``adj``, built once (the kept :math:`A^T` of the backward,
        :func:`hpcsoup.models.aggregate.transposed`, lives on it)."""
        if self._root_adj is None:
            self._root_adj = root_rows(self.adj, int(self.roots))
        return self._root_adj

    def column_blocks(self, mean: bool) -> list:
        """``[(columns, rows, block)]``: :meth:`root_adjacency` cut into its columns' blocks of
        :data:`FIRST_LAYER_BLOCK` (the field's rows ``rows``), as sum operators (a mean's
        values are divided by its row's count): :math:`A_{roots} H = \\sum_b A_b H_b`. Built once."""
        if mean not in self._column_blocks:  # per reduction: a mean's values differ
            self._column_blocks[mean] = column_blocks(self.root_adjacency(), FIRST_LAYER_BLOCK, mean)
        return self._column_blocks[mean]


#: rows per block of a two-layer field's hidden layer (:meth:`GNN._two_layers_in_blocks`), with
#: or without autograd
FIRST_LAYER_BLOCK = 4096


def first_layer_from_aggregate(conv: nn.Module, x, aggregate) -> torch.Tensor:
    """A first layer's output from ``x`` and its precomputed aggregation :math:`A X` (tensors or
    row sources, :mod:`hpcsoup.models.rows`): GCN and SAGE through :class:`RowsLinear`, which reads
    its inputs a block of rows at a time and keeps none of them for its backward."""
    if isinstance(conv, SAGEConv):       # (D^-1 A X) W_n + b + X W_s
        terms = ((aggregate, conv.lin_l.weight), (x, conv.lin_r.weight))
        bias, after = conv.lin_l.bias, None
    elif isinstance(conv, GCNConv):      # (D^-1/2 (A+I) D^-1/2 X) W + b
        terms, bias, after = ((aggregate, conv.lin.weight),), None, conv.bias
    elif isinstance(conv, GINConv):      # MLP((1 + eps) X + A X)
        return conv.nn((1 + conv.eps) * dense(x) + dense(aggregate))
    else:
        raise ModelError(f"{type(conv).__name__} has no precomputable first aggregation")
    sources, weights = zip(*terms)
    if any(isinstance(s, torch.Tensor) and s.requires_grad for s in sources):  # not data
        out = linear_sum([dense(s) for s in sources], weights, bias)  # autograd's own backward
    else:
        out = RowsLinear.apply(sources, bias, *weights)
    if after is None:
        return out
    return out + after if torch.is_grad_enabled() else out.add_(after)


def first_layer(conv: nn.Module, x, aggregate, activate: bool) -> torch.Tensor:
    """:func:`first_layer_from_aggregate`, then ReLU if ``activate``.

    Without autograd the layer's only temporary of a field's size is its output (bias and ReLU
    in place; GCN and SAGE read their inputs in blocks, :class:`RowsLinear`), and GIN's MLP runs
    a block of :data:`FIRST_LAYER_BLOCK` rows at a time (at 2.45M nodes the validation field
    has 1.0M rows: 256 MB per temporary of width 64).
    """
    rows = x.size(0)
    if isinstance(conv, GINConv) and not torch.is_grad_enabled() and rows > FIRST_LAYER_BLOCK:
        out = None
        for start in range(0, rows, FIRST_LAYER_BLOCK):
            block = slice(start, start + FIRST_LAYER_BLOCK)
            part = first_layer_from_aggregate(conv, x[block], aggregate[block])
            if out is None:
                out = part.new_empty(rows, part.size(1))
            out[block] = part
    else:
        out = first_layer_from_aggregate(conv, x, aggregate)
    if not activate:
        return out
    return out.relu() if torch.is_grad_enabled() else out.relu_()


def column_blocks(adj: torch.Tensor, width: int, mean: bool) -> list:
    """``[(columns, rows, csr)]``: a CSR matrix as the sum of its blocks of ``width`` columns,
    each a CSR of the rows ``rows`` that have entries there and of those columns (both
    re-indexed), so a block costs its entries, not one pointer per row of the matrix (at 2.45M
    nodes: 39k roots x 125 blocks); ``mean``: values divided by each row's entry count, so the
    blocks sum to the row means."""
    crow, col = adj.crow_indices(), adj.col_indices()
    rows, columns = adj.size(0), adj.size(1)
    count = crow[1:] - crow[:-1]
    row = torch.repeat_interleave(torch.arange(rows, device=col.device), count)
    values = adj.values()
    if mean:
        values = values / count.clamp(min=1).to(values.dtype)[row]
    which = torch.div(col, width, rounding_mode="floor")
    order = torch.argsort(which, stable=True)  # per block, still by row
    ends = torch.cumsum(torch.bincount(which, minlength=-(-columns // width)), 0).tolist()
    blocks, start = [], 0
    for b, end in enumerate(ends):
        index = order[start:end]
        present, local = torch.unique_consecutive(row[index], return_inverse=True)
        lo = b * width
        block_crow = torch.zeros(present.numel() + 1, dtype=crow.dtype, device=col.device)
        torch.cumsum(torch.bincount(local, minlength=present.numel()), 0, out=block_crow[1:])
        with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what PyG uses
            warnings.simplefilter("ignore", UserWarning)
            blocks.append((slice(lo, min(lo + width, columns)), present,
                           torch.sparse_csr_tensor(block_crow, col[index] - lo, values[index],
                                                   size=(present.numel(), min(width, columns - lo)))))
        start = end
    return blocks


def root_rows(adj: torch.Tensor, roots: int) -> torch.Tensor:
    """The first ``roots`` rows of a CSR adjacency (targets), all its columns (sources)."""
    crow = adj.crow_indices()[:roots + 1]
    end = int(crow[-1])
    with warnings.catch_warnings():  # "sparse CSR support is in beta": it is what PyG uses
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, adj.col_indices()[:end], adj.values()[:end],
                                       size=(roots, adj.size(1)))


class GNN(nn.Module):
    """A stack of ``spec.layers`` convolutions of one architecture; returns logits.

    The graph input is an ``edge_index`` or sparse adjacency, or :class:`Precomputed`.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        widths = [spec.in_channels] + [spec.hidden] * (spec.layers - 1) + [spec.out_channels]
        self.convs = nn.ModuleList(
            _conv(spec.arch, widths[i], widths[i + 1], spec.heads, last=i == spec.layers - 1,
                  norm=spec.norm)
            for i in range(spec.layers))

    def forward(self, x: torch.Tensor, edge_index) -> torch.Tensor:
        if isinstance(edge_index, Precomputed):
            return self._from_precomputed(x, edge_index)
        for i, conv in enumerate(self.convs):
            x = nn.functional.dropout(x, self.spec.dropout, self.training)
            x = conv(x, edge_index)
            if i < len(self.convs) - 1:
                x = x.relu()
        return x

    def _from_precomputed(self, x: torch.Tensor, graph: Precomputed) -> torch.Tensor:
        """Inference from :class:`Precomputed` (no dropout: eval mode only)."""
        if self.training:
            raise ModelError("a precomputed first aggregation is for inference (eval mode) only")
        last = len(self.convs) - 1
        roots = x.size(0) if graph.roots is None else int(graph.roots)
        if last == 0:
            return first_layer(self.convs[0], x[:roots], graph.aggregate[:roots], False)
        if last == 1 and roots < x.size(0) and x.size(0) > FIRST_LAYER_BLOCK:
            return self._two_layers_in_blocks(x, graph, roots)
        x = first_layer(self.convs[0], x, graph.aggregate, True)
        for i, conv in enumerate(self.convs[1:], start=1):
            if i < last:
                x = conv(x, graph.adj).relu()
            elif roots == x.size(0):
                x = conv(x, graph.adj)
            else:  # the roots' rows only: every source, the roots as targets
                x = conv(x if isinstance(conv, GCNConv) else (x, x[:roots]),
                         graph.root_adjacency())
        return x

    def _two_layers_in_blocks(self, x: torch.Tensor, graph: Precomputed,
                              roots: int) -> torch.Tensor:
        """A two-layer model's roots' logits with the hidden layer computed a block at a time.

        The last layer's aggregation is linear, :math:`A_{roots} H = \\sum_b A_b H_b` over the
        field's row blocks :math:`b` (:meth:`Precomputed.column_blocks`), so each block of
        :math:`H = \\sigma(\\text{first layer})` is added in and dropped: the peak holds two
        ``[roots, hidden]`` tensors and one block, never :math:`H` for the whole field (82k x 64
        at 200k nodes, 1.0M x 64 at 2.45M). The last layer then runs from that aggregation as
        the first one does from :math:`A X` (:func:`first_layer_from_aggregate`).

        With autograd (learned souping's step) the blocks of :math:`H` are kept for the
        backward, as :math:`H` would be, but as many small tensors: glibc maps every buffer
        above 32 MiB afresh (page faults on each step: a 1M-node field's :math:`H` is 106 MB)
        and reuses small ones; each block's transpose is kept (:class:`Aggregate`).
        """
        first, last = self.convs
        aggregate = kept = None
        for rows, present, block in graph.column_blocks(getattr(last, "aggr", None) == "mean"):
            hidden = first_layer(first, x[rows], graph.aggregate[rows], True)
            if aggregate is None:
                aggregate = hidden.new_zeros(roots, hidden.size(1))
            aggregate.index_add_(0, present, Aggregate.apply(block, hidden, "sum"))
            if rows.start < roots:  # the roots are the field's first rows: keep theirs
                own = hidden[:roots - rows.start].clone()  # not a view holding the block
                kept = own if kept is None else torch.cat([kept, own])
        return first_layer_from_aggregate(last, kept, aggregate)


def build_model(spec: ModelSpec, seed: int | None = None) -> GNN:
    """Build a :class:`GNN`; with a seed its initial weights depend on the seed alone."""
    if seed is None:
        return GNN(spec)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return GNN(spec)

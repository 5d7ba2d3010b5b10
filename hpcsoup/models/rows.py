"""A first layer read a block of rows at a time, and rows gathered only when read.

With the first aggregation :math:`A X` precomputed (:class:`~hpcsoup.models.gnn.Precomputed`),
a first layer is a row-wise linear map of its inputs,

.. math::
    Z = \\sum_j S_j W_j^\\top + b \\qquad (\\text{SAGE: } S = (A X, X);\\ \\text{GCN: } S = (A X)),

whose weight gradients :math:`\\partial W_j = \\partial Z^\\top S_j` need the inputs again, not
:math:`Z`. :class:`RowsLinear` computes :math:`Z` a block of :data:`READ_BLOCK` rows at a time
and keeps no input for its backward: it reads each block of :math:`S_j` again there. That
matters where the inputs are not held anyway:

- :class:`GatheredRows`: the rows ``index`` of a larger tensor, gathered when read. A PLS
  piece's features and first aggregation are rows of the validation field's
  (:mod:`hpcsoup.soup.pls`); gathered whole and kept by autograd they were 800 bytes a node, the
  largest share of a step's memory (200k nodes: 2.3 of 5 MiB per piece);
- :class:`~hpcsoup.store.zarr_store.RowReader`: rows read from the store (a distributed rank's
  scoring fields).

A plain tensor's blocks are views: nothing is copied and the result is the same. Every caller
(LS, PLS in one process, PLS on MPI ranks) goes through the same blocks, so their sums round
alike: the soup stays the same to the bit on any number of ranks.
"""
from __future__ import annotations

import torch
from torch.nn import functional as F

#: rows a :class:`RowsLinear` reads at a time: a block of gathered inputs (two of 100 features:
#: 800 KB) and its products exist one at a time
READ_BLOCK = 1024


class GatheredRows:
    """Rows ``index`` of ``source`` (``source.index_select(0, index)``), gathered when read.

    ``rows[a:b]`` is another :class:`GatheredRows` (no copy); :func:`dense` reads them. ``shape``,
    ``dtype``, ``device``, ``size``, ``numel`` and ``to`` as a tensor's, so a forward that only
    slices row ranges takes either.
    """

    def __init__(self, source: torch.Tensor, index: torch.Tensor):
        self.source, self.index = source, index
        self.shape = torch.Size((index.numel(),) + tuple(source.shape[1:]))
        self.dtype, self.device = source.dtype, source.device

    def __getitem__(self, rows: slice) -> "GatheredRows":
        if not isinstance(rows, slice):
            raise TypeError(f"GatheredRows takes row ranges (rows[a:b]), not {rows!r}")
        return GatheredRows(self.source, self.index[rows])

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return self.shape.numel()

    def to(self, device) -> "GatheredRows":
        device = torch.device(device)
        if device == self.device:
            return self
        return GatheredRows(self.source.to(device), self.index.to(device))

    def tensor(self) -> torch.Tensor:
        return self.source.index_select(0, self.index)


def dense(rows) -> torch.Tensor:
    """The rows of a row source as a tensor: a tensor itself, a :class:`GatheredRows` gathered,
    a :class:`~hpcsoup.store.zarr_store.RowReader` read."""
    if isinstance(rows, torch.Tensor):
        return rows
    return rows.tensor() if isinstance(rows, GatheredRows) else rows[:]


def linear_sum(inputs, weights, bias) -> torch.Tensor:
    """:math:`S_0 W_0^\\top + b + \\sum_{j \\ge 1} S_j W_j^\\top` of tensors (in this order: the
    rounding of PyG's ``lin_l(A X) + lin_r(X)``)."""
    out = F.linear(inputs[0], weights[0], bias)
    for rows, weight in zip(inputs[1:], weights[1:]):
        out = out + F.linear(rows, weight)
    return out


class RowsLinear(torch.autograd.Function):
    """:math:`Z = S_0 W_0^\\top + b + \\sum_{j \\ge 1} S_j W_j^\\top`, read and computed a block
    of :data:`READ_BLOCK` rows at a time; the backward reads each block again for
    :math:`\\partial W_j = \\sum_{\\text{blocks}} \\partial Z_b^\\top S_{j,b}` (no input kept).

    ``apply(sources, bias, *weights)``: ``sources`` a tuple of row sources (tensors that need no
    gradient, :class:`GatheredRows`, ``RowReader``), one per weight; ``bias`` or ``None``.
    """

    @staticmethod
    def forward(ctx, sources: tuple, bias, *weights):
        ctx.sources, ctx.has_bias = sources, bias is not None
        ctx.shapes = [w.shape for w in weights]
        rows = sources[0].size(0)
        out = None
        for start in range(0, rows, READ_BLOCK):
            block = slice(start, start + READ_BLOCK)
            z = linear_sum([dense(source[block]) for source in sources], weights, bias)
            if out is None:
                out = z.new_empty(rows, z.size(1))
            out[block] = z
        if out is None:  # no rows
            out = weights[0].new_empty(0, weights[0].size(0))
        return out

    @staticmethod
    def backward(ctx, grad):
        needs = ctx.needs_input_grad[2:]  # after (sources, bias)
        grads = [grad.new_zeros(shape) if need else None for need, shape in zip(needs, ctx.shapes)]
        for start in range(0, grad.size(0), READ_BLOCK):
            block = slice(start, start + READ_BLOCK)
            g = grad[block].t()
            for total, source in zip(grads, ctx.sources):
                if total is not None:
                    total.addmm_(g, dense(source[block]))
        bias_grad = grad.sum(0) if ctx.has_bias and ctx.needs_input_grad[1] else None
        return (None, bias_grad, *grads)

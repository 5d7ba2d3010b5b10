"""Sparse aggregation with a backward by a kept transpose.

A GNN layer's neighbourhood aggregation :math:`Y = A X` (sums or means over in-edges, ``A`` a
CSR adjacency with rows = targets) differentiates to :math:`\\partial X = A^T \\partial Y`.
torch builds :math:`A^T` afresh on every backward (a sort of every edge); :class:`Aggregate`
keeps it on the adjacency, so learned souping, which differentiates through the same
adjacency at every step, transposes it once.
"""
from __future__ import annotations

import warnings

import torch


def transposed(adj: torch.Tensor) -> torch.Tensor:
    """:math:`A^T` of a CSR adjacency as CSR, built on first use and kept on ``adj``."""
    cached = getattr(adj, "_hpcsoup_transposed", None)
    if cached is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            cached = adj.t().to_sparse_csr()
        adj._hpcsoup_transposed = cached
    return cached


class Aggregate(torch.autograd.Function):
    """``A @ X`` (row sums or row means) with a backward by the kept :math:`A^T`.

    Forward: exactly PyG's ``spmm`` on a CPU/GPU CSR tensor (``torch.sparse.mm``).
    Backward: :math:`\\partial X = A^T \\partial Y` for sums and
    :math:`A^T (D^{-1} \\partial Y)` for means (:math:`D` the row counts, at least 1).
    """

    @staticmethod
    def forward(ctx, adj: torch.Tensor, x: torch.Tensor, reduce: str) -> torch.Tensor:
        ctx.adj, ctx.reduce = adj, reduce
        return torch.sparse.mm(adj, x, "mean") if reduce == "mean" else torch.sparse.mm(adj, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[1]:
            return None, None, None
        adj = ctx.adj
        if ctx.reduce == "mean":
            rows = adj.crow_indices()
            grad = grad / (rows[1:] - rows[:-1]).clamp(min=1).to(grad.dtype).unsqueeze(-1)
        return None, transposed(adj) @ grad, None

"""UMPM: the Universal Message Passing Mixture, one operator family for GCN, SAGE, GAT and GIN.

H-GRAMA ("Training-Free Cross-Architecture Merging for Graph Neural Networks", Bhattacharya,
Kalsariya, Manwani, arXiv 2602.19332) merges GNNs of *different* architectures by writing every
layer in one operator family. Here one UMPM layer is

.. math::
    Z = H W_{self} + P(H)\\,H W_{nbr} + b, \\qquad H' = \\varphi(Z)

and each architecture is one choice of the propagation :math:`P`, the weights and :math:`\\varphi`:

=======  ====================================================  =================  ===============
arch     :math:`P`                                             :math:`W_{self}`   :math:`\\varphi`
=======  ====================================================  =================  ===============
gcn      :math:`\\hat D^{-1/2}(A+I)\\hat D^{-1/2}`                 --                 ReLU / id
sage     :math:`D^{-1}A` (mean)                                :math:`W_r`        ReLU / id
gat      per head :math:`\\mathrm{softmax}_j\\,\\mathrm{LReLU}(a_s^\\top W h_j + a_d^\\top W h_i)`
         over :math:`N(i)\\cup\\{i\\}`                             --                 ReLU / id
gin      :math:`A` (sum)                                       :math:`(1+\\epsilon)W_1`  ReLU, W2, (ReLU)
=======  ====================================================  =================  ===============

(ReLU on hidden layers, identity on the last, as in :mod:`hpcsoup.models.gnn`.)

Efficient execution, used identically by the merged child and by the ensemble baseline:

- every static propagation is derived from **one** binary CSR adjacency ``A`` (self loops removed)
  plus diagonal scalings, so the columns of several static operators are propagated in one shared
  sparse pass: ``gcn`` = :math:`d^{-1/2} \\odot A (d^{-1/2} \\odot U) + d^{-1} \\odot U`,
  ``sum`` = :math:`AU + L \\odot U`, ``mean`` = ``sum`` / in-degree;
- projection happens before aggregation (``P (H W)``): the projected width is never larger than
  the input width in these models, and GAT needs the projected features for its attention;
- GAT's self loop is handled analytically (no second structure), its softmax denominator comes
  out of the same sparse product as its numerator, and its attention can be cached;
- every operator can be restricted to a subset of rows (the nodes a router sends to a parent)
  and the columns they read (their *support*): :class:`Block`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings

import torch
import torch.nn.functional as F

from hpcsoup.errors import MergeError
from hpcsoup.soup.fields import csr_order

PROPS = ("gcn", "mean", "sum", "gat")
STATIC = ("gcn", "mean", "sum")
#: architecture -> propagation of its UMPM form
ARCH_PROP = {"gcn": "gcn", "sage": "mean", "gat": "gat", "gin": "sum"}


@contextlib.contextmanager
def quiet_sparse():
    """Without torch's notes that CSR is in beta and that invariant checks are off (PyG relies on
    CSR too): filtered where CSR tensors are made, not for the whole process."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support is in beta.*")
        warnings.filterwarnings("ignore", message=".*Sparse invariant checks are implicitly disabled.*")
        yield


_CSR_MADE = False


def sparse_csr(*args, **kwargs) -> torch.Tensor:
    """``torch.sparse_csr_tensor``, quietly (:func:`quiet_sparse`).

    torch warns once per process, so only the first tensor needs the filter: entering
    ``warnings.catch_warnings`` costs ~0.1 ms, a tenth of a small graph's sparse product.
    """
    global _CSR_MADE
    if _CSR_MADE:
        return torch.sparse_csr_tensor(*args, **kwargs)
    with quiet_sparse():
        matrix = torch.sparse_csr_tensor(*args, **kwargs)
        _CSR_MADE = True
        return matrix


class GraphOps:
    """Graph-derived operators of one graph (the cache both the child and the ensemble use).

    Holds one CSR structure of the adjacency without self loops, rows = message receivers
    (``edge_index[1]``, PyG's ``source_to_target`` flow), and the degree vectors that turn it into
    every static UMPM propagation. Building it is the only :math:`O(E \\log E)` step; it depends on
    the graph alone.

    Args:
        edge_index: ``[2, E]`` edges ``source -> target``.
        num_nodes: number of nodes ``N``.
        undirected: the caller guarantees that ``edge_index`` is symmetric (every hpcsoup
            :class:`~hpcsoup.data.Graph` is). Then an edge list sorted by source is already a CSR of
            :math:`A^\\top = A` and no sort is needed (default: ``False``).
    """

    def __init__(self, edge_index: torch.Tensor, num_nodes: int, undirected: bool = False):
        if edge_index.dim() != 2 or edge_index.size(0) != 2:
            raise MergeError(f"edge_index of shape {tuple(edge_index.shape)} is not [2, E]; "
                             f"pass a PyG edge_index")
        n = int(num_nodes)
        src, dst = edge_index[0], edge_index[1]
        loops = src == dst
        if bool(loops.any()):
            self.loops = torch.bincount(src[loops], minlength=n).to(torch.float32)
            keep = ~loops
            src, dst = src[keep], dst[keep]
        else:
            self.loops = None
        in_order = csr_order(src, dst, undirected)
        if in_order is not None:
            rows, cols = in_order
        else:
            order = torch.sort(dst, stable=True).indices
            rows, cols = dst[order], src[order]
        counts = torch.bincount(rows, minlength=n)
        crow = torch.zeros(n + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=crow[1:])
        self.num_nodes = n
        self.crow, self.col = crow, cols.contiguous()
        self._row = rows.contiguous()
        deg = counts.to(torch.float32)  # in-degree without self loops
        self.deg_hat = deg + 1.0        # GCN degree with one self loop per node
        self.deg_in = deg if self.loops is None else deg + self.loops  # SAGE mean / GIN sum
        self._full: Block | None = None

    def full(self) -> "Block":
        """The whole graph as a :class:`Block` (every row, every column)."""
        if self._full is None:
            self._full = Block(self, None, None, self.crow, self.col, self._row)
        return self._full

    def restrict(self, rows: torch.Tensor) -> "Block":
        """The operator rows ``rows`` (sorted node ids) and the support they read.

        The support is ``rows`` plus their in-neighbours; columns are renumbered into it, so a
        projection needs to be computed on the support only.
        """
        n = self.num_nodes
        if rows.numel() == n:
            return self.full()
        counts = self.crow[rows + 1] - self.crow[rows]
        crow = torch.zeros(rows.numel() + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=crow[1:])
        total = int(crow[-1])
        # entry ids of the kept rows: start of each row, then consecutive
        shift = torch.repeat_interleave(self.crow[rows] - crow[:-1], counts, output_size=total)
        entries = torch.arange(total) + shift
        col = self.col.index_select(0, entries)
        # support = the rows first, then the other nodes they read: a row's own entry in any
        # support-indexed tensor is then a prefix view, never a gather
        # counting beats marking: on Tolokers' halves (665k entries) ``mark[col] = True`` took
        # 6.7 ms, ``bincount(col) > 0`` 0.8 ms (one thread)
        mark = torch.bincount(col, minlength=n) > 0
        mark[rows] = False
        support = torch.cat([rows, mark.nonzero().view(-1)])
        local = torch.full((n,), -1, dtype=torch.long)
        local[support] = torch.arange(support.numel())
        row_local = torch.repeat_interleave(torch.arange(rows.numel()), counts, output_size=total)
        return Block(self, rows, support, crow, local.index_select(0, col), row_local,
                     rows_first=True, position=local, entries=entries)


@dataclasses.dataclass
class Block:
    """Rows of the graph operators and the support (columns) they read.

    ``rows``/``support`` are ``None`` for the whole graph. A restricted block's support starts with
    its rows (``rows_first``), so a row's own entry of a support-indexed tensor is ``u[:n_rows]``.
    """

    ops: GraphOps
    rows: torch.Tensor | None
    support: torch.Tensor | None
    crow: torch.Tensor
    col: torch.Tensor
    row: torch.Tensor
    rows_first: bool = False
    position: torch.Tensor | None = None  # [N] index of each node in the support, -1 outside
    entries: torch.Tensor | None = None   # ids of its stored entries in the whole graph's CSR
    _vec: dict = dataclasses.field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return self.ops.num_nodes if self.rows is None else int(self.rows.numel())

    @property
    def n_support(self) -> int:
        return self.ops.num_nodes if self.support is None else int(self.support.numel())

    def vec(self, name: str, on: str = "rows") -> torch.Tensor | None:
        """A per-node vector (``deg_hat``, ``deg_in``, ``loops``, ...) on the rows or the support."""
        key = (name, on)
        if key not in self._vec:
            full = getattr(self.ops, name)
            if full is None:
                self._vec[key] = None
            else:
                index = self.rows if on == "rows" else self.support
                self._vec[key] = full if index is None else full.index_select(0, index)
        return self._vec[key]

    def column(self, name: str, fn, on: str = "rows") -> torch.Tensor:
        """A cached ``[n, 1]`` column ``fn(vector)`` (e.g. the inverse square root of a degree)."""
        key = (name, on, fn.__name__)
        if key not in self._vec:
            self._vec[key] = fn(self.vec(name, on)).unsqueeze(1).contiguous()
        return self._vec[key]

    def on_rows(self, u: torch.Tensor) -> torch.Tensor:
        """Rows of a support-indexed tensor that belong to this block's rows."""
        return u[:self.n_rows] if self.rows_first else u

    def spmm(self, u: torch.Tensor, values: torch.Tensor | None = None,
             key: str | None = None) -> torch.Tensor:
        """``A[rows, support] @ u`` (binary adjacency, or ``values`` per stored entry).

        The sparse matrix of the binary adjacency, or of ``values`` named by ``key``, is made
        once per block and reused by every later product.
        """
        if values is None:
            key = "binary"
        cached = self._vec.get(("csr", key, u.dtype)) if key is not None else None
        if cached is not None:
            return cached @ u
        if values is None:
            values = torch.ones(self.col.numel(), dtype=u.dtype)
        matrix = sparse_csr(self.crow, self.col, values, (self.n_rows, self.n_support), dtype=u.dtype)
        if key is not None:
            self._vec[("csr", key, u.dtype)] = matrix
        return matrix @ u

    def spmm_heads(self, u: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """``blockdiag(A_0, ..., A_{H-1}) @ u`` with ``A_h`` this block's adjacency carrying
        ``values[h]``; ``u`` is ``[H * support, w]`` (head-major), the result ``[H * rows, w]``."""
        heads = values.size(0)
        key = ("heads", heads)
        if key not in self._vec:
            nnz = self.col.numel()
            offsets = torch.arange(heads).unsqueeze(1)
            crow = torch.cat([(self.crow[:-1] + offsets * nnz).view(-1),
                              torch.tensor([heads * nnz])])
            col = (self.col + offsets * self.n_support).view(-1)
            self._vec[key] = (crow, col)
        crow, col = self._vec[key]
        matrix = sparse_csr(crow, col, values.reshape(-1),
                            (heads * self.n_rows, heads * self.n_support), dtype=u.dtype)
        return matrix @ u


def _rsqrt(v: torch.Tensor) -> torch.Tensor:
    return v.rsqrt()


def _recip(v: torch.Tensor) -> torch.Tensor:
    """``1 / v`` for a vector known to be positive (``deg_hat`` counts a self loop)."""
    return v.reciprocal()


def _inv(v: torch.Tensor) -> torch.Tensor:
    return torch.where(v > 0, 1.0 / v.clamp_min(1e-12), torch.zeros_like(v))


def propagate_static(block: Block, parts: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
    """Apply static propagations to several column blocks in **one** sparse pass.

    Args:
        block: rows and support of the operator.
        parts: ``(kind, U)`` pairs, ``kind`` in ``gcn``/``mean``/``sum`` and ``U`` of shape
            ``[support, width]``.

    Returns:
        ``P_kind[rows, support] @ U`` for each part, shape ``[rows, width]``.
    """
    if len(parts) == 1:
        return [_propagate_one(block, *parts[0])]
    inputs = []
    for kind, u in parts:
        if kind == "gcn":
            u = u * block.column("deg_hat", _rsqrt, on="support")
        inputs.append(u)
    stacked = inputs[0] if len(inputs) == 1 else torch.cat(inputs, 1)
    agg = block.spmm(stacked)
    out, start = [], 0
    for (kind, u), width in zip(parts, [u.size(1) for _, u in parts]):
        y = agg[:, start:start + width] if len(parts) > 1 else agg
        start += width
        if kind == "gcn":
            y = y * block.column("deg_hat", _rsqrt) + block.on_rows(u) * block.column("deg_hat", _recip)
        else:
            loops = block.vec("loops")
            if loops is not None:
                y = y + block.on_rows(u) * loops.unsqueeze(1)
            if kind == "mean":
                y = y * block.column("deg_in", _inv)
        out.append(y)
    return out


def _propagate_one(block: Block, kind: str, u: torch.Tensor) -> torch.Tensor:
    """One static propagation with the normalisation stored in the CSR values (fewer dense ops)."""
    key = ("values", kind)
    whole = block.ops._full
    if key not in block._vec and block.entries is not None and whole is not None \
            and whole._vec.get(key) is not None:
        # the whole graph's normalised values (the gate's propagations made them): a block's
        # entries carry the same global (row, column) pairs, so one gather replaces two and a product
        block._vec[key] = whole._vec[key].index_select(0, block.entries)
    if key not in block._vec:
        if kind == "gcn":
            d = block.ops.deg_hat.rsqrt()
            rows_d = d if block.rows is None else d.index_select(0, block.rows)
            cols_d = d if block.support is None else d.index_select(0, block.support)
            values = rows_d.index_select(0, block.row) * cols_d.index_select(0, block.col)
        elif kind == "mean":
            values = block.vec("deg_in").clamp_min(1e-12).reciprocal().index_select(0, block.row)
        else:
            values = None
        block._vec[key] = values
    y = block.spmm(u, block._vec[key], key=kind)
    if kind == "gcn":
        return torch.addcmul(y, block.on_rows(u), block.column("deg_hat", _recip))
    loops = block.vec("loops")
    if loops is not None:
        extra = block.on_rows(u) * loops.unsqueeze(1)
        y = y + (extra * block.column("deg_in", _inv) if kind == "mean" else extra)
    return y


@dataclasses.dataclass
class Attention:
    """GAT attention of one layer on one :class:`Block` (what "cached attention" keeps).

    ``edges`` ``[heads, entries]`` and ``self_`` ``[rows, heads]`` are unnormalised
    ``exp(logit - shift)``; ``inv_denom`` ``[rows, heads]`` (the softmax normaliser) is filled in by
    the first :func:`propagate_gat`, which gets it from the same sparse product as the numerator.
    """

    edges: torch.Tensor
    self_: torch.Tensor
    inv_denom: torch.Tensor | None = None


def gat_attention(block: Block, u: torch.Tensor, att_src: torch.Tensor, att_dst: torch.Tensor,
                  negative_slope: float) -> Attention:
    """GAT attention over ``N(i) ∪ {i}`` (Veličković et al., ICLR 2018).

    :math:`\\alpha_{ij} = \\mathrm{softmax}_j\\,\\mathrm{LeakyReLU}(a_s^\\top W h_j + a_d^\\top W h_i)`,
    computed from the projected features ``u = H W`` of shape ``[support, heads * C]``.
    The softmax is shift-invariant: logits are shifted only when they could overflow or
    underflow (bound ``upper_i = LeakyReLU(max_j a_j + b_i)``; the self loop bounds a row from
    below), and by the exact row maximum only when that bound is too loose.
    """
    heads, channels = att_src.shape
    uh = u.view(-1, heads, channels)
    a = (uh * att_src).sum(-1)                 # [support, heads] source scores
    b = (block.on_rows(uh) * att_dst).sum(-1)  # [rows, heads] target scores
    e = a.t().contiguous().index_select(1, block.col) + b.t().contiguous().index_select(1, block.row)
    e = F.leaky_relu(e, negative_slope)
    e_self = F.leaky_relu(block.on_rows(a) + b, negative_slope)
    if a.numel() and b.numel():
        upper = F.leaky_relu(a.max(0).values + b, negative_slope)
        if bool((upper > 60).any()) or bool((e_self < -60).any()):
            shift = upper
            if bool((e_self - upper < -60).any()):
                shift = e_self.clone()
                for h in range(heads):
                    row_max = torch.segment_reduce(e[h], "max", offsets=block.crow,
                                                   initial=float("-inf"))
                    shift[:, h] = torch.maximum(shift[:, h], row_max)
            e = e - shift.t().contiguous().index_select(1, block.row)
            e_self = e_self - shift
    return Attention(e.exp(), e_self.exp())


def propagate_gat(block: Block, u: torch.Tensor, attention: Attention, concat: bool) -> torch.Tensor:
    """``sum_j alpha_ij u_j`` per head, concatenated (hidden layers) or averaged (output layer).

    All heads in **one** sparse product: head ``h``'s attention is block ``h`` of a block-diagonal
    ``[heads * rows, heads * support]`` matrix whose values are ``attention.edges`` as stored
    (head-major), so per-head products (each a few tens of microseconds of fixed cost on a small
    graph) become one.
    """
    heads = attention.edges.size(0)
    channels = u.size(1) // heads
    rows = block.n_rows
    own = block.on_rows(u).view(rows, heads, channels)
    first = attention.inv_denom is None
    # [heads, support, C]: head-major, as the block-diagonal matrix reads it
    per_head = u.view(-1, heads, channels).transpose(0, 1)
    if first:  # a ones column makes the same sparse product return the softmax denominator
        per_head = torch.cat([per_head, torch.ones(heads, u.size(0), 1)], 2)
    width = per_head.size(2)
    y = block.spmm_heads(per_head.reshape(heads * u.size(0), width), attention.edges)
    y = y.view(heads, rows, width).transpose(0, 1)  # [rows, heads, C (+1)]
    if first:
        attention.inv_denom = 1.0 / (y[:, :, channels] + attention.self_)
        y = y[:, :, :channels]
    out = torch.addcmul(y, own, attention.self_.unsqueeze(2)) * attention.inv_denom.unsqueeze(2)
    if concat:
        return out.reshape(rows, heads * channels)
    return out[:, 0] if heads == 1 else out.mean(1)


@dataclasses.dataclass
class UMPMLayer:
    """One layer in UMPM form: ``Z = H W_self + P(H) H W_nbr + b``, ``H' = phi(Z)``.

    ``weight`` is ``[W_self | W_nbr]`` (``W_self`` absent for ``gcn``/``gat``), so one matrix
    product projects both. ``tail`` is GIN's second MLP linear ``(W_2, b_2)``; ``act`` the outer
    nonlinearity (``relu`` on hidden layers, ``none`` on the output layer).
    """

    arch: str
    prop: str
    in_dim: int
    out_dim: int
    weight: torch.Tensor
    bias: torch.Tensor
    has_self: bool = False
    heads: int = 1
    concat: bool = True
    att_src: torch.Tensor | None = None
    att_dst: torch.Tensor | None = None
    negative_slope: float = 0.2
    tail_weight: torch.Tensor | None = None
    tail_bias: torch.Tensor | None = None
    act: str = "relu"

    @property
    def proj_dim(self) -> int:
        """Width of ``H W_nbr`` (GAT: heads x channels)."""
        return self.weight.size(1) - (self.out_dim if self.has_self else 0)

    def split(self, u: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """``(H W_self, H W_nbr)`` from a projection by ``weight``."""
        if not self.has_self:
            return None, u
        return u[:, :self.out_dim], u[:, self.out_dim:]

    def finish(self, block: Block, u_self: torch.Tensor | None, agg: torch.Tensor) -> torch.Tensor:
        """``Z`` on the block's rows from the self projection (support rows) and the aggregation."""
        z = agg + self.bias
        if u_self is not None:
            z = z + block.on_rows(u_self)
        return z

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        """``phi(Z)``: ReLU/identity, or GIN's ``ReLU -> W_2 -> (ReLU)``."""
        if self.tail_weight is not None:
            z = torch.addmm(self.tail_bias, z.relu(), self.tail_weight)
        return z.relu() if self.act == "relu" else z

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.weight, "bias": self.bias}
        for name in ("att_src", "att_dst", "tail_weight", "tail_bias"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    def meta(self) -> dict:
        return {"arch": self.arch, "prop": self.prop, "in_dim": self.in_dim,
                "out_dim": self.out_dim, "has_self": self.has_self, "heads": self.heads,
                "concat": self.concat, "negative_slope": self.negative_slope, "act": self.act}

    @classmethod
    def from_parts(cls, meta: dict, tensors: dict) -> "UMPMLayer":
        return cls(**meta, **{k: tensors.get(k) for k in
                              ("weight", "bias", "att_src", "att_dst", "tail_weight", "tail_bias")})

    def replace(self, **changes) -> "UMPMLayer":
        return dataclasses.replace(self, **changes)


def layer_forward(layer: UMPMLayer, block: Block, u: torch.Tensor,
                  attention: Attention | None = None) -> tuple[torch.Tensor, Attention | None]:
    """Pre-activation ``Z`` of one layer on ``block``'s rows from its projection ``u`` (support).

    Static layers are normally propagated by :func:`propagate_static` together with others; this
    helper propagates one layer alone (used for GAT layers and single models).
    """
    u_self, u_nbr = layer.split(u)
    if layer.prop == "gat":
        if attention is None:
            attention = gat_attention(block, u_nbr, layer.att_src, layer.att_dst,
                                      layer.negative_slope)
        agg = propagate_gat(block, u_nbr, attention, layer.concat)
    else:
        agg = propagate_static(block, [(layer.prop, u_nbr)])[0]
    return layer.finish(block, u_self, agg), attention


def as_features(x: torch.Tensor, max_density: float = 0.1) -> torch.Tensor:
    """``x`` as sparse CSR when at most ``max_density`` of it is non-zero, else dense.

    Projecting Cora's 1.3%-dense bag of words as CSR is ~25x faster than densely; both the child
    and the ensemble project through this.
    """
    if x.layout == torch.sparse_csr or x.numel() == 0:
        return x
    density = float((x != 0).sum()) / x.numel()
    if density > max_density:
        return x
    with quiet_sparse():
        return x.to_sparse_csr()


def csr_rows(x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """Rows of a dense or sparse-CSR matrix."""
    if rows is None:
        return x
    if x.layout != torch.sparse_csr:
        return x.index_select(0, rows)
    crow, col, val = x.crow_indices(), x.col_indices(), x.values()
    counts = crow[rows + 1] - crow[rows]
    new_crow = torch.zeros(rows.numel() + 1, dtype=torch.long)
    torch.cumsum(counts, 0, out=new_crow[1:])
    total = int(new_crow[-1])
    entries = torch.arange(total) + torch.repeat_interleave(crow[rows] - new_crow[:-1], counts,
                                                            output_size=total)
    return sparse_csr(new_crow, col.index_select(0, entries), val.index_select(0, entries),
                      (rows.numel(), x.size(1)))


class UMPMNet:
    """A trained expert in UMPM form: a list of :class:`UMPMLayer` (inference only).

    ``forward`` reproduces the PyG expert's logits (eval mode) with the efficient kernels above.
    """

    def __init__(self, layers: list[UMPMLayer], arch: str, name: str = ""):
        self.layers = layers
        self.arch = arch
        self.name = name or arch

    @property
    def depth(self) -> int:
        return len(self.layers)

    @property
    def widths(self) -> list[int]:
        """Output width of every layer (the last is the number of classes)."""
        return [layer.out_dim for layer in self.layers]

    def forward(self, x: torch.Tensor, ops: GraphOps, capture: bool = False):
        """Full-graph logits; with ``capture`` also every layer's ``(Z, H')``."""
        block = ops.full()
        h = as_features(x)  # bag-of-words features stay sparse CSR: ``H W`` works on both
        trace = []
        for layer in self.layers:
            z, _ = layer_forward(layer, block, h @ layer.weight)
            h = layer.activate(z)
            if capture:
                trace.append((z, h))
        return (h, trace) if capture else h

    __call__ = forward


#: a BatchNorm's eval-mode tensors, in :func:`fold_batch_norm`'s argument order
BATCH_NORM = ("weight", "bias", "running_mean", "running_var")


def fold_batch_norm(weight: torch.Tensor, bias: torch.Tensor, gamma: torch.Tensor,
                    beta: torch.Tensor, mean: torch.Tensor, var: torch.Tensor,
                    eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """A linear map ``x W + b`` followed by an eval-mode BatchNorm, as one linear map.

    :math:`\\mathrm{BN}(z) = \\gamma (z - \\mu) / \\sqrt{\\sigma^2 + \\epsilon} + \\beta`
    is affine per channel, so with :math:`s = \\gamma / \\sqrt{\\sigma^2 + \\epsilon}`:
    :math:`W' = W \\operatorname{diag}(s)`, :math:`b' = (b - \\mu) s + \\beta` (exact; ``eps`` is
    ``torch.nn.BatchNorm1d``'s default). ``weight`` is ``[in, out]``.
    """
    scale = gamma / (var + eps).sqrt()
    return weight * scale, (bias - mean) * scale + beta


def from_pyg(spec, state_dict: dict, name: str = "") -> UMPMNet:
    """Convert a trained :class:`hpcsoup.models.GNN` (its ``ModelSpec`` and ``state_dict``) to UMPM.

    Raises:
        MergeError: the state_dict does not match the spec (missing tensors, wrong shapes).
    """
    sd = {k: v.detach().to(torch.float32).cpu() for k, v in state_dict.items()}

    def get(key):
        if key not in sd:
            raise MergeError(f"expert {name or spec.arch!r}: state_dict has no tensor {key!r} "
                             f"expected for a {spec.arch} layer; is its ModelSpec right?")
        return sd[key]

    layers = []
    widths = [spec.in_channels] + [spec.hidden] * (spec.layers - 1) + [spec.out_channels]
    for i in range(spec.layers):
        last = i == spec.layers - 1
        act = "none" if last else "relu"
        p = f"convs.{i}."
        din, dout = widths[i], widths[i + 1]
        if spec.arch == "gcn":
            layer = UMPMLayer("gcn", "gcn", din, dout, get(p + "lin.weight").t().contiguous(),
                              get(p + "bias"), act=act)
        elif spec.arch == "sage":
            w = torch.cat([get(p + "lin_r.weight").t(), get(p + "lin_l.weight").t()], 1)
            layer = UMPMLayer("sage", "mean", din, dout, w.contiguous(), get(p + "lin_l.bias"),
                              has_self=True, act=act)
        elif spec.arch == "gat":
            att_src, att_dst = get(p + "att_src")[0], get(p + "att_dst")[0]
            heads = att_src.size(0)
            layer = UMPMLayer("gat", "gat", din, dout, get(p + "lin.weight").t().contiguous(),
                              get(p + "bias"), heads=heads, concat=not last,
                              att_src=att_src.contiguous(), att_dst=att_dst.contiguous(), act=act)
        else:
            w1, b1 = get(p + "nn.0.weight").t(), get(p + "nn.0.bias")
            tail = p + "nn.2."
            if spec.norm == "batch":  # eval-mode BatchNorm is affine: folded into W_1, b_1
                w1, b1 = fold_batch_norm(w1, b1, *(get(p + f"nn.1.{n}") for n in BATCH_NORM))
                tail = p + "nn.3."
            eps = float(get(p + "eps").reshape(-1)[0])
            w = torch.cat([(1.0 + eps) * w1, w1], 1)
            layer = UMPMLayer("gin", "sum", din, dout, w.contiguous(), b1.contiguous(),
                              has_self=True, tail_weight=get(tail + "weight").t().contiguous(),
                              tail_bias=get(tail + "bias"), act=act)
        if layer.weight.size(0) != din:
            raise MergeError(f"expert {name or spec.arch!r}: layer {i} takes "
                             f"{layer.weight.size(0)} inputs, its spec says {din}")
        layers.append(layer)
    return UMPMNet(layers, spec.arch, name)

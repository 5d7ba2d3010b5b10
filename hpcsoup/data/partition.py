"""METIS partitions of a graph and the halo subgraphs that partition souping runs on.

- :func:`partition_for`: **the** partition of a config's graph for ``(K, seed)``, computed once per
  graph (one process computes under a file lock, every other one reads the stored result) and
  shared by training's Cluster-GCN batches, the soup's node order and every PLS rank; a caller
  without the graph in memory (an MPI rank) reads it without loading the graph;
- :func:`graph_partition`: the same, keyed by an explicit graph identity (:func:`graph_identity`);
- :func:`partition`: ``k`` balanced parts by METIS (Karypis & Kumar, SIAM J. Sci. Comput. 1998)
  through ``pymetis`` (PyG's ``ClusterData`` needs torch-sparse, which has no wheels here),
  seeded, deterministic, cached on disk by edge fingerprint;
- :func:`part_nodes`: the node ids of every part;
- :func:`induced_subgraph_with_halo`: a part's nodes plus their ``hops``-hop halo and every edge
  among them -- with enough hops (:func:`exact_hops`) a GNN's outputs on the part's nodes equal
  its full-graph outputs;
- :func:`edge_cut`: the fraction of edges joining different parts.

Graphs with more than :data:`METIS_MAX_EDGES` directed edges are partitioned on a sparsified
copy (every undirected edge kept with the same probability, decided by a seeded hash of the
pair, so the copy stays symmetric): METIS' memory grows with the edges (measured about 100 bytes
per directed edge with pymetis' 64-bit indices: 4.9 GB for synthetic-products at 1M nodes, 50M
edges, which puts ogbn-products' 124M edges near 12 GB), while on a graph of degree ~50 a
quarter of the edges still carries the community structure (at 1M nodes the edge cut of 32
parts rose from 0.405 to 0.416 with 64% of the edges, the default limit there, and to 0.434
with 25%; process peak 6.5 -> 4.9 -> 3.0 GiB; see benchmarks/RESULTS.md, ``## products``).
With the default limit METIS itself stays near 3.5 GB at any size.

Example::

    parts = partition_for(cfg, 32, seed=0, graph=graph)     # computed once, then read
    for nodes in part_nodes(parts, 32):
        subset, local_edges, core = induced_subgraph_with_halo(
            graph.data.edge_index, graph.num_nodes, nodes, exact_hops("sage", layers=2))
        out = model(graph.data.x[subset], local_edges)[:core]   # == full-graph output[nodes]
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch_geometric.data import Data
from torch_geometric.utils import k_hop_subgraph, subgraph

from hpcsoup.errors import DatasetError

#: cache file name: ``<name>-<nodes>-k<K>-s<seed>-<edge fingerprint>.pt``
CACHE_PATTERN = "{name}-{nodes}-k{k}-s{seed}-{fingerprint}.pt"
#: stored partition of an identified graph: ``<graph key>-k<K>-s<seed>.pt``
GRAPH_PATTERN = "{key}-k{k}-s{seed}.pt"
#: above this many directed edges (self-loops excluded) METIS runs on a sparsified copy
METIS_MAX_EDGES = 32_000_000


def partition_cache_dir(root: str | Path | None = None) -> Path:
    """Where partitions are cached: ``<root>/partitions`` (root: the datasets' root)."""
    from hpcsoup.data.datasets import default_root
    return Path(root if root else default_root()) / "partitions"


def fingerprint(edge_index: torch.Tensor, num_nodes: int) -> str:
    """A 16-hex-digit BLAKE2b digest of ``edge_index``'s contents and ``num_nodes``.

    Every byte is hashed, so a changed graph never matches a stale cache entry (measured on this
    kind of machine: about 1 s per GiB of edge_index, small next to METIS itself). The digest
    is kept on the tensor until it is modified in place (its ``_version``): a process that
    looks its partition up twice (the evaluator's node order, then PLS) hashes once.
    """
    key = (edge_index._version, int(num_nodes))
    kept = getattr(edge_index, "_hpcsoup_fingerprint", None)
    if kept is not None and kept[0] == key:
        return kept[1]
    digest = hashlib.blake2b(digest_size=8)
    digest.update(f"{num_nodes}:{tuple(edge_index.shape)}:{edge_index.dtype}".encode())
    digest.update(memoryview(edge_index.contiguous().numpy()).cast("B"))
    edge_index._hpcsoup_fingerprint = (key, digest.hexdigest())
    return edge_index._hpcsoup_fingerprint[1]


def partition(graph_or_edge_index, num_nodes: int | None, k: int, seed: int = 0,
              cache_dir: str | Path | None = None) -> torch.Tensor:
    """Split a graph into ``k`` balanced parts with METIS, minimising the edges cut.

    The graph is symmetrised, self-loops and duplicate edges are dropped, then
    ``pymetis.part_graph`` runs with ``Options(seed=seed)`` (recursive bisection for ``k <= 8``,
    k-way above, METIS' defaults otherwise); the result depends on the graph, ``k`` and ``seed``
    alone.

    Args:
        graph_or_edge_index: a :class:`~hpcsoup.data.datasets.Graph`, a PyG ``Data`` or an
            ``edge_index`` [2, E] LongTensor.
        num_nodes: the node count (``None``: taken from a Graph / Data).
        k: number of parts, 1 to ``num_nodes`` (``k = 1`` gives all zeros without METIS).
        seed: METIS' random seed (default: ``0``).
        cache_dir: if set, the result is kept in (and read back from) this folder as
            ``<name>-<nodes>-k<K>-s<seed>-<fingerprint>.pt``; the fingerprint of the edges
            (:func:`fingerprint`) makes a stale entry impossible to hit (default: ``None``).

    Returns:
        LongTensor [num_nodes] of part ids in ``0 .. k-1``.
    """
    name, edge_index, num_nodes = _unpack(graph_or_edge_index, num_nodes)
    _check_k(name, k, num_nodes)
    if k == 1:
        return torch.zeros(num_nodes, dtype=torch.long)
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / CACHE_PATTERN.format(
            name=re.sub(r"[^A-Za-z0-9_.-]+", "_", name), nodes=num_nodes, k=k, seed=seed,
            fingerprint=fingerprint(edge_index, num_nodes))
        parts = _read_cache(path, num_nodes, k)
        if parts is not None:
            return parts
    parts = _metis(edge_index, num_nodes, k, seed)
    if path is not None:
        _write_cache(path, parts)
    return parts


def _check_k(name: str, k, num_nodes: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_nodes:
        raise DatasetError(f"partition of '{name}': k={k!r} parts is invalid; use an integer "
                           f"from 1 to the node count {num_nodes}")


def graph_identity(dataset: str, nodes: int | None = None, seed: int | None = None) -> str:
    """A file-name-safe identity of a graph: the dataset, plus size and seed for generated ones.

    Only what changes the edges is part of it: a split changes the masks, not the graph, so
    every split of a dataset shares one partition.
    """
    from hpcsoup.data.datasets import SYNTHETIC

    text = f"{dataset}-n{nodes}-seed{seed}" if dataset == SYNTHETIC else dataset
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def partition_for(cfg, k: int, seed: int = 0, graph=None) -> torch.Tensor:
    """The METIS partition of ``cfg``'s graph (its ``[data]`` section) into ``k`` parts.

    The one call every stage makes (training's Cluster-GCN batches, the soup's node order,
    PLS ranks): the result is stored under ``<data.root>/partitions`` (:func:`partition_cache_dir`)
    and computed by whichever process asks first; see :func:`graph_partition`. ``graph`` is the
    loaded graph if the caller has it; without it the stored partition is read, and the graph
    is loaded (:func:`hpcsoup.data.load_from_config`) only when none is stored yet.
    """
    d = cfg.data
    key = graph_identity(d.dataset, d.nodes, d.seed)
    cache_dir = partition_cache_dir(d.root or None)
    if graph is None and _stored(cache_dir / GRAPH_PATTERN.format(key=key, k=k, seed=seed)) is None:
        from hpcsoup.data.datasets import load_from_config
        graph = load_from_config(cfg)
    return graph_partition(key, k, seed, graph=graph, cache_dir=cache_dir)


def graph_partition(key: str | None, k: int, seed: int = 0, *, graph=None, num_nodes: int | None = None,
                    cache_dir: str | Path | None = None, max_edges: int | None = None) -> torch.Tensor:
    """The METIS partition of the graph called ``key`` into ``k`` parts: computed once, then read.

    Args:
        key: the graph's identity (:func:`graph_identity`); ``None`` computes without storing.
        k: number of parts, 1 to the node count.
        seed: METIS' (and the sparsification's) seed (default: ``0``).
        graph: the graph (a :class:`~hpcsoup.data.datasets.Graph`, PyG ``Data`` or
            ``edge_index``); needed to compute, and when given a stored partition is used only
            if it was made from the same edges (fingerprint), so a changed generator never
            reads a stale one. ``None``: read the stored partition (a process without the graph).
        num_nodes: the node count when ``graph`` is a bare ``edge_index``.
        cache_dir: where partitions are stored (default: :func:`partition_cache_dir`).
        max_edges: directed edges METIS may see (default: :data:`METIS_MAX_EDGES`).

    Concurrent callers (array tasks, MPI ranks) take a file lock on the folder: one computes,
    the others sleep on the lock (no busy wait) and then read its result.

    Returns:
        LongTensor [num_nodes] of part ids in ``0 .. k-1``.
    """
    if key is None:
        if graph is None:
            raise DatasetError("graph_partition: pass the graph or a graph key with a stored "
                               "partition")
        name, edge_index, num_nodes = _unpack(graph, num_nodes)
        _check_k(name, k, num_nodes)
        return _compute(edge_index, num_nodes, k, seed, max_edges)
    path = Path(cache_dir or partition_cache_dir()) / GRAPH_PATTERN.format(key=key, k=k, seed=seed)
    edge_index = digest = None
    if graph is not None:
        name, edge_index, num_nodes = _unpack(graph, num_nodes)
        _check_k(name, k, num_nodes)
        digest = fingerprint(edge_index, num_nodes)
    from hpcsoup.data.graph import locked

    # one lock per folder: besides computing each partition once, it keeps two METIS runs
    # (each the size of the graph) from overlapping in memory
    with locked(path.parent):
        stored = _stored(path)
        if stored is not None and (digest is None or stored["fingerprint"] == digest):
            return stored["parts"]
        if graph is None:
            raise DatasetError(f"no stored partition of graph '{key}' into {k} parts (seed {seed}) "
                               f"in '{path.parent}'; pass the graph to compute it")
        parts = _compute(edge_index, num_nodes, k, seed, max_edges)
        _write_cache(path, {"parts": parts, "fingerprint": digest, "graph": key, "k": k,
                            "seed": seed, "nodes": num_nodes,
                            "metis_edge_share": metis_keep(edge_index.size(1), max_edges)})
    return parts


def _compute(edge_index: torch.Tensor, num_nodes: int, k: int, seed: int,
             max_edges: int | None) -> torch.Tensor:
    if k == 1:
        return torch.zeros(num_nodes, dtype=torch.long)
    return _metis(edge_index, num_nodes, k, seed, max_edges)


def _stored(path: Path) -> dict | None:
    """A stored :func:`graph_partition` entry, or ``None`` if missing or unreadable."""
    if not path.is_file():
        return None
    try:
        entry = torch.load(path, weights_only=True)
        parts = entry["parts"]
        ok = (isinstance(parts, torch.Tensor) and parts.dtype == torch.long
              and parts.shape == (entry["nodes"],) and (entry["nodes"] == 0 or int(parts.max()) < entry["k"]))
    except Exception:                       # a truncated or foreign file: recompute
        return None
    return entry if ok else None


def _unpack(graph, num_nodes):
    if isinstance(graph, torch.Tensor):
        name, edge_index = "graph", graph
    elif isinstance(graph, Data):
        name, edge_index = "graph", graph.edge_index
        num_nodes = graph.num_nodes if num_nodes is None else num_nodes
    elif hasattr(graph, "data") and hasattr(graph, "name"):        # hpcsoup Graph
        name, edge_index = str(graph.name), graph.data.edge_index
        num_nodes = graph.num_nodes if num_nodes is None else num_nodes
    else:
        raise DatasetError(f"partition: expected a Graph, a PyG Data or an edge_index tensor, "
                           f"got {type(graph).__name__}")
    if edge_index.dim() != 2 or edge_index.size(0) != 2 or edge_index.is_floating_point():
        raise DatasetError(f"partition of '{name}': edge_index must be an integer tensor of shape "
                           f"[2, E], got {edge_index.dtype} {tuple(edge_index.shape)}")
    if num_nodes is None:
        raise DatasetError(f"partition of '{name}': pass num_nodes with a bare edge_index")
    num_nodes = int(num_nodes)
    if edge_index.numel() and int(edge_index.max()) >= num_nodes:
        raise DatasetError(f"partition of '{name}': edge_index refers to node "
                           f"{int(edge_index.max())} but num_nodes={num_nodes}")
    return name, edge_index.cpu().long(), num_nodes


CHUNK = 1 << 24


def _kept(row: np.ndarray, col: np.ndarray, n: int, keep: float, seed: int) -> np.ndarray:
    """Whether each edge's undirected pair survives sparsification (a seeded splitmix64 hash).

    Both directions of a pair hash alike, so the sparsified graph stays symmetric.
    """
    x = (np.minimum(row, col) * n + np.maximum(row, col)).astype(np.uint64)
    x += np.uint64((0x9E3779B97F4A7C15 * (seed + 1)) % (1 << 64))
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x < np.uint64(min(int(keep * 2.0 ** 64), (1 << 64) - 1))


def _csr(edge_index: torch.Tensor, n: int, keep: float = 1.0,
         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric, self-loop-free, duplicate-free CSR (xadj, adjncy) as int64 (METIS' idx_t).

    With ``keep < 1`` each undirected edge survives with probability ``keep`` (:func:`_kept`).
    Built chunk by chunk, and ``adjncy`` reuses the sort keys' memory: the peak is the kept
    edges' keys plus one byte per edge.
    """
    row, col = edge_index.numpy()
    mask = np.empty(row.size, dtype=bool)
    for start in range(0, row.size, CHUNK):
        r, c = row[start:start + CHUNK], col[start:start + CHUNK]
        m = r != c
        if keep < 1:
            m &= _kept(r, c, n, keep, seed)
        mask[start:start + CHUNK] = m
    key = np.empty(int(mask.sum()), dtype=np.int64)
    pos = 0
    for start in range(0, row.size, CHUNK):
        m = mask[start:start + CHUNK]
        chunk = row[start:start + CHUNK][m] * n + col[start:start + CHUNK][m]
        key[pos:pos + chunk.size] = chunk
        pos += chunk.size
    del mask
    if key.size > 1 and not bool(np.all(key[1:] > key[:-1])):     # not already coalesced
        key = np.unique(key)
    rev = (key % n) * n + key // n
    rev.sort()
    if not np.array_equal(key, rev):                                # directed input: symmetrise
        key = np.unique(np.concatenate([key, rev]))
    del rev
    xadj = np.zeros(n + 1, np.int64)
    np.cumsum(np.bincount(key // n, minlength=n), out=xadj[1:])
    np.remainder(key, n, out=key)
    return xadj, key


def metis_keep(edges: int, max_edges: int | None = None) -> float:
    """The share of edges METIS sees: 1, or ``max_edges / edges`` above :data:`METIS_MAX_EDGES`."""
    limit = METIS_MAX_EDGES if max_edges is None else max_edges
    return 1.0 if edges <= limit else limit / edges


def _metis(edge_index: torch.Tensor, n: int, k: int, seed: int,
           max_edges: int | None = None) -> torch.Tensor:
    import pymetis

    keep = metis_keep(edge_index.size(1), max_edges)
    xadj, adjncy = _csr(edge_index, n, keep, seed)
    _, membership = pymetis.part_graph(k, adjacency=pymetis.CSRAdjacency(xadj, adjncy),
                                       options=pymetis.Options(seed=int(seed)))
    del xadj, adjncy
    return torch.as_tensor(np.asarray(membership, dtype=np.int64))


def _read_cache(path: Path, num_nodes: int, k: int) -> torch.Tensor | None:
    if not path.is_file():
        return None
    try:
        parts = torch.load(path, weights_only=True)
    except Exception:                       # a truncated or foreign file: recompute
        return None
    ok = (isinstance(parts, torch.Tensor) and parts.dtype == torch.long
          and parts.shape == (num_nodes,) and (num_nodes == 0 or int(parts.max()) < k))
    return parts if ok else None


def _write_cache(path: Path, parts) -> None:
    """Write atomically: concurrent array tasks may compute the same partition."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(parts, handle)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def part_nodes(parts: torch.Tensor, k: int) -> list[torch.Tensor]:
    """The ascending node ids of each part: ``k`` LongTensors (empty for an empty part)."""
    if parts.numel() and not 0 <= int(parts.min()) <= int(parts.max()) < k:
        raise DatasetError(f"part_nodes: part ids span {int(parts.min())}..{int(parts.max())}, "
                           f"outside 0..{k - 1}")
    order = torch.argsort(parts, stable=True)
    return list(torch.split(order, torch.bincount(parts, minlength=k).tolist()))


def edge_cut(edge_index: torch.Tensor, parts: torch.Tensor, chunk: int = 1 << 24) -> float:
    """Fraction of the edges (``edge_index`` columns) whose ends lie in different parts."""
    cut = 0
    for start in range(0, edge_index.size(1), chunk):
        block = edge_index[:, start:start + chunk]
        cut += int((parts[block[0]] != parts[block[1]]).sum())
    return cut / max(edge_index.size(1), 1)


def exact_hops(arch: str, layers: int) -> int:
    """The smallest halo that makes an ``arch`` GNN of ``layers`` layers exact on a part's nodes.

    A layer at node ``i`` reads its in-neighbours' previous states, so an ``L``-layer GNN's
    output at ``i`` depends on the nodes within ``L`` hops. In the subgraph induced by a part
    and its ``L``-hop halo, every node within ``L - 1`` hops keeps *all* its in-edges, so the
    chain of states that reaches the part is exact: ``L`` hops suffice for ``sage`` (mean over
    the full neighbourhood), ``gin`` (sum) and ``gat`` (softmax over the full neighbourhood).
    ``gcn`` also weights a message ``j -> i`` by :math:`1/\\sqrt{\\hat d_i \\hat d_j}`: the
    degrees of the nodes at exactly ``L`` hops, which lose their edges leaving the subgraph, are
    read at the first layer, so ``gcn`` needs ``L + 1`` hops.
    """
    if arch == "gcn":
        return layers + 1
    if arch in ("sage", "gin", "gat"):
        return layers
    raise DatasetError(f"exact_hops: unknown architecture {arch!r}; choose gcn, sage, gat or gin")


def induced_subgraph_with_halo(edge_index: torch.Tensor, num_nodes: int, nodes: torch.Tensor,
                               hops: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """A set of core nodes, their ``hops``-hop halo and every edge among them.

    The halo is the nodes from which a path of at most ``hops`` edges leads into the core
    (``edge_index`` is read as ``source -> target``, PyG's message direction; for an undirected
    graph this is simply the ``hops``-hop neighbourhood). With ``hops = exact_hops(arch, L)``
    (``L`` for sage/gat/gin, ``L + 1`` for gcn: see :func:`exact_hops`) an ``L``-layer GNN run
    on the subgraph gives exactly its full-graph outputs on the core nodes; ``hops = 0`` keeps
    only the edges inside the core (cheap, biased).

    Args:
        edge_index: [2, E] edges of the full graph.
        num_nodes: node count of the full graph.
        nodes: LongTensor of distinct core node ids (e.g. one entry of :func:`part_nodes`).
        hops: halo depth, >= 0.

    Returns:
        ``(subset, local_edge_index, core_count)``: ``subset`` holds the global ids, core nodes
        first (in the given order) then the halo (ascending); ``local_edge_index`` indexes into
        ``subset``; ``core_count = len(nodes)``, so ``out[:core_count]`` are the core outputs.
    """
    if isinstance(hops, bool) or not isinstance(hops, (int, np.integer)) or hops < 0:
        raise DatasetError(f"induced_subgraph_with_halo: hops={hops!r} must be an integer >= 0")
    nodes = torch.as_tensor(nodes, dtype=torch.long).view(-1)
    if hops == 0 or nodes.numel() == 0:
        subset = nodes
    else:
        reach, _, _, _ = k_hop_subgraph(nodes, int(hops), edge_index, relabel_nodes=False,
                                        num_nodes=num_nodes)
        in_core = torch.zeros(num_nodes, dtype=torch.bool)
        in_core[nodes] = True
        subset = torch.cat([nodes, reach[~in_core[reach]]])
    local, _ = subgraph(subset, edge_index, relabel_nodes=True, num_nodes=num_nodes)
    return subset, local, int(nodes.numel())

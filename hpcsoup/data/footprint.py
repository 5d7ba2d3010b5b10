"""Whether a config's graph fits where it will run, checked before any work starts.

Every stage's largest process holds the whole graph and works on it, so its peak is a
multiple of the graph's own tensors (:func:`graph_bytes`: float32 features, an int64
``edge_index``, labels and masks). Measured at 2.45M nodes (synthetic-products, 2.77 GiB of
tensors, `hpcsoup run jobs/products.toml`; benchmarks/RESULTS.md, ``## products``):
:data:`STAGE_FACTORS`. A config whose estimate exceeds the memory it can get fails at once,
naming the key and the estimate, instead of after an hour of METIS and training.

Sizes are known for ``synthetic-products`` (``data.nodes``; the generator's defaults: 100
features, 50 directed edges per node) and OGB's large node sets (their published sizes, as
ogb's loader stores them); the shipped graphs are small and other datasets unknown: not
checked.
"""
from __future__ import annotations

import inspect
import re

from hpcsoup.errors import ConfigError

#: each stage's peak RSS over the graph's tensors, measured at 2.45M nodes (rounded up): training
#: (`hpcsoup train --all`, METIS and a GCN and a SAGE specialist) 7.4 GiB since its adjacency is
#: read without a sort (12.1 GiB before), greedy's soup process 9.6 GiB, the H-GRAMA merge with
#: its evaluation 12.9 GiB since it times on whole METIS partitions of at most 1M nodes (killed at
#: 22.5 GiB on a 24 GiB machine before)
STAGE_FACTORS = {"train": 3.0, "soup": 3.6, "merge": 4.7}

#: (nodes, features, directed edges) of OGB's large node-property sets as ogb stores them
OGB_SIZES = {
    "ogbn-arxiv": (169_343, 128, 1_166_243),
    "ogbn-products": (2_449_029, 100, 123_718_280),
    "ogbn-papers100M": (111_059_956, 128, 1_615_685_872),
}


def graph_bytes(nodes: int, features: int, directed_edges: int) -> int:
    """Bytes of a graph's tensors: float32 features, an int64 ``edge_index``, labels and masks."""
    return nodes * (4 * features + 8 + 3) + 16 * directed_edges


def graph_size(dataset: str, nodes: int) -> tuple[int, int, int] | None:
    """``(nodes, features, directed_edges)`` of a config's dataset, where known."""
    from hpcsoup.data.datasets import SYNTHETIC

    if dataset == SYNTHETIC:
        from hpcsoup.data.synthetic import synthetic_products

        defaults = {k: p.default for k, p in inspect.signature(synthetic_products).parameters.items()}
        return int(nodes), defaults["features"], int(nodes * defaults["avg_degree"])
    return OGB_SIZES.get(dataset)


def slurm_bytes(mem: str) -> int | None:
    """Bytes of a SLURM ``--mem`` value (``'16G'``, ``'500M'``, ``'2T'``; no unit: MiB)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", mem or "", re.IGNORECASE)
    if not match:
        return None
    scale = {"": 2**20, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def check_fits(dataset: str, nodes: int, room: int | None, where: str, factor: float,
               doing: str) -> None:
    """A :class:`ConfigError` when the graph of ``dataset`` (``nodes``: synthetic-products'
    size) cannot fit in ``room`` bytes (``None``: unknown, not checked) with ``factor`` times
    its tensors; ``where`` says whose room it is, ``doing`` what needs it."""
    size = graph_size(dataset, nodes)
    if size is None or room is None:
        return
    nodes, features, edges = size
    tensors = graph_bytes(nodes, features, edges)
    need = factor * tensors
    if need > room:
        synthetic = dataset.startswith("synthetic")
        setting = f"data.nodes = {nodes:,}" if synthetic else f"data.dataset = {dataset!r} ({nodes:,} nodes)"
        smaller = "lower data.nodes" if synthetic else "use a smaller dataset"
        raise ConfigError(
            f"{setting}: {doing} needs about {need / 2**30:.1f} GiB ({tensors / 2**30:.1f} GiB "
            f"of float32 features and int64 edges x {factor:g}, measured); {where} can get "
            f"{room / 2**30:.1f} GiB; {smaller} or run where there is more memory "
            f"(SLURM: [slurm] mem)")

"""Specialist regions: which parent of a heterogeneous merge owns each node.

H-GRAMA's parents are specialists trained on disjoint parts of the training
nodes. A region assignment gives every node (not only training nodes) one
owner in ``0..parents-1``, so that each parent's region also holds validation
and test nodes on which its *retention* is measured:

- ``metis``: METIS parts of the graph (regions are connected communities);
- ``random``: a seeded uniform assignment;
- ``class``: the classes are shuffled (seeded) and dealt to parents round-robin,
  so each parent sees only some classes.

Parent ``k`` trains on ``train_mask & (region == k)``.
"""
from __future__ import annotations

import torch

from hpcsoup.data import Graph
from hpcsoup.errors import ConfigError

SPLITS = ("metis", "random", "class")


def specialist_regions(graph: Graph, split: str, parents: int, seed: int = 0,
                       cfg=None) -> torch.Tensor:
    """Owner of every node, shape ``[N]``, values in ``0..parents-1``.

    With ``cfg`` (the graph's config) a METIS split is the graph's stored partition
    (:func:`hpcsoup.data.partition.partition_for`): computed by one task, read by the others.
    """
    if split not in SPLITS:
        raise ConfigError(f"specialist split {split!r} is unknown; choose from {list(SPLITS)}")
    if parents < 1:
        raise ConfigError(f"specialists need at least one parent, got {parents}")
    n = graph.num_nodes
    generator = torch.Generator().manual_seed(seed)
    if split == "metis":
        from hpcsoup.data.partition import graph_partition, partition_for
        if cfg is not None:
            return partition_for(cfg, parents, seed=seed, graph=graph)
        return graph_partition(None, parents, seed=seed, graph=graph)
    if split == "random":
        return torch.randint(parents, (n,), generator=generator)
    if graph.num_classes < parents:
        raise ConfigError(f"class split needs at least as many classes as parents; "
                          f"'{graph.name}' has {graph.num_classes} classes, {parents} parents")
    owner_of_class = torch.empty(graph.num_classes, dtype=torch.long)
    owner_of_class[torch.randperm(graph.num_classes, generator=generator)] = (
        torch.arange(graph.num_classes) % parents)
    return owner_of_class[graph.data.y]

"""A graph without a fixed split, laid out the way a real PyG dataset class reads it.

``write_citationfull(root, graph)`` writes ``<root>/cora_ml/raw/cora_ml.npz`` in the npz layout
``torch_geometric.datasets.CitationFull`` downloads (graph2gauss: CSR adjacency, CSR attributes,
labels, no masks), so ``load_dataset("pyg/CitationFull/Cora_ML", root)`` runs PyG's own class
and reader offline. The content is a slice of the shipped Planetoid Cora (the real Cora_ML file
cannot be downloaded here); what is tested is the path of a mask-less PyG dataset.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
from torch_geometric.utils import subgraph


def write_citationfull(root: Path, graph, nodes: int = 600) -> Path:
    """The first ``nodes`` nodes of ``graph`` as ``<root>/cora_ml/raw/cora_ml.npz``; returns root."""
    data = graph.data
    keep = torch.arange(nodes)
    edge_index, _ = subgraph(keep, data.edge_index, relabel_nodes=True, num_nodes=data.num_nodes)
    x = sp.csr_matrix(data.x[:nodes].numpy())
    adj = sp.csr_matrix((np.ones(edge_index.size(1), dtype=np.float32),
                         (edge_index[0].numpy(), edge_index[1].numpy())), shape=(nodes, nodes))
    raw = Path(root) / "cora_ml" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    np.savez(raw / "cora_ml.npz", adj_data=adj.data, adj_indices=adj.indices,
             adj_indptr=adj.indptr, adj_shape=np.array(adj.shape), attr_data=x.data,
             attr_indices=x.indices, attr_indptr=x.indptr, attr_shape=np.array(x.shape),
             labels=data.y[:nodes].numpy())
    return Path(root)

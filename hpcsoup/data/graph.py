"""A node-classification graph and the normalisation every loader applies to what it read.

:mod:`hpcsoup.data.datasets` (shipped, PyG and synthetic graphs) and :mod:`hpcsoup.data.ogb`
(ogbn-* sets) both build their :class:`Graph` here.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import warnings
from pathlib import Path
from typing import Any

import torch
from torch_geometric.data import Data
from torch_geometric.utils import is_undirected, to_undirected

from hpcsoup.data.metrics import score as metric_score
from hpcsoup.errors import DatasetError


@dataclasses.dataclass
class Graph:
    """A node-classification graph and how to score predictions on it."""

    name: str
    data: Data
    num_classes: int
    metric: str
    evaluator: Any = None  # ogb's Evaluator for ogbn-* sets
    split: str = "fixed"  # how the masks were made: the dataset's own, or a random split

    @property
    def num_nodes(self) -> int:
        return self.data.num_nodes

    @property
    def num_features(self) -> int:
        return self.data.x.size(1)

    def mask(self, split: str) -> torch.Tensor:
        if split not in ("train", "val", "test"):
            raise DatasetError(f"split {split!r} of '{self.name}' is unknown; use train, val or test")
        return self.data[f"{split}_mask"]

    def score(self, logits: torch.Tensor, split: str | torch.Tensor = "test") -> float:
        """The dataset's standard score of ``logits`` (all nodes) on a split or node mask."""
        mask = self.mask(split) if isinstance(split, str) else split
        mask = mask.to(logits.device)
        if self.evaluator is not None and self.metric == "accuracy":
            y_true = self.data.y.to(logits.device)[mask].view(-1, 1).cpu()
            y_pred = logits[mask].argmax(-1, keepdim=True).cpu()
            return float(self.evaluator.eval({"y_true": y_true, "y_pred": y_pred})["acc"])
        return metric_score(self.metric, logits, self.data.y.to(logits.device), mask)

    def info(self) -> dict:
        d = self.data
        return {
            "dataset": self.name, "nodes": d.num_nodes, "edges": int(d.edge_index.size(1)),
            "features": self.num_features, "classes": self.num_classes, "metric": self.metric,
            "train": int(d.train_mask.sum()), "val": int(d.val_mask.sum()),
            "test": int(d.test_mask.sum()), "split": self.split,
        }


@contextlib.contextmanager
def locked(folder: Path):
    """Serialise first loads: PyG writes ``processed/`` files that concurrent tasks would race on."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".hpcsoup.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def quiet_pyg():
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch_geometric")


def finish(name: str, data: Data, num_classes: int, metric: str, split: int,
           evaluator: Any = None) -> Graph:
    """Normalise a loaded graph: undirected edges, 1-D labels, one split's masks."""
    if not is_undirected(data.edge_index, num_nodes=data.num_nodes):
        data.edge_index = to_undirected(data.edge_index, num_nodes=data.num_nodes)
    data.edge_attr = None
    data.x = data.x.float()
    data.y = data.y.view(-1).long()
    for key in ("train_mask", "val_mask", "test_mask"):
        mask = data[key]
        if mask.dim() == 2:
            if not 0 <= split < mask.size(1):
                raise DatasetError(f"dataset '{name}' has {mask.size(1)} splits; "
                                   f"split={split} is out of range (use 0..{mask.size(1) - 1})")
            mask = mask[:, split]
        data[key] = mask.bool().contiguous()
    out = Data(x=data.x, y=data.y, edge_index=data.edge_index, train_mask=data.train_mask,
               val_mask=data.val_mask, test_mask=data.test_mask)
    return Graph(name, out, num_classes, metric, evaluator)

"""Datasets: one name -> one :class:`Graph` (a PyG ``Data`` plus its metric).

Names:

- ``Cora``, ``CiteSeer`` (Planetoid, public split), ``Minesweeper``, ``Tolokers``
  (Platonov et al. 2023, 10 splits): shipped in the package, loaded offline
  by PyG's own loaders;
- ``ogbn-*`` (e.g. ``ogbn-arxiv``, ``ogbn-products``): ogb's
  ``PygNodePropPredDataset`` with the official split and ogb's ``Evaluator``;
- ``pyg/<Class>/<name>``: any ``torch_geometric.datasets`` class read from a root;
- ``synthetic-products``: a seeded ogbn-products-like graph of any size.

Every graph has an undirected ``edge_index``, float ``x``, long ``y`` of shape
``[N]`` and boolean ``train_mask`` / ``val_mask`` / ``test_mask``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch_geometric.data import Data
from torch_geometric.utils import is_undirected, to_undirected

from hpcsoup.data.metrics import score as metric_score
from hpcsoup.errors import DatasetError, DatasetNotFoundError

SHIPPED_DIR = Path(__file__).parent / "shipped"

#: shipped name -> (folder under the root, PyG class name, metric)
SHIPPED = {
    "Cora": ("planetoid", "Planetoid", "accuracy"),
    "CiteSeer": ("planetoid", "Planetoid", "accuracy"),
    "Minesweeper": ("heterophilous", "HeterophilousGraphDataset", "rocauc"),
    "Tolokers": ("heterophilous", "HeterophilousGraphDataset", "rocauc"),
}
SYNTHETIC = "synthetic-products"


@dataclasses.dataclass
class Graph:
    """A node-classification graph and how to score predictions on it."""

    name: str
    data: Data
    num_classes: int
    metric: str
    evaluator: Any = None  # ogb's Evaluator for ogbn-* sets

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
            "test": int(d.test_mask.sum()),
        }


def default_root() -> Path:
    """``$HPCSOUP_DATA`` or ``~/.cache/hpcsoup/data``: where datasets are kept."""
    return Path(os.environ.get("HPCSOUP_DATA", Path.home() / ".cache" / "hpcsoup" / "data"))


@contextlib.contextmanager
def _locked(folder: Path):
    """Serialise first loads: PyG writes ``processed/`` files that concurrent tasks would race on."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".hpcsoup.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _quiet_pyg():
    warnings.filterwarnings("ignore", category=DeprecationWarning, module="torch_geometric")


def _finish(name: str, data: Data, num_classes: int, metric: str, split: int,
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


def _load_shipped(name: str, root: Path, split: int) -> Graph:
    import torch_geometric.datasets as pyg_datasets

    folder, cls_name, metric = SHIPPED[name]
    sub = name if folder == "planetoid" else name.lower()
    target = root / folder / sub / "raw"
    with _locked(root / folder):
        if not target.is_dir():
            shutil.copytree(SHIPPED_DIR / folder / sub / "raw", target)
        _quiet_pyg()
        dataset = getattr(pyg_datasets, cls_name)(str(root / folder), name)
    return _finish(name, dataset[0], dataset.num_classes, metric, split)


def _load_pyg(name: str, root: Path, split: int) -> Graph:
    """``pyg/<Class>/<name>`` (or ``pyg/<Class>`` for classes without a name argument)."""
    import torch_geometric.datasets as pyg_datasets

    parts = name.split("/")
    if len(parts) not in (2, 3) or not hasattr(pyg_datasets, parts[1]):
        raise DatasetError(f"dataset '{name}': expected pyg/<Class>/<name> with a class of "
                           f"torch_geometric.datasets, e.g. pyg/Planetoid/PubMed")
    cls = getattr(pyg_datasets, parts[1])
    _quiet_pyg()
    with _locked(root):
        try:
            dataset = cls(str(root), parts[2]) if len(parts) == 3 else cls(str(root))
        except (OSError, RuntimeError) as exc:  # download attempted offline, or no files
            raise DatasetNotFoundError(
                f"dataset '{name}' could not be loaded from '{root}': {exc}. Put its files "
                f"under that root (as {parts[1]} expects them) or run once with network access"
            ) from exc
    data = dataset[0]
    for key in ("train_mask", "val_mask", "test_mask"):
        if key not in data:
            raise DatasetError(f"dataset '{name}' has no {key}; hpcsoup needs a fixed split")
    return _finish(name, data, int(dataset.num_classes), "accuracy", split)


def load_dataset(name: str, root: str | Path | None = None, split: int = 0,
                 nodes: int = 100_000, seed: int = 0) -> Graph:
    """Load a dataset by name.

    Args:
        name: a shipped name, ``ogbn-*``, ``pyg/<Class>/<name>`` or ``synthetic-products``.
        root: folder holding (or receiving) the files (default: :func:`default_root`).
        split: which split for datasets that ship several (default: ``0``).
        nodes: node count of ``synthetic-products`` (default: ``100_000``).
        seed: seed of ``synthetic-products`` (default: ``0``).
    """
    root = Path(root) if root else default_root()
    if name in SHIPPED:
        return _load_shipped(name, root, split)
    if name.startswith("ogbn-"):
        from hpcsoup.data.ogb import load_ogb
        return load_ogb(name, root)
    if name.startswith("pyg/"):
        return _load_pyg(name, root, split)
    if name == SYNTHETIC:
        from hpcsoup.data.synthetic import synthetic_products
        data, num_classes = synthetic_products(nodes, seed=seed)
        return Graph(f"{SYNTHETIC}-{nodes}", data, num_classes, "accuracy")
    lowered = {k.lower(): k for k in SHIPPED}
    hint = f" (did you mean '{lowered[name.lower()]}'?)" if name.lower() in lowered else ""
    raise DatasetError(f"unknown dataset '{name}'{hint}; choose one of {sorted(SHIPPED)}, "
                       f"'ogbn-<name>', 'pyg/<Class>/<name>' or '{SYNTHETIC}'")


def load_from_config(cfg) -> Graph:
    """The dataset a config's ``[data]`` section names."""
    d = cfg.data
    return load_dataset(d.dataset, d.root or None, split=d.split, nodes=d.nodes, seed=d.seed)

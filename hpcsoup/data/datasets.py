"""Datasets: one name -> one :class:`Graph` (a PyG ``Data`` plus its metric).

Names:

- ``Cora``, ``CiteSeer`` (Planetoid, public split), ``Minesweeper``, ``Tolokers``
  (Platonov et al. 2023, 10 splits): shipped in the package, loaded offline
  by PyG's own loaders;
- ``ogbn-*`` (e.g. ``ogbn-arxiv``, ``ogbn-products``): ogb's
  ``PygNodePropPredDataset`` with the official split and ogb's ``Evaluator``;
- ``pyg/<Class>/<name>``: any ``torch_geometric.datasets`` class read from a root;
  one without a fixed split (Amazon, Coauthor, CitationFull, WikiCS...) gets a
  seeded random split (:func:`random_split`, settings :class:`SplitSettings`);
- ``synthetic-products``: a seeded ogbn-products-like graph of any size.

Every graph has an undirected ``edge_index``, float ``x``, long ``y`` of shape
``[N]`` and boolean ``train_mask`` / ``val_mask`` / ``test_mask``.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path

import torch
from torch_geometric.data import Data

from hpcsoup.data.graph import Graph, finish, locked, quiet_pyg
from hpcsoup.errors import DatasetError, DatasetNotFoundError
from hpcsoup.data.footprint import check_fits
from hpcsoup.memory import available_bytes

SHIPPED_DIR = Path(__file__).parent / "shipped"

#: shipped name -> (folder under the root, PyG class name, metric)
SHIPPED = {
    "Cora": ("planetoid", "Planetoid", "accuracy"),
    "CiteSeer": ("planetoid", "Planetoid", "accuracy"),
    "Minesweeper": ("heterophilous", "HeterophilousGraphDataset", "rocauc"),
    "Tolokers": ("heterophilous", "HeterophilousGraphDataset", "rocauc"),
}
SYNTHETIC = "synthetic-products"


@dataclasses.dataclass(frozen=True)
class SplitSettings:
    """The seeded random split of a graph without masks (PyG's ``RandomNodeSplit`` conventions).

    Args:
        mode: ``train_rest`` (validation and test drawn, the rest trains) or ``random``
            (``num_train_per_class`` training nodes per class, then validation and test from
            the rest) (default: ``train_rest``).
        num_train_per_class: training nodes per class for ``random`` (default: ``20``).
        num_val, num_test: a fraction of the nodes when below 1, else a node count
            (default: ``0.2`` each: a 60/20/20 split).
        seed: the split's seed (default: ``0``).

    Config keys: ``data.random_split``, ``data.num_train_per_class``, ``data.num_val``,
    ``data.num_test``, ``data.seed``.
    """

    mode: str = "train_rest"
    num_train_per_class: int = 20
    num_val: float = 0.2
    num_test: float = 0.2
    seed: int = 0

    def describe(self) -> str:
        train = ("the rest" if self.mode == "train_rest"
                 else f"{self.num_train_per_class} per class")
        return (f"random (no fixed split; seed {self.seed}): train {train}, val {self.num_val:g}, "
                f"test {self.num_test:g} (data.random_split, data.num_train_per_class, "
                f"data.num_val, data.num_test, data.seed)")


def random_split(data: Data, settings: SplitSettings | None = None, **values) -> Data:
    """``data`` with seeded ``train_mask``/``val_mask``/``test_mask`` (a shallow copy).

    ``torch_geometric.transforms.RandomNodeSplit`` draws them from the global RNG; it runs
    here under a forked RNG seeded with ``settings.seed``, so the split depends on the seed
    alone. ``values`` override ``settings`` fields, e.g. ``random_split(data, seed=1)``.
    """
    from torch_geometric.transforms import RandomNodeSplit

    s = dataclasses.replace(settings or SplitSettings(), **values)
    if s.mode not in ("train_rest", "random"):
        raise DatasetError(f"random split mode {s.mode!r} is unknown; choose 'train_rest' or "
                           f"'random'")

    def size(value: float) -> int | float:  # RandomNodeSplit: int = count, float = fraction
        return float(value) if value < 1 else int(value)

    n = data.num_nodes
    counts = [v if v >= 1 else v * n for v in (s.num_val, s.num_test)]
    if s.mode == "random":
        counts.append(s.num_train_per_class * int(data.y.view(-1).max() + 1))
    if sum(counts) >= n or min(s.num_val, s.num_test) <= 0:
        raise DatasetError(f"random split num_val={s.num_val:g}, num_test={s.num_test:g}"
                           f"{'' if s.mode == 'train_rest' else f', {s.num_train_per_class} per class'}"
                           f" does not fit {n} nodes; use fractions such as 0.2")
    transform = RandomNodeSplit(s.mode, num_train_per_class=s.num_train_per_class,
                                num_val=size(s.num_val), num_test=size(s.num_test))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        return transform(data)


def default_root() -> Path:
    """``$HPCSOUP_DATA`` or ``~/.cache/hpcsoup/data``: where datasets are kept."""
    return Path(os.environ.get("HPCSOUP_DATA", Path.home() / ".cache" / "hpcsoup" / "data"))


def _load_shipped(name: str, root: Path, split: int) -> Graph:
    import torch_geometric.datasets as pyg_datasets

    folder, cls_name, metric = SHIPPED[name]
    sub = name if folder == "planetoid" else name.lower()
    target = root / folder / sub / "raw"
    with locked(root / folder):
        if not target.is_dir():
            shutil.copytree(SHIPPED_DIR / folder / sub / "raw", target)
        quiet_pyg()
        dataset = getattr(pyg_datasets, cls_name)(str(root / folder), name)
    return finish(name, dataset[0], dataset.num_classes, metric, split)


def _load_pyg(name: str, root: Path, split: int, split_settings: SplitSettings) -> Graph:
    """``pyg/<Class>/<name>`` (or ``pyg/<Class>`` for classes without a name argument).

    Without masks the graph gets :func:`random_split` with ``split_settings``.
    """
    import torch_geometric.datasets as pyg_datasets

    parts = name.split("/")
    if len(parts) not in (2, 3) or not hasattr(pyg_datasets, parts[1]):
        raise DatasetError(f"dataset '{name}': expected pyg/<Class>/<name> with a class of "
                           f"torch_geometric.datasets, e.g. pyg/Planetoid/PubMed")
    cls = getattr(pyg_datasets, parts[1])
    quiet_pyg()
    with locked(root):
        try:
            dataset = cls(str(root), parts[2]) if len(parts) == 3 else cls(str(root))
        except (OSError, RuntimeError) as exc:  # download attempted offline, or no files
            raise DatasetNotFoundError(
                f"dataset '{name}' could not be loaded from '{root}': {exc}. Put its files "
                f"under that root (as {parts[1]} expects them) or run once with network access"
            ) from exc
    data = dataset[0]
    keys = ("train_mask", "val_mask", "test_mask")
    present = [key for key in keys if key in data]
    how = "fixed"
    if not present:
        if data.y is None:
            raise DatasetError(f"dataset '{name}' has no node labels y; hpcsoup needs a node "
                               f"classification dataset")
        data.y = data.y.view(-1)
        data = random_split(data, split_settings)
        how = split_settings.describe()
    elif len(present) < len(keys):
        missing = next(key for key in keys if key not in present)
        raise DatasetError(f"dataset '{name}' has {', '.join(present)} but no {missing}; "
                           f"hpcsoup needs all three masks (or none: then it draws a random "
                           f"split)")
    graph = finish(name, data, int(dataset.num_classes), "accuracy", split)
    graph.split = how
    return graph


#: generating a synthetic graph peaks at about this many times the graph's own tensors
#: (measured: 3.6 GiB at 2.45M nodes for 2.8 GiB of features, edges and labels)
GENERATION_OVERHEAD = 1.3


def check_room_for_synthetic(nodes: int) -> None:
    """A :class:`ConfigError` before generation when the graph cannot fit in this process."""
    check_fits(SYNTHETIC, nodes, available_bytes(), "this process", GENERATION_OVERHEAD,
               f"generating {SYNTHETIC}")


def load_dataset(name: str, root: str | Path | None = None, split: int = 0,
                 nodes: int = 100_000, seed: int = 0,
                 split_settings: SplitSettings | None = None) -> Graph:
    """Load a dataset by name.

    Args:
        name: a shipped name, ``ogbn-*``, ``pyg/<Class>/<name>`` or ``synthetic-products``.
        root: folder holding (or receiving) the files (default: :func:`default_root`).
        split: which split for datasets that ship several (default: ``0``).
        nodes: node count of ``synthetic-products`` (default: ``100_000``).
        seed: seed of ``synthetic-products`` (default: ``0``).
        split_settings: the random split of a ``pyg/`` dataset without masks (default:
            :class:`SplitSettings` ``()``: 60/20/20, seed 0).
    """
    root = Path(root) if root else default_root()
    if name in SHIPPED:
        return _load_shipped(name, root, split)
    if name.startswith("ogbn-"):
        from hpcsoup.data.ogb import load_ogb
        return load_ogb(name, root)
    if name.startswith("pyg/"):
        return _load_pyg(name, root, split, split_settings or SplitSettings())
    if name == SYNTHETIC:
        from hpcsoup.data.synthetic import synthetic_products
        check_room_for_synthetic(nodes)
        data, num_classes = synthetic_products(nodes, seed=seed)
        return Graph(f"{SYNTHETIC}-{nodes}", data, num_classes, "accuracy")
    lowered = {k.lower(): k for k in SHIPPED}
    hint = f" (did you mean '{lowered[name.lower()]}'?)" if name.lower() in lowered else ""
    raise DatasetError(f"unknown dataset '{name}'{hint}; choose one of {sorted(SHIPPED)}, "
                       f"'ogbn-<name>', 'pyg/<Class>/<name>' or '{SYNTHETIC}'")


def load_from_config(cfg) -> Graph:
    """The dataset a config's ``[data]`` section names."""
    d = cfg.data
    settings = SplitSettings(d.random_split, d.num_train_per_class, d.num_val, d.num_test, d.seed)
    return load_dataset(d.dataset, d.root or None, split=d.split, nodes=d.nodes, seed=d.seed,
                        split_settings=settings)

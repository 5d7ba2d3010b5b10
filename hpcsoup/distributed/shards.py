"""The partitioned graph, stored once, read back one rank's shard at a time.

Distributed partition learned souping (:mod:`hpcsoup.distributed.pls`) needs every
rank to hold only the METIS partitions it computes, never the whole graph. The
graph is therefore partitioned **once** and each partition's subgraph (its core
nodes plus the halo the objective needs) is written to the Zarr store::

    <store>/graphs/<graph>/parts-<K>-halo<h>-seed<s>/      attrs: partitions, halo, seed, sizes...
        p00000/ nodes        int64 [n_p]     global ids, the core_count core nodes first
                edge_index   int64 [2, e_p]  local ids (the partition's subgraph)
                x            float32 [n_p, F]
                y            int64 [n_p]
                train_mask, val_mask, test_mask   bool [n_p]
        p00001/ ...

``<graph>`` is the dataset name (plus ``-split<i>`` for multi-split sets). The
folder is built aside and renamed into place (atomic), so a reader sees either
no partitioned graph or a complete one, and concurrent preparers cannot corrupt it.

A :class:`Shard` is what one rank holds: the partitions assigned to it.
**Assignment** (:func:`owner_of`): partition ``p`` belongs to rank ``p mod P``
(round-robin by partition id). With PLS's stratified draw (partition ids drawn
one per residue class mod R; see :mod:`hpcsoup.distributed.pls`) and ``P`` dividing
``R``, every rank then computes exactly ``R / P`` of a step's partitions; any
other draw is still correct, only less balanced.

Resident memory: a rank holds ``sum_p n_p`` node rows over its partitions, i.e.
about ``N / P`` core nodes plus their halos; :attr:`Shard.resident_nodes` and
:attr:`Shard.unique_nodes` measure it.
"""
from __future__ import annotations

import dataclasses
import os
import re
import uuid
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from hpcsoup.errors import StoreError, StoreNotFoundError
from hpcsoup.store.zarr_store import remove_tree
from hpcsoup.soup.pls import LocalPartitionSource, Part

GRAPHS = "graphs"
FORMAT = 2  # 2: one Part for PLS and shards, val_positives (the AUC objective)
#: the arrays each stored partition holds: PLS's own :class:`~hpcsoup.soup.pls.Part`
ARRAYS = Part.TENSORS


def graph_key(dataset: str, split: int = 0, data_seed: int = 0) -> str:
    """Folder name of a graph under ``graphs/``: the dataset name, ``-split<i>`` when the split
    is not 0, ``-dseed<s>`` when a generated graph's seed is not 0."""
    key = re.sub(r"[^A-Za-z0-9_.+=-]", "_", dataset)
    if split:
        key += f"-split{split}"
    if data_seed:
        key += f"-dseed{data_seed}"
    return key


def parts_key(partitions: int, halo: int, seed: int) -> str:
    return f"parts-{partitions}-halo{halo}-seed{seed}"


def shard_path(store_path: str | Path, graph_id: str, partitions: int, halo: int,
               seed: int) -> Path:
    """Where a partitioned graph lives in the store (``graph_id`` from :func:`graph_key`)."""
    return Path(store_path) / GRAPHS / graph_id / parts_key(partitions, halo, seed)


def owner_of(pid: int, size: int) -> int:
    """The rank that holds partition ``pid`` among ``size`` ranks: round-robin, ``pid mod size``."""
    return pid % size


def owned_partitions(partitions: int, rank: int, size: int) -> list[int]:
    """Partition ids of ``rank``: ``rank, rank + size, rank + 2 size, ...``."""
    return list(range(rank, partitions, size))


# --------------------------------------------------------------------------- building


def build_parts(graph, partitions: int, halo: int, seed: int = 0,
                parts: torch.Tensor | None = None) -> Iterator[Part]:
    """METIS partitions of ``graph`` with a ``halo``-hop halo, one :class:`Part` at a time.

    They come from PLS's own :class:`~hpcsoup.soup.pls.LocalPartitionSource`
    (pymetis, seeded; or the given partition vector ``parts``), so they are the same, bit
    for bit, as in a single-process run.
    """
    source = LocalPartitionSource(graph, partitions, halo, seed=seed, cache=False, parts=parts)
    for pid in range(partitions):
        yield source.part(pid)


def _compressors():
    return [ZstdCodec(level=1), Crc32cCodec()]


def _write(group: zarr.Group, name: str, tensor: torch.Tensor) -> None:
    array = tensor.detach().cpu().contiguous().numpy()
    group.create_array(name, data=array, compressors=_compressors(),
                       attributes={"torch_dtype": str(tensor.dtype).removeprefix("torch.")})


def write_parts(path: str | Path, parts: Iterable[Part], attrs: dict,
                arrays: dict | None = None) -> Path:
    """Write partitions (and small global ``arrays``) to ``path`` atomically.

    The folder is built aside and renamed into place. When another writer finished
    first, its copy is kept and this one discarded (both hold the same graph).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        root = zarr.create_group(store=str(tmp), zarr_format=3,
                                 attributes={"hpcsoup_graph_parts": FORMAT, "complete": False})
        for name, tensor in (arrays or {}).items():
            _write(root, name, tensor)
        sizes, cores, edges, val_counts, test_counts, val_positives = [], [], [], [], [], []
        for part in parts:
            group = root.create_group(f"p{part.pid:05d}", attributes={
                "pid": part.pid, "core_count": part.core_count, "nodes": part.num_nodes,
                "edges": int(part.edge_index.size(1))})
            for name, tensor in part.tensors().items():
                _write(group, name, tensor)
            sizes.append(part.num_nodes)
            cores.append(part.core_count)
            edges.append(int(part.edge_index.size(1)))
            val_counts.append(int(part.val_mask.sum()))
            test_counts.append(int(part.test_mask.sum()))
            val_positives.append(int((part.y[part.val_mask] == 1).sum()))
        root.attrs.update({**attrs, "partitions": len(sizes), "sizes": sizes, "core": cores,
                           "edges": edges, "val_counts": val_counts, "test_counts": test_counts,
                           "val_positives": val_positives})
        root.attrs.update({"complete": True})  # LAST
        try:
            os.rename(tmp, path)
        except OSError:
            if not _complete(path):
                raise
    finally:
        remove_tree(tmp)
    return path


def _complete(path: Path) -> bool:
    if not (Path(path) / "zarr.json").is_file():
        return False
    try:
        attrs = zarr.open_group(str(path), mode="r", zarr_format=3).attrs
        return attrs.get("complete") is True and attrs.get("hpcsoup_graph_parts") == FORMAT
    except Exception:  # unreadable metadata: not a usable partitioned graph
        return False


def is_prepared(path: str | Path) -> bool:
    """Whether a complete partitioned graph is at ``path``."""
    return _complete(Path(path))


def prepare(path: str | Path, graph, partitions: int, halo: int, seed: int = 0,
            builder: Callable[..., Iterable[Part]] | None = None,
            parts: torch.Tensor | None = None) -> Path:
    """Partition ``graph`` and write it to ``path`` (see :func:`shard_path`) once.

    Does nothing when a complete partitioned graph is already there. Only one process
    should call this (rank 0 before the others read, or a separate preparation step):
    it needs the whole graph in memory.
    """
    path = Path(path)
    if _complete(path):
        return path
    if not 1 <= partitions <= graph.num_nodes:
        raise StoreError(f"cannot cut '{graph.name}' ({graph.num_nodes} nodes) into {partitions} "
                         f"partitions; set soup.pls.partitions in 1..{graph.num_nodes}")
    if builder is None:
        parts = build_parts(graph, partitions, halo, seed, parts)
    else:
        parts = builder(graph, partitions, halo, seed)
    info = graph.info()
    data = graph.data
    return write_parts(path, parts, {
        "dataset": graph.name, "halo": halo, "seed": seed, "num_nodes": graph.num_nodes,
        "num_features": graph.num_features, "num_classes": graph.num_classes,
        "metric": graph.metric, "info": info}, arrays={
        "val_labels": data.y[graph.mask("val")], "test_labels": data.y[graph.mask("test")]})


# --------------------------------------------------------------------------- reading


@dataclasses.dataclass
class Shard:
    """The partitions one rank holds (and nothing else of the graph).

    Attributes:
        path: the partitioned graph in the store.
        attrs: its metadata (every partition's sizes and validation/test counts, metric...).
        rank, size: this rank and the number of ranks.
        parts: ``{pid: Part}`` for the partitions this rank owns.
        val_labels, test_labels: the labels of the validation / test nodes in global order
            (small; ROC-AUC needs them beside the gathered scores).
    """

    path: Path
    attrs: dict
    rank: int
    size: int
    parts: dict
    val_labels: torch.Tensor
    test_labels: torch.Tensor

    @property
    def partitions(self) -> int:
        return int(self.attrs["partitions"])

    def owns(self, pid: int) -> bool:
        return pid in self.parts

    def owner(self, pid: int) -> int:
        return owner_of(pid, self.size)

    @property
    def resident_nodes(self) -> int:
        """Node rows this rank holds: its partitions' core and halo nodes (halos may repeat)."""
        return sum(p.num_nodes for p in self.parts.values())

    @property
    def core_nodes(self) -> int:
        return sum(p.core_count for p in self.parts.values())

    @property
    def unique_nodes(self) -> int:
        """Distinct graph nodes this rank holds (core or halo)."""
        if not self.parts:
            return 0
        return int(torch.cat([p.nodes for p in self.parts.values()]).unique().numel())

    @property
    def resident_bytes(self) -> int:
        return sum(p.nbytes() for p in self.parts.values())

    def stats(self) -> dict:
        return {"rank": self.rank, "partitions": sorted(self.parts), "core_nodes": self.core_nodes,
                "resident_nodes": self.resident_nodes, "unique_nodes": self.unique_nodes,
                "resident_bytes": self.resident_bytes, "graph_nodes": int(self.attrs["num_nodes"])}


def _fix(path: Path) -> str:
    return (f"delete '{path}' and run the soup again to rebuild it (or "
            f"`hpcsoup partition --config <file>`)")


def _read(group: zarr.Group, name: str, where: str, path: Path) -> torch.Tensor:
    try:
        node = group[name]
    except KeyError:
        raise StoreError(f"partitioned graph '{where}' has no array '{name}'; {_fix(path)}") from None
    try:
        array = np.array(node[...], copy=True)
    except Exception as exc:  # zstd / crc32c / file errors: a damaged chunk
        raise StoreError(f"partitioned graph '{where}': array '{name}' cannot be read "
                         f"({type(exc).__name__}: {exc}); {_fix(path)}") from exc
    return torch.from_numpy(array)


def read_part(path: str | Path, pid: int) -> Part:
    """Partition ``pid`` of the partitioned graph at ``path``."""
    path = Path(path)
    name = f"p{pid:05d}"
    where = f"{path}/{name}"
    if not (path / name / "zarr.json").is_file():
        raise StoreNotFoundError(f"partition {pid} is missing from the partitioned graph "
                                 f"'{path}'; {_fix(path)}")
    group = zarr.open_group(str(path), path=name, mode="r", zarr_format=3)
    t = {name: _read(group, name, where, path) for name in ARRAYS}
    return Part(t["x"], t["edge_index"].long(), t["y"].long(), t["deg"], t["val_mask"].bool(),
                t["val_pos"].long(), t["test_mask"].bool(), t["test_pos"].long(),
                t["nodes"].long(), int(group.attrs["core_count"]), pid)


def open_parts(path: str | Path) -> dict:
    """The metadata of a partitioned graph; :class:`StoreNotFoundError` when it is not there."""
    path = Path(path)
    if not (path / "zarr.json").is_file():
        raise StoreNotFoundError(f"partitioned graph '{path}' does not exist; rank 0 writes it on "
                                 f"the first distributed soup, or run `hpcsoup partition "
                                 f"--config <file>` first")
    attrs = dict(zarr.open_group(str(path), mode="r", zarr_format=3).attrs)
    if attrs.get("complete") is not True:
        raise StoreError(f"partitioned graph '{path}' is incomplete (its writer was killed); "
                         f"{_fix(path)}")
    if attrs.get("hpcsoup_graph_parts") != FORMAT:
        raise StoreError(f"partitioned graph '{path}' has format {attrs.get('hpcsoup_graph_parts')}, "
                         f"this hpcsoup reads format {FORMAT}; {_fix(path)}")
    return attrs


def load_shard(path: str | Path, rank: int, size: int) -> Shard:
    """Read the partitions of ``rank`` (of ``size`` ranks) from the store: only those."""
    path = Path(path)
    attrs = open_parts(path)
    root = zarr.open_group(str(path), mode="r", zarr_format=3)
    labels = {name: _read(root, name, str(path), path).long() for name in ("val_labels", "test_labels")}
    mine = owned_partitions(int(attrs["partitions"]), rank, size)
    return Shard(path, attrs, rank, size, {pid: read_part(path, pid) for pid in mine},
                 labels["val_labels"], labels["test_labels"])

"""OGB node-property datasets (``ogbn-*``) through ogb's own loader.

:func:`load_ogb` reads a dataset with ``ogb.nodeproppred.PygNodePropPredDataset``,
turns the official split (``get_idx_split()``) into masks and keeps ogb's
``Evaluator`` on the :class:`~hpcsoup.data.datasets.Graph`, so that scores are
the leaderboard's own arithmetic.

Where the files live (``root`` is the dataset root, e.g. ``$HPCSOUP_DATA``)::

    <root>/ogbn_products/            the unzipped content of products.zip
        RELEASE_v1.txt               ogb's version stamp (required)
        raw/  split/  mapping/
        processed/                   written by the first load (PyG)

The folder name is the dataset name with ``-`` replaced by ``_`` (ogb's rule; a
``<name>_pyg`` folder is used when present). With network access a missing
dataset downloads by itself; offline (or with ``HPCSOUP_OFFLINE=1``) a missing
dataset raises :class:`~hpcsoup.errors.DatasetNotFoundError` that names the
folder to fill. hpcsoup downloads with ogb's helpers itself rather than through
ogb's dataset class, because ogb asks on the terminal (``input()``) before large
downloads and on version mismatches, which would fail or hang in batch jobs.

**Custom datasets in OGB layout** (e.g. written by ``ogb.io.DatasetSaver``)
load offline through ogb's ``meta_dict`` mechanism, either by passing
``meta_dict=`` or, to make them loadable by name (``load_dataset('ogbn-mine')``),
by putting the dataset folder at ``<root>/ogbn_mine/`` with its meta dict as
``meta.json`` beside ``RELEASE_v<version>.txt`` (:func:`save_meta` writes it).
The folder is then found from ``root``; a ``dir_path`` inside ``meta.json`` is
ignored. Example::

    saver = DatasetSaver("ogbn-mine", is_hetero=False, version=1, root=tmp)
    ...                                        # save_graph_list, labels, split, task info
    meta = saver.get_meta_dict()
    shutil.copytree(meta["dir_path"], root / "ogbn_mine")
    save_meta(meta, root / "ogbn_mine")
    graph = load_dataset("ogbn-mine", root)

Only single-label multi-class sets scored by accuracy are supported
(ogbn-arxiv, ogbn-products, ogbn-papers100M and custom ones like them);
ogbn-proteins (112 binary tasks, ROC-AUC) and ogbn-mag (heterogeneous) raise
:class:`~hpcsoup.errors.DatasetError`.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any, Mapping

import torch

from hpcsoup.data.graph import Graph, finish, locked, quiet_pyg
from hpcsoup.errors import DatasetError, DatasetNotFoundError

#: set to 1 to never try a download (a missing dataset raises at once)
OFFLINE_ENV = "HPCSOUP_OFFLINE"
#: the meta dict of a custom dataset, inside its folder
META_FILE = "meta.json"
#: seconds to wait for the download server to answer before calling it offline
PROBE_TIMEOUT = 10.0

_FLAGS = ("binary", "is hetero", "has_node_attr", "has_edge_attr", "add_inverse_edge")
_REQUIRED = ("version", "num tasks", "num classes", "task type", "eval metric", "split")
_DEFAULTS = {
    "binary": "True", "is hetero": "False", "has_node_attr": "True", "has_edge_attr": "False",
    "add_inverse_edge": "False", "additional node files": "None", "additional edge files": "None",
    "url": "",
}


def _allow_ogb_pickles() -> None:
    """Let ``torch.load(weights_only=True)`` (torch >= 2.6's default) read ogb's files.

    ogb calls ``torch.load`` without ``weights_only``: the processed graph is a
    pickled PyG ``Data`` (with numpy scalars), and a split written by
    ``DatasetSaver`` is a dict of numpy arrays. Registering exactly these types
    keeps the safe loader on instead of switching to ``weights_only=False``.
    """
    import numpy as np
    from torch_geometric.data.data import Data, DataEdgeAttr, DataTensorAttr
    from torch_geometric.data.storage import GlobalStorage

    try:
        from numpy._core.multiarray import _reconstruct, scalar
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct, scalar
    torch.serialization.add_safe_globals([
        Data, DataEdgeAttr, DataTensorAttr, GlobalStorage,
        scalar, _reconstruct, np.ndarray, np.dtype,
        *(type(np.dtype(t)) for t in (np.bool_, np.uint8, np.int8, np.int16, np.int32, np.int64,
                                      np.float16, np.float32, np.float64)),
    ])


def _master() -> Mapping[str, Mapping[str, str]]:
    """ogb's table of official node-property datasets: name -> meta info."""
    import pandas as pd
    import ogb.nodeproppred

    path = Path(ogb.nodeproppred.__file__).parent / "master.csv"
    table = pd.read_csv(path, index_col=0, keep_default_na=False)
    return {name: table[name].to_dict() for name in table.columns}


def dir_name(name: str) -> str:
    """ogb's folder name for a dataset: ``ogbn-products`` -> ``ogbn_products``."""
    return "_".join(name.split("-"))


def save_meta(meta_dict: Mapping[str, Any], folder: str | Path) -> Path:
    """Write a custom dataset's meta dict as ``<folder>/meta.json`` (``dir_path`` dropped).

    Args:
        meta_dict: ogb's meta dict, e.g. ``DatasetSaver.get_meta_dict()``.
        folder: the dataset folder (``<root>/<name with _>``) holding ``raw/`` and ``split/``.
    """
    folder = Path(folder)
    meta = {k: v for k, v in meta_dict.items() if k != "dir_path"}
    path = folder / META_FILE
    path.write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    return path


def _normalise_meta(name: str, meta: Mapping[str, Any], folder: Path) -> dict:
    """A meta dict as ogb reads it: flags as the strings 'True'/'False', int version."""
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise DatasetError(f"meta dict of dataset '{name}' lacks {missing}; write it with "
                           f"ogb.io.DatasetSaver.get_meta_dict() (keys: {list(_REQUIRED)})")
    out = {**_DEFAULTS, "download_name": folder.name, **meta}
    for key in _FLAGS:
        value = out[key]
        if isinstance(value, bool):
            out[key] = str(value)
        elif str(value) not in ("True", "False"):
            raise DatasetError(f"meta dict of dataset '{name}': {key!r} = {value!r}; "
                               f"use True or False")
    try:
        out["version"] = int(out["version"])
    except (TypeError, ValueError):
        raise DatasetError(f"meta dict of dataset '{name}': 'version' = {out['version']!r} "
                           f"is not an integer") from None
    out["dir_path"] = str(folder)
    return out


def _resolve(name: str, root: Path, meta_dict: Mapping[str, Any] | None):
    """(folder, meta info, custom?) of a dataset."""
    if meta_dict is not None:
        folder = Path(meta_dict["dir_path"]) if "dir_path" in meta_dict else root / dir_name(name)
        return folder, _normalise_meta(name, meta_dict, folder), True
    folder = root / dir_name(name)
    if (root / (dir_name(name) + "_pyg")).is_dir():  # ogb's rule for older downloads
        folder = root / (dir_name(name) + "_pyg")
    if (folder / META_FILE).is_file():
        try:
            meta = json.loads((folder / META_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise DatasetError(f"dataset '{name}': cannot read '{folder / META_FILE}': {exc}") from exc
        return folder, _normalise_meta(name, meta, folder), True
    master = _master()
    if name not in master:
        raise DatasetNotFoundError(
            f"dataset '{name}' is not an official OGB node dataset ({sorted(master)}) and "
            f"'{folder / META_FILE}' does not exist. For a custom dataset in OGB layout (e.g. "
            f"written by ogb.io.DatasetSaver), put its folder at '{folder}/' with its meta "
            f"dict as {META_FILE} (hpcsoup.data.ogb.save_meta), or pass meta_dict=")
    return folder, {**master[name], "dir_path": str(folder)}, False


def _check_supported(name: str, info: Mapping[str, Any]) -> None:
    if str(info["is hetero"]) == "True":
        raise DatasetError(f"dataset '{name}' is heterogeneous (several node types); hpcsoup "
                           f"supports homogeneous node sets such as ogbn-arxiv or ogbn-products")
    if info["eval metric"] != "acc" or int(info["num tasks"]) != 1:
        raise DatasetError(
            f"dataset '{name}' is scored by {info['eval metric']!r} over {info['num tasks']} "
            f"tasks (multi-label); hpcsoup supports single-label multi-class sets scored by "
            f"accuracy, such as ogbn-arxiv, ogbn-products and ogbn-papers100M")


def _offline(name: str, root: Path, folder: Path, info: Mapping[str, Any], why: str):
    return DatasetNotFoundError(
        f"dataset '{name}' is not under root '{root}' and cannot be downloaded ({why}). Put "
        f"the unzipped OGB files (the content of {info['url']}: raw/, split/, "
        f"RELEASE_v{info['version']}.txt) in '{folder}/', i.e. '<root>/{folder.name}/'. With "
        f"network access it downloads automatically on first use.")


def _download(name: str, root: Path, folder: Path, info: Mapping[str, Any]) -> None:
    """Fetch and unzip an official dataset into ``folder``, without ogb's interactive prompts."""
    from ogb.utils.url import download_url, extract_zip

    url = info["url"]
    if os.environ.get(OFFLINE_ENV, "") not in ("", "0"):
        raise _offline(name, root, folder, info, f"{OFFLINE_ENV} is set")
    try:  # fail fast (and never hang) when there is no network
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=PROBE_TIMEOUT)
    except (OSError, ValueError) as exc:
        raise _offline(name, root, folder, info, f"no answer from {url}: {exc}") from exc
    staging = root / f".{folder.name}.download"
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(120)  # ogb's download_url opens the URL without a timeout
    try:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"hpcsoup: downloading {name} from {url} to {folder}", file=sys.stderr)
        with contextlib.redirect_stdout(sys.stderr):
            path = download_url(url, str(staging))
            extract_zip(path, str(staging))
        os.unlink(path)
        shutil.move(str(staging / info["download_name"]), str(folder))  # appears complete at once
    except (OSError, RuntimeError) as exc:
        raise DatasetNotFoundError(f"downloading dataset '{name}' from {url} failed: {exc}") from exc
    finally:
        socket.setdefaulttimeout(old_timeout)
        shutil.rmtree(staging, ignore_errors=True)


def _ensure_files(name: str, root: Path, folder: Path, info: Mapping[str, Any], custom: bool) -> None:
    release = folder / f"RELEASE_v{info['version']}.txt"
    if folder.is_dir():
        if not release.is_file():  # ogb would ask on the terminal whether to delete the folder
            raise DatasetNotFoundError(
                f"dataset folder '{folder}' exists but has no '{release.name}': it is incomplete "
                f"or another version. Delete the folder to download it again"
                + (f", or add the OGB files of version {info['version']}" if custom else ""))
        return
    if custom:
        raise DatasetNotFoundError(f"dataset '{name}': its folder '{folder}' does not exist; "
                                   f"custom datasets cannot be downloaded")
    _download(name, root, folder, info)


def _dataset_class():
    from ogb.nodeproppred import PygNodePropPredDataset

    class OfflinePygNodePropPredDataset(PygNodePropPredDataset):
        """ogb's dataset, with ogb's own (interactive) download replaced by a clear error."""

        def download(self):
            raise DatasetNotFoundError(
                f"dataset '{self.name}': raw files {self.raw_file_names} are missing in "
                f"'{self.raw_dir}' and there is no processed copy; delete '{self.root}' to "
                f"download it again, or restore the files")

    return OfflinePygNodePropPredDataset


def _evaluator(name: str, info: Mapping[str, Any], custom: bool):
    from ogb.nodeproppred import Evaluator

    if not custom:
        return Evaluator(name)

    class MetaEvaluator(Evaluator):
        """ogb's Evaluator for a dataset outside ogb's table (same evaluation code)."""

        def __init__(self):
            self.name = name
            self.num_tasks = int(info["num tasks"])
            self.eval_metric = info["eval metric"]

    return MetaEvaluator()


def load_ogb(name: str, root: str | Path, meta_dict: Mapping[str, Any] | None = None) -> Graph:
    """Load an ``ogbn-*`` node dataset with its official split and ogb's ``Evaluator``.

    Args:
        name: ``ogbn-arxiv``, ``ogbn-products``, ``ogbn-papers100M`` or a custom ``ogbn-*`` name.
        root: the dataset root; the files are in ``<root>/<name with - replaced by _>/``.
        meta_dict: ogb's meta dict of a custom dataset in OGB layout (its ``dir_path`` is the
            folder; without one, ``<root>/<name with _>/``). Without it a custom dataset is
            read from ``<folder>/meta.json`` (default: ``None``).

    Returns:
        a :class:`Graph` with ``metric="accuracy"`` scored by ogb's ``Evaluator``; the masks are
        the official train/valid/test split.

    Raises:
        DatasetNotFoundError: the files are missing and cannot be downloaded (the message names
            the folder to fill).
        DatasetError: the dataset is multi-label (ogbn-proteins), heterogeneous (ogbn-mag) or its
            meta dict is invalid.
    """
    root = Path(root)
    folder, info, custom = _resolve(name, root, meta_dict)
    _check_supported(name, info)
    _allow_ogb_pickles()
    quiet_pyg()
    with locked(root):  # one task downloads and writes processed/; the others wait, then read
        _ensure_files(name, root, folder, info, custom)
        with contextlib.redirect_stdout(sys.stderr):  # ogb prints progress; keep stdout for results
            dataset = _dataset_class()(name, root=str(root), meta_dict=info if custom else None)
            split = dataset.get_idx_split(info["split"])
    data = dataset[0]
    if data.x is None:
        raise DatasetError(f"dataset '{name}' has no node features; hpcsoup needs x")
    num_nodes = data.num_nodes
    for key, part in (("train_mask", "train"), ("val_mask", "valid"), ("test_mask", "test")):
        mask = torch.zeros(num_nodes, dtype=torch.bool)
        mask[torch.as_tensor(split[part], dtype=torch.long)] = True
        data[key] = mask
    if data.y.is_floating_point():  # ogb stores labels with NaN (unlabelled nodes) as float
        data.y = torch.nan_to_num(data.y, nan=-1.0).long()
    return finish(name, data, int(info["num classes"]), "accuracy", 0,
                  evaluator=_evaluator(name, info, custom))

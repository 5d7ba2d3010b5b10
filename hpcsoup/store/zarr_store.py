"""The Zarr store: the contract between the pipeline's stages (and other tools).

Layout (zarr v3, one directory per node on a local or shared file system)::

    <store>.zarr/                          root attrs written once, by the creator
      inits/<init_id>/params/<name>        shared initial weights (written once, atomically)
      experts/<id>/params/<name>           one array per state_dict tensor
      experts/<id>/<name>                  extra arrays (e.g. a specialist's region)
      soups/<id>/params/<name>, merges/<id>/...
      graphs/<graph>/<set>/<array>         a graph cut into shards (format GRAPH_FORMAT in its
      graphs/<graph>/<set>/<shard>/<array>   attrs): small arrays of the whole, then one group per
                                           shard, read back one shard at a time

Rules that make many concurrent writers safe without locks (zarr has none):

- The root is built in a temporary directory and renamed into place; ``os.rename``
  is atomic, so of several concurrent creators exactly one wins and the others
  open what it made (every writer creating a missing root in place loses groups:
  measured, 9 of 10 rounds with 4 writers).
- One writer per group. A group is written under a private temporary name
  (``<kind>/.tmp~<id>~<host>~<pid>~<random>``), its attrs get ``complete=True``
  *last*, and one ``os.rename`` publishes it. Readers (:meth:`Store.groups`) see
  only complete groups, so a killed writer leaves nothing visible (its rerun
  removes the dead temporary copy, or replaces an incomplete group left at the
  final name), and two runs of one task cannot mix their arrays: exactly one
  rename wins.
- Inits may be written by any array task that finds none, the same way; the
  losers of the rename discard their copy.
- A graph's shard set (:meth:`Store.write_graph`) is written the same way; when
  another writer published it first, its copy stands (both hold the same graph),
  and an incomplete one or one of another format is replaced.

Every array stores its torch dtype (``torch_dtype`` attr; bfloat16 and float8 have
no numpy dtype, so their bits are stored) and every params group a manifest with
each tensor's shape, dtype and SHA-1 of its bytes, so that a corrupt or missing
chunk, a missing array or NaN weights are reported naming the group and the array.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import logging
import math
import os
import re
import shutil
import time
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from hpcsoup.errors import StoreAccessError, StoreError, StoreNotFoundError
from hpcsoup.store.oserrors import file_blocking, store_os_errors

log = logging.getLogger(__name__)

KINDS = ("experts", "soups", "merges")
INITS = "inits"
GRAPHS = "graphs"
#: the format of a graph's shard set, in its ``hpcsoup_graph_parts`` attr: another one is rebuilt
GRAPH_FORMAT = 3
GRAPH_FORMAT_ATTR = "hpcsoup_graph_parts"
PARAMS = "params"
FORMAT = 1
_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=-]*$")
# Bits-only dtypes (no numpy equivalent): stored as unsigned ints of the same width.
_BITS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def _compressors():
    # crc32c makes a flipped byte in a chunk an error instead of silently different weights.
    return [ZstdCodec(level=3), Crc32cCodec()]


def _jsonable(value: Any) -> Any:
    """Attrs must be JSON: tensors, numpy scalars and paths become plain values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _jsonable(value.tolist())
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def _torch_dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def tensor_to_numpy(tensor: torch.Tensor) -> tuple[np.ndarray, str]:
    """``(array, torch dtype name)``; dtypes numpy lacks (bfloat16, float8) as raw bits."""
    t = tensor.detach().cpu().contiguous()
    name = _torch_dtype_name(t.dtype)
    try:
        return t.numpy(), name
    except TypeError:
        width = t.element_size()
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[width]
        return t.view(bits).numpy().view(_BITS[width]), name


def numpy_to_tensor(array: np.ndarray, dtype_name: str | None) -> torch.Tensor:
    """Inverse of :func:`tensor_to_numpy` (``dtype_name`` None: numpy's own dtype)."""
    array = np.array(array, copy=True, order="C")  # (ascontiguousarray turns 0-d into 1-d)
    if dtype_name is None:
        return torch.from_numpy(array)
    dtype = getattr(torch, dtype_name, None)
    if not isinstance(dtype, torch.dtype):
        raise StoreError(f"unknown torch dtype {dtype_name!r} in the store; "
                         f"was it written by a newer torch?")
    if array.dtype.kind == "u" and dtype.is_floating_point:  # raw bits of bfloat16 / float8
        signed = {1: np.uint8, 2: np.int16, 4: np.int32, 8: np.int64}[array.itemsize]
        return torch.from_numpy(array.view(signed)).view(dtype)
    return torch.from_numpy(array).to(dtype)


def _digest(array: np.ndarray) -> str:
    return hashlib.sha1(np.asarray(array).tobytes(order="C")).hexdigest()


_HOST = socket.gethostname().replace("~", "-")


def _temp_name(group_id: str) -> str:
    """A writer's private name for a group: ``.tmp~<id>~<host>~<pid>~<random>``."""
    return f".tmp~{group_id}~{_HOST}~{os.getpid()}~{uuid.uuid4().hex[:8]}"


def _parse_temp(name: str) -> tuple[str, str, int] | None:
    parts = name.split("~")
    if len(parts) != 5 or parts[0] != ".tmp" or not parts[3].isdigit():
        return None
    return parts[1], parts[2], int(parts[3])


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_not_a_file(path: Path) -> None:
    """A store path that is, or lies under, a regular file: say so (zarr would fail obscurely)."""
    blocking = file_blocking(path)
    if blocking is not None:
        where = ("is a regular file" if blocking == path.absolute()
                 else f"lies under the regular file '{blocking}'")
        raise StoreAccessError(f"store path '{path}' {where}, not a folder; pass a --store path "
                               f"that is a folder (e.g. runs/x.zarr), or move the file away")


@dataclasses.dataclass(frozen=True)
class GroupInfo:
    """One group of the store: ``kind`` (experts/soups/merges/graphs), ``id`` and its attrs."""

    kind: str
    id: str
    attrs: dict

    @property
    def complete(self) -> bool:
        return self.attrs.get("complete") is True


def remove_tree(path: Path, attempts: int = 20) -> None:
    """Remove a temporary folder for good, even while writes to it are still landing.

    zarr writes chunks from its own event-loop thread: when one write fails (a full disk),
    others may still create files after a first ``rmtree`` (seen: 1 run in 3 left a
    temporary group behind). Retry until the folder stays gone.
    """
    gone = 0
    for _ in range(attempts):
        shutil.rmtree(path, ignore_errors=True)
        gone = gone + 1 if not os.path.lexists(path) else 0
        if gone == 2:  # still gone after a pause: no write was in flight
            return
        time.sleep(0.05)


class Store:
    """A hpcsoup Zarr store on a (shared) file system.

    Use :meth:`create` (idempotent, race-free) or :meth:`open`; see the module
    docstring for the layout and the concurrency rules.
    """

    def __init__(self, path: Path, root: zarr.Group):
        self.path = path
        self._root = root

    def __repr__(self) -> str:
        return f"Store('{self.path}')"

    # ---------------------------------------------------------------- opening

    @classmethod
    def create(cls, path: str | Path, attrs: dict | None = None) -> "Store":
        """Create the store root with ``attrs`` once; open it if it already exists.

        Safe when many processes call it at once: the root is built aside and
        renamed into place atomically; the root attrs are written only here.
        """
        path = Path(path)
        _check_not_a_file(path)
        if not (path / "zarr.json").is_file():
            if path.is_dir() and any(path.iterdir()):
                raise StoreError(f"cannot create a store at '{path}': the folder exists, is not "
                                 f"empty and holds no zarr.json; choose another --store path")
            tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            try:
                with store_os_errors(path, "create the store"):
                    path.parent.mkdir(parents=True, exist_ok=True)
                    root = zarr.create_group(store=str(tmp), zarr_format=3, attributes=_jsonable(
                        {"hpcsoup_store": FORMAT, **(attrs or {})}))
                    for kind in (INITS, *KINDS):
                        root.create_group(kind)
                    try:
                        os.rename(tmp, path)  # atomic; fails when another creator got there first
                    except OSError:
                        if not (path / "zarr.json").is_file():
                            raise
            finally:
                remove_tree(tmp)
        return cls.open(path)

    @classmethod
    def open(cls, path: str | Path) -> "Store":
        """Open an existing store; :class:`StoreNotFoundError` naming the path if there is none."""
        path = Path(path)
        _check_not_a_file(path)
        if not (path / "zarr.json").is_file():
            if path.exists():
                raise StoreError(f"'{path}' is not a hpcsoup store (it has no zarr.json); "
                                 f"pass the .zarr folder that `hpcsoup train` wrote")
            raise StoreNotFoundError(f"store '{path}' does not exist; check the path or fill it "
                                     f"first with `hpcsoup train --config <file> --store {path}`")
        root = zarr.open_group(str(path), mode="r+", zarr_format=3)
        if "hpcsoup_store" not in root.attrs:
            raise StoreError(f"'{path}' is a zarr group but not a hpcsoup store (no 'hpcsoup_store' "
                             f"attribute); pass the store that `hpcsoup train` created")
        return cls(path, root)

    @property
    def attrs(self) -> dict:
        """The root attrs (written once, when the store was created)."""
        return dict(self._root.attrs)

    # ---------------------------------------------------------------- helpers

    @staticmethod
    def _check_kind(kind: str) -> None:
        if kind not in (*KINDS, GRAPHS):
            raise StoreError(f"group kind {kind!r} is unknown; choose from {[*KINDS, GRAPHS]}")

    @staticmethod
    def _check_id(what: str, gid: str) -> None:
        """Ids are single path components: no '/', no '..', no leading '.' (nothing outside the store)."""
        if not isinstance(gid, str) or not _ID.match(gid) or ".." in gid:
            raise StoreError(f"{what} id {gid!r} is not allowed: use letters, digits and _.+=- "
                             f"(no '/' or '..', not starting with '.' or '-'), e.g. 'sage-e003'")

    def _check(self, kind: str, gid: str) -> None:
        self._check_kind(kind)
        if kind != GRAPHS:
            self._check_id(kind[:-1], gid)
            return
        graph, _, name = gid.partition("/")  # graphs/<graph>/<set>: two components
        if not name:
            raise StoreError(f"graph shard set id {gid!r} is not allowed: give '<graph>/<set>', "
                             f"e.g. 'Cora/parts-8-halo1-seed0' (`hpcsoup store ls` lists them)")
        self._check_id("graph", graph)
        self._check_id("graph shard set", name)

    def _dir(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    def _slot(self, kind: str, gid: str) -> tuple[Path, str]:
        """``(folder, name)`` of ``kind/gid``: its temporary copies live beside it in ``folder``."""
        target = self._dir(kind, gid)
        return target.parent, target.name

    def _folders(self, kind: str) -> list[tuple[str, Path]]:
        """The folders that hold ``kind``'s groups, each with the id prefix of its groups:
        ``kind/`` itself, or ``graphs/<graph>/`` for each graph."""
        folder = self._dir(kind)
        if not folder.is_dir():
            return []
        if kind != GRAPHS:
            return [("", folder)]
        graphs = sorted(os.scandir(folder), key=lambda e: e.name)
        return [(f"{entry.name}/", Path(entry.path)) for entry in graphs
                if entry.is_dir() and not entry.name.startswith(".")]

    @staticmethod
    def _valid(kind: str, attrs: dict) -> bool:
        """Complete, and for a graph's shard set of this hpcsoup's format."""
        return attrs.get("complete") is True and (
            kind != GRAPHS or attrs.get(GRAPH_FORMAT_ATTR) == GRAPH_FORMAT)

    @contextlib.contextmanager
    def _aside(self, kind: str, group_id: str, action: str) -> Iterator[Path]:
        """A private temporary path to build ``kind/group_id`` in (dead writers' copies are
        removed first); an OS error in the block becomes one
        :class:`~hpcsoup.errors.StoreAccessError`, and the path is gone afterwards."""
        self._remove_stale_temps(kind, group_id)
        folder, name = self._slot(kind, group_id)
        tmp = folder / _temp_name(name)
        try:
            with store_os_errors(self.path, action):
                yield tmp
        finally:
            remove_tree(tmp)

    def _node_attrs(self, *parts: str) -> dict | None:
        """Attrs of a node read from its ``zarr.json``; ``None`` if it is absent or unreadable."""
        meta = self._dir(*parts, "zarr.json")
        try:
            return json.loads(meta.read_text()).get("attributes", {})
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, ValueError) as exc:
            log.warning("store %s: unreadable metadata %s (%s); treating it as incomplete",
                        self.path, meta, exc)
            return {}

    def _group(self, *parts: str, create: bool = False) -> zarr.Group:
        path = "/".join(parts)
        return zarr.open_group(store=str(self.path), path=path, mode="a" if create else "r+",
                               zarr_format=3)

    @staticmethod
    def _write_tensor(group: zarr.Group, name: str, tensor: torch.Tensor,
                      chunk_rows: int | None = None) -> dict:
        """Write ``tensor`` as array ``name``; ``chunk_rows``: chunks of that many whole rows
        (what :class:`RowReader` reads one at a time), else zarr's automatic chunks."""
        array, dtype_name = tensor_to_numpy(tensor)
        meta = {"shape": list(array.shape), "torch_dtype": dtype_name, "sha1": _digest(array)}
        chunks = ((max(1, min(chunk_rows, array.shape[0])),) + array.shape[1:]
                  if chunk_rows and array.ndim >= 1 else "auto")
        group.create_array(name, data=array, chunks=chunks, compressors=_compressors(),
                           overwrite=True, attributes=meta)
        return meta

    def repair_hint(self, where: str) -> str:
        """How to replace or remove the group ``where`` (``kind/id``): the commands, spelled out."""
        kind, _, gid = where.partition("/")
        remove = f"`hpcsoup store rm {self.path} {where}`"
        if kind == "experts":
            task = (self._node_attrs(kind, gid) or {}).get("task_id")
            task = "N" if task is None else task
            return (f"retrain it with `hpcsoup train --config <file> --task-id {task} --force` "
                    f"or remove it with {remove}")
        if kind in ("soups", "merges"):
            return f"rerun `hpcsoup {kind[:-1]} --config <file>` (it replaces it) or remove it with {remove}"
        if kind == GRAPHS:
            where = "/".join(where.split("/")[:3])  # the shard set, not one of its shards
            return (f"remove it with `hpcsoup store rm {self.path} {where}`, then `hpcsoup "
                    f"partition --config <file>` (or the distributed soup) rebuilds it")
        return f"remove it with `rm -r {self.path / where}`; the next `hpcsoup train` rewrites it"

    def _read_tensor(self, where: str, group: zarr.Group, name: str, meta: dict | None,
                     check_finite: bool) -> torch.Tensor:
        fix = self.repair_hint(where)
        try:
            node = group[name]
        except KeyError:
            raise StoreError(f"'{where}': array '{name}' is missing from store '{self.path}'"
                             + (" (its manifest lists it)" if meta else "") + f"; {fix}") from None
        meta = meta or dict(node.attrs)
        try:
            array = np.asarray(node[...])
        except Exception as exc:  # zstd / crc32c / file errors all mean: this chunk is damaged
            raise StoreError(f"'{where}': array '{name}' in store '{self.path}' cannot be read, "
                             f"a chunk is corrupt ({type(exc).__name__}: {exc}); {fix}") from exc
        if list(array.shape) != list(meta.get("shape", array.shape)):
            raise StoreError(f"'{where}': array '{name}' has shape {list(array.shape)}, its manifest "
                             f"says {meta['shape']}; {fix}")
        if "sha1" in meta and _digest(array) != meta["sha1"]:
            raise StoreError(f"'{where}': array '{name}' does not match its checksum (a chunk is "
                             f"corrupt or missing) in store '{self.path}'; {fix}")
        tensor = numpy_to_tensor(array, meta.get("torch_dtype"))
        if check_finite and tensor.is_floating_point() and tensor.numel():
            bad = int((~torch.isfinite(tensor.float())).sum())
            if bad:
                raise StoreError(f"'{where}': array '{name}' holds {bad} NaN/inf value(s) of "
                                 f"{tensor.numel()}; the run that wrote it diverged: "
                                 f"{self.repair_hint(where)} (e.g. with a lower lr)")
        return tensor

    def _write_params(self, group: zarr.Group, state_dict: dict) -> None:
        params = group.create_group(PARAMS, overwrite=True)
        manifest = {name: self._write_tensor(params, name, tensor)
                    for name, tensor in state_dict.items()}
        params.attrs.update({"manifest": manifest, "order": list(state_dict)})

    def _read_params(self, where: str, *parts: str, check_finite: bool = True) -> dict:
        try:
            params = self._group(*parts, PARAMS)
        except (FileNotFoundError, KeyError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(f"'{where}' has no '{PARAMS}' group in store '{self.path}'; "
                             f"{self.repair_hint(where)}") from exc
        manifest = params.attrs.get("manifest")
        if manifest is None:
            raise StoreError(f"'{where}/{PARAMS}' has no manifest in store '{self.path}'; it was not "
                             f"written by hpcsoup or its writer was killed; {self.repair_hint(where)}")
        order = params.attrs.get("order", list(manifest))
        return {name: self._read_tensor(where, params, name, manifest[name], check_finite)
                for name in order}

    # ---------------------------------------------------------------- inits

    def has_init(self, init_id: str) -> bool:
        self._check_id("init", init_id)
        return (self._node_attrs(INITS, init_id) or {}).get("complete") is True

    def write_init(self, init_id: str, state_dict: dict, attrs: dict | None = None) -> bool:
        """Store a shared initialisation once. Returns False when it was already there.

        Race-free: the init is written to a private temporary group and renamed into
        ``inits/<init_id>``; when another writer won, this copy is discarded.
        """
        self._check_id("init", init_id)
        if self.has_init(init_id):
            return False
        with self._aside(INITS, init_id, f"write '{INITS}/{init_id}'") as tmp:
            group = zarr.create_group(store=str(tmp), zarr_format=3,
                                      attributes=_jsonable({**(attrs or {}), "complete": False}))
            self._write_params(group, state_dict)
            group.attrs.update({"complete": True})
            try:
                os.rename(tmp, self._dir(INITS, init_id))
            except OSError:
                if not self.has_init(init_id):
                    raise
                return False
        return True

    def read_init(self, init_id: str) -> dict:
        """The state_dict of a shared initialisation."""
        self._check_id("init", init_id)
        attrs = self._node_attrs(INITS, init_id)
        if attrs is None:
            known = self.inits()
            raise StoreNotFoundError(f"init '{init_id}' is not in store '{self.path}' (it has "
                                     f"{known or 'none'}); run `hpcsoup train` to create it")
        return self._read_params(f"{INITS}/{init_id}", INITS, init_id)

    def init_attrs(self, init_id: str) -> dict:
        return self._node_attrs(INITS, init_id) or {}

    def inits(self) -> list[str]:
        folder = self._dir(INITS)
        return sorted(p.name for p in folder.iterdir() if p.is_dir()
                      and not p.name.startswith(".") and self.has_init(p.name)) if folder.is_dir() else []

    # ---------------------------------------------------------------- groups

    def write_group(self, kind: str, group_id: str, state_dict: dict, attrs: dict,
                    arrays: dict | None = None, overwrite: bool = False) -> GroupInfo:
        """Write one group: its params, its ``arrays`` (extra tensors), its attrs, then ``complete``.

        The group is written under a private temporary name, ``complete=True`` last,
        then renamed into ``<kind>/<group_id>`` in one atomic step: readers never see
        a half-written group, and two runs of the same task cannot interleave their
        arrays. An incomplete group of that id (left by a killed writer) is replaced;
        a complete one is an error unless ``overwrite=True``: tasks never duplicate
        or silently replace a finished expert.

        Replacing moves the old group aside (a rename) only once the new one is fully
        written, so a write that fails (disk full, quota) loses nothing. When two
        writers replace one id at the same moment, one rename wins; the other writer
        logs that it kept the winner's copy and returns it, without an error. A failed
        write leaves no temporary files (:class:`~hpcsoup.errors.StoreAccessError`
        names the path and the fix).
        """
        self._check(kind, group_id)
        for name in arrays or {}:
            self._check_array_name(kind, group_id, name)
        if self.has_group(kind, group_id) and not overwrite:
            raise self._exists_error(kind, group_id)
        attrs = {k: v for k, v in _jsonable(dict(attrs)).items() if k != "complete"}
        with self._aside(kind, group_id, f"write '{kind}/{group_id}'") as tmp:
            group = zarr.create_group(store=str(tmp), zarr_format=3,
                                      attributes={**attrs, "complete": False})
            self._write_params(group, state_dict)
            for name, tensor in (arrays or {}).items():
                self._write_tensor(group, name, tensor)
            group.attrs.update({"complete": True})  # LAST, then one rename makes it visible
            if not self._publish(kind, group_id, tmp, "replace" if overwrite else "raise"):
                winner = self._node_attrs(kind, group_id) or {}
                log.warning("store %s: another process wrote '%s/%s' at the same moment; its "
                            "copy was kept and this one discarded", self.path, kind, group_id)
                return GroupInfo(kind, group_id, winner)
        return GroupInfo(kind, group_id, {**attrs, "complete": True})

    def _publish(self, kind: str, group_id: str, tmp: Path, existing: str) -> bool:
        """Rename the written ``tmp`` to ``kind/group_id``; False when another writer's copy won.

        ``existing`` says what becomes of a valid group already there (an invalid one, e.g. a
        killed writer's, is always replaced): ``"raise"`` an error, ``"replace"`` it, or
        ``"keep"`` it (this copy is discarded).
        """
        target = self._dir(kind, group_id)
        for _ in range(3):
            if target.exists():
                if existing != "replace" and self.has_group(kind, group_id):  # completed meanwhile
                    if existing == "keep":
                        return False
                    raise self._exists_error(kind, group_id)
                log.info("store %s: replacing '%s/%s'", self.path, kind, group_id)
                self._discard(kind, group_id)
            try:
                os.rename(tmp, target)
                return True
            except OSError as exc:
                # ENOTEMPTY / EEXIST: another writer published between our discard and our rename
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
                if existing == "replace":  # groups reach their final name complete: theirs stands
                    return False
                # else look again: a valid copy is kept or refused, a killed writer's is replaced
        raise StoreError(f"'{kind}/{group_id}' in store '{self.path}' kept changing while this "
                         f"writer published it; is a crashed writer looping? rerun the task")

    def _discard(self, kind: str, group_id: str) -> None:
        """Move ``kind/group_id`` aside (atomic: readers see it or nothing) and delete it."""
        folder, name = self._slot(kind, group_id)
        trash = folder / _temp_name(name)
        try:
            os.rename(self._dir(kind, group_id), trash)
        except FileNotFoundError:  # another writer moved it first
            return
        shutil.rmtree(trash, ignore_errors=True)

    def remove(self, kind: str, group_id: str) -> None:
        """Delete the group ``kind/group_id`` (complete or not): ``hpcsoup store rm``."""
        self._check(kind, group_id)
        if not self._dir(kind, group_id).is_dir():
            known = [g.id for g in self._all_groups(kind)]
            raise StoreNotFoundError(f"'{kind}/{group_id}' is not in store '{self.path}'; "
                                     f"{kind} there: {known or 'none'}")
        with store_os_errors(self.path, f"remove '{kind}/{group_id}'"):
            self._discard(kind, group_id)
            if kind == GRAPHS:  # the graph's folder goes with its last shard set
                with contextlib.suppress(OSError):
                    self._slot(kind, group_id)[0].rmdir()

    def _exists_error(self, kind: str, group_id: str) -> StoreError:
        return StoreError(f"'{kind}/{group_id}' already exists and is complete in store "
                          f"'{self.path}'; pass overwrite=True to replace it, or use another id")

    def _remove_stale_temps(self, kind: str, group_id: str) -> None:
        """Delete temporary copies of ``group_id`` whose writer (on this host) is dead."""
        folder, name = self._slot(kind, group_id)
        if not folder.is_dir():
            return
        for entry in folder.iterdir():
            parsed = _parse_temp(entry.name)
            if parsed and parsed[0] == name and parsed[1] == _HOST and not _alive(parsed[2]):
                shutil.rmtree(entry, ignore_errors=True)

    def _check_array_name(self, kind: str, group_id: str, name: str) -> None:
        if name == PARAMS or not _ID.match(name):
            raise StoreError(f"array name {name!r} for '{kind}/{group_id}' is not allowed "
                             f"(not '{PARAMS}'; letters, digits and _.+=-)")

    def groups(self, kind: str, **attr_filters) -> list[GroupInfo]:
        """Complete groups of ``kind`` whose attrs equal every ``attr_filters`` item, by id
        (graphs: ``<graph>/<set>`` ids, of this hpcsoup's format)."""
        return [g for g in self._all_groups(kind) if self._valid(kind, g.attrs)
                and all(g.attrs.get(k) == v for k, v in attr_filters.items())]

    def incomplete(self, kind: str) -> list[GroupInfo]:
        """Groups being written, or left by killed writers (invisible to :meth:`groups`); for
        graphs also shard sets of another format.

        Temporary copies appear under their group id with a ``writer`` attr ``host:pid``.
        """
        out = [g for g in self._all_groups(kind) if not self._valid(kind, g.attrs)]
        for prefix, folder in self._folders(kind):
            for entry in sorted(folder.iterdir()):
                parsed = _parse_temp(entry.name)
                if parsed:
                    attrs = self._node_attrs(kind, prefix + entry.name) or {}
                    out.append(GroupInfo(kind, prefix + parsed[0],
                                         {**attrs, "writer": f"{parsed[1]}:{parsed[2]}"}))
        return out

    def _all_groups(self, kind: str) -> list[GroupInfo]:
        self._check_kind(kind)
        out = []
        for prefix, folder in self._folders(kind):
            for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                if entry.name.startswith(".") or not entry.is_dir():
                    continue
                attrs = self._node_attrs(kind, prefix + entry.name)
                out.append(GroupInfo(kind, prefix + entry.name, attrs if attrs is not None else {}))
        return out

    def has_group(self, kind: str, group_id: str) -> bool:
        """True when ``kind/group_id`` exists and is complete (graphs: and of this format)."""
        self._check(kind, group_id)
        return self._valid(kind, self._node_attrs(kind, group_id) or {})

    def group_attrs(self, kind: str, group_id: str) -> dict:
        """Attrs of a complete group."""
        return self._complete_attrs(kind, group_id)

    def _complete_attrs(self, kind: str, group_id: str) -> dict:
        self._check(kind, group_id)
        attrs = self._node_attrs(kind, group_id)
        if attrs is None:
            known = [g.id for g in self.groups(kind)]
            how = ("; `hpcsoup partition --config <file>` (or the first distributed soup) writes "
                   "it" if kind == GRAPHS else "")
            raise StoreNotFoundError(f"'{kind}/{group_id}' is not in store '{self.path}'; complete "
                                     f"{kind}: {known or 'none'}{how}")
        if attrs.get("complete") is not True:
            raise StoreError(f"'{kind}/{group_id}' in store '{self.path}' is incomplete (complete=true "
                             f"was never written: its writer was killed or is still running); "
                             f"{self.repair_hint(f'{kind}/{group_id}')}")
        if not self._valid(kind, attrs):
            raise StoreError(f"'{kind}/{group_id}' in store '{self.path}' has format "
                             f"{attrs.get(GRAPH_FORMAT_ATTR)}, this hpcsoup reads format "
                             f"{GRAPH_FORMAT}; {self.repair_hint(f'{kind}/{group_id}')}")
        return attrs

    def load_group(self, kind: str, group_id: str) -> tuple[dict, dict]:
        """``(state_dict, attrs)`` of a complete group, validated.

        Raises :class:`StoreError` naming the group and the array for a missing array,
        a corrupt or missing chunk (checksums), or NaN/inf weights.
        """
        attrs = self._complete_attrs(kind, group_id)
        return self._read_params(f"{kind}/{group_id}", kind, group_id), attrs

    def write_array(self, kind: str, group_id: str, name: str, tensor: torch.Tensor) -> None:
        """Store an extra (non-parameter) array in an existing group, e.g. a region mask."""
        self._check(kind, group_id)
        self._check_array_name(kind, group_id, name)
        if self._node_attrs(kind, group_id) is None:
            raise StoreNotFoundError(f"'{kind}/{group_id}' is not in store '{self.path}'; write the "
                                     f"group first (write_group) or pass arrays= to it")
        with store_os_errors(self.path, f"write '{kind}/{group_id}/{name}'"):
            self._write_tensor(self._group(kind, group_id), name, tensor)

    def read_array(self, kind: str, group_id: str, name: str) -> torch.Tensor:
        """An extra array of a group (see :meth:`write_array`)."""
        self._check(kind, group_id)
        if self._node_attrs(kind, group_id) is None:
            raise StoreNotFoundError(f"'{kind}/{group_id}' is not in store '{self.path}'")
        if not self._dir(kind, group_id, name, "zarr.json").is_file():
            raise StoreNotFoundError(f"'{kind}/{group_id}' has no array '{name}' in store "
                                     f"'{self.path}'")
        return self._read_tensor(f"{kind}/{group_id}", self._group(kind, group_id), name, None,
                                 check_finite=False)

    def array_names(self, kind: str, group_id: str) -> list[str]:
        """Names of a group's extra arrays (not its params)."""
        self._check(kind, group_id)
        folder = self._dir(kind, group_id)
        return sorted(p.name for p in folder.iterdir() if p.name != PARAMS
                      and (p / "zarr.json").is_file()) if folder.is_dir() else []

    def param_info(self, kind: str, group_id: str) -> dict:
        """The params manifest ``{name: {shape, torch_dtype, sha1}}`` of a group."""
        self._check(kind, group_id)
        attrs = self._node_attrs(kind, group_id, PARAMS) or {}
        return attrs.get("manifest", {})

    # ---------------------------------------------------------------- graphs

    def graph_path(self, graph_id: str) -> Path:
        """The folder of the graph shard set ``graph_id`` (``<graph>/<set>``)."""
        self._check(GRAPHS, graph_id)
        return self._dir(GRAPHS, graph_id)

    @classmethod
    def locate_graph(cls, path: str | Path) -> tuple["Store", str]:
        """``(store, graph_id)`` of a graph shard set's folder ``<store>/graphs/<graph>/<set>``."""
        path = Path(path)
        if path.parent.parent.name != GRAPHS:
            raise StoreError(f"'{path}' is not a graph shard set of a store: its path must end in "
                             f"<store>/{GRAPHS}/<graph>/<set> (`hpcsoup store ls` lists them)")
        store = cls.open(path.parent.parent.parent)
        graph_id = f"{path.parent.name}/{path.name}"
        store._check(GRAPHS, graph_id)
        return store, graph_id

    @contextlib.contextmanager
    def write_graph(self, graph_id: str, attrs: dict,
                    arrays: dict | None = None) -> Iterator["GraphWriter"]:
        """Write the graph shard set ``graphs/<graph_id>``: ``with store.write_graph(...) as w:``,
        then ``w.add(shard, tensors, attrs)`` per shard and ``w.attrs.update(...)``.

        ``arrays`` are small arrays of the whole graph, beside the shards. The set is built
        under a private temporary name, gets its format and ``complete=True`` last and is
        renamed into place when the block ends (nothing is published when it raises), like
        :meth:`write_group`. A valid set that another writer published first is kept (this
        copy is discarded: both hold the same graph); an incomplete set, or one of another
        format, is replaced.
        """
        self._check(GRAPHS, graph_id)
        for name in arrays or {}:
            self._check_array_name(GRAPHS, graph_id, name)
        with self._aside(GRAPHS, graph_id, f"write '{GRAPHS}/{graph_id}'") as tmp:
            root = zarr.create_group(store=str(tmp), zarr_format=3, attributes=_jsonable(
                {**attrs, GRAPH_FORMAT_ATTR: GRAPH_FORMAT, "complete": False}))
            for name, tensor in (arrays or {}).items():
                self._write_tensor(root, name, tensor)
            writer = GraphWriter(self, graph_id, root)
            yield writer
            root.attrs.update({**_jsonable(writer.attrs), GRAPH_FORMAT_ATTR: GRAPH_FORMAT,
                               "complete": True})  # LAST
            if not self._publish(GRAPHS, graph_id, tmp, "keep"):
                log.info("store %s: another process wrote '%s/%s' first; its copy was kept",
                         self.path, GRAPHS, graph_id)

    def graph_attrs(self, graph_id: str) -> dict:
        """Attrs of a valid graph shard set; a clear error when it is missing, incomplete or of
        another format."""
        return self._complete_attrs(GRAPHS, graph_id)

    def read_graph_arrays(self, graph_id: str, names, shard: str | None = None) -> tuple[dict, dict]:
        """``({name: tensor}, attrs)`` of shard ``shard`` of a graph shard set (of the set's own
        arrays when ``None``): only these arrays are read, not the other shards'.

        Raises :class:`StoreNotFoundError` when the shard is missing and :class:`StoreError`
        naming the shard and the array for a missing array or a corrupt chunk.
        """
        self._check(GRAPHS, graph_id)
        parts = (GRAPHS, graph_id) if shard is None else (GRAPHS, graph_id, shard)
        where = "/".join(parts)
        attrs = self._node_attrs(*parts)
        if attrs is None:
            raise StoreNotFoundError(f"'{where}' is not in store '{self.path}'; "
                                     f"{self.repair_hint(where)}")
        group = zarr.open_group(store=str(self._dir(*parts)), mode="r", zarr_format=3)
        return {name: self._read_tensor(where, group, name, None, check_finite=False)
                for name in names}, attrs

    def read_graph_rows(self, graph_id: str, shard: str, names) -> dict:
        """``{name: RowReader}`` of arrays of shard ``shard`` of a graph shard set: nothing is
        read until rows are asked for (:class:`RowReader`)."""
        self._check(GRAPHS, graph_id)
        parts = (GRAPHS, graph_id, shard)
        where = "/".join(parts)
        if self._node_attrs(*parts) is None:
            raise StoreNotFoundError(f"'{where}' is not in store '{self.path}'; "
                                     f"{self.repair_hint(where)}")
        group = zarr.open_group(store=str(self._dir(*parts)), mode="r", zarr_format=3)
        readers = {}
        for name in names:
            try:
                node = group[name]
            except KeyError:
                raise StoreError(f"'{where}': array '{name}' is missing from store '{self.path}'; "
                                 f"{self.repair_hint(where)}") from None
            readers[name] = RowReader(node, f"{where}/{name}", dict(node.attrs),
                                      self.repair_hint(where))
        return readers


class RowReader:
    """A stored array read by row ranges, one chunk of rows held at a time: ``reader[a:b]`` is
    a tensor of rows ``a..b-1``. What a forward that runs in row blocks needs of a large input
    (a scoring field's features and first aggregation: :mod:`hpcsoup.distributed.shards`)
    without the whole array in memory.

    Integrity: every chunk carries its crc32c; the array's sha1 (which would also catch a
    missing chunk, read back as zeros) is checked as the rows are read from the first to the
    last in order, which a blocked forward does; :class:`StoreError` on a mismatch, at the end
    of that pass, before anything computed from it is used.

    ``shape``, ``dtype``, ``size``, ``numel`` and ``to(device)`` (rows then arrive there) as a
    tensor's, so a forward's row slicing takes either.
    """

    def __init__(self, array, where: str, meta: dict, fix: str):
        self.array, self.where, self.fix = array, where, fix
        self.shape = tuple(array.shape)
        self.chunk_rows = int(array.chunks[0]) if self.shape and self.shape[0] else 1
        self.dtype_name, self.sha1 = meta.get("torch_dtype"), meta.get("sha1")
        self.dtype = (getattr(torch, self.dtype_name) if self.dtype_name
                      else torch.from_numpy(np.zeros(0, dtype=array.dtype)).dtype)
        self.device: torch.device | None = None
        self._digest, self._hashed = hashlib.sha1(), 0  # rows hashed so far, in order
        self._held = (0, 0, None)                       # (first row, end row, tensor)

    def size(self, dim: int | None = None):
        return torch.Size(self.shape) if dim is None else self.shape[dim]

    def numel(self) -> int:
        return int(np.prod(self.shape))

    def to(self, device) -> "RowReader":
        self.device = torch.device(device)
        return self

    def __getitem__(self, index: slice) -> torch.Tensor:
        if not isinstance(index, slice):
            raise TypeError(f"{self.where}: a RowReader takes row ranges (reader[a:b]), "
                            f"not {index!r}")
        start, stop, step = index.indices(self.shape[0])
        if step != 1:
            raise TypeError(f"{self.where}: a RowReader takes contiguous row ranges")
        pieces, row = [], start
        while row < stop:
            first, end, rows = self._held
            if not first <= row < end:
                first, end, rows = self._read(row // self.chunk_rows)
            pieces.append(rows[row - first:min(stop, end) - first])
            row = min(stop, end)
        if not pieces:
            out = torch.empty((0,) + self.shape[1:], dtype=self.dtype)
        else:
            out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out if self.device is None else out.to(self.device)

    def _read(self, chunk: int) -> tuple:
        first = chunk * self.chunk_rows
        end = min(first + self.chunk_rows, self.shape[0])
        self._held = (0, 0, None)  # the chunk before goes first: one chunk in memory at a time
        try:
            block = np.asarray(self.array[first:end])
        except Exception as exc:  # zstd / crc32c / file errors all mean: this chunk is damaged
            raise StoreError(f"'{self.where}' cannot be read, a chunk is corrupt "
                             f"({type(exc).__name__}: {exc}); {self.fix}") from exc
        if first == self._hashed and self.sha1:
            self._digest.update(np.ascontiguousarray(block))  # C order, as the whole was hashed
            self._hashed = end
            if end == self.shape[0] and self._digest.hexdigest() != self.sha1:
                raise StoreError(f"'{self.where}' does not match its checksum (a chunk is corrupt "
                                 f"or missing); {self.fix}")
        self._held = (first, end, numpy_to_tensor(block, self.dtype_name))
        return self._held


class GraphWriter:
    """The open graph shard set of :meth:`Store.write_graph`: :meth:`add` writes one shard;
    :attr:`attrs` is what the set's attrs get when the block ends (e.g. totals over the shards)."""

    def __init__(self, store: Store, graph_id: str, root: zarr.Group):
        self.store, self.graph_id, self._root = store, graph_id, root
        self.attrs: dict = {}

    def add(self, shard: str, tensors: dict, attrs: dict | None = None,
            chunk_rows: dict | None = None) -> None:
        """Write the shard ``shard``: its ``tensors`` (compressed, checksummed) and ``attrs``;
        ``chunk_rows``: ``{name: rows}``, arrays stored in chunks of whole rows (read by
        :meth:`Store.read_graph_rows`)."""
        self.store._check_array_name(GRAPHS, self.graph_id, shard)
        group = self._root.create_group(shard, attributes=_jsonable(dict(attrs or {})))
        for name, tensor in tensors.items():
            self.store._write_tensor(group, name, tensor, (chunk_rows or {}).get(name))

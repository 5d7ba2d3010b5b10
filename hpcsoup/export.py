"""Models out of hpcsoup: one file per soup, merge or expert, loaded back with one call.

``hpcsoup export STORE GROUP --out FILE`` (or ``Souped.save`` / ``Merged.save`` from the
Python API) writes, with ``torch.save``, a dict of plain data only (tensors, strings,
numbers, lists, dicts), so ``torch.load(FILE, weights_only=True)`` reads it without
unpickling any code:

- ``format``: ``"hpcsoup-model/1"``; ``kind``: ``soup``, ``merge`` or ``expert``;
- ``model``: how to rebuild the module: ``{"type": "hpcsoup.GNN", "spec": ...}``,
  ``{"type": "hpcsoup.MergedGNN", "structure": ...}``,
  ``{"type": "torch_geometric", "class": "GCN", "kwargs": ...}``, or
  ``{"type": "module", "class": "pkg.Net"}`` for a user's own class;
- ``state_dict``: the plain tensors (for those who build the module themselves);
- ``metrics`` and ``info`` (method, coefficients, parents, the store group's attrs...).

:func:`load_model` returns the module (eval mode). A user's own class cannot be rebuilt
from data: pass an instance (``load_model(FILE, model=Net(...))``) and the state_dict is
loaded into it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from hpcsoup.errors import ModelError, StoreNotFoundError

FORMAT = "hpcsoup-model/1"
KINDS = {"experts": "expert", "soups": "soup", "merges": "merge"}


def _plain(value):
    """JSON-able attrs as plain Python values (what ``weights_only`` loading accepts)."""
    return json.loads(json.dumps(value, default=str))


def describe_module(module: nn.Module) -> dict:
    """The ``model`` entry of a file: how :func:`load_model` rebuilds ``module``."""
    from hpcsoup.merge.child import MergedGNN
    from hpcsoup.models import GNN
    from hpcsoup.models.convert import pyg_kwargs

    if isinstance(module, MergedGNN):
        return {"type": "hpcsoup.MergedGNN", "structure": _plain(module.structure())}
    if isinstance(module, GNN):
        return {"type": "hpcsoup.GNN", "spec": module.spec.to_dict()}
    try:
        pyg = pyg_kwargs(module)
    except ModelError:  # a PyG model with options hpcsoup does not rebuild
        pyg = None
    if pyg is not None:
        return {"type": "torch_geometric", **pyg}
    cls = type(module)
    return {"type": "module", "class": f"{cls.__module__}.{cls.__qualname__}"}


def write(path, record: dict) -> Path:
    """``torch.save`` ``record`` to ``path`` through a temporary file (no partial file left)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        torch.save(record, temp)
        os.replace(temp, path)
    finally:
        temp.unlink(missing_ok=True)
    return path


def record(kind: str, model: dict, state_dict: dict, metrics: dict | None, info: dict) -> dict:
    return {"format": FORMAT, "kind": kind, "model": model,
            "state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()},
            "metrics": _plain(metrics or {}), "info": _plain(info)}


def save_module(path, module: nn.Module, kind: str, state_dict: dict, metrics: dict | None,
                info: dict) -> Path:
    """Write ``module`` (its ``state_dict``) as a file :func:`load_model` reads."""
    return write(path, record(kind, describe_module(module), state_dict, metrics, info))


def export_group(store, group: str, out) -> dict:
    """Write ``experts/<id>``, ``soups/<id>`` or ``merges/<id>`` of a store to ``out``."""
    from hpcsoup.store import Store

    store = store if isinstance(store, Store) else Store.open(store)
    kind, _, gid = str(group).strip("/").partition("/")
    if kind not in KINDS or not gid:
        raise StoreNotFoundError(f"group '{group}': expected experts/<id>, soups/<id> or "
                                 f"merges/<id> (`hpcsoup store ls {store.path}` lists them)")
    tensors, attrs = store.load_group(kind, gid)
    if kind == "merges":
        if "structure" not in attrs:
            raise ModelError(f"merges/{gid} in '{store.path}' has no stored structure; it cannot "
                             f"be rebuilt as a model")
        model = {"type": "hpcsoup.MergedGNN", "structure": _plain(attrs["structure"])}
    else:
        model = {"type": "hpcsoup.GNN", "spec": _plain(attrs["model"])}
    info = {"store": str(store.path), "group": f"{kind}/{gid}",
            "attrs": {k: v for k, v in attrs.items() if k != "config"}}
    path = write(out, record(KINDS[kind], model, tensors, attrs.get("metrics"), info))
    return {"out": str(path), "group": f"{kind}/{gid}", "kind": KINDS[kind],
            "model": model["type"], "tensors": len(tensors), "metrics": attrs.get("metrics")}


def read(path) -> dict:
    """The plain dict of an exported file (``torch.load(..., weights_only=True)``), checked."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file '{path}' does not exist; write one with "
                         f"`hpcsoup export STORE GROUP --out {path}` or result.save('{path}')")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, or one holding pickled code
        raise ModelError(f"'{path}' is not an hpcsoup model file: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ModelError(f"'{path}' is not an hpcsoup model file (format "
                         f"{data.get('format') if isinstance(data, dict) else None!r}, expected "
                         f"{FORMAT!r})")
    return data


def load_model(path, model: nn.Module | None = None) -> nn.Module:
    """The module an exported file holds, in eval mode.

    Args:
        path: a file from ``hpcsoup export`` or ``result.save``.
        model: an instance to load the state_dict into (needed for a user's own class;
            optional otherwise).
    """
    data = read(path)
    desc, state = data["model"], data["state_dict"]
    if desc["type"] == "hpcsoup.MergedGNN":
        from hpcsoup.merge.child import MergedGNN
        if model is not None:
            raise ModelError(f"'{path}' holds an H-GRAMA child, which is rebuilt from the file; "
                             f"call hpcsoup.load_model('{path}') without model=")
        child = MergedGNN.from_parts(desc["structure"], state)
        child.info = dict(data.get("info") or {})
        return child.eval()
    if model is None:
        model = _build(desc, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ModelError(f"'{path}': its state_dict does not fit the {type(model).__name__} "
                         f"given: {str(exc).splitlines()[0]}") from None
    return model.eval()


def _build(desc: dict, path) -> nn.Module:
    if desc["type"] == "hpcsoup.GNN":
        from hpcsoup.models import ModelSpec, build_model
        return build_model(ModelSpec.from_dict(desc["spec"]))
    if desc["type"] == "torch_geometric":
        import torch_geometric.nn.models as pyg_models
        return getattr(pyg_models, desc["class"])(**desc["kwargs"])
    raise ModelError(f"'{path}' holds a model of the user class '{desc.get('class')}', which "
                     f"hpcsoup cannot rebuild from data; pass an instance: "
                     f"hpcsoup.load_model('{path}', model=YourClass(...)), or read the plain "
                     f"state_dict: torch.load('{path}', weights_only=True)['state_dict']")

"""``hpcsoup store ls|show PATH``: what a store holds, as tables (and a dict for ``--json``)."""
from __future__ import annotations

import json
import math

from hpcsoup.errors import HpcsoupError, StoreError, StoreNotFoundError
from hpcsoup.store.zarr_store import GRAPH_FORMAT_ATTR, GRAPHS, INITS, KINDS, PARAMS, Store

_COLUMNS = {
    "experts": ["id", "arch", "role", "init_id", "seed", "train", "metric", "val", "test", "seconds"],
    "soups": ["id", "method", "ingredients", "metric", "val", "test", "seconds", "ranks"],
    "merges": ["id", "method", "parents", "metric", "test", "speedup_vs_ensemble"],
    GRAPHS: ["id", "dataset", "partitions", "halo", "seed", "nodes", "format"],
}


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) and abs(value) < 1e4 else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def text_table(rows: list[dict], columns: list[str]) -> str:
    """Rows as an aligned plain-text table (one header line)."""
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in cells]
    return "\n".join(lines)


def _row(kind: str, gid: str, attrs: dict) -> dict:
    if kind == GRAPHS:
        return {"id": gid, "complete": attrs.get("complete") is True, "dataset": attrs.get("dataset"),
                "partitions": attrs.get("partitions"), "halo": attrs.get("halo"),
                "seed": attrs.get("seed"), "nodes": attrs.get("num_nodes"),
                "format": attrs.get(GRAPH_FORMAT_ATTR)}
    metrics = attrs.get("metrics") or {}
    row = {"id": gid, "complete": attrs.get("complete") is True, "metric": metrics.get("metric"),
           "val": metrics.get("val"), "test": metrics.get("test")}
    if kind == "experts":
        nodes = attrs.get("train_nodes") or {}
        split = nodes.get("split")
        row.update(arch=attrs.get("arch"), role=attrs.get("role"), init_id=attrs.get("init_id"),
                   seed=attrs.get("seed"), seconds=attrs.get("train_seconds"),
                   train=(f"{split}:{nodes.get('region')}" if split not in (None, "all") else "all")
                   + (f" ({nodes['count']})" if "count" in nodes else ""))
    elif kind == "soups":
        row.update(method=attrs.get("method"), ingredients=len(attrs.get("ingredients") or []),
                   seconds=attrs.get("seconds"), ranks=attrs.get("ranks"))
    else:
        row.update(method=attrs.get("method"), parents=attrs.get("parents"),
                   speedup_vs_ensemble=metrics.get("speedup_vs_ensemble"))
    return row


def _ls(store: Store, echo: bool) -> dict:
    out: dict = {"store": str(store.path), "attrs": {k: v for k, v in store.attrs.items()
                                                     if k != "config"},
                 "inits": store.inits()}
    lines = [f"store {store.path}"]
    lines.append(f"inits ({len(out['inits'])}): {', '.join(out['inits']) or '-'}")
    for kind in (*KINDS, GRAPHS):
        done = [_row(kind, g.id, g.attrs) for g in store.groups(kind)]
        pending = [g.id for g in store.incomplete(kind)]
        out[kind] = done
        out[f"{kind}_incomplete"] = pending
        lines.append("")
        lines.append(f"{kind}: {len(done)} complete"
                     + (f", {len(pending)} incomplete (invisible to readers): {', '.join(pending)}"
                        if pending else ""))
        if done:
            lines.append(text_table(done, _COLUMNS[kind]))
    if echo:
        print("\n".join(lines))
    return out


def resolve_group(store: Store, group: str) -> tuple[str, str]:
    """``"experts/sage-e000"`` or a bare ``"sage-e000"`` -> ``(kind, id)``, both validated."""
    kind, _, gid = group.strip("/").partition("/")
    if not gid:  # a bare id: find its kind
        gid = kind
        Store._check_id("group", gid)
        found = [k for k in (*KINDS, INITS) if (store.path / k / gid / "zarr.json").is_file()]
        if not found:
            raise StoreNotFoundError(f"no group '{gid}' in store '{store.path}'; "
                                     f"`hpcsoup store ls {store.path}` lists them")
        kind = found[0]
    if kind not in (*KINDS, GRAPHS, INITS):
        raise StoreNotFoundError(f"group '{group}': kind '{kind}' is unknown; use one of "
                                 f"{[*KINDS, GRAPHS, INITS]}, e.g. experts/<id>")
    if kind == INITS:
        Store._check_id("init", gid)
    else:
        store._check(kind, gid)
    return kind, gid


def _show(store: Store, group: str, echo: bool) -> dict:
    kind, gid = resolve_group(store, group)
    attrs = store._node_attrs(kind, gid)
    if attrs is None:
        raise StoreNotFoundError(f"no group '{kind}/{gid}' in store '{store.path}'; "
                                 f"`hpcsoup store ls {store.path}` lists them")
    params = (store._node_attrs(kind, gid, PARAMS) or {}).get("manifest", {})
    arrays = store.array_names(kind, gid) if kind != INITS else []
    try:  # full validation: checksums, missing arrays, NaN (a graph: its attrs and format)
        if kind == INITS:
            store.read_init(gid)
        elif kind == GRAPHS:
            store.graph_attrs(gid)
        else:
            store.load_group(kind, gid)
        valid, problem = True, None
    except HpcsoupError as exc:
        valid, problem = False, str(exc)
    out = {"store": str(store.path), "group": f"{kind}/{gid}", "attrs": attrs,
           "params": {n: {"shape": m.get("shape"), "dtype": m.get("torch_dtype")}
                      for n, m in params.items()},
           "arrays": arrays, "valid": valid, "problem": problem}
    if echo:
        shown = {k: v for k, v in attrs.items() if k != "config"}
        lines = [f"{kind}/{gid} in {store.path}", json.dumps(shown, indent=2, default=str), ""]
        rows = [{"param": n, "shape": "x".join(map(str, m.get("shape") or [])) or "()",
                 "dtype": m.get("torch_dtype")} for n, m in params.items()]
        lines.append(text_table(rows, ["param", "shape", "dtype"]) if rows else "(no params)")
        if arrays:
            lines.append(f"arrays: {', '.join(arrays)}")
        lines.append("valid: yes" if valid else f"valid: NO: {problem}")
        print("\n".join(lines))
    return out


def remove_group(path, group: str, echo: bool = True) -> dict:
    """``hpcsoup store rm PATH GROUP``: delete one group (e.g. a corrupt or unwanted expert)."""
    store = Store.open(path)
    kind, gid = resolve_group(store, group)
    if kind == INITS:
        raise StoreError(f"'{INITS}/{gid}' is the shared start of experts and cannot be removed "
                         f"alone; remove the store folder '{store.path}' to start over")
    store.remove(kind, gid)
    if echo:
        print(f"removed {kind}/{gid} from {store.path}")
    return {"store": str(store.path), "removed": f"{kind}/{gid}"}


def describe_store(path, group: str | None = None, echo: bool = True) -> dict:
    """List a store (``group=None``) or show one group (``experts/<id>`` or a bare id).

    Prints readable tables when ``echo``; returns the same content as a dict.
    """
    store = Store.open(path)
    return _ls(store, echo) if group is None else _show(store, group, echo)

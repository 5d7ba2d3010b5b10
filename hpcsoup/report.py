"""Stage 5: a report of what a store holds, fit for a paper.

``report(store_path)`` writes into ``<store>.report/`` (or ``out``):

- ``report.md``: the tables (scores to 3 decimals; seconds and MiB to 2 significant figures;
  ``mean ± std`` over seeds when a store holds several), the plots embedded, the configuration
  and the provenance (versions, hosts, times, SLURM jobs);
- ``report.json``: every row, unrounded;
- ``soups.png`` / ``.pdf``: test score against souping time per method, one panel per dataset,
  with the best expert (selected by validation score) and the uniform soup as reference lines;
- ``merges.png`` / ``.pdf``: test score of the merged child, its parents and their ensemble; and
  full-graph inference time of child and ensemble with the graph operators uncached and cached
  (what :mod:`hpcsoup.merge.timing` measures);
- ``scaling.png`` / ``.pdf``: seconds and peak memory per stage against graph nodes and MPI ranks,
  when the store holds runs at several sizes (e.g. ``synthetic-products-<nodes>``) or ranks.

Only complete groups are reported.
"""
from __future__ import annotations

import datetime
import json
import math
import re
import statistics
from pathlib import Path

import hpcsoup
from hpcsoup.config import SOUP_METHODS
from hpcsoup.progress import significant
from hpcsoup.summary import score

PLOT_FORMATS = ("png", "pdf")
_SIZE = re.compile(r"-(\d+)$")


# ------------------------------------------------------------------ numbers

def _spread(values: list, fmt) -> str:
    """``fmt(mean)``, with ``± fmt(std)`` over several values; ``-`` without any."""
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return fmt(values[0])
    return f"{fmt(statistics.mean(values))} ± {fmt(statistics.stdev(values))}"


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.mean(values) if values else None


def _std(values: list) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return statistics.stdev(values) if len(values) > 1 else 0.0


def _yes(value) -> str:
    return "-" if value is None else ("yes" if value else "no")


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` (already formatted) restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if row.get(c) is None else str(row.get(c)) for c in columns) + " |"
              for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------ rows

def graph_nodes(dataset: str | None, attrs: dict) -> int | None:
    """The node count of a group's graph, where the store says it: ``synthetic-products-<nodes>``,
    the config's ``data.nodes`` for synthetic-products, or the nodes a distributed soup sharded."""
    if dataset and dataset.startswith("synthetic-products"):
        found = _SIZE.search(dataset)
        if found:
            return int(found.group(1))
        return ((attrs.get("config") or {}).get("data") or {}).get("nodes")
    core = (attrs.get("extras") or {}).get("core_nodes_per_rank")
    return sum(core) if core else None


def collect(store) -> dict:
    """One row per complete expert, soup and merge of a store (numbers unrounded)."""
    experts, soups, merges = [], [], []
    for g in store.groups("experts"):
        a, m = g.attrs, g.attrs.get("metrics") or {}
        experts.append({"id": g.id, "dataset": a.get("dataset"), "nodes": graph_nodes(a.get("dataset"), a),
                        "arch": a.get("arch"), "role": a.get("role", "expert"), "seed": a.get("seed"),
                        "metric": m.get("metric"), "val": m.get("val"), "test": m.get("test"),
                        "seconds": a.get("train_seconds")})
    for g in store.groups("soups"):
        a, m, extras = g.attrs, g.attrs.get("metrics") or {}, g.attrs.get("extras") or {}
        ranks = a.get("ranks") or extras.get("ranks") or 1
        rss = a.get("peak_rss_bytes")
        soups.append({"id": g.id, "dataset": a.get("dataset"), "nodes": graph_nodes(a.get("dataset"), a),
                      "arch": a.get("arch"), "method": a.get("method"),
                      "ingredients": len(a.get("ingredients") or []), "seed": a.get("seed"),
                      "ranks": ranks, "halo": extras.get("halo", m.get("halo")),
                      # a single process scores the soup on the whole graph: exact by construction
                      "exact": m.get("exact", ranks <= 1), "moved": extras.get("moved"),
                      "metric": m.get("metric"), "val": m.get("val"), "test": m.get("test"),
                      "seconds": a.get("seconds"), "peak_mib": rss / 2**20 if rss else None})
    for g in store.groups("merges"):
        a, m = g.attrs, g.attrs.get("metrics") or {}
        timing = m.get("timing") or {}
        seconds = a.get("seconds") or {}
        merges.append({"id": g.id, "dataset": a.get("dataset"), "nodes": graph_nodes(a.get("dataset"), a),
                       "parents": list(a.get("parents") or []), "metric": m.get("metric"),
                       "test": m.get("test"), "ensemble_test": m.get("ensemble_test"),
                       "parent_test": {p: v.get("test") for p, v in (m.get("parents") or {}).items()},
                       "retention_mean": m.get("retention_mean"), "retention_min": m.get("retention_min"),
                       "speedup_cached": m.get("speedup_vs_ensemble"),
                       "speedup_uncached": m.get("speedup_uncached"),
                       "speedup": timing.get("speedup") or {},
                       "child_seconds": timing.get("child") or {},
                       "ensemble_seconds": timing.get("ensemble") or {},
                       "merge_seconds": seconds.get("merge") if isinstance(seconds, dict) else None,
                       "seconds": seconds.get("total") if isinstance(seconds, dict) else seconds})
    return {"experts": experts, "soups": soups, "merges": merges}


def _groups(rows: list[dict], keys: tuple) -> dict:
    """``rows`` grouped by the values of ``keys`` (the seeds of one setting together), in order."""
    out: dict = {}
    for row in rows:
        out.setdefault(tuple(row.get(k) for k in keys), []).append(row)
    return out


def _method_order(row: dict) -> tuple:
    """Methods in the order of the pipeline (uniform first, pls last), then ranks and halo."""
    method = row.get("method")
    rank = SOUP_METHODS.index(method) if method in SOUP_METHODS else len(SOUP_METHODS)
    return (rank, str(method), row.get("ranks") or 1, row.get("halo") or 0)


def soup_settings(soups: list[dict]) -> list[dict]:
    """One row per (dataset, method, ranks, halo): mean and spread over its soups (seeds)."""
    soups = sorted(soups, key=_method_order)
    out = []
    keys = ("dataset", "method", "ranks", "halo")
    for (dataset, method, ranks, halo), rows in _groups(soups, keys).items():
        out.append({"dataset": dataset, "nodes": rows[0]["nodes"], "method": method, "ranks": ranks,
                    "halo": halo, "metric": rows[0]["metric"], "seeds": len(rows),
                    "exact": all(r["exact"] for r in rows) if all(r["exact"] is not None for r in rows)
                    else None,
                    "moved": None if all(r["moved"] is None for r in rows) else any(r["moved"] for r in rows),
                    **{f"{k}_values": [r[k] for r in rows] for k in ("val", "test", "seconds", "peak_mib")}})
    return out


def best_expert(experts: list[dict], dataset: str) -> dict | None:
    """The soup reference: the ingredient expert of ``dataset`` with the best validation score."""
    pool = [e for e in experts if e["dataset"] == dataset and e["role"] == "expert" and e["val"] is not None]
    return max(pool, key=lambda e: e["val"]) if pool else None


def scaling_rows(rows: dict) -> list[dict]:
    """Seconds and peak memory per stage at each (dataset, ranks), for graphs of known size."""
    out = []
    for (dataset, nodes, role), experts in _groups([e for e in rows["experts"] if e["nodes"]],
                                                   ("dataset", "nodes", "role")).items():
        out.append({"dataset": dataset, "nodes": nodes, "stage": f"train (per {role})", "ranks": 1,
                    "seconds_values": [e["seconds"] for e in experts], "peak_mib_values": []})
    for s in soup_settings([s for s in rows["soups"] if s["nodes"]]):
        out.append({"dataset": s["dataset"], "nodes": s["nodes"], "stage": f"soup {s['method']}",
                    "ranks": s["ranks"], "seconds_values": s["seconds_values"],
                    "peak_mib_values": s["peak_mib_values"]})
    for (dataset, nodes), merges in _groups([m for m in rows["merges"] if m["nodes"]],
                                            ("dataset", "nodes")).items():
        out.append({"dataset": dataset, "nodes": nodes, "stage": "merge", "ranks": 1,
                    "seconds_values": [m["seconds"] for m in merges], "peak_mib_values": []})
    return out


def has_scaling(scaling: list[dict]) -> bool:
    """A sweep: runs at two or more graph sizes, or one stage at two or more rank counts."""
    sizes = {r["nodes"] for r in scaling}
    ranks = _groups(scaling, ("dataset", "stage"))
    return len(sizes) > 1 or any(len({r["ranks"] for r in rs}) > 1 for rs in ranks.values())


# ------------------------------------------------------------------ plots

def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, out: Path, name: str) -> list[str]:
    paths = []
    for fmt in PLOT_FORMATS:
        path = out / f"{name}.{fmt}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(str(path))
    _pyplot().close(fig)
    return paths


def _log_axis(ax, which: str, base: int = 10, ticks=None) -> None:
    """A log-scaled axis with ticks at 1, 2, 5 x 10^k (or at ``ticks``) labelled as plain numbers."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    getattr(ax, f"set_{which}scale")("log", base=base)
    axis = getattr(ax, f"{which}axis")
    axis.set_major_locator(FixedLocator(sorted(set(ticks))) if ticks is not None
                           else LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    axis.set_minor_formatter(NullFormatter())


def _label(method: str, ranks: int) -> str:
    return method + (f" ({ranks} ranks)" if ranks and ranks > 1 else "")


def plot_soups(rows: dict, out: Path) -> list[str]:
    """Test score against souping time per method, one panel per dataset, with references."""
    settings = [s for s in soup_settings(rows["soups"]) if _mean(s["test_values"]) is not None
                and _mean(s["seconds_values"])]
    if not settings:
        return []
    plt = _pyplot()
    datasets = list(dict.fromkeys(s["dataset"] for s in settings))
    cols = min(3, len(datasets))
    nrows = math.ceil(len(datasets) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4.6 * cols, 3.6 * nrows), squeeze=False)
    methods = list(dict.fromkeys(_label(s["method"], s["ranks"]) for s in settings))
    markers = "osD^v<>pP*Xh"
    style = {m: (f"C{i % 10}", markers[i % len(markers)]) for i, m in enumerate(methods)}
    for ax, dataset in zip(axes.flat, datasets):
        here = [s for s in settings if s["dataset"] == dataset]
        for s in here:
            label = _label(s["method"], s["ranks"])
            color, marker = style[label]
            ax.errorbar(_mean(s["seconds_values"]), _mean(s["test_values"]),
                        xerr=_std(s["seconds_values"]) or None, yerr=_std(s["test_values"]) or None,
                        fmt=marker, color=color, label=label, capsize=3, markersize=7)
        best = best_expert(rows["experts"], dataset)
        if best is not None and best["test"] is not None:
            ax.axhline(best["test"], color="0.35", linestyle="--", linewidth=1,
                       label=f"best expert ({best['id']})")
        uniform = [s for s in here if s["method"] == "uniform"]
        if uniform:
            ax.axhline(_mean(uniform[0]["test_values"]), color="C0", linestyle=":", linewidth=1,
                       label="uniform soup")
        _log_axis(ax, "x")
        ax.set_xlabel("souping time (s, log scale)")
        ax.set_ylabel(f"test {here[0]['metric'] or 'score'}")
        seeds = max(s["seeds"] for s in here)
        ax.set_title(dataset + (f" (mean ± std over {seeds} seeds)" if seeds > 1 else ""), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    for ax in list(axes.flat)[len(datasets):]:
        ax.set_visible(False)
    fig.tight_layout()
    return _save(fig, out, "soups")


def plot_merges(rows: dict, out: Path) -> list[str]:
    """Left: test score of parents, ensemble and child per merge; right: inference time."""
    merges = [m for m in rows["merges"] if m["test"] is not None]
    if not merges:
        return []
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.8
    for i, m in enumerate(merges):
        bars = [(p, v) for p, v in m["parent_test"].items()] + [("ensemble", m["ensemble_test"]),
                                                                ("merged child", m["test"])]
        step = width / len(bars)
        for j, (name, value) in enumerate(bars):
            color = "C2" if name == "merged child" else "C1" if name == "ensemble" else "0.65"
            x = i - width / 2 + step * (j + 0.5)
            left.bar(x, value or 0, step * 0.9, color=color)
            left.text(x, (value or 0), score(value), ha="center", va="bottom", fontsize=7)
            left.text(x, 0.02, name, rotation=90, ha="center", va="bottom", fontsize=7)
    left.set_xticks(range(len(merges)), [" + ".join(m["parents"]) for m in merges], fontsize=8)
    left.set_ylabel(f"test {merges[0]['metric'] or 'score'}")
    left.set_title(f"merged child vs parents vs ensemble ({merges[0]['dataset']})", fontsize=10)
    regimes = [("uncached", "operators rebuilt"), ("cached", "operators cached")]
    labels, child_ms, ens_ms, speedups = [], [], [], []
    for m in merges:
        for regime, text in regimes:
            if regime in m["child_seconds"] and regime in m["ensemble_seconds"]:
                labels.append(text + ("" if len(merges) == 1 else f"\n{' + '.join(m['parents'])}"))
                child_ms.append(1e3 * m["child_seconds"][regime])
                ens_ms.append(1e3 * m["ensemble_seconds"][regime])
                speedups.append(m["speedup"].get(regime))  # the median of per-round ratios
    if labels:
        x = range(len(labels))
        right.bar([i - 0.2 for i in x], ens_ms, 0.4, color="C1", label="ensemble")
        right.bar([i + 0.2 for i in x], child_ms, 0.4, color="C2", label="merged child")
        for i, (c, speedup) in enumerate(zip(child_ms, speedups)):
            right.text(i + 0.2, c, f"{significant(speedup)}x", ha="center", va="bottom", fontsize=8)
        right.set_xticks(list(x), labels, fontsize=8)
        right.set_ylabel("full-graph inference (ms, median)")
        right.set_title("speed: child vs ensemble (label: speedup)", fontsize=10)
        right.legend(fontsize=8)
    else:
        right.set_visible(False)
    fig.tight_layout()
    return _save(fig, out, "merges")


def plot_scaling(scaling: list[dict], out: Path) -> list[str]:
    """Seconds and peak memory per stage against nodes (several sizes) and ranks (several counts)."""
    if not has_scaling(scaling):
        return []
    plt = _pyplot()
    by_nodes = len({r["nodes"] for r in scaling}) > 1
    by_ranks = [rs for rs in _groups(scaling, ("dataset", "stage")).values()
                if len({r["ranks"] for r in rs}) > 1]
    panels = (["nodes"] if by_nodes else []) + (["ranks"] if by_ranks else [])
    fig, axes = plt.subplots(2, len(panels), figsize=(5 * len(panels), 7), squeeze=False)
    for col, axis in enumerate(panels):
        if axis == "nodes":
            series = _groups(scaling, ("stage", "ranks"))
            name = {key: _label(*key) for key in series}
        else:
            series = {key: rs for rs in by_ranks for key in [(rs[0]["stage"], rs[0]["nodes"])]}
            name = {key: f"{key[0]}, {key[1]:,} nodes" for key in series}
        for row, (field, ylabel) in enumerate((("seconds", "seconds"), ("peak_mib", "peak memory (MiB)"))):
            ax = axes[row][col]
            for i, (key, rs) in enumerate(series.items()):
                points = sorted((r[axis], _mean(r[f"{field}_values"]), _std(r[f"{field}_values"]))
                                for r in rs if _mean(r[f"{field}_values"]) is not None)
                if points:
                    xs, ys, es = zip(*points)
                    ax.errorbar(xs, ys, yerr=[e or 0 for e in es], marker="osD^v<>"[i % 7],
                                color=f"C{i % 10}", label=name[key], capsize=3)
            _log_axis(ax, "x", 10 if axis == "nodes" else 2,
                      None if axis == "nodes" else [r["ranks"] for rs in series.values() for r in rs])
            _log_axis(ax, "y")
            ax.set_xlabel("graph nodes" if axis == "nodes" else "MPI ranks")
            ax.set_ylabel(ylabel + (" per process (max over ranks)" if field == "peak_mib" else ""))
            ax.grid(alpha=0.3, which="both")
            if ax.lines:
                ax.legend(fontsize=7)
        axes[0][col].set_title("scaling with graph size" if axis == "nodes" else "scaling with ranks",
                               fontsize=10)
    fig.tight_layout()
    return _save(fig, out, "scaling")


# ------------------------------------------------------------------ markdown

def _experts_section(experts: list[dict]) -> str:
    table = []
    for (dataset, arch, role), rows in _groups(experts, ("dataset", "arch", "role")).items():
        table.append({"dataset": dataset, "arch": arch, "role": role, "count": len(rows),
                      "metric": rows[0]["metric"], "val": _spread([r["val"] for r in rows], score),
                      "test": _spread([r["test"] for r in rows], score),
                      "seconds": _spread([r["seconds"] for r in rows], significant)})
    each = [{"id": e["id"], "dataset": e["dataset"], "arch": e["arch"], "role": e["role"],
             "seed": e["seed"], "val": score(e["val"]), "test": score(e["test"]),
             "seconds": significant(e["seconds"])} for e in experts]
    return (f"## Experts ({len(experts)})\n\nMean ± std over the experts of each kind; seconds of "
            f"training per expert.\n\n"
            + markdown_table(table, ["dataset", "arch", "role", "count", "metric", "val", "test",
                                     "seconds"])
            + "\n\n<details><summary>every expert</summary>\n\n"
            + markdown_table(each, ["id", "dataset", "arch", "role", "seed", "val", "test", "seconds"])
            + "\n\n</details>")


def _soups_section(rows: dict, plot: list[str]) -> str:
    settings = soup_settings(rows["soups"])
    moved = any(s["moved"] is not None for s in settings)
    columns = ["method", "ranks", "halo", "exact score", *(["moved"] if moved else []), "seeds",
               "val", "test", "seconds", "peak MiB"]
    parts = [f"## Soups ({len(rows['soups'])})",
             "Scores on the full graph's validation and test nodes (mean ± std over soup seeds); "
             "`exact score`: the stored score is that of the whole graph (a distributed soup with "
             "a halo smaller than the layers scores partitions only); `halo`: hops of neighbours "
             "kept around each partition (PLS); seconds of souping; peak resident memory of one "
             "process (the largest rank for distributed soups)."
             + (" `moved`: whether the learned coefficients left the uniform start." if moved else "")]
    for dataset, group in _groups(settings, ("dataset",)).items():
        table = []
        for s in group:
            table.append({"method": s["method"], "ranks": s["ranks"],
                          "halo": "-" if s["halo"] is None else s["halo"],
                          "exact score": _yes(s["exact"]), "moved": _yes(s["moved"]), "seeds": s["seeds"],
                          "val": _spread(s["val_values"], score), "test": _spread(s["test_values"], score),
                          "seconds": _spread(s["seconds_values"], significant),
                          "peak MiB": _spread(s["peak_mib_values"], significant)})
        best = best_expert(rows["experts"], dataset[0])
        if best is not None:
            table.append({"method": f"best expert ({best['id']})", "val": score(best["val"]),
                          "test": score(best["test"]), "seconds": "-", "ranks": "-", "halo": "-",
                          "exact score": "yes", "moved": "-", "seeds": 1, "peak MiB": "-"})
        parts.append(f"### {dataset[0]} ({group[0]['metric']})\n\n" + markdown_table(table, columns))
    if plot:
        parts.append(f"![soups: test score against souping time]({Path(plot[0]).name})")
    return "\n\n".join(parts)


def _merges_section(merges: list[dict], plot: list[str]) -> str:
    table = [{"parents": " + ".join(m["parents"]), "dataset": m["dataset"], "metric": m["metric"],
              "child test": score(m["test"]), "ensemble test": score(m["ensemble_test"]),
              "parents test": ", ".join(score(v) for v in m["parent_test"].values()),
              "retention mean / worst": f"{score(m['retention_mean'])} / {score(m['retention_min'])}",
              "speedup cached / uncached": f"{significant(m['speedup_cached'])}x / "
                                           f"{significant(m['speedup_uncached'])}x",
              "merge s": significant(m["merge_seconds"]), "id": m["id"]} for m in merges]
    text = (f"## Merges ({len(merges)})\n\nH-GRAMA children: test score of child, ensemble (mean of "
            f"the parents' logits) and each parent; retention = child / parent on the test "
            f"nodes of the parent's region; speedup = ensemble / child full-graph inference time "
            f"(median of interleaved runs), with the graph operators cached or rebuilt every "
            f"forward; seconds of the merge itself.\n\n"
            + markdown_table(table, ["parents", "dataset", "metric", "child test", "ensemble test",
                                     "parents test", "retention mean / worst",
                                     "speedup cached / uncached", "merge s", "id"]))
    if plot:
        text += f"\n\n![merges: child vs parents vs ensemble]({Path(plot[0]).name})"
    return text


def _scaling_section(scaling: list[dict], plot: list[str]) -> str:
    table = [{"dataset": r["dataset"], "nodes": f"{r['nodes']:,}", "stage": r["stage"], "ranks": r["ranks"],
              "runs": len(r["seconds_values"]), "seconds": _spread(r["seconds_values"], significant),
              "peak MiB": _spread(r["peak_mib_values"], significant)}
             for r in sorted(scaling, key=lambda r: (r["stage"], r["nodes"], r["ranks"]))]
    text = ("## Scaling\n\nSeconds and peak resident memory per stage (mean ± std over runs) "
            "against graph nodes and MPI ranks.\n\n"
            + markdown_table(table, ["stage", "dataset", "nodes", "ranks", "runs", "seconds", "peak MiB"]))
    if plot:
        text += f"\n\n![scaling: seconds and memory against nodes and ranks]({Path(plot[0]).name})"
    return text


def _provenance_section(store, groups: list) -> str:
    root = store.attrs
    created = root.get("created") or {}
    versions: dict = {}
    hosts, times, jobs, configs = set(), [], set(), set()
    for g in groups:
        v = g.attrs.get("versions") or {}
        for key in ("hpcsoup", "python", "torch", "torch_geometric", "zarr", "numpy"):
            if key in v:
                versions.setdefault(key, set()).add(str(v[key]))
        hosts.update([v["hostname"]] if "hostname" in v else [])
        times += [v["time"]] if "time" in v else []
        slurm = g.attrs.get("slurm") or {}
        if slurm.get("job_id"):
            jobs.add(str(slurm.get("array_job_id") or slurm["job_id"]))
        if g.attrs.get("config") is not None:
            configs.add(json.dumps(g.attrs["config"], sort_keys=True))
    lines = [f"- store: `{store.path}` (experiment `{root.get('name')}`), created "
             f"{created.get('time', '?')} on {created.get('hostname', '?')}",
             f"- groups written {min(times) if times else '?'} to {max(times) if times else '?'} "
             f"on {', '.join(sorted(hosts)) or '?'}"]
    lines += [f"- {key}: {', '.join(sorted(values))}" for key, values in versions.items()]
    if jobs:
        lines.append(f"- SLURM jobs: {', '.join(sorted(jobs))}")
    if len(configs) > 1:
        lines.append(f"- the groups were written with {len(configs)} different configurations "
                     f"(each group records its own in its `config` attribute)")
    config = json.dumps(root.get("config") or {}, indent=2, sort_keys=True)
    return ("## Provenance\n\n" + "\n".join(lines)
            + "\n\n## Configuration\n\nThe configuration the store was created with:\n\n"
            + f"```json\n{config}\n```")


def report(store_path: str | Path, out: str | Path | None = None) -> dict:
    """Write ``report.md``, ``report.json`` and the plots of a store; return where they are.

    Returns ``{"store", "out", "markdown", "json", "plots": {name: [png, pdf]}, "experts",
    "soups", "merges"}`` (the last three: the rows, as in ``report.json``).
    """
    from hpcsoup.store import Store

    store = Store.open(store_path)
    rows = collect(store)
    out = Path(out) if out else Path(str(store_path).rstrip("/") + ".report")
    out.mkdir(parents=True, exist_ok=True)
    scaling = scaling_rows(rows)
    plots = {"soups": plot_soups(rows, out), "merges": plot_merges(rows, out),
             "scaling": plot_scaling(scaling, out)}
    plots = {name: paths for name, paths in plots.items() if paths}
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    sections = [f"# hpcsoup report: {store.attrs.get('name') or store_path}",
                f"Store `{store_path}`; written {now} by hpcsoup {hpcsoup.__version__}. Scores to 3 "
                f"decimals; seconds and MiB to 2 significant figures."]
    if rows["soups"]:
        sections.append(_soups_section(rows, plots.get("soups", [])))
    if rows["merges"]:
        sections.append(_merges_section(rows["merges"], plots.get("merges", [])))
    if has_scaling(scaling):
        sections.append(_scaling_section(scaling, plots.get("scaling", [])))
    sections.append(_experts_section(rows["experts"]) if rows["experts"] else "## Experts\n\n(none)")
    groups = [g for kind in ("experts", "soups", "merges") for g in store.groups(kind)]
    sections.append(_provenance_section(store, groups))
    markdown = out / "report.md"
    markdown.write_text("\n\n".join(sections) + "\n")
    (out / "report.json").write_text(json.dumps({**rows, "scaling": scaling}, indent=2, default=str))
    return {"store": str(store_path), "out": str(out), "markdown": str(markdown),
            "json": str(out / "report.json"), "plots": plots, "experts": len(rows["experts"]),
            "soups": rows["soups"], "merges": rows["merges"]}

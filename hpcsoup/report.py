"""Stage 5: tables and plots of what a store holds (experts, soups, merges).

``report(store_path)`` writes ``report.md``, ``report.json`` and
``soups.png`` (score against souping time per method) into ``<store>.report/``
and prints the tables. Only complete groups are reported.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _fmt(value, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return "" if value is None else str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
    """A GitHub-flavoured markdown table of ``rows`` restricted to ``columns``."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def collect(store) -> dict:
    """Rows of the experts, soups and merges a store holds."""
    experts = []
    for g in store.groups("experts"):
        a, m = g.attrs, g.attrs.get("metrics", {})
        experts.append({"id": g.id, "arch": a.get("arch"), "role": a.get("role", "expert"),
                        "metric": m.get("metric"), "val": m.get("val"), "test": m.get("test"),
                        "seconds": a.get("train_seconds")})
    soups = []
    for g in store.groups("soups"):
        a, m = g.attrs, g.attrs.get("metrics", {})
        rss = a.get("peak_rss_bytes")
        soups.append({"id": g.id, "method": a.get("method"), "ingredients": len(a.get("ingredients", [])),
                      "val": m.get("val"), "test": m.get("test"), "seconds": a.get("seconds"),
                      "peak_rss_mib": rss / 2**20 if rss else None, "ranks": a.get("ranks")})
    merges = []
    for g in store.groups("merges"):
        a, m = g.attrs, g.attrs.get("metrics", {})
        retention = m.get("retention", {}) or {}
        merges.append({"id": g.id, "parents": ",".join(a.get("parents", [])), "test": m.get("test"),
                       "ensemble_test": m.get("ensemble_test"),
                       "mean_retention": (sum(retention.values()) / len(retention)) if retention else None,
                       "worst_retention": min(retention.values()) if retention else None,
                       "speedup_vs_ensemble": m.get("speedup_vs_ensemble")})
    return {"experts": experts, "soups": soups, "merges": merges}


def _plot(soups: list[dict], path: Path) -> Path | None:
    rows = [s for s in soups if s["seconds"] is not None and s["test"] is not None]
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for s in rows:
        ax.scatter(s["seconds"], s["test"])
        ax.annotate(s["method"], (s["seconds"], s["test"]), textcoords="offset points", xytext=(4, 4))
    ax.set_xscale("log")
    ax.set_xlabel("souping time (s, log)")
    ax.set_ylabel("test score")
    ax.set_title("soups: score vs time")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def report(store_path: str | Path, out: str | Path | None = None, echo: bool = True) -> dict:
    """Write ``report.md``, ``report.json`` and ``soups.png`` for a store; return the rows."""
    from hpcsoup.store import Store

    store = Store.open(store_path)
    rows = collect(store)
    out = Path(out) if out else Path(str(store_path).rstrip("/") + ".report")
    out.mkdir(parents=True, exist_ok=True)
    sections = [f"# hpcsoup report: {store_path}"]
    columns = {"experts": ["id", "arch", "role", "metric", "val", "test", "seconds"],
               "soups": ["method", "ingredients", "val", "test", "seconds", "peak_rss_mib", "ranks"],
               "merges": ["id", "parents", "test", "ensemble_test", "mean_retention",
                          "worst_retention", "speedup_vs_ensemble"]}
    for kind, cols in columns.items():
        sections.append(f"## {kind} ({len(rows[kind])})\n\n" +
                        (markdown_table(rows[kind], cols) if rows[kind] else "(none)"))
    text = "\n\n".join(sections) + "\n"
    (out / "report.md").write_text(text)
    (out / "report.json").write_text(json.dumps(rows, indent=2))
    plot = _plot(rows["soups"], out / "soups.png")
    if echo:
        print(text, file=sys.stderr)
    return {"store": str(store_path), "out": str(out), "plot": str(plot) if plot else None,
            "experts": len(rows["experts"]), "soups": rows["soups"], "merges": rows["merges"]}

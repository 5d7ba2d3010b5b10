"""What each command prints on stdout: a stage's results in a few lines.

Progress and logs go to stderr (:mod:`hpcsoup.progress`); these texts are the results, on stdout,
with the precision of :mod:`hpcsoup.report`: scores to 3 decimals, seconds and MiB to 2
significant figures. Each function takes what the stage's Python function returned.
"""
from __future__ import annotations

import shlex

from hpcsoup.progress import duration, significant
from hpcsoup.store.describe import text_table


def score(value) -> str:
    """A score to 3 decimals (``"-"`` when missing)."""
    return "-" if value is None else f"{value:.3f}"


def mib(n_bytes) -> str:
    """Bytes as MiB to 2 significant figures."""
    return "-" if not n_bytes else significant(n_bytes / 2**20)


def train(result: dict) -> str:
    rows = [{"expert": t.get("expert_id", t.get("task_id")), "status": t["status"],
             "metric": (t.get("metrics") or {}).get("metric", ""),
             "val": score((t.get("metrics") or {}).get("val")),
             "test": score((t.get("metrics") or {}).get("test")),
             "seconds": significant(t.get("train_seconds"))} for t in result["tasks"]]
    head = (f"train: {result['trained']} trained, {result['existing']} already there, in "
            f"{duration(result['seconds'])} -> {result['store']}")
    return head + "\n" + text_table(rows, ["expert", "status", "metric", "val", "test", "seconds"])


def soup(result: dict) -> str:
    if not result.get("soups"):
        return f"soup: nothing souped in {result.get('store')}"
    rows = []
    for s in result["soups"]:
        m, extras = s.get("metrics") or {}, s.get("extras") or {}
        ranks = extras.get("ranks") or result.get("ranks") if s["method"] == "pls" else None
        rows.append({"method": s["method"] + (f" ({ranks} ranks)" if ranks and ranks > 1 else ""),
                     "val": score(m.get("val")), "test": score(m.get("test")),
                     "moved": {True: "yes", False: "no (= its start)"}.get(extras.get("moved"), "-"),
                     "seconds": significant(s.get("seconds")), "peak MiB": mib(s.get("peak_rss_bytes")),
                     "id": s["id"]})
    head = (f"soup: {len(result.get('ingredients') or [])} {result.get('arch', '')} experts on "
            f"{result.get('dataset')} ({result.get('metric', '')}) -> {result['store']}")
    lines = [head, text_table(rows, ["method", "val", "test", "moved", "seconds", "peak MiB", "id"])]
    best = result.get("best_expert")
    if best:
        lines.append(f"best expert {best.get('id')}: val {score(best.get('val'))} "
                     f"test {score(best.get('test'))}")
    return "\n".join(lines)


def merge(result: dict) -> str:
    m = result["metrics"]
    parents = ", ".join(f"{p} {score(v.get('test'))}" for p, v in (m.get("parents") or {}).items())
    return (f"merge: {' + '.join(result['parents'])} -> {result['store']}/merges/{result['merge_id']}\n"
            f"  {m['metric']} test: child {score(m['test'])}, ensemble {score(m.get('ensemble_test'))}, "
            f"parents {parents}\n"
            f"  retention (child / parent on its region): mean {score(m.get('retention_mean'))}, "
            f"worst {score(m.get('retention_min'))}\n"
            f"  inference: {significant(m.get('speedup_vs_ensemble'))}x faster than the ensemble "
            f"(graph operators cached; uncached {significant(m.get('speedup_uncached'))}x)")


def report(result: dict) -> str:
    lines = [f"report: {result['markdown']}"]
    for name, files in result.get("plots", {}).items():
        lines.append(f"plot {name}: {', '.join(files)}")
    if not result.get("plots"):
        lines.append("plots: none (the store holds nothing to plot)")
    return "\n".join(lines)


def run(result: dict) -> str:
    parts = [train(result["train"])]
    for key in ("soup", "soup_pls"):
        if key in result:
            parts.append(soup(result[key]))
    if "merge" in result:
        parts.append(merge(result["merge"]))
    parts.append(report(result["report"]))
    parts.append(f"done in {duration(result['seconds'])}")
    return "\n\n".join(parts)


def submit(result: dict) -> str:
    """The store, the log folder, each job with what it waits for, and how to follow them."""
    jobs, after = result["jobs"], result.get("after", {})
    lines = [f"store: {result['store']}", f"logs:  {result.get('logs') or 'slurm-logs/'}"]
    if result.get("dry_run"):
        lines.append("dry run: these sbatch commands would be run (each <stage> is that job's id):")
        lines += [f"  {stage}: {command}" for stage, command in jobs.items()]
        return "\n".join(lines)
    lines.append("jobs:")
    width = max(map(len, jobs))
    for stage, job in jobs.items():
        waits = after.get(stage)
        lines.append(f"  {stage:<{width}}  {job}" + (f"  after {' and '.join(waits)} succeed"
                                                     if waits else ""))
    ids = ",".join(str(j) for j in jobs.values())
    lines.append(f"follow: squeue --jobs={ids}")
    logs = result.get("logs") or "slurm-logs"
    lines.append(f"        tail -f {shlex.quote(logs.rstrip('/'))}/*")
    return "\n".join(lines)


def partition(result: dict) -> str:
    if not result.get("partitioned"):
        return f"partition: nothing to do ({result.get('reason')})"
    return (f"partition: {result['partitioned']}: {result['partitions']} partitions of "
            f"{result['nodes']} nodes, halo {result['halo']}")

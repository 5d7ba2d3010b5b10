"""The products study on one GPU: every stage with ``device = "cuda"``, time and CUDA memory.

Runs ``hpcsoup run`` on the study config (default ``jobs/products.toml``: experts, the five
soups with PLS on 2 MPI ranks sharing the GPU, the H-GRAMA merge of the specialists, the report)
once per ``--nodes`` size, each in a fresh store, as a user of a GPU node would, and reads
what every stage recorded: seconds, the process's peak RSS and ``torch.cuda.max_memory_allocated``
(``peak_gpu_bytes``), the val / test of every expert, soup and child, whether each soup moved.
H-GRAMA's fit (alignment, gate) runs on the CPU; the child's and the ensemble's inference and
their timing on the GPU.

A bare GPU machine has to train its own experts, so the check trains them for
``--epochs`` (default 10, with the config's patience) and reports souping and merging on
those: the check is of speed and memory on the GPU, not of the experts' quality (the CPU runs
in benchmarks/RESULTS.md are).

Usage (on a machine with a CUDA GPU; ``benchmarks/gpu_check.sh`` wraps it)::

    python benchmarks/gpu_check.py --nodes 2e4 1e6 --epochs 10 --out benchmarks/out/gpu_check

Writes a markdown table to stdout and ``<out>/gpu_check.json``. Exit status 1 if any run failed.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from scaling_study import measure  # noqa: E402  (one way to measure a process: wall, CPU, RSS)

GIB = 2 ** 30


def gib(value) -> str:
    return f"{value / GIB:.2f}" if isinstance(value, (int, float)) else "-"


def quality(metrics: dict | None) -> str:
    if not isinstance(metrics, dict) or "val" not in metrics:
        return "-"
    return f"{metrics['val']:.4f} / {metrics['test']:.4f}"


def stage_rows(nodes: int, result: dict, device: str) -> list[dict]:
    """One row per expert, soup and merge from ``hpcsoup run --json``'s result."""
    rows = []
    for task in (result.get("train") or {}).get("tasks", []):
        rows.append({"nodes": nodes, "stage": f"train {task.get('expert_id')}",
                     "seconds": task.get("train_seconds"), "peak_rss": task.get("peak_rss_bytes"),
                     "peak_gpu": task.get("peak_gpu_bytes"), "quality": quality(task.get("metrics")),
                     "note": task.get("status", "")})
    soups = list((result.get("soup") or {}).get("soups", []))
    soups += list((result.get("soup_pls") or {}).get("soups", []))
    for soup in soups:
        extras = soup.get("extras") or {}
        moved = extras.get("moved")
        note = "" if moved is None else ("moved" if moved else "did not move")
        if extras.get("ranks"):
            note += f", {extras['ranks']} ranks, per-rank GPU " + " ".join(
                gib(b) for b in extras.get("peak_gpu_bytes_per_rank") or [])
        rows.append({"nodes": nodes, "stage": f"soup {soup['method']}", "seconds": soup.get("seconds"),
                     "peak_rss": soup.get("peak_rss_bytes"), "peak_gpu": soup.get("peak_gpu_bytes"),
                     "quality": quality(soup.get("metrics")), "note": note.strip(", ")})
    merge = result.get("merge")
    if merge:
        m = merge["metrics"]
        speed = m.get("timing", {}).get("speedup", {})
        rows.append({"nodes": nodes, "stage": "merge (fit on CPU)",
                     "seconds": (merge.get("seconds") or {}).get("merge"),
                     "peak_rss": None, "peak_gpu": None, "quality": "-", "note": ""})
        rows.append({"nodes": nodes, "stage": f"merge: evaluate + time on {device}",
                     "seconds": None, "peak_rss": m.get("memory", {}).get("peak_rss_bytes"),
                     "peak_gpu": m.get("memory", {}).get("peak_gpu_bytes"),
                     "quality": quality(m),
                     "note": f"ensemble test {m['ensemble']['test']:.4f}; child vs ensemble "
                             f"{speed.get('cached', float('nan')):.2f}x cached, "
                             f"{speed.get('uncached', float('nan')):.2f}x uncached"})
    return rows


def print_table(runs: list[dict]) -> None:
    print("| nodes | run | wall s | CPU s | peak RSS GiB (largest process) | exit |")
    print("|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r['nodes']:,} | hpcsoup run | {r['seconds']:.1f} | {r['cpu_s']:.1f} | "
              f"{r['peak_rss_gib']:.2f} | {r['exit']} |")
    print("\n| nodes | stage | seconds | peak RSS GiB | peak GPU GiB | val / test | note |")
    print("|---|---|---|---|---|---|---|")
    for r in runs:
        for s in r["stages"]:
            seconds = f"{s['seconds']:.2f}" if isinstance(s["seconds"], (int, float)) else "-"
            print(f"| {s['nodes']:,} | {s['stage']} | {seconds} | {gib(s['peak_rss'])} | "
                  f"{gib(s['peak_gpu'])} | {s['quality']} | {s['note']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(HERE.parent / "jobs" / "products.toml"))
    parser.add_argument("--nodes", nargs="+", type=float, default=[2.45e6])
    parser.add_argument("--epochs", type=int, default=10, help="expert epochs (default 10)")
    parser.add_argument("--device", default="cuda",
                        help="'cuda' (default) or 'cpu': the same check on the CPU, to compare")
    parser.add_argument("--threads", type=int, default=min(8, os.cpu_count() or 1),
                        help="torch threads per process for the CPU-side work (default <= 8)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable)")
    parser.add_argument("--work", default="/tmp/hpcsoup-gpu-check", help="stores and data")
    parser.add_argument("--out", default=str(HERE / "out" / "gpu_check"),
                        help="folder of gpu_check.json (default benchmarks/out/gpu_check)")
    args = parser.parse_args(argv)

    import torch
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_check: torch {torch.__version__} sees no CUDA GPU; run it on a GPU node",
              file=sys.stderr)
        return 2
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=str(HERE.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = []
    for nodes in (int(n) for n in args.nodes):
        overrides = [f"device={json.dumps(args.device)}", f"data.nodes={nodes}",
                     f"experts.epochs={args.epochs}", f"specialists.epochs={args.epochs}",
                     f"threads={args.threads}",
                     f"data.root={json.dumps(str(work / 'data'))}",
                     f"store={json.dumps(str(work / f'n{nodes}.zarr'))}", *args.set]
        command = [sys.executable, "-m", "hpcsoup", "run", args.config, "--json"]
        for item in overrides:
            command += ["--set", item]
        print(f"gpu_check: {nodes:,} nodes on {gpu}: {' '.join(command)}", file=sys.stderr,
              flush=True)
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        run = measure(command, env)
        run.update(nodes=nodes, started=started, command=" ".join(command),
                   stages=stage_rows(nodes, run["result"] or {}, args.device))
        runs.append(run)
        print(f"gpu_check: {nodes:,} nodes: exit {run['exit']} in {run['seconds']:.0f} s",
              file=sys.stderr, flush=True)
        (out / "gpu_check.json").write_text(json.dumps(  # after every size: a timeout keeps it
            {"gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
             "cpus": os.cpu_count(), "host": platform.node(), "argv": sys.argv, "runs": runs},
            indent=2, default=str))
        if not run["ok"]:  # a larger size would fail the same way, only later
            break
    print_table(runs)
    return 0 if all(r["ok"] for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())

"""The ogbn-products scaling study: seconds and peak memory of every pipeline stage vs nodes and ranks.

Each stage runs as its own process, exactly as a user or a SLURM job runs it, on the study
config (default ``jobs/products.toml``) with ``data.nodes`` set to each size:

- ``data``: load (generate) the graph;
- ``partition``: load the graph and compute its METIS partition (``experts.batch_partitions``
  parts) through :func:`hpcsoup.data.partition.partition_for`, the stored partition every later
  stage reads (an earlier one is removed first, so METIS really runs);
- ``train``: ``hpcsoup train --task-id 0``, one expert (one SLURM array task);
- ``uniform``, ``greedy``, ``gis``, ``learned``: ``hpcsoup soup --method M``;
- ``pls``: ``hpcsoup soup --method pls``, under ``mpiexec -n P`` for each rank count P > 1;
- ``merge``: ``hpcsoup merge`` (H-GRAMA on the config's specialists).

Soups and the merge need the other experts and the specialists: they are trained first (not
timed) with ``hpcsoup train --all``. Only ``pls`` depends on the rank count; the other stages run
once per size. A stage's time is its process's wall time and CPU time (user + system, all its
processes; imports and graph loading included: what a job pays), beside the seconds the stage
reports for its own work; on a shared machine the CPU time is the steadier figure. Its memory
is the peak RSS of the largest process it ran (``wait4``'s ``ru_maxrss``: for ``mpiexec`` the
largest rank). The growth exponent ``b`` of each stage is the least-squares slope of
``log(y) = a + b log(nodes)`` over the sizes measured (1 rank), for wall seconds, CPU seconds
and peak memory; the plot shows CPU seconds.

Usage::

    python benchmarks/scaling_study.py --nodes 1e5 4e5 1e6 2.45e6 --ranks 1 2 4
    python benchmarks/scaling_study.py --nodes 1e5 2e5 --stages data partition train \\
        --set experts.epochs=2
    python benchmarks/scaling_study.py --nodes 1e6 --metis-edges 1e12 32e6 12.5e6
                         # METIS on all edges vs sparsified copies: time, memory, edge cut

Writes a markdown table to stdout, ``benchmarks/out/scaling_study.json`` and
``benchmarks/out/scaling_study.png`` (``--append``: together with the rows already there, so a
study can run size by size). Every size gets its own store
(``<work>/n<nodes>.zarr``); graphs' partitions are stored under ``<work>/data``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
OUT = HERE / "out"
STAGES = ("data", "partition", "train", "uniform", "greedy", "gis", "learned", "pls", "merge")
SOUPS = ("uniform", "greedy", "gis", "learned", "pls")
#: what the growth exponents are fitted to: wall and CPU seconds of the process, peak RSS
FITTED = ("seconds", "cpu_s", "peak_rss_gib")


# ----------------------------------------------------------------------------- stage bodies

def _stage_body(stage: str, config: str) -> dict:
    """Run inside the stage's own process (``--stage``): the data and partition stages."""
    import torch

    from hpcsoup.config import load_config
    from hpcsoup.data import load_from_config
    from hpcsoup.data.partition import GRAPH_PATTERN, graph_identity, partition_cache_dir, partition_for

    cfg = load_config(config)
    torch.set_num_threads(max(cfg.threads, 1))
    start = time.perf_counter()
    graph = load_from_config(cfg)
    out = {"load_s": time.perf_counter() - start, "nodes": graph.num_nodes,
           "edges": int(graph.data.edge_index.size(1))}
    if stage == "partition":
        k = cfg.experts.batch_partitions
        stored = partition_cache_dir(cfg.data.root or None) / GRAPH_PATTERN.format(
            key=graph_identity(cfg.data.dataset, cfg.data.nodes, cfg.data.seed), k=k, seed=0)
        stored.unlink(missing_ok=True)
        start = time.perf_counter()
        partition_for(cfg, k, seed=0, graph=graph)
        out["metis_s"] = time.perf_counter() - start
    return out


def _metis_body(config: str, max_edges: int) -> dict:
    """One METIS run on a share of the edges (``--metis-edges``): seconds, edge cut, balance."""
    import torch

    from hpcsoup.config import load_config
    from hpcsoup.data import load_from_config
    from hpcsoup.data.partition import edge_cut, graph_partition, metis_keep

    cfg = load_config(config)
    torch.set_num_threads(1)
    graph = load_from_config(cfg)
    k = cfg.experts.batch_partitions
    start = time.perf_counter()
    parts = graph_partition(None, k, 0, graph=graph, max_edges=max_edges)
    seconds = time.perf_counter() - start
    edges = graph.data.edge_index
    return {"metis_s": seconds, "k": k, "edges": int(edges.size(1)), "max_edges": max_edges,
            "edge_share": metis_keep(edges.size(1), max_edges), "edge_cut": edge_cut(edges, parts),
            "largest_part_over_mean": float(torch.bincount(parts, minlength=k).max()) * k
            / graph.num_nodes}


def _workspace(args) -> tuple[Path, dict]:
    """The study's work folder (made) and the environment of its stage processes."""
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    return work, dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO) + os.pathsep
                      + os.environ.get("PYTHONPATH", ""))


def compare_metis(args) -> list[dict]:
    """METIS on the whole graph vs on sparsified copies: time, peak RSS and the edge cut."""
    work, env = _workspace(args)
    rows = []
    for nodes in args.nodes:
        config = _config_file(args.config, nodes, work, args.set)
        for max_edges in args.metis_edges:
            run = measure([sys.executable, str(Path(__file__).resolve()), "--stage", "metis",
                           "--config", config, "--max-edges", str(max_edges)], env)
            rows.append(dict(run["result"] or {}, nodes=nodes, ok=run["ok"],
                             process_peak_rss_gib=run["peak_rss_gib"], cpu_s=run["cpu_s"]))
            print(f"{nodes} nodes, max_edges {max_edges}: {rows[-1]}", file=sys.stderr, flush=True)
    print("| nodes | edges METIS sees | METIS s | process CPU s | process peak RSS GiB | edge cut "
          "| largest part / mean |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["ok"]:
            print(f"| {r['nodes']:,} | {r['edge_share']:.0%} of {r['edges']:,} | {r['metis_s']:.1f} | "
                  f"{r['cpu_s']:.1f} | {r['process_peak_rss_gib']:.2f} | {r['edge_cut']:.4f} | "
                  f"{r['largest_part_over_mean']:.3f} |")
    return rows


# ----------------------------------------------------------------------------- measuring

def measure(command: list[str], env: dict) -> dict:
    """Run ``command``; its wall time, the peak RSS of its largest process, CPU times, JSON."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout:
        process = subprocess.Popen(command, stdout=stdout, env=env, cwd=REPO)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        stdout.seek(0)
        lines = stdout.read().strip().splitlines()
    result = None
    if lines:
        try:
            result = json.loads(lines[-1])
        except json.JSONDecodeError:
            result = None
    return {"ok": process.returncode == 0, "exit": process.returncode, "seconds": wall,
            "cpu_s": usage.ru_utime + usage.ru_stime, "peak_rss_gib": usage.ru_maxrss / 2**20,
            "user_s": usage.ru_utime, "sys_s": usage.ru_stime, "result": result,
            "work_s": work_seconds(result)}


def work_seconds(result: dict | None) -> float | None:
    """The seconds the stage itself reports for its work (no imports, no graph loading)."""
    if not isinstance(result, dict):
        return None
    if "metis_s" in result:
        value = result["metis_s"]
    elif "load_s" in result:
        value = result["load_s"]
    elif result.get("tasks"):
        value = result["tasks"][0].get("train_seconds")
    elif result.get("soups"):
        value = result["soups"][0].get("seconds")
    else:
        value = result.get("seconds")
    return float(value) if isinstance(value, (int, float)) else None


def _mpiexec() -> str:
    from hpcsoup.pipeline import find_mpiexec

    found = find_mpiexec()
    if found is None:
        raise SystemExit("pls with more than one rank needs mpiexec (pip install -e '.[mpi]')")
    return found


def stage_commands(stage: str, ranks: int, config: str) -> list[str]:
    python = [sys.executable]
    if stage in ("data", "partition"):
        return python + [str(Path(__file__).resolve()), "--stage", stage, "--config", config]
    hpcsoup = python + ["-m", "hpcsoup"]
    if stage == "train":
        return hpcsoup + ["train", "--config", config, "--task-id", "0", "--json"]
    if stage == "merge":
        return hpcsoup + ["merge", "--config", config, "--json"]
    soup = hpcsoup + ["soup", "--config", config, "--method", stage, "--json",
                      "--set", f"soup.pls.ranks={ranks}"]
    return ([_mpiexec(), "-n", str(ranks)] + soup) if ranks > 1 else soup


def _config_file(base: str, nodes: int, work: Path, overrides: list[str]) -> str:
    """The study config for one size, as the JSON file every stage reads."""
    from hpcsoup.config import load_config

    store = work / f"n{nodes}.zarr"
    cfg = load_config(base, [f"data.nodes={nodes}", f"data.root={json.dumps(str(work / 'data'))}",
                             f"store={json.dumps(str(store))}", *overrides])
    path = work / f"n{nodes}.json"
    path.write_text(json.dumps(cfg.to_dict()))
    return str(path)


# ----------------------------------------------------------------------------- the sweep

def run_study(args) -> list[dict]:
    work, env = _workspace(args)
    rows = []
    for nodes in args.nodes:
        config = _config_file(args.config, nodes, work, args.set)
        shutil.rmtree(work / f"n{nodes}.zarr", ignore_errors=True)   # every stage starts afresh
        trained = False
        for stage in [s for s in STAGES if s in args.stages]:
            if (stage in SOUPS or stage == "merge") and not trained:
                # soups and the merge need every expert and specialist: trained here, untimed,
                # after the timed `train` stage (which must find its expert missing)
                prep = measure([sys.executable, "-m", "hpcsoup", "train", "--config", config,
                                "--all", "--json"], env)
                trained = True
                if not prep["ok"]:
                    print(f"{nodes} nodes: training the experts failed (exit {prep['exit']})",
                          file=sys.stderr)
            for ranks in (args.ranks if stage == "pls" else [1]):
                load = os.getloadavg()[0]
                row = dict(measure(stage_commands(stage, ranks, config), env), stage=stage,
                           nodes=nodes, ranks=ranks, loadavg_1min=load)
                rows.append(row)
                print(f"{stage:>9} {nodes:>9} nodes {ranks} rank(s): "
                      f"{'ok' if row['ok'] else 'FAILED exit %d' % row['exit']} "
                      f"{row['seconds']:.1f} s, peak {row['peak_rss_gib']:.2f} GiB, user "
                      f"{row['user_s']:.1f} s, sys {row['sys_s']:.1f} s, load {load:.1f}",
                      file=sys.stderr, flush=True)
        if not args.keep:
            shutil.rmtree(work / f"n{nodes}.zarr", ignore_errors=True)
    return rows


def stage_record(result: dict | None) -> dict:
    """What a stage's JSON says about its product: the first expert, the first soup, or the
    result itself (the merge); ``{}`` when there is no JSON."""
    if not isinstance(result, dict):
        return {}
    for key in ("tasks", "soups"):
        if result.get(key):
            return result[key][0]
    return result


def quality(result: dict | None) -> str:
    """``val / test`` of what the stage produced (expert, soup, merged child), else ``-``."""
    metrics = stage_record(result).get("metrics")
    if not isinstance(metrics, dict) or not {"val", "test"} <= set(metrics):
        return "-"
    return f"{metrics['val']:.4f} / {metrics['test']:.4f}"


def gpu_gib(result: dict | None) -> float | None:
    """Peak CUDA memory (``torch.cuda.max_memory_allocated``) the stage reported, in GiB;
    ``None`` when it ran on a CPU or reports none (the merge keeps it under metrics.memory)."""
    record = stage_record(result)
    memory = (record.get("metrics") or {}).get("memory") or {}
    value = record.get("peak_gpu_bytes", memory.get("peak_gpu_bytes"))
    return value / 2**30 if isinstance(value, (int, float)) else None


def growth_exponent(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of ``log y`` against ``log x`` (``None`` below two distinct x)."""
    points = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y > 0]
    if len({x for x, _ in points}) < 2:
        return None
    mx = sum(x for x, _ in points) / len(points)
    my = sum(y for _, y in points) / len(points)
    return (sum((x - mx) * (y - my) for x, y in points)
            / sum((x - mx) ** 2 for x, _ in points))


def exponents(rows: list[dict]) -> dict:
    """Per stage: the growth exponents of seconds and peak memory with the nodes (1 rank)."""
    out = {}
    for stage in STAGES:
        ok = [r for r in rows if r["stage"] == stage and r["ranks"] == 1 and r["ok"]]
        if ok:
            out[stage] = {key: growth_exponent([(r["nodes"], r[key]) for r in ok])
                          for key in FITTED}
    return out


def print_table(rows: list[dict], fits: dict) -> None:
    print("| stage | nodes | ranks | wall s | CPU s (user + sys) | sys s | stage's own s "
          "| peak RSS GiB | peak GPU GiB | val / test | load |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        status = "" if r["ok"] else f" (failed, exit {r['exit']})"
        work = f"{r['work_s']:.1f}" if r["work_s"] is not None else "-"
        gpu = gpu_gib(r["result"])
        print(f"| {r['stage']}{status} | {r['nodes']:,} | {r['ranks']} | {r['seconds']:.1f} | "
              f"{r['cpu_s']:.1f} | {r['sys_s']:.1f} | {work} | {r['peak_rss_gib']:.2f} | "
              f"{'-' if gpu is None else f'{gpu:.2f}'} | {quality(r['result'])} | "
              f"{r['loadavg_1min']:.1f} |")
    print("\n| stage | growth exponent: wall s | CPU s | peak memory |")
    print("|---|---|---|---|")
    for stage, fit in fits.items():
        cells = [f"{fit[k]:.2f}" if fit[k] is not None else "n/a" for k in FITTED]
        print(f"| {stage} | {' | '.join(cells)} |")


def plot(rows: list[dict], fits: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for stage in STAGES:
        ok = sorted((r for r in rows if r["stage"] == stage and r["ranks"] == 1 and r["ok"]),
                    key=lambda r: r["nodes"])
        if not ok:
            continue
        fit = fits.get(stage, {})
        for ax, key in zip(axes[:2], ("cpu_s", "peak_rss_gib")):
            b = fit.get(key)
            ax.plot([r["nodes"] for r in ok], [r[key] for r in ok], "o-",
                    label=stage + (f" (b={b:.2f})" if b is not None else ""))
    pls = sorted((r for r in rows if r["stage"] == "pls" and r["ok"]),
                 key=lambda r: (r["nodes"], r["ranks"]))
    for nodes in sorted({r["nodes"] for r in pls}):
        series = [r for r in pls if r["nodes"] == nodes]
        axes[2].plot([r["ranks"] for r in series], [r["seconds"] for r in series], "o-",
                     label=f"wall seconds, {nodes:,} nodes")
        axes[2].plot([r["ranks"] for r in series], [r["peak_rss_gib"] for r in series], "s--",
                     label=f"peak GiB per rank, {nodes:,} nodes")
    for ax, title in zip(axes[:2], ("CPU seconds per stage", "peak RSS per stage (GiB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("nodes")
        ax.set_title(title + "; b = growth exponent")
        ax.legend(fontsize=7)
    axes[2].set_xlabel("MPI ranks")
    axes[2].set_title("pls against ranks")
    if pls:
        axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO / "jobs" / "products.toml"))
    parser.add_argument("--nodes", nargs="+", type=float, default=[1e5, 4e5, 1e6, 2.45e6])
    parser.add_argument("--ranks", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every run (repeatable)")
    parser.add_argument("--work", default=str(OUT / "scaling_study"),
                        help="stores and data of the study")
    parser.add_argument("--keep", action="store_true", help="keep each size's store")
    parser.add_argument("--append", action="store_true",
                        help="add to the rows of benchmarks/out/scaling_study.json (a study run "
                             "in pieces); a stage measured again replaces its earlier row")
    parser.add_argument("--metis-edges", nargs="+", type=float, metavar="MAX_EDGES",
                        help="instead of the study: METIS with each edge limit (e.g. 1e12 32e6 "
                             "12.5e6) on each --nodes graph: time, peak RSS, edge cut")
    parser.add_argument("--stage", choices=("data", "partition", "metis"), help=argparse.SUPPRESS)
    parser.add_argument("--max-edges", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true",
                        help="print the table of benchmarks/out/scaling_study.json, run nothing")
    parser.add_argument("--out", default=str(OUT),
                        help="folder of scaling_study.json and .png (default: benchmarks/out)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    if args.report:
        saved = json.loads((out / "scaling_study.json").read_text())
        print_table(saved["rows"], exponents(saved["rows"]))
        return
    if args.stage == "metis":
        print(json.dumps(_metis_body(args.config, int(args.max_edges))))
        return
    if args.stage:
        print(json.dumps(_stage_body(args.stage, args.config)))
        return
    args.nodes = [int(n) for n in args.nodes]
    if args.metis_edges:
        args.metis_edges = [int(m) for m in args.metis_edges]
        rows = compare_metis(args)
        OUT.mkdir(exist_ok=True)
        (OUT / "scaling_study_metis.json").write_text(json.dumps(
            {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "rows": rows}, indent=2))
        return
    if any(r < 1 for r in args.ranks):
        parser.error(f"--ranks {args.ranks}: every rank count must be >= 1")
    command = " ".join([Path(sys.argv[0]).name] + sys.argv[1:])
    rows, commands = run_study(args), [command]
    saved = out / "scaling_study.json"
    if args.append and saved.is_file():         # earlier runs' rows, unless measured again now
        earlier = json.loads(saved.read_text())
        done = {(r["stage"], r["nodes"], r["ranks"]) for r in rows}
        rows = [r for r in earlier["rows"] if (r["stage"], r["nodes"], r["ranks"]) not in done] + rows
        rows.sort(key=lambda r: (r["nodes"], STAGES.index(r["stage"]), r["ranks"]))
        commands = earlier.get("commands", []) + commands
    fits = exponents(rows)
    print_table(rows, fits)
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(
        {"commands": commands, "config": args.config,
         "overrides": args.set, "nodes": args.nodes, "ranks": args.ranks, "stages": args.stages,
         "rows": rows, "growth_exponents": fits, "cores": os.cpu_count(),
         "this_process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20},
        indent=2))
    plot(rows, fits, out / "scaling_study.png")
    print(f"\nwrote {saved} and {out / 'scaling_study.png'}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Benchmark `hpcsoup train --all`: wall time of N experts on Dask workers vs one worker.

The must-show of the experts issue: 8 GraphSAGE experts on Cora (the quickstart's settings:
2 layers, hidden 64, 100 epochs, validation check every epoch) trained by
``run_train(cfg, all_tasks=True)`` into a fresh store, with ``experts.workers`` = 1 and = the
machine's cores. Each worker is one process with one torch thread.

Measurement: wall time of the whole call (Dask LocalCluster start, worker imports, dataset
load, training, store writes), the variants interleaved over ``--rounds`` rounds, medians; the
experts' own ``train_seconds`` (sum over experts) as the compute inside; and a check that every
variant produced bit-identical weights (same seeds). The 2 cores are shared with other work:
ratios from one process are what to compare, and the 1-minute load average before and after
each variant is recorded (a speedup needs idle cores: with the load above the core count, more
workers only share the same CPU time). As a control, each round first measures the speedup the
machine gives right then to two single-thread processes running a fixed torch workload.

Usage::

    .venv/bin/python benchmarks/bench_train.py                  # 8 experts, 100 epochs, 2 rounds
    .venv/bin/python benchmarks/bench_train.py --quick          # 4 experts, 5 epochs, 1 round

Writes benchmarks/out/bench_train.json and prints a table.

Two more measurements at products scale (synthetic-products, one GraphSAGE 2x64 expert with
Cluster-GCN batches of 4 of 32 METIS parts, a full-graph validation check every epoch, 1 thread):

- ``--one-expert NODES``: time and peak RSS of the expert's training + validation alone
  (``fit``, sampled every 5 ms) and of the whole process, user and system CPU seconds; one JSON
  line. It uses only APIs older trees have too, so ``PYTHONPATH=<old tree>`` gives "before".
- ``--malloc NODES``: the same workload as child processes with and without allocator settings
  (glibc's ``MALLOC_MMAP_THRESHOLD_=65536``, transparent huge pages for malloc through
  ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``), interleaved over ``--rounds``: user vs system time.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from hpcsoup.config import build_config  # noqa: E402
from hpcsoup.store import Store  # noqa: E402
from hpcsoup.train.run import available_cores, run_train  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"


def _config(store: Path, args, workers: int):
    return build_config({
        "name": "bench-train", "store": str(store), "threads": 1,
        "data": {"dataset": "Cora", "root": args.data_root},
        "experts": {"arch": "sage", "count": args.experts, "layers": 2, "hidden": 64,
                    "epochs": args.epochs, "lr": 0.01, "workers": workers, "progress_every": 10**6},
        "specialists": {"archs": []},
    })


def _burn(iterations: int) -> float:
    """A fixed single-thread torch workload; returns its wall time."""
    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    start = time.perf_counter()
    for _ in range(iterations):
        a = torch.tanh(a @ a * 1e-3)
    return time.perf_counter() - start


def machine_capacity(iterations: int = 3000) -> float:
    """Speedup this machine gives right now to 2 single-thread processes over 1 (ideal: 2.0).

    The control for the workers' speedup: the same fixed workload alone, then in two
    concurrent processes; ``2 * t_alone / t_pair``.
    """
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(1) as pool:
        alone = pool.apply(_burn, (iterations,))
    with ctx.Pool(2) as pool:  # each timed inside its worker, like `alone` (no dispatch cost)
        pair = max(pool.starmap(_burn, [(iterations,)] * 2))
    return 2 * alone / pair


def one_expert(nodes: int, epochs: int, data_root: str) -> dict:
    """One synthetic-products expert's training + validation: seconds, peak RSS, CPU times."""
    import resource

    from hpcsoup.data import load_dataset
    from hpcsoup.data.partition import partition, partition_cache_dir
    from hpcsoup.models import ModelSpec, build_model
    from hpcsoup.memory import PeakMemory
    from hpcsoup.train.loop import ClusterBatches, fit

    torch.set_num_threads(1)
    start = time.perf_counter()
    graph = load_dataset("synthetic-products", data_root, nodes=nodes)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    parts = partition(graph, None, 32, seed=0, cache_dir=partition_cache_dir(data_root))
    partition_s = time.perf_counter() - start
    model = build_model(ModelSpec("sage", graph.num_features, graph.num_classes, hidden=64), seed=0)
    batches = ClusterBatches(graph.data.edge_index, parts, 4)
    before = resource.getrusage(resource.RUSAGE_SELF)
    with PeakMemory() as memory:
        result = fit(model, graph, epochs=epochs, lr=0.01, seed=0, batches=batches)
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {"nodes": nodes, "edges": int(graph.data.edge_index.size(1)), "epochs": epochs,
            "load_s": load_s, "partition_s": partition_s, "fit_s": result.seconds,
            "fit_user_s": after.ru_utime - before.ru_utime,
            "fit_sys_s": after.ru_stime - before.ru_stime,
            "rss_before_fit_gib": memory.start / 2**30, "fit_peak_rss_gib": memory.peak / 2**30,
            "process_peak_rss_gib": after.ru_maxrss / 2**20,
            "val": result.metrics["val"], "test": result.metrics["test"]}


#: allocator settings compared by --malloc (environment additions of the child process)
MALLOC_VARIANTS = {
    "default": {},
    "MALLOC_MMAP_THRESHOLD_=65536": {"MALLOC_MMAP_THRESHOLD_": "65536"},
    "glibc.malloc.hugetlb=1": {"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"},
}


def malloc_study(nodes: int, epochs: int, rounds: int, data_root: str) -> list[dict]:
    """User vs system CPU time of :func:`one_expert` under each allocator setting, interleaved."""
    import subprocess

    rows = []
    for r in range(rounds):
        names = list(MALLOC_VARIANTS) if r % 2 == 0 else list(MALLOC_VARIANTS)[::-1]
        for name in names:
            env = {k: v for k, v in os.environ.items()
                   if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
            env.update(MALLOC_VARIANTS[name])
            load = os.getloadavg()[0]
            out = subprocess.run([sys.executable, __file__, "--one-expert", str(nodes), "--epochs",
                                  str(epochs), "--data-root", data_root], env=env, check=True,
                                 capture_output=True, text=True).stdout
            row = dict(json.loads(out.strip().splitlines()[-1]), variant=name, round=r,
                       loadavg_1min=load)
            rows.append(row)
            print(f"round {r} {name}: fit {row['fit_s']:.1f} s, user {row['fit_user_s']:.1f} s, "
                  f"sys {row['fit_sys_s']:.1f} s, fit peak {row['fit_peak_rss_gib']:.2f} GiB, "
                  f"load {load:.1f}", file=sys.stderr)
    print("| allocator | fit s | user s | sys s | sys share | fit peak RSS GiB |")
    print("|---|---|---|---|---|---|")
    for name in MALLOC_VARIANTS:
        runs = [x for x in rows if x["variant"] == name]
        user = statistics.median(x["fit_user_s"] for x in runs)
        system = statistics.median(x["fit_sys_s"] for x in runs)
        print(f"| {name} | {statistics.median(x['fit_s'] for x in runs):.1f} | {user:.1f} | "
              f"{system:.1f} | {system / (user + system):.0%} | "
              f"{statistics.median(x['fit_peak_rss_gib'] for x in runs):.2f} |")
    return rows


def _weights(store: Path) -> dict:
    s = Store.open(store)
    return {g.id: s.load_group("experts", g.id)[0] for g in s.groups("experts")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--data-root", default=str(OUT / "data"))
    parser.add_argument("--quick", action="store_true", help="4 experts, 5 epochs, 1 round")
    parser.add_argument("--one-expert", type=int, metavar="NODES",
                        help="time and memory of one synthetic-products expert (JSON line)")
    parser.add_argument("--malloc", type=int, metavar="NODES",
                        help="user vs system time of --one-expert under allocator settings")
    args = parser.parse_args()
    if args.one_expert:
        print(json.dumps(one_expert(args.one_expert, args.epochs, args.data_root)))
        return
    if args.malloc:
        rows = malloc_study(args.malloc, args.epochs, args.rounds, args.data_root)
        OUT.mkdir(exist_ok=True)
        (OUT / "bench_train_malloc.json").write_text(json.dumps(rows, indent=2))
        return
    if args.quick:
        args.experts, args.epochs, args.rounds = 4, 5, 1
    torch.set_num_threads(1)
    cores = available_cores()
    variants = {"1 worker": 1, f"{cores} workers": cores}
    work = OUT / "bench_train"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rows = {name: [] for name in variants}
    reference = None
    for r in range(args.rounds):
        order = list(variants.items()) if r % 2 == 0 else list(variants.items())[::-1]
        capacity = machine_capacity()
        print(f"round {r}: the machine gives 2 processes {capacity:.2f}x of 1 now", file=sys.stderr)
        for name, workers in order:
            store = work / f"r{r}-{workers}.zarr"
            load_before = os.getloadavg()[0]
            start = time.perf_counter()
            out = run_train(_config(store, args, workers), all_tasks=True)
            wall = time.perf_counter() - start
            s = Store.open(store)
            experts = s.groups("experts")
            compute = sum(g.attrs["train_seconds"] for g in experts)
            rows[name].append({"wall_s": wall, "train_seconds_sum": compute,
                               "workers": out["workers"], "experts": len(experts),
                               "loadavg_1min": [load_before, os.getloadavg()[0]],
                               "machine_capacity_2_procs": capacity,
                               "val": [g.attrs["metrics"]["val"] for g in experts],
                               "test": [g.attrs["metrics"]["test"] for g in experts]})
            weights = _weights(store)
            if reference is None:
                reference = weights
            same = all(torch.equal(weights[k][p], reference[k][p]) for k in reference
                       for p in reference[k])
            rows[name][-1]["identical_to_first"] = same
            print(f"round {r} {name}: {wall:.1f} s wall, {compute:.1f} s of training, "
                  f"identical weights: {same}, load average {load_before:.1f} -> "
                  f"{os.getloadavg()[0]:.1f}", file=sys.stderr)
            shutil.rmtree(store)
    base = statistics.median(x["wall_s"] for x in rows["1 worker"])
    table = []
    for name, runs in rows.items():
        wall = statistics.median(x["wall_s"] for x in runs)
        table.append({"variant": name, "wall_s": wall, "speedup": base / wall,
                      "train_seconds_sum": statistics.median(x["train_seconds_sum"] for x in runs),
                      "val_mean": statistics.mean(runs[0]["val"]),
                      "test_mean": statistics.mean(runs[0]["test"]),
                      "identical": all(x["identical_to_first"] for x in runs)})
    print(f"\n{args.experts} SAGE experts on Cora, {args.epochs} epochs, 1 torch thread per worker, "
          f"{cores} cores, median of {args.rounds} round(s)")
    print("| variant | wall s | speedup | sum of experts' train s | mean val | mean test | identical "
          "| load avg before/after |")
    print("|---|---|---|---|---|---|---|---|")
    for t, runs in zip(table, rows.values()):
        loads = ", ".join(f"{a:.1f}/{b:.1f}" for a, b in (x["loadavg_1min"] for x in runs))
        print(f"| {t['variant']} | {t['wall_s']:.1f} | {t['speedup']:.2f}x | "
              f"{t['train_seconds_sum']:.1f} | {t['val_mean']:.4f} | {t['test_mean']:.4f} | "
              f"{t['identical']} | {loads} |")
    caps = [x["machine_capacity_2_procs"] for x in rows["1 worker"]]
    print(f"\ncontrol: 2 single-thread processes ran {', '.join(f'{c:.2f}x' for c in caps)} as fast as 1 "
          f"(per round; ideal 2.00x on 2 idle cores)")
    OUT.mkdir(exist_ok=True)
    (OUT / "bench_train.json").write_text(json.dumps(
        {"experts": args.experts, "epochs": args.epochs, "rounds": args.rounds, "cores": cores,
         "threads_per_worker": 1, "runs": rows, "table": table}, indent=2))


if __name__ == "__main__":
    main()

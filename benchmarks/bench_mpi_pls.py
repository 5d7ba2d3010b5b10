"""Distributed PLS on MPI ranks: time per step, peak memory per rank, bytes per step, speedup.

    .venv/bin/python benchmarks/bench_mpi_pls.py                 # the recorded run (~10 min here)
    .venv/bin/python benchmarks/bench_mpi_pls.py --nodes 20000 --repeats 1 --steps 8   # quick

What it does (one torch thread per rank throughout; ``mpiexec`` of the pip MPICH):

1. builds once, under ``benchmarks/out/mpi_pls/``, a store of ``--experts`` GraphSAGE experts
   (shared init, a few epochs each) on ``synthetic-products`` with ``--nodes`` nodes (40k nodes
   = 1M undirected edges), and its partitioned graph (``hpcsoup partition``);
2. measures ``MPI_Allreduce`` latency against message size for P = 2 and 4 (``--worker
   allreduce``): the input of ``benchmarks/scaling_model.py``;
3. runs distributed PLS (``run_pls_ranks``, the code ``hpcsoup soup`` runs) under
   ``mpiexec -n P`` for P in ``--ranks``, interleaved over ``--repeats`` rounds (the order
   rotates each round), with the stratified draw, plus the uniform random draw at P = 2 for
   comparison; each rank records when each step's allreduce starts and ends, so a step splits
   into this rank's compute (its drawn partitions: forward + backward) and the allreduce
   (including waiting for the slowest rank), in wall time and in this rank's CPU time (the 2
   cores are shared with other jobs: CPU time shows how the work splits whatever the load);
   each partition's term is timed in CPU time (input of ``benchmarks/scaling_model.py``);
4. runs P = 2 once on a ``--small-nodes`` graph: the bytes per step do not change with the graph.

Prints a table and writes ``benchmarks/out/mpi_pls.json``. Times are medians over steps (the
first step is excluded: it includes the initial validation check) and over rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "out"
PY = sys.executable
MPIEXEC = str(Path(PY).with_name("mpiexec"))


def log(message: str) -> None:
    print(f"[bench_mpi_pls {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- setup


def config_text(store: Path, nodes: int, args, draw: str) -> str:
    return "\n".join([
        f'store = "{store}"', "threads = 1", "",
        "[data]", 'dataset = "synthetic-products"', f"nodes = {nodes}", "",
        "[experts]", 'arch = "sage"', "layers = 2", f"hidden = {args.hidden}", "",
        "[soup]", 'methods = ["pls"]', "seed = 0", "",
        "[soup.pls]", f"partitions = {args.partitions}", f"per_step = {args.per_step}",
        "halo = 0", f"steps = {args.steps}", f"eval_every = {args.steps + 1}", "patience = 1000",
        f'draw = "{draw}"', ""])


def build(nodes: int, args) -> Path:
    """Store with experts + partitioned graph for a graph of ``nodes`` nodes (cached)."""
    import torch

    from hpcsoup.data import load_dataset
    from hpcsoup.models import ModelSpec, build_model
    from hpcsoup.store import Store
    from hpcsoup.train import fit

    folder = OUT / "mpi_pls" / f"n{nodes}-h{args.hidden}-e{args.experts}"
    store = folder / "store.zarr"
    for draw in ("stratified", "random"):
        (folder / f"{draw}.toml").parent.mkdir(parents=True, exist_ok=True)
        (folder / f"{draw}.toml").write_text(config_text(store, nodes, args, draw))
    if not (folder / "experts.done").exists():
        torch.set_num_threads(1)
        graph = load_dataset("synthetic-products", nodes=nodes)
        log(f"training {args.experts} experts on {graph.info()}")
        spec = ModelSpec("sage", graph.num_features, graph.num_classes, 2, args.hidden)
        init = build_model(spec, seed=0).state_dict()
        st = Store.create(store)
        for i in range(args.experts):
            model = build_model(spec)
            model.load_state_dict(init)
            result = fit(model, graph, epochs=args.epochs, lr=0.01, seed=i)
            st.write_group("experts", f"sage-e{i:03d}", result.state_dict, {
                "arch": "sage", "model": spec.to_dict(), "dataset": graph.name, "init_id": "init",
                "seed": i, "role": "expert", "metrics": result.metrics}, overwrite=True)
            log(f"expert {i}: {result.metrics} in {result.seconds:.0f} s")
        (folder / "experts.done").write_text("ok")
    done = subprocess.run([PY, "-m", "hpcsoup", "partition", "--config",
                           str(folder / "stratified.toml")], env=env(), stderr=subprocess.PIPE, text=True)
    log(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "partitioned")
    if done.returncode:
        raise SystemExit(done.stderr)
    return folder


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def running() -> int:
    """Runnable processes on the machine now (``procs_running`` of /proc/stat), this one included."""
    with open("/proc/stat") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("procs_running"))


def wait_quiet(limit: float, others: float = 0.3) -> float:
    """Wait (at most ``limit`` s) for 2 s in which other processes leave the cores free; returns
    the mean number of other runnable processes in the last window."""
    deadline = time.time() + limit
    while True:
        samples = []
        for _ in range(8):
            samples.append(running() - 1)
            time.sleep(0.25)
        mean = sum(samples) / len(samples)
        if mean <= others or time.time() >= deadline:
            return mean
        time.sleep(1)


def mpirun(ranks: int, *worker_args: str, timeout: int = 900) -> dict:
    """Run a worker under ``mpiexec -n ranks``; also sample how many *other* processes were
    runnable meanwhile (the machine's cores are shared with other engineers' jobs)."""
    import threading

    command = [MPIEXEC, "-n", str(ranks), PY, __file__, "--worker", *worker_args]
    samples: list[int] = []
    stop = threading.Event()

    def sample():
        while not stop.wait(0.25):
            samples.append(running() - 1 - ranks)  # minus this sampler and our own ranks

    thread = threading.Thread(target=sample, daemon=True)
    start = time.perf_counter()
    thread.start()
    done = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=timeout)
    stop.set()
    thread.join()
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    result["others_running"] = max(0.0, sum(samples) / max(1, len(samples)))
    return result


# ----------------------------------------------------------------------------- workers


def worker_allreduce(args) -> None:
    from hpcsoup.distributed.mpi import measure_allreduce, world

    comm = world()
    sizes = [1, 25, 256, 1024, 4096, 16384, 65536, 262144]
    rows = measure_allreduce(comm, sizes, repeats=args.allreduce_repeats)
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "allreduce": rows}))


def worker_pls(args) -> None:
    import torch

    import hpcsoup.distributed.pls as dpls
    from hpcsoup.config import load_config
    from hpcsoup.distributed.mpi import abort_on_error, world
    from hpcsoup.distributed.shards import owner_of
    from hpcsoup.soup.pls import draw_partitions

    comm = world()
    events: list[tuple[float, float, int, float, float]] = []

    class Timed(dpls.Counted):
        def __call__(self, tensor):
            start, cpu = time.perf_counter(), time.process_time()
            out = super().__call__(tensor)
            events.append((start, time.perf_counter(), tensor.numel(), cpu, time.process_time()))
            return out

    forwards: list[tuple[float, float]] = []
    original_forward = dpls.ShardEvaluator.forward

    def timed_forward(self, params, x, adj):
        if torch.is_grad_enabled():  # a step's partition term (the checks run without grad)
            forwards.append((time.perf_counter(), time.process_time()))
        return original_forward(self, params, x, adj)

    dpls.Counted = Timed
    dpls.ShardEvaluator.forward = timed_forward
    with abort_on_error(comm):
        torch.set_num_threads(1)
        cfg = load_config(args.config)
        run = dpls.run_pls_ranks(cfg, comm)
        logits = run.ingredients.num_tensors * run.ingredients.n + 1
        steps = [e for e in events if e[2] == logits]  # the step allreduces (not the checks)
        pls = cfg.soup.pls
        val_counts = _val_counts(run.shards)
        rows, part_times, overheads = [], {}, []
        for k in range(1, len(steps)):
            drawn = draw_partitions(cfg.soup.seed, k, pls.partitions, pls.per_step, pls.draw)
            mine = [p for p in drawn if owner_of(p, comm.size) == comm.rank and val_counts[p]]
            compute = steps[k][0] - steps[k - 1][1]
            rows.append({"step": compute + steps[k][1] - steps[k][0], "compute": compute,
                         "allreduce": steps[k][1] - steps[k][0], "owned": len(mine),
                         # CPU time of this rank's compute: what the step costs it, whatever
                         # else runs on the shared cores (the wall time above includes waiting)
                         "compute_cpu": steps[k][3] - steps[k - 1][4]})
            # this step's partition terms, in the order PLS computes them; CPU time, so that
            # the spread between partitions is theirs, not the shared machine's
            starts = [cpu for wall, cpu in forwards if steps[k - 1][1] < wall < steps[k][0]]
            if len(starts) == len(mine) and mine:
                overheads.append(starts[0] - steps[k - 1][4])
                for p, a, b in zip(mine, starts, starts[1:] + [steps[k][3]]):
                    part_times.setdefault(p, []).append(b - a)
        mine = {
            "rank": comm.rank,
            "step": statistics.median(r["step"] for r in rows),
            "compute": statistics.median(r["compute"] for r in rows),
            "compute_cpu": statistics.median(r["compute_cpu"] for r in rows),
            "allreduce": statistics.median(r["allreduce"] for r in rows),
            "compute_per_partition": statistics.median(r["compute"] / r["owned"]
                                                       for r in rows if r["owned"]),
            "owned_per_step": statistics.mean(r["owned"] for r in rows),
            "max_owned": max(r["owned"] for r in rows),
            "cpu_per_step": [r["compute_cpu"] for r in rows],
            "partition_times": {str(p): statistics.median(t) for p, t in part_times.items()},
            "step_overhead": statistics.median(overheads) if overheads else None,
        }
        everyone = comm.allgather(mine)
        if comm.rank == 0:
            print(json.dumps({
                "ranks": comm.size, "draw": pls.draw, "nodes": cfg.data.nodes,
                "steps": len(rows), "per_rank": everyone,
                "step_seconds": max(r["step"] for r in everyone),
                # the busiest rank of each step (the draw changes who that is), median over steps
                "busiest_cpu": statistics.median(
                    max(c) for c in zip(*(r["cpu_per_step"] for r in everyone))),
                "peak_rss": run.peak_rss, "start_rss": run.start_rss,
                "shards": run.shard_stats, "bytes_per_step": run.step_bytes,
                "logits_elements": logits - 1, "seconds": run.seconds,
                "coefficients": run.result.coefficients, "load": os.getloadavg()}))


def _val_counts(path) -> list:
    from hpcsoup.distributed.shards import open_parts
    return open_parts(path)["val_counts"]


# ----------------------------------------------------------------------------- driver


def _merge_times(dicts: list) -> dict:
    """Median time of each partition over runs and ranks."""
    merged: dict = {}
    for d in dicts:
        for p, t in d.items():
            merged.setdefault(p, []).append(t)
    return {p: statistics.median(t) for p, t in sorted(merged.items(), key=lambda kv: int(kv[0]))}


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=40_000)
    parser.add_argument("--small-nodes", type=int, default=10_000)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--partitions", type=int, default=32)
    parser.add_argument("--per-step", type=int, default=8)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--allreduce-repeats", type=int, default=300)
    parser.add_argument("--quiet", type=float, default=0.0,
                        help="wait up to this many seconds before each run for the other "
                             "processes to leave the cores free (0: do not wait)")
    parser.add_argument("--quiet-others", type=float, default=0.5,
                        help="a round counts as quiet when fewer other processes than this were "
                             "runnable on average during both runs")
    parser.add_argument("--worker", choices=("allreduce", "pls"))
    parser.add_argument("--config")
    args = parser.parse_args()
    if args.worker == "allreduce":
        return worker_allreduce(args)
    if args.worker == "pls":
        return worker_pls(args)

    OUT.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    big = build(args.nodes, args)
    small = build(args.small_nodes, args)

    log("allreduce latency, P = 2 and 4")
    allreduce = {p: mpirun(p, "allreduce", "--allreduce-repeats", str(args.allreduce_repeats))
                 for p in (2, 4)}

    runs: dict = {}
    order = list(args.ranks)
    for rep in range(args.repeats):
        plan = [(p, "stratified") for p in order] + [(2, "random")]
        for ranks, draw in plan:
            quiet = wait_quiet(args.quiet) if args.quiet else None
            log(f"round {rep + 1}/{args.repeats}: P={ranks} draw={draw}"
                + (f" (others runnable before: {quiet:.1f})" if quiet is not None else ""))
            result = mpirun(ranks, "pls", "--config", str(big / f"{draw}.toml"))
            runs.setdefault(f"{ranks}-{draw}", []).append(result)
            log(f"  step {result['step_seconds'] * 1e3:.1f} ms, other runnable processes "
                f"{result['others_running']:.1f}, load {result['load'][0]:.1f}")
        order = order[1:] + order[:1]
    small_run = mpirun(2, "pls", "--config", str(small / "stratified.toml"))
    load_after = os.getloadavg()

    def med(values):
        return statistics.median(values) if values else float("nan")

    table = []
    for key, results in runs.items():
        ranks, draw = key.split("-")
        ranks = int(ranks)
        step = med([r["step_seconds"] for r in results])
        per_rank = [r["per_rank"] for r in results]
        table.append({
            "ranks": ranks, "draw": draw, "runs": len(results), "step_seconds": step,
            "compute_seconds": med([max(x["compute"] for x in pr) for pr in per_rank]),
            "compute_cpu_seconds": med([r["busiest_cpu"] for r in results]),
            "allreduce_seconds": med([min(x["allreduce"] for x in pr) for pr in per_rank]),
            "partition_seconds": med([x["compute_per_partition"] for pr in per_rank for x in pr]),
            "max_owned": max(x["max_owned"] for pr in per_rank for x in pr),
            "peak_rss_per_rank": [max(r["peak_rss"][i] for r in results) for i in range(ranks)],
            "start_rss_per_rank": [max(r["start_rss"][i] for r in results) for i in range(ranks)],
            "resident_nodes_per_rank": [s["resident_nodes"] for s in results[0]["shards"]],
            "resident_bytes_per_rank": [s["resident_bytes"] for s in results[0]["shards"]],
            "bytes_per_step": results[0]["bytes_per_step"],
            "partition_times": _merge_times([x["partition_times"] for pr in per_rank for x in pr]),
            "step_overhead": med([x["step_overhead"] for pr in per_rank for x in pr
                                  if x["step_overhead"] is not None]),
            "step_seconds_all": [r["step_seconds"] for r in results],
            "coefficients": results[0]["coefficients"]})
    base = next(t for t in table if t["ranks"] == 1)
    import torch
    for row in table:
        # paired within each round (the runs of a round are minutes apart, rounds are not: the
        # shared machine's load changes between rounds), then the median over rounds
        ones = runs["1-stratified"]
        pairs = [a["step_seconds"] / b["step_seconds"]
                 for a, b in zip(ones, runs[f"{row['ranks']}-{row['draw']}"])]
        row["speedup_per_round"] = pairs
        row["load_per_round"] = [r["load"][0] for r in runs[f"{row['ranks']}-{row['draw']}"]]
        row["others_per_round"] = [(a["others_running"], b["others_running"]) for a, b in
                                   zip(ones, runs[f"{row['ranks']}-{row['draw']}"])]
        quiet = [x for x, (a, b) in zip(pairs, row["others_per_round"])
                 if max(a, b) <= args.quiet_others]
        row["quiet_rounds"] = len(quiet)
        row["quiet_speedup_vs_1"] = statistics.median(quiet) if quiet else None
        row["paired_speedup_vs_1"] = statistics.median(pairs)
        row["speedup_vs_1"] = base["step_seconds"] / row["step_seconds"]
        row["cpu_speedup_vs_1"] = base["compute_cpu_seconds"] / row["compute_cpu_seconds"]
        row["max_coefficient_diff_vs_1"] = float(
            (torch.tensor(row["coefficients"]) - torch.tensor(base["coefficients"])).abs().max()) \
            if row["draw"] == base["draw"] else None

    print(f"\nsynthetic-products {args.nodes} nodes ({runs['1-stratified'][0]['shards'][0]['graph_nodes']} "
          f"in the store), K={args.partitions}, R={args.per_step}, halo 0, SAGE 2x{args.hidden}, "
          f"{args.experts} experts, 1 thread per rank, medians of {args.repeats} rounds x "
          f"{args.steps - 1} steps; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after")
    print(f"{'P':>2} {'draw':>10} {'step ms':>8} {'compute':>8} {'allred.':>8} {'part ms':>8} "
          f"{'speedup':>7} {'paired':>7} {'cpu ms':>7} {'cpu sp.':>7} {'peak RSS MiB/rank':>22} "
          f"{'graph MiB/rank':>16} {'nodes/rank':>16} {'B/step':>6} {'max|dc|':>8}")
    for row in sorted(table, key=lambda r: (r["draw"] != "stratified", r["ranks"])):
        diff = row["max_coefficient_diff_vs_1"]
        print(f"{row['ranks']:>2} {row['draw']:>10} {row['step_seconds'] * 1e3:8.1f} "
              f"{row['compute_seconds'] * 1e3:8.1f} {row['allreduce_seconds'] * 1e3:8.2f} "
              f"{row['partition_seconds'] * 1e3:8.1f} {row['speedup_vs_1']:6.2f}x "
              f"{row['paired_speedup_vs_1']:6.2f}x "
              f"{row['compute_cpu_seconds'] * 1e3:7.1f} {row['cpu_speedup_vs_1']:6.2f}x "
              f"{'/'.join(mib(b) for b in row['peak_rss_per_rank']):>22} "
              f"{'/'.join(mib(b) for b in row['resident_bytes_per_rank']):>16} "
              f"{'/'.join(str(n) for n in row['resident_nodes_per_rank']):>16} "
              f"{row['bytes_per_step']:>6} {'-' if diff is None else f'{diff:.1e}':>8}")
    for row in table:
        if row["ranks"] > 1:
            print(f"P={row['ranks']} {row['draw']}: speedup per round (other runnable processes "
                  f"during the P=1 / P={row['ranks']} runs) "
                  + ", ".join(f"{x:.2f}x ({a:.1f}/{b:.1f})" for x, (a, b) in
                              zip(row["speedup_per_round"], row["others_per_round"]))
                  + (f"; median of the {row['quiet_rounds']} rounds with <= {args.quiet_others} "
                     f"others: {row['quiet_speedup_vs_1']:.2f}x" if row["quiet_rounds"] else
                     f"; no round with <= {args.quiet_others} others"))
    print(f"bytes per step on {args.small_nodes} nodes (P=2): {small_run['bytes_per_step']} "
          f"(= 4 x ({small_run['logits_elements']} logits + 1 loss)); on {args.nodes} nodes: "
          f"{base['bytes_per_step']}")
    print("allreduce median latency (max over ranks), seconds:")
    for p, res in allreduce.items():
        cells = [f"{r['bytes']} B {r['seconds'] * 1e6:.1f} us" for r in res["allreduce"]]
        print(f"  P={p}: " + ", ".join(cells))
    for row in table:
        row.pop("coefficients")
    (OUT / "mpi_pls.json").write_text(json.dumps({
        "args": vars(args), "load_before": load_before, "load_after": load_after,
        "table": table, "allreduce": {str(p): r["allreduce"] for p, r in allreduce.items()},
        "small_graph": {"nodes": args.small_nodes, "bytes_per_step": small_run["bytes_per_step"],
                        "step_seconds": small_run["step_seconds"]},
        "threads_per_rank": 1, "cpus": os.cpu_count()}, indent=1))
    log(f"wrote {OUT / 'mpi_pls.json'}")


if __name__ == "__main__":
    main()

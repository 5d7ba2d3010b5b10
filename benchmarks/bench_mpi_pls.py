"""Distributed PLS on 1, 2, 4 MPI ranks with its real stopping rule: same soup, time, memory.

    .venv/bin/python benchmarks/bench_mpi_pls.py                        # the recorded run
    .venv/bin/python benchmarks/bench_mpi_pls.py --nodes 10000 --repeats 1   # quick

What it does (one torch thread per process throughout; ``mpiexec`` of the pip MPICH):

1. builds once, under ``benchmarks/out/mpi_pls/``, a store of ``--experts`` GraphSAGE experts
   (shared init, ``--epochs`` full-batch epochs each, expert ``i`` with seed ``i``: its own
   dropout) on ``synthetic-products`` with ``--nodes`` nodes, and partitions the graph into the
   store as distributed PLS reads it (the default ``scope = "field"``: each METIS partition's
   validation nodes' receptive field), timed as its own one-time cost (seconds, CPU seconds,
   peak RSS);
2. scores, in a child process, the uniform soup and each expert on the full graph (val/test):
   the reference a PLS soup is compared with;
3. measures ``MPI_Allreduce`` latency against message size for P = 2 and 4 (``--worker
   allreduce``): the input of ``benchmarks/scaling_model.py``;
4. runs distributed PLS exactly as ``hpcsoup soup --method pls`` does under ``mpiexec -n P``
   (:func:`hpcsoup.distributed.pls.run_pls_ranks`, then the soup written to the store) for P in
   ``--ranks``, interleaved over ``--repeats`` rounds (the order rotates each round), with the
   package's PLS defaults (steps, lr, ``eval_every``, ``patience``, ``min_steps``, scope) except
   ``check = "partitions"``, which ranks use anyway (``auto``) and which makes P = 1 run the
   same check as P > 1. Per P it records what the soup stores: the coefficients, ``best_step``,
   the steps taken, ``moved``, ``shift_from_uniform``, the recorded (full-graph) val/test, the
   PLS seconds, each rank's peak RSS; and per step, from hooks on the allreduce and the
   evaluator's forward: this rank's compute (its drawn partitions: forward + backward) and the
   allreduce (including waiting for the slowest rank), in wall time and in this rank's CPU
   time (the 2 cores are shared with other jobs: CPU time shows how the work splits whatever
   the load), and each partition's term in CPU time (input of ``benchmarks/scaling_model.py``).

Prints a markdown table and writes ``benchmarks/out/mpi_pls.json``. Step times are medians
over the steps without a stopping check before them (step 0, 10, 20, ... also hold a check)
and over rounds; "PLS s" is the whole PLS loop (checks included).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
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


def config_text(store: Path, args) -> str:
    """The run's config: PLS with the package's defaults, but the partition check on every P."""
    pls = ['check = "partitions"']
    pls += [f"partitions = {args.partitions}"] if args.partitions else []
    pls += [f"per_step = {args.per_step}"] if args.per_step else []
    return "\n".join([
        f'store = "{store}"', "threads = 1", "",
        "[data]", 'dataset = "synthetic-products"', f"nodes = {args.nodes}", "",
        "[experts]", 'arch = "sage"', "layers = 2", f"hidden = {args.hidden}", "",
        "[soup]", 'methods = ["pls"]', "seed = 0", "",
        "[soup.pls]", *pls, ""])


def build(args) -> Path:
    """The config of a store with experts and its partitioned graph (the experts are cached)."""
    import torch

    from hpcsoup.data import load_dataset
    from hpcsoup.models import ModelSpec, build_model
    from hpcsoup.store import Store
    from hpcsoup.train import fit

    folder = OUT / "mpi_pls" / f"n{args.nodes}-h{args.hidden}-e{args.experts}-ep{args.epochs}"
    store = folder / "store.zarr"
    config = folder / "pls.toml"
    folder.mkdir(parents=True, exist_ok=True)
    config.write_text(config_text(store, args))
    if not (folder / "experts.done").exists():
        torch.set_num_threads(1)
        graph = load_dataset("synthetic-products", nodes=args.nodes)
        log(f"training {args.experts} experts ({args.epochs} epochs) on {graph.info()}")
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
        del graph
        (folder / "experts.done").write_text("ok")
    return config


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def children_cpu() -> float:
    """CPU seconds of this process's finished children (and theirs) so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def child(*worker_args: str, ranks: int = 0, timeout: int = 900) -> dict:
    """Run a worker (under ``mpiexec -n ranks`` when ``ranks``); its JSON line, plus its wall and
    CPU seconds (all its processes) and the mean number of *other* runnable processes
    meanwhile (the machine's cores are shared with other engineers' jobs)."""
    import threading

    launcher = [MPIEXEC, "-n", str(ranks)] if ranks else []
    command = launcher + [PY, __file__, "--worker", *worker_args]
    ours = max(1, ranks)
    samples: list[int] = []
    stop = threading.Event()

    def sample():
        while not stop.wait(0.25):
            samples.append(running() - 1 - ours)  # minus this sampler and our own processes

    thread = threading.Thread(target=sample, daemon=True)
    start, cpu = time.perf_counter(), children_cpu()
    thread.start()
    done = subprocess.run(command, capture_output=True, text=True, env=env(), timeout=timeout)
    stop.set()
    thread.join()
    if done.returncode:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - start
    result["cpu_seconds"] = children_cpu() - cpu
    result["others_running"] = max(0.0, sum(samples) / max(1, len(samples)))
    return result


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


# ----------------------------------------------------------------------------- workers


def _experts(cfg, graph=None):
    """The experts as ``hpcsoup soup`` reads them (a rank knows the graph by its name only)."""
    from hpcsoup.distributed.pls import _Named, graph_name
    from hpcsoup.soup.run import load_ingredients
    from hpcsoup.store import Store

    return load_ingredients(cfg, Store.open(cfg.store), graph or _Named(graph_name(cfg)))


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def worker_partition(args) -> None:
    """Partition the graph into the store as distributed PLS reads it (one process, timed)."""
    import torch

    from hpcsoup.config import load_config
    from hpcsoup.distributed.pls import prepare_from_config, shards_of_config
    from hpcsoup.distributed.shards import is_prepared, open_parts

    torch.set_num_threads(1)
    cfg = load_config(args.config)
    spec = _experts(cfg).spec
    cached = is_prepared(shards_of_config(cfg, spec))
    start = time.perf_counter()
    path = prepare_from_config(cfg, spec)
    attrs = open_parts(path)
    print(json.dumps({"path": str(path), "cached": cached, "seconds": time.perf_counter() - start,
                      "peak_rss": _peak_rss(), "partitions": attrs["partitions"],
                      "scope": attrs.get("scope", "partition")}))


def worker_reference(args) -> None:
    """Full-graph val/test of the uniform soup and of each expert (one process)."""
    import torch

    from hpcsoup.config import load_config
    from hpcsoup.data import load_from_config
    from hpcsoup.soup import Evaluator

    torch.set_num_threads(1)
    cfg = load_config(args.config)
    graph = load_from_config(cfg)
    ingredients = _experts(cfg, graph)
    evaluator = Evaluator(ingredients.spec, graph)
    n = ingredients.n
    uniform = evaluator.metrics(ingredients.mix(torch.full((n,), 1.0 / n)))
    experts = [evaluator.metrics(ingredients.mix(torch.eye(n)[i])) for i in range(n)]
    print(json.dumps({"graph": graph.info(), "nodes": graph.data.num_nodes,
                      "edges": int(graph.data.edge_index.size(1)), "experts": ingredients.ids,
                      "uniform": uniform, "expert_metrics": experts, "peak_rss": _peak_rss()}))


def worker_allreduce(args) -> None:
    from hpcsoup.distributed.mpi import measure_allreduce, world

    comm = world()
    sizes = [1, 25, 256, 1024, 4096, 16384, 65536, 262144]
    rows = measure_allreduce(comm, sizes, repeats=args.allreduce_repeats)
    if comm.rank == 0:
        print(json.dumps({"ranks": comm.size, "allreduce": rows}))


def worker_pls(args) -> None:
    """``hpcsoup soup --method pls`` on this communicator, with the step timing hooks."""
    import torch

    import hpcsoup.distributed.pls as dpls
    from hpcsoup.config import load_config
    from hpcsoup.distributed.mpi import abort_on_error, world
    from hpcsoup.distributed.shards import open_parts, owner_of
    from hpcsoup.soup.evaluate import Evaluator
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
    original_forward = Evaluator.forward

    def timed_forward(self, params, x=None, adj=None):
        if torch.is_grad_enabled():  # a step's partition term (checks and scoring run without)
            forwards.append((time.perf_counter(), time.process_time()))
        return original_forward(self, params, x, adj)

    dpls.Counted = Timed
    Evaluator.forward = timed_forward
    with abort_on_error(comm):
        torch.set_num_threads(1)
        cfg = load_config(args.config)
        run = dpls.run_pls_ranks(cfg, comm)
        soup = dpls.write_distributed_soup(cfg, comm, run)  # what `hpcsoup soup` stores
        s = run.settings
        # a step's allreduce: one row per drawn partition (its gradient and loss term)
        logits = int(s["per_step"]) * (run.ingredients.num_tensors * run.ingredients.n + 1)
        steps = [e for e in events if e[2] == logits]  # the step allreduces (not the checks)
        K, R, every = int(s["partitions"]), int(s["per_step"]), int(s["eval_every"])
        val_counts = open_parts(run.shards)["val_counts"]
        rows, part_times, overheads = [], {}, []
        for k in range(1, len(steps)):
            if k % every == 0:  # a stopping check ran before this step: not a step's time
                continue
            drawn = draw_partitions(cfg.soup.seed, k, K, R, s["draw"])
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
            extras = soup["extras"]
            print(json.dumps({
                "ranks": comm.size, "nodes": cfg.data.nodes, "settings": s, "soup_id": soup["id"],
                "timed_steps": len(rows), "per_rank": everyone,
                "step_seconds": max(r["step"] for r in everyone),
                # the busiest rank of each step (the draw changes who that is), median over steps
                "busiest_cpu": statistics.median(
                    max(c) for c in zip(*(r["cpu_per_step"] for r in everyone))),
                "peak_rss": run.peak_rss, "start_rss": run.start_rss,
                "shards": run.shard_stats, "bytes_per_step": run.step_bytes,
                "logits_elements": run.ingredients.num_tensors * run.ingredients.n,
                "per_step": int(s["per_step"]), "seconds": run.seconds,
                "metrics": soup["metrics"], "coefficients": soup["coefficients"],
                **{key: extras.get(key) for key in (
                    "steps", "best_step", "moved", "shift_from_uniform", "shift_from_start",
                    "stopped_early", "checks", "check_val", "check_loss", "check",
                    "partition_forwards", "scope")},
                "load": os.getloadavg()}))


# ----------------------------------------------------------------------------- driver


def _merge_times(dicts: list) -> dict:
    """Median time of each partition over runs and ranks."""
    merged: dict = {}
    for d in dicts:
        for p, t in d.items():
            merged.setdefault(p, []).append(t)
    return {p: statistics.median(t) for p, t in sorted(merged.items(), key=lambda kv: int(kv[0]))}


def max_diff(a: list, b: list) -> float:
    """max |a - b| over two ``[tensors][experts]`` coefficient tables."""
    return max(abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb))


def mib(n: float) -> str:
    return f"{n / 2 ** 20:.0f}"


def summarise(runs: dict, reference: dict) -> list:
    """One row per rank count: the soup (equal on every round?) and its costs."""
    def med(values):
        return statistics.median(values) if values else float("nan")

    base = runs[min(runs)][0]
    uniform = reference["uniform"]
    n = len(base["coefficients"][0])
    table = []
    for ranks, results in sorted(runs.items()):
        first, per_rank = results[0], [r["per_rank"] for r in results]
        table.append({
            "ranks": ranks, "draw": first["settings"]["draw"], "runs": len(results),
            "steps": [r["steps"] for r in results], "best_step": [r["best_step"] for r in results],
            "same_steps_as_1": all(r["steps"] == base["steps"] and r["best_step"] ==
                                   base["best_step"] for r in results),
            "moved": [r["moved"] for r in results],
            "shift_from_uniform": max(r["shift_from_uniform"] for r in results),
            "max_abs_c_minus_uniform": max(abs(c - 1 / n) for r in results
                                           for row in r["coefficients"] for c in row),
            "max_coefficient_diff_vs_1": max(max_diff(r["coefficients"], base["coefficients"])
                                             for r in results),
            "val": first["metrics"]["val"], "test": first["metrics"]["test"],
            "val_all": [r["metrics"]["val"] for r in results],
            "test_all": [r["metrics"]["test"] for r in results],
            "val_gain_vs_uniform": first["metrics"]["val"] - uniform["val"],
            "test_gain_vs_uniform": first["metrics"]["test"] - uniform["test"],
            "scored_on": first["metrics"].get("scored_on"),
            "check_val": first["check_val"], "stopped_early": first["stopped_early"],
            "pls_seconds": med([r["seconds"] for r in results]),
            "pls_seconds_all": [r["seconds"] for r in results],
            "process_wall_seconds": med([r["wall_seconds"] for r in results]),
            "process_cpu_seconds": med([r["cpu_seconds"] for r in results]),
            "step_seconds": med([r["step_seconds"] for r in results]),
            "compute_seconds": med([max(x["compute"] for x in pr) for pr in per_rank]),
            "compute_cpu_seconds": med([r["busiest_cpu"] for r in results]),
            "allreduce_seconds": med([min(x["allreduce"] for x in pr) for pr in per_rank]),
            "partition_seconds": med([x["compute_per_partition"] for pr in per_rank for x in pr]),
            "timed_steps": [r["timed_steps"] for r in results],
            "max_owned": max(x["max_owned"] for pr in per_rank for x in pr),
            "peak_rss_per_rank": [max(r["peak_rss"][i] for r in results) for i in range(ranks)],
            "start_rss_per_rank": [max(r["start_rss"][i] for r in results) for i in range(ranks)],
            "resident_nodes_per_rank": [s["resident_nodes"] for s in first["shards"]],
            "resident_bytes_per_rank": [s["resident_bytes"] for s in first["shards"]],
            "bytes_per_step": first["bytes_per_step"],
            "partition_times": _merge_times([x["partition_times"] for pr in per_rank for x in pr]),
            "step_overhead": med([x["step_overhead"] for pr in per_rank for x in pr
                                  if x["step_overhead"] is not None]),
            "step_seconds_all": [r["step_seconds"] for r in results],
            "others_running": [r["others_running"] for r in results],
            "load_per_round": [r["load"][0] for r in results],
            "coefficients": first["coefficients"]})
    ones = runs[min(runs)]
    for row in table:
        # paired within each round (the runs of a round are a minute apart, rounds are not:
        # the shared machine's load changes between rounds), then the median over rounds
        pairs = [a["step_seconds"] / b["step_seconds"] for a, b in zip(ones, runs[row["ranks"]])]
        row["speedup_per_round"] = pairs
        row["paired_speedup_vs_1"] = statistics.median(pairs)
        row["cpu_speedup_vs_1"] = table[0]["compute_cpu_seconds"] / row["compute_cpu_seconds"]
    return table


def markdown(table: list, reference: dict) -> str:
    uniform, experts = reference["uniform"], reference["expert_metrics"]
    best = max(experts, key=lambda m: m["val"])
    lines = [
        f"uniform soup (full graph): val {uniform['val'] * 100:.2f} / test "
        f"{uniform['test'] * 100:.2f}; best expert by val: {best['val'] * 100:.2f} / "
        f"{best['test'] * 100:.2f}; experts' val "
        + ", ".join(f"{m['val'] * 100:.2f}" for m in experts), "",
        "| P | steps | best_step | = P=1 | moved | max \\|c−1/n\\| | max \\|c_P−c_1\\| "
        "| val / test (full graph) | Δ val / test vs uniform | PLS s | step ms (wall) "
        "| busiest CPU ms/step | allreduce ms | step speedup (paired) | process CPU s "
        "| peak RSS MiB/rank |",
        "|---:|---|---|---|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---|"]
    for row in table:
        lines.append(
            f"| {row['ranks']} | {'/'.join(map(str, row['steps']))} "
            f"| {'/'.join(map(str, row['best_step']))} | {'yes' if row['same_steps_as_1'] else 'NO'} "
            f"| {'/'.join('yes' if m else 'no' for m in row['moved'])} "
            f"| {row['max_abs_c_minus_uniform']:.3f} | {row['max_coefficient_diff_vs_1']:.1e} "
            f"| {row['val'] * 100:.2f} / {row['test'] * 100:.2f} "
            f"| {row['val_gain_vs_uniform'] * 100:+.2f} / {row['test_gain_vs_uniform'] * 100:+.2f} "
            f"| {row['pls_seconds']:.2f} | {row['step_seconds'] * 1e3:.1f} "
            f"| {row['compute_cpu_seconds'] * 1e3:.1f} | {row['allreduce_seconds'] * 1e3:.2f} "
            f"| {row['paired_speedup_vs_1']:.2f}x | {row['process_cpu_seconds']:.1f} "
            f"| {'/'.join(mib(b) for b in row['peak_rss_per_rank'])} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=40_000)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=40,
                        help="full-batch epochs per expert (3: the soup did not move at 10k nodes)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--partitions", type=int, default=0,
                        help="K (default 0: the package's PLS default)")
    parser.add_argument("--per-step", type=int, default=0,
                        help="R (default 0: the package's PLS default)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--allreduce-repeats", type=int, default=300)
    parser.add_argument("--quiet", type=float, default=0.0,
                        help="wait up to this many seconds before each run for the other "
                             "processes to leave the cores free (0: do not wait)")
    parser.add_argument("--worker", choices=("allreduce", "pls", "partition", "reference"))
    parser.add_argument("--config")
    args = parser.parse_args()
    workers = {"allreduce": worker_allreduce, "pls": worker_pls, "partition": worker_partition,
               "reference": worker_reference}
    if args.worker:
        return workers[args.worker](args)

    OUT.mkdir(parents=True, exist_ok=True)
    load_before = os.getloadavg()
    config = build(args)
    parted = child("partition", "--config", str(config))
    log(f"partitioned graph {parted['path']}: {parted['seconds']:.1f} s, peak RSS "
        f"{mib(parted['peak_rss'])} MiB" + (" (already there)" if parted["cached"] else ""))
    reference = child("reference", "--config", str(config))
    log(f"{reference['graph']}: uniform soup {reference['uniform']}")

    log("allreduce latency, P = 2 and 4")
    allreduce = {p: child("allreduce", "--allreduce-repeats", str(args.allreduce_repeats), ranks=p)
                 for p in (2, 4)}

    runs: dict = {}
    order = list(args.ranks)
    for rep in range(args.repeats):
        for ranks in order:
            quiet = wait_quiet(args.quiet) if args.quiet else None
            log(f"round {rep + 1}/{args.repeats}: P={ranks}"
                + (f" (others runnable before: {quiet:.1f})" if quiet is not None else ""))
            result = child("pls", "--config", str(config), ranks=ranks)
            runs.setdefault(ranks, []).append(result)
            log(f"  {result['steps']} steps (best {result['best_step']}, moved {result['moved']}), "
                f"val {result['metrics']['val']:.4f}, PLS {result['seconds']:.2f} s, step "
                f"{result['step_seconds'] * 1e3:.1f} ms, others runnable "
                f"{result['others_running']:.1f}, load {result['load'][0]:.1f}")
        order = order[1:] + order[:1]
    load_after = os.getloadavg()
    table = summarise(runs, reference)
    settings = runs[min(runs)][0]["settings"]
    first = runs[min(runs)][0]
    print(f"\nsynthetic-products {args.nodes} nodes ({reference['nodes']} in the graph, "
          f"{reference['edges']} directed edges), SAGE 2x{args.hidden}, {args.experts} experts "
          f"({args.epochs} epochs each); PLS {settings}; 1 thread per rank, medians over "
          f"{args.repeats} rounds; load average {load_before[0]:.1f} before, {load_after[0]:.1f} "
          f"after; partitioning (one-time) {parted['seconds']:.1f} s, peak RSS "
          f"{mib(parted['peak_rss'])} MiB{' (cached)' if parted['cached'] else ''}\n")
    print(markdown(table, reference))
    print(f"\nbytes per step: {first['bytes_per_step']} (= 4 x {first['per_step']} drawn partitions "
          f"x ({first['logits_elements']} logits + 1 loss)); allreduce median latency (max over "
          f"ranks):")
    for p, res in allreduce.items():
        cells = [f"{r['bytes']} B {r['seconds'] * 1e6:.1f} us" for r in res["allreduce"]]
        print(f"  P={p}: " + ", ".join(cells))
    (OUT / "mpi_pls.json").write_text(json.dumps({
        "args": {**vars(args), "partitions": int(settings["partitions"]),
                 "per_step": int(settings["per_step"])},
        "settings": settings, "load_before": load_before, "load_after": load_after,
        "partitioning": parted, "reference": reference, "table": table,
        "allreduce": {str(p): r["allreduce"] for p, r in allreduce.items()},
        "threads_per_rank": 1, "cpus": os.cpu_count()}, indent=1))
    log(f"wrote {OUT / 'mpi_pls.json'}")


if __name__ == "__main__":
    main()

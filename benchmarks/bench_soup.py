"""Benchmark the souping methods against each other (issue: uniform, greedy, GIS, LS, PLS).

Datasets: (a) Cora with 8 GraphSAGE and 8 GCN experts, (b) Tolokers with 8 GraphSAGE experts,
(c) synthetic-products (200k nodes, 10M directed edges) with 8 GraphSAGE experts, and a scaling
study of every method over synthetic-products sizes.

For every method: souping seconds, peak memory above the loaded data, val and test score, the
best single expert's score, and a cost model in full-graph forward-equivalents beside the
measured time (time / the measured time of one full-graph inference forward).

Measurement:
- one torch thread everywhere (``--threads``, default 1); the 2 cores are shared.
- memory: every (dataset, method) runs in a fresh subprocess that loads the graph, the experts
  and the shared evaluator, then souping runs inside :class:`hpcsoup.memory.PeakMemory`
  (a thread samples RSS from /proc/self/statm every 5 ms): peak RSS during souping minus the
  RSS right before it; beside it the same for anonymous pages alone (RSS less file-backed
  pages). Before the measured soup a worker runs one validation evaluation and one gradient of
  the model (:func:`gradient_warm_up`): a process's first backward pages in ~4.5 MiB of
  libtorch's code (file-backed, shared), which no method should be charged for, nor was it
  once a method before it in ``hpcsoup soup`` had trained. ``ru_maxrss`` minus that RSS is
  reported as a cross-check. Memory
  workers run with ``MALLOC_MMAP_THRESHOLD_=65536`` so that freed buffers leave RSS (otherwise
  glibc's dynamic threshold makes RSS ratchet with allocation history: PLS read +240 MiB
  instead of +57 MiB at 200k nodes). That threshold maps every buffer above 64 KiB afresh, and
  the page faults made every method 2-3x slower (GIS at 200k: 14.4 s CPU instead of 5.5 s), so
  the times come from another process, with glibc's default allocator (what a user's run
  costs); memory and timed runs must give the same val and test.
- time: wall-clock and CPU seconds of the souping thread (``time.thread_time``; with one
  torch thread every op runs in it). The 2 cores are shared with other jobs, which inflates
  wall-clock time by whatever else runs at that moment; CPU time counts only this process's
  work, so speed ratios are quoted from CPU time (wall ratios beside them). The methods of a
  graph run in one process, interleaved over rounds in alternating order, medians
  (``--rounds`` on Cora and Tolokers, ``--repeats`` on synthetic-products): separate processes
  differed by up to 1.6x in the time of the same validation evaluation (200k nodes: 33 vs
  53 ms), more than the ratios being measured. "evaluations measured" divides a method's CPU
  time by the CPU time of one validation evaluation around it.
- experts are trained once (shared init, full batch, Adam, seeds 0..7 for dropout) and cached
  in benchmarks/out/experts/.

Usage::

    .venv/bin/python benchmarks/bench_soup.py                 # everything (~20 min)
    .venv/bin/python benchmarks/bench_soup.py --only cora     # one part: cora|tolokers|products|scaling
    .venv/bin/python benchmarks/bench_soup.py --quick         # a smoke run with tiny sizes
    .venv/bin/python benchmarks/bench_soup.py --tune          # the LS settings grid (defaults)

Writes benchmarks/out/bench_soup.json, prints the tables, and draws benchmarks/soup_scaling.png.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
METHODS = ["uniform", "greedy", "gis", "learned", "pls"]
#: rows of the large-graph table beside the methods' defaults: PLS checking partition by
#: partition (memory of one partition's field, as on MPI ranks) instead of the whole
#: validation field
LARGE_VARIANTS = {"pls check=partitions": ("pls", {"check": "partitions"})}

#: experts per benchmark graph: arch, count, layers, hidden, epochs, lr, eval_every
EXPERTS = {
    "cora-sage": dict(dataset="Cora", arch="sage", n=8, layers=2, hidden=64, epochs=40, lr=0.01,
                      eval_every=2),
    "cora-gcn": dict(dataset="Cora", arch="gcn", n=8, layers=2, hidden=64, epochs=40, lr=0.01,
                     eval_every=2),
    "tolokers-sage": dict(dataset="Tolokers", arch="sage", n=8, layers=2, hidden=64, epochs=100,
                          lr=0.01, eval_every=2),
    "citeseer-sage": dict(dataset="CiteSeer", arch="sage", n=8, layers=2, hidden=64, epochs=40,
                          lr=0.01, eval_every=2),
    "products-sage": dict(dataset="synthetic-products", nodes=200_000, arch="sage", n=4, layers=2,
                          hidden=64, epochs=24, lr=0.02, eval_every=3),
}
# the same experts, twice as many (the first four are products-sage's): GIS's cost grows with
# the number of experts, LS's and PLS's do not
EXPERTS["products-sage-8"] = dict(EXPERTS["products-sage"], n=8)
EXPERTS_FULL = dict(EXPERTS)
QUICK_EXPERTS = {
    "cora-sage": dict(EXPERTS["cora-sage"], n=3, epochs=20),
    "products-sage": dict(EXPERTS["products-sage"], nodes=5_000, n=3, epochs=6),
}

#: souping settings of the benchmark (the package defaults unless stated)
SETTINGS = {
    "uniform": {}, "greedy": {}, "gis": {"granularity": 20}, "learned": {},
    "pls": {"partitions": 32, "per_step": 4},
}


def log(message: str) -> None:
    print(f"[bench_soup] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- data and experts

def data_root() -> Path:
    return OUT / "data"


def generator_version(dataset: str) -> str:
    """A digest of the synthetic generator's code ('' for real datasets): cached graphs and the
    experts trained on them are reused only while the generator is unchanged. Docstrings and
    comments are left out (``ast``), so a reworded docstring does not retrain the experts."""
    if dataset != "synthetic-products":
        return ""
    import ast
    import hashlib
    import inspect

    from hpcsoup.data import synthetic
    tree = ast.parse(inspect.getsource(synthetic))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)) and body and \
                isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) and \
                isinstance(body[0].value.value, str):
            node.body = body[1:]
    return hashlib.sha1(ast.dump(tree).encode()).hexdigest()[:10]


def load_graph(dataset: str, nodes: int | None = None):
    """The dataset; synthetic-products graphs are cached as .pt (generation takes seconds)."""
    from hpcsoup.data import Graph, load_dataset

    if dataset != "synthetic-products":
        return load_dataset(dataset, data_root())
    path = OUT / "graphs" / f"synthetic-products-{nodes}-{generator_version(dataset)}.pt"
    if path.is_file():
        saved = torch.load(path, weights_only=False)
        return Graph(saved["name"], saved["data"], saved["num_classes"], saved["metric"])
    graph = load_dataset(dataset, data_root(), nodes=nodes)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"name": graph.name, "data": graph.data, "num_classes": graph.num_classes,
                "metric": graph.metric}, path)
    return graph


def train_experts(key: str, spec_args: dict) -> dict:
    """Train (or load cached) experts from one shared init; CSR adjacency, Adam, full batch.

    The same model code as souping (PyG layers on the evaluator's adjacency), so training
    a 200k-node graph costs seconds per epoch instead of tens.
    """
    from hpcsoup.models import ModelSpec, build_model
    from hpcsoup.soup.evaluate import build_adjacency
    from torch_geometric.nn import GCNConv

    path = OUT / "experts" / f"{key}.pt"
    if spec_args != EXPERTS_FULL.get(key):  # --quick experts never replace the real ones
        path = path.with_name(f"{key}-quick.pt")
    version = generator_version(spec_args["dataset"])
    if path.is_file():
        cached = torch.load(path, weights_only=False)
        if cached["config"] == spec_args and cached.get("generator", "") == version:
            return cached
    graph = load_graph(spec_args["dataset"], spec_args.get("nodes"))
    spec = ModelSpec(spec_args["arch"], graph.num_features, graph.num_classes,
                     spec_args["layers"], spec_args["hidden"])
    init = build_model(spec, seed=spec_args.get("init_seed", 0)).state_dict()
    data = graph.data
    adj = build_adjacency(spec.arch, data.edge_index, data.num_nodes)
    train = graph.mask("train")
    states, metrics, seconds = [], [], []
    for i in range(spec_args["n"]):
        model = build_model(spec)
        model.load_state_dict(init)
        for module in model.modules():
            if isinstance(module, GCNConv):
                module.normalize = False  # the adjacency holds the normalisation
        optimizer = torch.optim.Adam(model.parameters(), lr=spec_args["lr"], weight_decay=5e-4)
        torch.manual_seed(1000 + 100 * spec_args.get("init_seed", 0) + i)
        best, best_state = float("-inf"), None
        start = time.perf_counter()
        for epoch in range(spec_args["epochs"]):
            model.train()
            optimizer.zero_grad()
            out = model(data.x, adj)
            loss = torch.nn.functional.cross_entropy(out[train], data.y[train])
            loss.backward()
            optimizer.step()
            if (epoch + 1) % spec_args["eval_every"] == 0 or epoch + 1 == spec_args["epochs"]:
                model.eval()
                with torch.no_grad():
                    logits = model(data.x, adj)
                val = graph.score(logits, "val")
                if val > best:
                    best = val
                    best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
                    test = graph.score(logits, "test")
        seconds.append(time.perf_counter() - start)
        states.append(best_state)
        metrics.append({"val": best, "test": test})
        log(f"{key}: expert {i} val {best:.4f} test {test:.4f} ({seconds[-1]:.1f} s)")
    saved = {"config": spec_args, "spec": spec.to_dict(), "states": states, "metrics": metrics,
             "train_seconds": seconds, "generator": version}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(saved, path)
    return saved


def ingredients_of(saved: dict):
    from hpcsoup.models import ModelSpec
    from hpcsoup.soup import Ingredients

    return Ingredients.from_state_dicts(ModelSpec.from_dict(saved["spec"]), saved["states"],
                                        [f"e{i}" for i in range(len(saved["states"]))],
                                        [m["val"] for m in saved["metrics"]])


# ----------------------------------------------------------------------------- one measurement

def method_settings(method: str) -> dict:
    if method in LARGE_VARIANTS:
        name, extra = LARGE_VARIANTS[method]
        return dict(SETTINGS[name], **extra)
    return dict(SETTINGS[method])


def base_method(method: str) -> str:
    """The souping method a benchmark row runs (a variant's, or the row's own name)."""
    return LARGE_VARIANTS[method][0] if method in LARGE_VARIANTS else method


def median_seconds(call, repeats: int = 3) -> tuple[float, float]:
    """Median (wall, CPU) seconds of ``call()`` after one warm-up call."""
    call()
    walls, cpus = [], []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.thread_time()
        call()
        walls.append(time.perf_counter() - start)
        cpus.append(time.thread_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def forward_seconds(evaluator, state: dict, repeats: int = 3) -> tuple[float, float]:
    """Median (wall, CPU) seconds of one full-graph inference forward."""
    return median_seconds(lambda: evaluator.logits(state), repeats)


def run_method(method: str, ingredients, evaluator, settings: dict | None = None) -> dict:
    """Soup once (``settings``: default the benchmark's), measuring seconds and peak RSS above
    the RSS at the start."""
    import gc

    from hpcsoup.soup import get_method
    from hpcsoup.memory import PeakMemory

    soup = get_method(base_method(method),
                      **(method_settings(method) if settings is None else settings))
    gc.collect()
    evaluations = evaluator.evaluations
    with PeakMemory() as memory:
        start, cpu = time.perf_counter(), time.thread_time()
        inputs = {"partition_cache": str(OUT / "parts")} if base_method(method) == "pls" else {}
        result = soup.soup(ingredients, evaluator, seed=0, **inputs)
        seconds, cpu_seconds = time.perf_counter() - start, time.thread_time() - cpu
    evaluator.evaluations = evaluations  # the final scoring below is not the method's
    metrics = evaluator.metrics(result.state_dict)
    extras = {k: v for k, v in result.extras.items() if k not in ("logits", "chosen")}
    return {"method": method, "seconds": seconds, "cpu_seconds": cpu_seconds,
            "peak_above_bytes": memory.above_start,
            "anon_above_bytes": memory.anon_above_start,
            "rss_start_bytes": memory.start,
            "maxrss_above_bytes": max(0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
                                      - memory.start),
            "val": metrics["val"], "test": metrics["test"], "metric": metrics["metric"],
            "extras": extras, "coefficients": result.coefficients}


def setup(key: str, nodes: int | None):
    """Graph, experts and the shared evaluator: what every method starts from."""
    spec_args = EXPERTS[key]
    saved = train_experts(key, spec_args)
    return setup_from(spec_args, saved, nodes)


def shared_evaluator(graph, spec, **options):
    """The evaluator every method shares, storing the graph partition-contiguous (as `hpcsoup
    soup` does: full-graph methods get the memory locality PLS has by construction);
    ``options``: :class:`hpcsoup.soup.Evaluator` keywords (``receptive_field``)."""
    from hpcsoup.data.partition import partition
    from hpcsoup.soup import Evaluator
    from hpcsoup.soup.evaluate import locality_order

    parts = partition(graph.data.edge_index, graph.num_nodes, SETTINGS["pls"]["partitions"],
                      seed=0, cache_dir=OUT / "parts")
    return Evaluator(spec, graph, order=locality_order(parts), **options)


def setup_from(spec_args: dict, saved: dict, nodes: int | None = None, before=None):
    """Graph, the saved experts as ingredients, and the shared (partition-ordered) evaluator;
    ``before(evaluator)`` runs before anything is evaluated (it gets the fresh evaluator)."""
    graph = load_graph(spec_args["dataset"], nodes or spec_args.get("nodes"))
    ingredients = ingredients_of(saved)
    evaluator = shared_evaluator(graph, ingredients.spec)
    if before is not None:
        before(evaluator)
    if nodes and nodes != spec_args.get("nodes"):
        # experts trained at another size of the same generator: re-score them on this graph
        ingredients.val_scores = [evaluator.evaluate(ingredients.expert(i))
                                  for i in range(ingredients.n)]
        evaluator.evaluations = 0
    return graph, ingredients, evaluator, saved


def metis_worker(key: str, nodes: int | None) -> dict:
    """METIS (K of the benchmark's PLS, no cache): its own one-time cost, time and peak memory."""
    from hpcsoup.data.partition import partition
    from hpcsoup.memory import PeakMemory

    spec_args = EXPERTS[key]
    graph = load_graph(spec_args["dataset"], nodes or spec_args.get("nodes"))
    with PeakMemory() as memory:
        start, cpu = time.perf_counter(), time.process_time()
        partition(graph.data.edge_index, graph.num_nodes, SETTINGS["pls"]["partitions"], seed=0)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu
    return {"method": "metis", "seconds": seconds, "cpu_seconds": cpu_seconds,
            "peak_above_bytes": memory.above_start, "partitions": SETTINGS["pls"]["partitions"]}


def worker(key: str, method: str, nodes: int | None, repeats: int = 1) -> dict:
    """In this (fresh) process: one method's soup (what the parent records for its memory), or
    with ``method = "timing"`` every method of the table, interleaved over ``repeats`` rounds
    in alternating order (medians: what the parent records for their times)."""
    if method == "metis":
        return metis_worker(key, nodes)
    out = {}
    # the field's one-time cost, before the experts are re-scored on another size (which uses it)
    graph, ingredients, evaluator, _ = setup_from(
        EXPERTS[key], train_experts(key, EXPERTS[key]), nodes,
        before=lambda fresh: out.update(field=validation_field(fresh)))
    if method != "timing":  # after one evaluation, as in the timing run: the validation
        # field's one-time structures (its column blocks) are built by then, as `hpcsoup soup`
        # shares them between methods
        evaluation_seconds(evaluator, ingredients.mean(), repeats=1)
        gradient_warm_up(ingredients, evaluator)
        return dict(out, **run_method(method, ingredients, evaluator))
    # one validation evaluation before and after each soup: the cost model's unit, measured
    # at the soup's own moment
    out["forward_seconds"] = forward_seconds(evaluator, ingredients.mean(), repeats=1)
    out["evaluation_seconds"] = evaluation_seconds(evaluator, ingredients.mean(), repeats=1)
    methods = METHODS + list(LARGE_VARIANTS)
    runs: dict[str, list] = {m: [] for m in methods}
    for r in range(repeats):
        for method in methods if r % 2 == 0 else methods[::-1]:
            before = evaluation_seconds(evaluator, ingredients.mean(), repeats=1)
            evaluator.evaluations = 0
            run = run_method(method, ingredients, evaluator)
            after = evaluation_seconds(evaluator, ingredients.mean(), repeats=1)
            runs[method].append(dict(run, evaluation_cpu_around=(before[1] + after[1]) / 2))
    out["rows"] = {m: dict(r[0], seconds=statistics.median(x["seconds"] for x in r),
                           cpu_seconds=statistics.median(x["cpu_seconds"] for x in r),
                           cpu_seconds_all=[x["cpu_seconds"] for x in r],
                           evaluation_cpu_around=statistics.median(
                               x["evaluation_cpu_around"] for x in r))
                   for m, r in runs.items()}
    return out


def gradient_warm_up(ingredients, evaluator) -> None:
    """One gradient through the model on the field of 8 validation nodes: the process has then
    paged in libtorch's backward code, as any process that trained has. A field of its own
    (cut afresh, not kept), so that no method's structures (LS's kept transpose of the
    validation field) are built before its measurement."""
    import torch

    field = evaluator.field_of(torch.arange(8))
    graph_input = evaluator.field_input(field.edge_index, field.weight, field.x.size(0),
                                        field.aggregate, field.roots)
    logits = torch.zeros(ingredients.num_tensors, ingredients.n, requires_grad=True)
    evaluator.forward(ingredients.mix(logits.softmax(-1)), field.x, graph_input).sum().backward()


def validation_field(evaluator) -> dict:
    """Build the evaluator's validation field (:mod:`hpcsoup.soup.fields`) before any method
    runs, as ``hpcsoup soup`` shares it between methods: its one-time cost, time and memory."""
    from hpcsoup.memory import PeakMemory

    with PeakMemory() as memory:
        start, cpu = time.perf_counter(), time.thread_time()
        field = evaluator.field()
        seconds, cpu_seconds = time.perf_counter() - start, time.thread_time() - cpu
    nodes = 0 if field is None else int(field[0].size(0))
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "nodes": nodes,
            "peak_above_bytes": memory.above_start}


def evaluation_seconds(evaluator, state: dict, repeats: int = 3) -> tuple[float, float]:
    """Median (wall, CPU) seconds of one validation evaluation (the cost model's unit: what GIS
    makes N + (N - 1) G of)."""
    return median_seconds(lambda: evaluator.evaluate(state), repeats)


def in_subprocess(key: str, method: str, nodes: int | None, threads: int,
                  repeats: int = 1, memory: bool = True) -> dict:
    """:func:`worker` in a fresh process: with the fixed mmap threshold (``memory``: its RSS
    is the working set) or with glibc's default allocator (its time is a user's)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", key, method,
               "--threads", str(threads), "--repeats", str(repeats)]
    if nodes:
        command += ["--nodes", str(nodes)]
    if EXPERTS != EXPERTS_FULL:
        command.append("--quick")
    # glibc raises its mmap threshold after big frees and then keeps freed buffers in the heap:
    # RSS would ratchet with allocation history instead of showing a method's working set.
    # A fixed threshold returns big buffers to the OS on free (the same for every method).
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if memory:
        env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"worker {key} {method} failed with exit {done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- cost model

def cost_model(method: str, n: int, row: dict) -> tuple[str, float]:
    """Nominal validation evaluations of a method (an LS step: about 3) and their formula."""
    e = row["extras"]
    if method == "uniform":
        return "0", 0.0
    if method == "greedy":
        return "N-1", float(n - 1)
    if method == "gis":
        g = SETTINGS["gis"]["granularity"]
        return f"N+(N-1)G ({e.get('evaluations', '?')} run)", float(n + (n - 1) * g)
    start = n - 1 if e.get("init") == "greedy" else 0  # the greedy start's evaluations
    if method == "learned":
        steps = e.get("forwards", e.get("steps", 0))
        final = 0 if e.get("stopped_early") else 1
        return "N-1 + 3E", start + 3.0 * steps + final
    if method == "pls":  # S: the checks choosing its start (a greedy prefix: 1 to N - 1)
        k, r = e.get("partitions", 32), e.get("per_step", 4)
        start = e.get("start_checks", start)
        return "S + 3E*R/K + C", start + 3.0 * e.get("steps", 0) * r / k + e.get("checks", 0)
    return "?", float("nan")


# ----------------------------------------------------------------------------- the benchmarks

def bench_small(key: str, rounds: int, threads: int) -> dict:
    """A small graph: timing in this process (interleaved rounds, medians), memory in workers."""
    graph, ingredients, evaluator, saved = setup(key, None)
    fwd = forward_seconds(evaluator, ingredients.mean(), repeats=7)
    evaluator.evaluations = 0
    runs: dict[str, list] = {m: [] for m in METHODS}
    for r in range(rounds):
        order = METHODS if r % 2 == 0 else METHODS[::-1]  # interleaved, alternating order
        for method in order:
            runs[method].append(run_method(method, ingredients, evaluator))
    rows = []
    for method in METHODS:
        first = runs[method][0]
        mem = in_subprocess(key, method, None, threads)
        row = dict(first, seconds=statistics.median(r["seconds"] for r in runs[method]),
                   cpu_seconds=statistics.median(r["cpu_seconds"] for r in runs[method]),
                   seconds_all=[r["seconds"] for r in runs[method]],
                   seconds_subprocess=mem["seconds"], peak_above_bytes=mem["peak_above_bytes"],
                   maxrss_above_bytes=mem["maxrss_above_bytes"])
        rows.append(row)
        log(f"{key} {method}: {row['seconds']:.3f} s, val {row['val']:.4f}, test {row['test']:.4f}")
    return finish(key, graph, saved, rows, fwd)


def bench_large(key: str, nodes: int, threads: int, repeats: int = 3) -> dict:
    """A large graph: the methods' times in one fresh process (``repeats`` interleaved rounds,
    default allocator: ratios measured side by side), each method's memory in its own fresh
    process (fixed mmap threshold)."""
    rows = []
    metis = in_subprocess(key, "metis", nodes, threads)
    log(f"{key}@{nodes} METIS K={metis['partitions']}: {metis['seconds']:.1f} s, "
        f"+{metis['peak_above_bytes'] / 2**20:.0f} MiB (one-time, not in any method's time)")
    timing = in_subprocess(key, "timing", nodes, threads, repeats=repeats, memory=False)
    fwd, evaluation = timing["forward_seconds"], timing["evaluation_seconds"]
    for method in METHODS + list(LARGE_VARIANTS):
        row = dict(timing["rows"][method], field=timing["field"])
        mem = in_subprocess(key, method, nodes, threads)
        if (mem["val"], mem["test"]) != (row["val"], row["test"]):
            raise RuntimeError(f"{key}@{nodes} {method}: the memory run scored "
                               f"{mem['val']}/{mem['test']}, the timed run {row['val']}/{row['test']}")
        row.update(peak_above_bytes=mem["peak_above_bytes"],
                   anon_above_bytes=mem["anon_above_bytes"],
                   maxrss_above_bytes=mem["maxrss_above_bytes"],
                   memory_run={k: mem[k] for k in ("seconds", "cpu_seconds", "peak_above_bytes")})
        rows.append(row)
        log(f"{key}@{nodes} {method}: {row['seconds']:.1f} s ({row['cpu_seconds']:.1f} s CPU), "
            f"+{row['peak_above_bytes'] / 2**20:.0f}"
            f" MiB, val {row['val']:.4f}, test {row['test']:.4f}")
    if nodes == EXPERTS[key].get("nodes"):
        result = finish(key, load_graph(EXPERTS[key]["dataset"], nodes),
                        train_experts(key, EXPERTS[key]), rows, fwd, evaluation)
    else:
        graph, ingredients, evaluator, saved = setup(key, nodes)  # experts' scores on this size
        saved = dict(saved, metrics=[evaluator.metrics(ingredients.expert(i))
                                     for i in range(ingredients.n)])
        result = finish(key, graph, saved, rows, fwd, evaluation)
    return dict(result, metis=metis, field=rows[0]["field"])


def finish(key: str, graph, saved: dict, rows: list[dict], fwd: float,
           evaluation: tuple | None = None) -> dict:
    n = len(saved["states"])
    best = max(range(n), key=lambda i: saved["metrics"][i]["val"])
    for row in rows:
        formula, nominal = cost_model(base_method(row["method"]), n, row)
        row["cost_formula"], row["cost_forwards"] = formula, nominal
        unit = row.get("evaluation_cpu_around") or (evaluation or fwd)[1]
        row["measured_forwards"] = row["cpu_seconds"] / unit
    return {"key": key, "graph": graph.info(), "experts": n, "forward_seconds": fwd,
            "evaluation_seconds": evaluation or fwd,
            "best_expert": {"index": best, **saved["metrics"][best]},
            "expert_test_max": max(m["test"] for m in saved["metrics"]), "rows": rows}


# ----------------------------------------------------------------------------- report

def moved(row: dict) -> float:
    """max |c - 1/n| over a soup's coefficients: 0 means it is the uniform soup."""
    c = torch.tensor(row["coefficients"], dtype=torch.float64)
    return float((c - 1.0 / c.size(1)).abs().max())


def table(result: dict) -> str:
    rows = {r["method"]: r for r in result["rows"]}
    gis, ls = rows.get("gis"), rows.get("learned")
    evaluation = result.get("evaluation_seconds", result["forward_seconds"])
    head = (f"{result['key']} ({result['graph']['dataset']}: {result['graph']['nodes']} nodes, "
            f"{result['graph']['edges']} edges; {result['experts']} experts; one full-graph "
            f"forward {result['forward_seconds'][1]:.3f} s CPU, one validation evaluation "
            f"{evaluation[1]:.3f} s CPU)\n")
    lines = ["| method | wall s | CPU s | GIS / method (wall) | GIS / method (CPU) | "
             "evaluations model | evaluations measured (CPU) | peak MiB above data | / LS memory | "
             "anonymous MiB | / LS anonymous | "
             "val | test | val − uniform | test − uniform | val − best expert | "
             "test − best expert | moved | work |",
             "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    uniform, best = rows["uniform"], result["best_expert"]

    def ratio(a, b):
        return f"{a / b:.1f}" if b > 1e-2 else "-"  # uniform: no forward at all

    for method in METHODS + [v for v in LARGE_VARIANTS if v in rows]:
        r = rows[method]
        e = r["extras"]
        mem = r["peak_above_bytes"] / 2**20
        vs_ls = r["peak_above_bytes"] / ls["peak_above_bytes"] if ls["peak_above_bytes"] else float("nan")
        anon, ls_anon = r.get("anon_above_bytes"), ls.get("anon_above_bytes")
        anon_cells = (f"{anon / 2**20:.1f} | {anon / ls_anon:.2f}" if anon is not None and ls_anon
                      else "- | -")  # runs before the anonymous column
        work = (f"{e.get('steps', '-')} steps, {e.get('checks', '-')} checks"
                if base_method(method) in ("learned", "pls") else f"{e.get('evaluations', 0)} evals")
        lines.append(f"| {method} | {r['seconds']:.3f} | {r['cpu_seconds']:.3f} | "
                     f"{ratio(gis['seconds'], r['seconds'])} | "
                     f"{ratio(gis['cpu_seconds'], r['cpu_seconds'])} | "
                     f"{r['cost_formula']} = {r['cost_forwards']:.1f} | {r['measured_forwards']:.1f} | "
                     f"{mem:.1f} | "
                     f"{vs_ls:.2f} | {anon_cells} | {100 * r['val']:.2f} | {100 * r['test']:.2f} | "
                     f"{100 * (r['val'] - uniform['val']):+.2f} | "
                     f"{100 * (r['test'] - uniform['test']):+.2f} | "
                     f"{100 * (r['val'] - best['val']):+.2f} | {100 * (r['test'] - best['test']):+.2f} | "
                     f"{moved(r):.3f} | {work} |")
    lines.append(f"| best expert (by val) | | | | | | | | | | | {100 * best['val']:.2f} | "
                 f"{100 * best['test']:.2f} | | | | | | |")
    metis = result.get("metis")
    if metis:
        lines.append(f"\nMETIS K = {metis['partitions']} (one-time, cached afterwards, in no "
                     f"method's time): {metis['seconds']:.1f} s wall, {metis['cpu_seconds']:.1f} s "
                     f"CPU, +{metis['peak_above_bytes'] / 2**20:.0f} MiB peak")
    field = result.get("field")
    if field:
        lines.append(f"Validation field ({field['nodes']} nodes; built once per graph and shared "
                     f"by every method, in no method's time): {field['seconds']:.1f} s wall, "
                     f"{field['cpu_seconds']:.1f} s CPU, +{field['peak_above_bytes'] / 2**20:.0f} "
                     f"MiB peak")
    return head + "\n".join(lines)


def plot(scaling: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_t, ax_f, ax_m) = plt.subplots(1, 3, figsize=(15, 4.4))
    sizes = [r["graph"]["nodes"] for r in scaling]
    colors = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red")))
    styles = {"greedy": dict(linestyle="--", marker="s")}  # greedy's memory lies on GIS's
    for method in METHODS:
        rows = [next(x for x in r["rows"] if x["method"] == method) for r in scaling]
        style = dict(dict(linestyle="-", marker="o"), color=colors[method], label=method,
                     **styles.get(method, {}))
        ax_m.plot(sizes, [x["peak_above_bytes"] / 2**20 for x in rows], **style)
        if method == "uniform":  # no forward at all: < 1 ms at every size
            continue
        ax_t.plot(sizes, [x["cpu_seconds"] for x in rows], **style)
        ax_f.plot(sizes, [x["measured_forwards"] for x in rows], **style)
    xlabel = "nodes (synthetic-products, mean degree 50)"
    ax_t.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="souping CPU seconds (1 thread)",
             title="time (uniform: < 1 ms)")
    ax_f.set(xscale="log", yscale="log", xlabel=xlabel,
             ylabel="seconds / one full-graph forward", title="time in forward-equivalents")
    ax_m.set(xscale="log", xlabel=xlabel, ylabel="peak RSS above loaded data (MiB)",
             title="memory")
    for ax in (ax_t, ax_f, ax_m):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.suptitle("Souping 8 GraphSAGE experts: time and memory vs graph size")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def scaling_table(scaling: list[dict]) -> str:
    lines = ["| nodes | edges | " + " | ".join(f"{m} CPU s / MiB" for m in METHODS) + " |",
             "|---|---|" + "---|" * len(METHODS)]
    for r in scaling:
        cells = []
        for method in METHODS:
            x = next(x for x in r["rows"] if x["method"] == method)
            cells.append(f"{x['cpu_seconds']:.1f} / {x['peak_above_bytes'] / 2**20:.0f}")
        lines.append(f"| {r['graph']['nodes']} | {r['graph']['edges']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: the learned-souping settings compared by --tune (optimizer, lr, patience; min_delta 0)
TUNE_GRID = [("adam", lr, p) for lr in (0.03, 0.1, 0.3, 1.0) for p in (3, 5, 10)] + \
            [("sgd", lr, p) for lr in (5.0, 20.0, 80.0) for p in (3, 5, 10)]


def tune(keys: list[str]) -> str:
    """LS optimizer/lr/patience grid on small graphs (one process, one run each): the basis of
    the package defaults. Scored against GIS from the same process."""
    from hpcsoup.soup import get_method

    lines = []
    for key in keys:
        graph, ingredients, evaluator, _ = setup(key, None)
        start = time.perf_counter()
        gis = get_method("gis").soup(ingredients, evaluator)
        gis_seconds = time.perf_counter() - start
        gis_metrics = evaluator.metrics(gis.state_dict)
        lines += [f"\n{key}: GIS {gis_seconds:.2f} s, val {100 * gis_metrics['val']:.2f}, test "
                  f"{100 * gis_metrics['test']:.2f}",
                  "| optimizer | lr | patience | seconds | GIS / LS | steps | best step | val | test |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for optimizer, lr, patience in TUNE_GRID:
            method = get_method("learned", optimizer=optimizer, lr=lr, patience=patience,
                                min_delta=0.0, momentum=0.9)
            start = time.perf_counter()
            result = method.soup(ingredients, evaluator)
            seconds = time.perf_counter() - start
            m = evaluator.metrics(result.state_dict)
            lines.append(f"| {optimizer} | {lr:g} | {patience} | {seconds:.2f} | "
                         f"{gis_seconds / seconds:.1f} | {result.extras['steps']} | "
                         f"{result.extras['best_step']} | {100 * m['val']:.2f} | "
                         f"{100 * m['test']:.2f} |")
            log(lines[-1])
    return "\n".join(lines)


def quality(keys: list[str], seeds: int, variants: dict) -> dict:
    """Every method on ``seeds`` expert sets per graph (shared init ``s``, seeds ``1000+100s+i``),
    in one process, with the quality each method bought beside its CPU time.

    Per row: val/test, their gains over the uniform soup and over the best expert (by val),
    ``moved`` = max |c - 1/n| over the coefficients (0: the soup is the uniform soup), CPU
    and wall seconds, and the CPU ratio GIS / method. ``variants`` adds rows: ``name ->
    (method, settings)`` or ``(method, settings, evaluator options)``; a row's CPU ratio is to
    the GIS row run on an evaluator with the same options (e.g. ``receptive_field=False``).
    """
    runs = []
    for key in keys:
        for seed in range(seeds):
            spec_args = dict(EXPERTS[key], init_seed=seed)
            saved = train_experts(f"{key}-s{seed}" if seed else key, spec_args)
            graph, ingredients, evaluator, _ = setup_from(spec_args, saved)
            evaluators = {"{}": evaluator}
            best = max(range(ingredients.n), key=lambda i: saved["metrics"][i]["val"])
            rows, gis_of = {}, {}
            for name in METHODS + list(variants):
                method, settings, *options = variants.get(name, (name, SETTINGS.get(name, {})))
                options = options[0] if options else {}
                if "objective" in settings and graph.metric != "rocauc":
                    continue  # the objective's variant is for ROC-AUC graphs only
                tag = json.dumps(options, sort_keys=True)
                if tag not in evaluators:
                    evaluators[tag] = shared_evaluator(graph, ingredients.spec, **options)
                row = run_method(method, ingredients, evaluators[tag], settings)
                row["moved"], row["evaluator"] = moved(row), options
                rows[name] = row
                if method == "gis":
                    gis_of.setdefault(tag, name)
            for row in rows.values():
                for split in ("val", "test"):
                    row[f"{split}_vs_uniform"] = row[split] - rows["uniform"][split]
                    row[f"{split}_vs_best_expert"] = row[split] - saved["metrics"][best][split]
                gis = rows[gis_of[json.dumps(row["evaluator"], sort_keys=True)]]
                row["gis_cpu_ratio"] = gis["cpu_seconds"] / max(row["cpu_seconds"], 1e-9)
            runs.append({"key": key, "seed": seed, "dataset": graph.name, "metric": graph.metric,
                         "best_expert": saved["metrics"][best], "rows": rows})
            log(f"{key} seed {seed}: " + ", ".join(
                f"{n} {r['val']:.4f}/{r['test']:.4f}" for n, r in rows.items()))
    return {"runs": runs, "variants": {k: list(v) for k, v in variants.items()}}


def quality_table(result: dict) -> str:
    """Per graph: the mean over expert sets of every column, and the floors of issue 10."""
    lines = []
    keys = sorted({r["key"] for r in result["runs"]}, key=[r["key"] for r in result["runs"]].index)
    for key in keys:
        runs = [r for r in result["runs"] if r["key"] == key]
        names = list(runs[0]["rows"])
        best = statistics.mean(r["best_expert"]["val"] for r in runs)
        lines += [f"\n{runs[0]['dataset']} ({runs[0]['metric']}, mean of {len(runs)} expert sets; "
                  f"best expert val {100 * best:.2f})",
                  "| method | val | test | val − uniform | test − uniform | val − best expert | "
                  "test − best expert | moved max abs(c − 1/n) | CPU s | wall s | GIS CPU / CPU |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name in names:
            rows = [r["rows"][name] for r in runs]

            def m(field, scale=100.0):
                return scale * statistics.mean(row[field] for row in rows)
            lines.append(f"| {name} | {m('val'):.2f} | {m('test'):.2f} | {m('val_vs_uniform'):+.2f} | "
                         f"{m('test_vs_uniform'):+.2f} | {m('val_vs_best_expert'):+.2f} | "
                         f"{m('test_vs_best_expert'):+.2f} | {m('moved', 1):.3f} | "
                         f"{m('cpu_seconds', 1):.2f} | {m('seconds', 1):.2f} | "
                         f"{m('gis_cpu_ratio', 1):.1f}x |")
        gis = statistics.mean(r["rows"]["gis"]["val"] for r in runs)
        uni = statistics.mean(r["rows"]["uniform"]["val"] for r in runs)
        for name, floor in (("learned", 0.002), ("pls", 0.005)):
            val = statistics.mean(r["rows"][name]["val"] for r in runs)
            ok = val >= gis - floor and val >= uni
            lines.append(f"floor {name}: val {100 * val:.2f} >= GIS {100 * gis:.2f} − "
                         f"{100 * floor:.1f} and >= uniform {100 * uni:.2f}: "
                         f"{'met' if ok else 'NOT met'}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="cora,tolokers,products",
                        help="comma list of cora, tolokers, products (the scaling study)")
    parser.add_argument("--sizes", default="50000,100000,200000",
                        help="synthetic-products sizes (the largest is benchmark (c))")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds on small graphs")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds of the methods in the timing process "
                             "(synthetic-products)")
    parser.add_argument("--products", default="products-sage-8,products-sage",
                        help="expert sets of the products rows: the first at every size, the "
                             "others at the first size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="tiny smoke run")
    parser.add_argument("--train", nargs="+", metavar="KEY", help="only train (cache) these experts")
    parser.add_argument("--tune", nargs="*", metavar="KEY",
                        help="only the LS settings grid (default keys: cora-sage cora-gcn)")
    parser.add_argument("--quality", nargs="*", metavar="KEY",
                        help="every method on --seeds expert sets per graph, quality beside time "
                             "(default: cora-sage citeseer-sage tolokers-sage)")
    parser.add_argument("--seeds", type=int, default=3, help="expert sets per graph (--quality)")
    parser.add_argument("--worker", nargs=2, metavar=("KEY", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        EXPERTS.clear()
        EXPERTS.update(QUICK_EXPERTS)
        SETTINGS["pls"] = {"partitions": 8, "per_step": 1}
    if args.train:
        logging.basicConfig(level=logging.INFO, stream=sys.stderr)
        for key in args.train:
            train_experts(key, EXPERTS[key])
        return 0
    if args.tune is not None:
        print(tune(args.tune or ["cora-sage", "cora-gcn"]))
        return 0
    if args.quality is not None:
        # the old defaults (LS: uniform start, lr 0.3, 100 steps; PLS: partition check), the
        # other starts, and both methods without the receptive field (GIS too: its ratio is
        # to GIS on the same evaluator)
        off = {"receptive_field": False}
        variants = {"gis receptive_field=off": ("gis", {}, off),
                    "learned receptive_field=off": ("learned", {}, off),
                    "learned init=uniform lr=0.3 steps=100": (
                        "learned", {"init": "uniform", "lr": 0.3, "steps": 100}),
                    "learned init=validation": ("learned", {"init": "validation"}),
                    "pls check=partitions": ("pls", dict(SETTINGS["pls"], check="partitions")),
                    "pls init=uniform": ("pls", dict(SETTINGS["pls"], init="uniform")),
                    # the previous start: the whole greedy soup (n - 1 checks)
                    "pls init=greedy": ("pls", dict(SETTINGS["pls"], init="greedy")),
                    # the previous objective (the paper's: partitions without their cut edges)
                    # and the previous optimiser settings
                    "pls scope=partition": ("pls", dict(SETTINGS["pls"], scope="partition")),
                    "pls init=uniform steps=100 lr=0.3 eval_every=5 patience=4 min_steps=20": (
                        "pls", dict(SETTINGS["pls"], init="uniform", steps=100, lr=0.3,
                                    eval_every=5, patience=4, min_steps=20)),
                    "learned objective=ce": ("learned", {"objective": "ce"}),
                    # a check once per pass over the partitions (K/R steps)
                    "pls eval_every=8 min_steps=8": (
                        "pls", dict(SETTINGS["pls"], eval_every=8, min_steps=8))}
        result = quality(args.quality or ["cora-sage", "citeseer-sage", "tolokers-sage"],
                         args.seeds, variants)
        OUT.mkdir(parents=True, exist_ok=True)
        (OUT / "bench_soup_quality.json").write_text(json.dumps(result, indent=1, default=str))
        print(quality_table(result))
        return 0
    if args.worker:
        print(json.dumps(worker(*args.worker, args.nodes, args.repeats)))
        return 0
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    OUT.mkdir(parents=True, exist_ok=True)
    parts = args.only.split(",")
    results: dict = {"threads": args.threads, "rounds": args.rounds, "repeats": args.repeats,
                     "settings": SETTINGS,
                     "command": " ".join(["benchmarks/bench_soup.py"] + (argv or sys.argv[1:]))}
    start = time.perf_counter()
    if "cora" in parts:
        results["cora"] = [bench_small(k, args.rounds, args.threads)
                           for k in ("cora-sage", "cora-gcn") if k in EXPERTS]
    if "tolokers" in parts and "tolokers-sage" in EXPERTS:
        results["tolokers"] = [bench_small("tolokers-sage", args.rounds, args.threads)]
    if "products" in parts:
        sizes = [int(s) for s in args.sizes.split(",")] if not args.quick else [2_000, 5_000]
        first, *others = args.products.split(",") if not args.quick else ["products-sage"]
        results["scaling"] = [bench_large(first, n, args.threads, args.repeats) for n in sizes]
        # other expert sets (e.g. fewer experts) at the first size only
        results["others"] = [bench_large(key, sizes[0], args.threads, args.repeats)
                             for key in others]
    results["seconds"] = time.perf_counter() - start
    name = "bench_soup_quick.json" if args.quick else "bench_soup.json"
    (OUT / name).write_text(json.dumps(results, indent=1))
    for group in ("cora", "tolokers", "scaling", "others"):
        for result in results.get(group, []):
            print(table(result), end="\n\n")
    if results.get("scaling"):
        print(scaling_table(results["scaling"]))
        plot(results["scaling"], OUT / "soup_scaling.png" if args.quick else HERE / "soup_scaling.png")
    print(f"\n{results['seconds']:.0f} s in all; JSON in {OUT / name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

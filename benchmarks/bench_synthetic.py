"""Benchmark the synthetic ogbn-products-like generator: build time, peak memory, statistics,
METIS time; whether a GNN needs the graph (2-layer GraphSAGE vs a feature-only MLP); and
whether experts trained from one init differ enough for their soups to differ.

Every size is built in a fresh child process, so its peak RSS (``VmHWM``) is its own; the
parent prints a table and writes ``benchmarks/out/synthetic.json``. One torch thread.

    python benchmarks/bench_synthetic.py                      # 1e5, 1e6, 2.4e6 + learning at 2e5
    python benchmarks/bench_synthetic.py --sizes 100000 --learn 0
    python benchmarks/bench_synthetic.py --sizes --learn 0 --experts 100000   # expert spread, soup
    python benchmarks/bench_synthetic.py --sizes --learn 100000 --graph homophily_slope=3   # a knob

``--graph NAME=VALUE`` (repeatable) passes a keyword argument of
:func:`hpcsoup.data.synthetic.synthetic_products` to every part: a calibration sweep.
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

OUT = Path(__file__).resolve().parent / "out"
GIB = 2 ** 30
#: experts of the --experts check
EXPERTS = 4


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_gib() -> float:
    return _status_kib("VmHWM") * 1024 / GIB


def rss_gib() -> float:
    return _status_kib("VmRSS") * 1024 / GIB


def child_build(nodes: int, seed: int, metis_k: int, knobs: dict) -> dict:
    import torch

    from hpcsoup.data.synthetic import edge_homophily, synthetic_products

    torch.set_num_threads(1)
    baseline = rss_gib()
    start = time.perf_counter()
    data, classes = synthetic_products(nodes, seed=seed, **knobs)
    build = time.perf_counter() - start
    peak_build = peak_rss_gib()
    ei = data.edge_index
    degree = torch.bincount(ei[0], minlength=nodes)
    row = {
        "nodes": nodes, "seed": seed, "edges": int(ei.size(1)),
        "undirected_edges": int(ei.size(1)) // 2, "classes": classes,
        "features": int(data.x.size(1)), "build_seconds": round(build, 2),
        "baseline_rss_gib": round(baseline, 3), "peak_rss_gib": round(peak_build, 3),
        "homophily": round(edge_homophily(ei, data.y), 4),
        "mean_degree": round(ei.size(1) / nodes, 3),
        "median_degree": int(degree.median()), "max_degree": int(degree.max()),
        "isolated_nodes": int((degree == 0).sum()),
        "largest_class_share": round(float(torch.bincount(data.y).max()) / nodes, 4),
        "split": [int(data[m].sum()) for m in ("train_mask", "val_mask", "test_mask")],
    }
    if metis_k:
        from hpcsoup.data.partition import edge_cut, partition

        start = time.perf_counter()
        parts = partition(ei, nodes, metis_k, seed=0)
        row["metis_k"] = metis_k
        row["metis_seconds"] = round(time.perf_counter() - start, 2)
        sizes = torch.bincount(parts, minlength=metis_k)
        row["metis_imbalance"] = round(float(sizes.max()) / (nodes / metis_k), 4)
        row["metis_edge_cut"] = round(edge_cut(ei, parts), 4)
        row["peak_rss_gib_with_metis"] = round(peak_rss_gib(), 3)
    return row


def child_learn(nodes: int, seed: int, epochs: int, knobs: dict) -> dict:
    import torch
    from torch_geometric.utils import to_torch_csr_tensor

    from hpcsoup.data.synthetic import synthetic_products
    from hpcsoup.models.gnn import ModelSpec, build_model

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    data, classes = synthetic_products(nodes, seed=seed, **knobs)
    # the same aggregation as edge_index, several times faster on CPU (CSR sparse-dense product)
    adj_t = to_torch_csr_tensor(data.edge_index.flip(0), size=(nodes, nodes))

    def fit(model, forward):
        opt = torch.optim.Adam(model.parameters(), lr=0.01, weight_decay=5e-4)
        best = {"val": -1.0}
        start = time.perf_counter()
        for epoch in range(epochs):
            model.train()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(forward(model)[data.train_mask],
                                              data.y[data.train_mask]).backward()
            opt.step()
            model.eval()
            with torch.no_grad():
                pred = forward(model).argmax(-1)
            acc = {s: float((pred[m] == data.y[m]).float().mean())
                   for s, m in (("val", data.val_mask), ("test", data.test_mask))}
            if acc["val"] > best["val"]:
                best = {**acc, "epoch": epoch}
        best["seconds"] = round(time.perf_counter() - start, 1)
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in best.items()}

    sage = build_model(ModelSpec("sage", data.x.size(1), classes, layers=2, hidden=64), seed=seed)
    mlp = torch.nn.Sequential(torch.nn.Linear(data.x.size(1), 64), torch.nn.ReLU(),
                              torch.nn.Dropout(0.5), torch.nn.Linear(64, classes))
    return {"nodes": nodes, "seed": seed, "epochs": epochs, "graph": knobs,
            "sage": fit(sage, lambda m: m(data.x, adj_t)),
            "mlp": fit(mlp, lambda m: m(data.x))}


def child_experts(nodes: int, seed: int, epochs: int, count: int, knobs: dict) -> dict:
    """``count`` SAGE experts from one shared init, trained with seeds 0..count-1 on Cluster-GCN
    batches (32 METIS parts, 4 per batch, as ``experts.batching = "partitions"``), and their
    uniform soup: do the experts differ enough for soups to differ?"""
    import torch

    from hpcsoup.data.datasets import Graph
    from hpcsoup.data.partition import partition
    from hpcsoup.data.synthetic import synthetic_products
    from hpcsoup.models.gnn import ModelSpec, build_model
    from hpcsoup.soup.base import Ingredients
    from hpcsoup.soup.evaluate import Evaluator
    from hpcsoup.train.loop import ClusterBatches, fit

    torch.set_num_threads(1)
    data, classes = synthetic_products(nodes, seed=seed, **knobs)
    graph = Graph(f"synthetic-products-{nodes}", data, classes, "accuracy")
    start = time.perf_counter()
    batches = ClusterBatches(data.edge_index, partition(graph, None, 32, seed=0), 4)
    metis = time.perf_counter() - start
    spec = ModelSpec("sage", data.x.size(1), classes, layers=2, hidden=64)
    init = build_model(spec, seed=0).state_dict()
    experts, states = [], []
    for i in range(count):
        model = build_model(spec, seed=0)
        model.load_state_dict(init)
        result = fit(model, graph, epochs=epochs, lr=0.01, seed=i, batches=batches)
        states.append(result.state_dict)
        experts.append({"val": round(result.metrics["val"], 4), "test": round(result.metrics["test"], 4),
                        "best_epoch": result.metrics["best_epoch"], "seconds": round(result.seconds, 1)})
    soup = Evaluator(spec, graph).metrics(Ingredients.from_state_dicts(spec, states).mean())
    tests = [e["test"] for e in experts]
    return {"nodes": nodes, "seed": seed, "epochs": epochs, "graph": knobs, "metis_seconds": round(metis, 1),
            "experts": experts, "test_spread": round(max(tests) - min(tests), 4),
            "uniform_soup": {"val": round(soup["val"], 4), "test": round(soup["test"], 4)}}


def run_child(args: list[str]) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"child {args} failed with exit code {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _knobs(parser: argparse.ArgumentParser, items: list[str]) -> dict:
    """``["homophily_slope=2.5", "classes=10"]`` -> ``{"homophily_slope": 2.5, "classes": 10}``;
    a malformed item or an unknown name is a usage error."""
    from hpcsoup.data.synthetic import synthetic_products

    allowed = set(inspect.signature(synthetic_products).parameters) - {"nodes", "seed"}
    knobs = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in allowed:
            parser.error(f"--graph {item!r}: {name!r} is not an argument of synthetic_products; "
                         f"use one of {', '.join(sorted(allowed))}")
        try:
            number = float(value)
        except ValueError:
            parser.error(f"--graph {item!r}: expected NAME=NUMBER, e.g. homophily_slope=2.5")
        knobs[name] = int(number) if value.strip().lstrip("-").isdigit() else number
    return knobs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[100_000, 1_000_000, 2_400_000])
    parser.add_argument("--metis-max", type=int, default=1_000_000,
                        help="run METIS (K=--metis-k) for sizes up to this (default: 1e6)")
    parser.add_argument("--metis-k", type=int, default=32)
    parser.add_argument("--learn", type=int, default=200_000, help="nodes for SAGE vs MLP; 0 = skip")
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--experts", type=int, default=0,
                        help="nodes for 4 Cluster-GCN SAGE experts and their uniform soup; 0 = skip")
    parser.add_argument("--expert-epochs", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--graph", action="append", default=[], metavar="NAME=VALUE",
                        help="a numeric keyword argument of synthetic_products, e.g. "
                             "homophily_slope=3 (repeatable; default: the generator's defaults)")
    parser.add_argument("--child", choices=("build", "learn", "experts"), help=argparse.SUPPRESS)
    parser.add_argument("--nodes", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    knobs = _knobs(parser, args.graph)
    passed = [flag for item in args.graph for flag in ("--graph", item)]

    if args.child == "build":
        print(json.dumps(child_build(args.nodes, args.seed, args.metis_k, knobs)))
        return
    if args.child == "learn":
        print(json.dumps(child_learn(args.nodes, args.seed, args.epochs, knobs)))
        return
    if args.child == "experts":
        print(json.dumps(child_experts(args.nodes, args.seed, args.expert_epochs, EXPERTS, knobs)))
        return

    rows = []
    for n in args.sizes:
        k = args.metis_k if n <= args.metis_max else 0
        rows.append(run_child(["--child", "build", "--nodes", str(n), "--seed", str(args.seed),
                               "--metis-k", str(k), *passed]))
        print(f"built {n:,} nodes: {rows[-1]['build_seconds']} s", file=sys.stderr, flush=True)
    print("| nodes | directed edges | build s | peak RSS GiB | homophily | mean degree | "
          "median / max degree | METIS K | METIS s | edge cut | peak RSS GiB w/ METIS |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        metis = (f"{r['metis_k']} | {r['metis_seconds']} | {r['metis_edge_cut']} | "
                 f"{r['peak_rss_gib_with_metis']}") if "metis_k" in r else "- | - | - | -"
        print(f"| {r['nodes']:,} | {r['edges']:,} | {r['build_seconds']} | {r['peak_rss_gib']} | "
              f"{r['homophily']} | {r['mean_degree']} | {r['median_degree']} / {r['max_degree']} | "
              f"{metis} |")
    learn = None
    if args.learn:
        learn = run_child(["--child", "learn", "--nodes", str(args.learn), "--seed", str(args.seed),
                           "--epochs", str(args.epochs), *passed])
        print(f"\nnodes {learn['nodes']:,}, {learn['epochs']} epochs, test accuracy at best val: "
              f"2-layer GraphSAGE {learn['sage']['test']} ({learn['sage']['seconds']} s), "
              f"MLP {learn['mlp']['test']} ({learn['mlp']['seconds']} s)")
    experts = None
    if args.experts:
        experts = run_child(["--child", "experts", "--nodes", str(args.experts), "--seed",
                             str(args.seed), "--expert-epochs", str(args.expert_epochs), *passed])
        print(f"\nnodes {experts['nodes']:,}, {EXPERTS} Cluster-GCN SAGE experts, "
              f"{experts['epochs']} epochs: test {[e['test'] for e in experts['experts']]} "
              f"(spread {experts['test_spread']}), uniform soup test {experts['uniform_soup']['test']}")
    OUT.mkdir(parents=True, exist_ok=True)
    result = {"benchmark": "synthetic", "torch_threads": 1, "python": platform.python_version(),
              "machine": f"{os.cpu_count()} cores, {platform.machine()}", "graph": knobs, "builds": rows,
              "learn": learn, "experts": experts}
    (OUT / "synthetic.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {OUT / 'synthetic.json'}", file=sys.stderr)


if __name__ == "__main__":
    if __package__ in (None, ""):
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()

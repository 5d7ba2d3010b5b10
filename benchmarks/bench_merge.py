"""H-GRAMA benchmark: heterogeneous specialists merged without training, against their ensemble.

For each case (dataset x split x depth x parent pair, plus a 3-parent merge) the parents are
specialists trained on disjoint halves (thirds) of the training nodes -- by METIS region, at random,
or by class -- and merged with H-GRAMA. Reported per case: each parent's score on its own region
and on all test nodes, the child's and the ensemble's, retention (child / parent on the parent's
region: mean and worst-served parent), and full-graph inference time of child vs. the like-for-like
ensemble (same kernels, same caches; medians of interleaved runs in one process, 1 thread) in
three regimes (uncached, cached graph operators, cached graph operators + attention).

Parts:
  main       the grid, with the default settings and the ablations (no alignment, no routing,
             no calibration) on every case;
  tradeoff   retention vs. speedup over the gate threshold (and alignment variants) on the
             depth-2 pairs;
  findings   the prototype's claims, checked: owner vs. confidence gate target, GAT vs. other
             reference, Procrustes vs. permutation, calibrating the output layer.

Usage:
  python benchmarks/bench_merge.py --train-only --datasets Cora         # parents only (cached)
  python benchmarks/bench_merge.py --datasets Cora CiteSeer --parts main tradeoff findings
  python benchmarks/bench_merge.py --report                            # tables + plot from JSON

Parents are cached under benchmarks/out/merge_parents/, results in benchmarks/out/merge_*.json,
the trade-off plot in benchmarks/merge_tradeoff.png. Threads: 1 (fixed).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch  # noqa: E402

warnings.filterwarnings("ignore")
torch.set_num_threads(1)

from hpcsoup.data import load_dataset  # noqa: E402
from hpcsoup.merge.hgrama import HGramaSettings, merge  # noqa: E402
from hpcsoup.merge.run import evaluate_merge  # noqa: E402
from hpcsoup.merge.umpm import from_pyg  # noqa: E402
from hpcsoup.models import ModelSpec, build_model  # noqa: E402
from hpcsoup.train import fit  # noqa: E402
from hpcsoup.train.regions import specialist_regions  # noqa: E402

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "out"
PARENTS = OUT / "merge_parents"
DATA = Path(os.environ.get("HPCSOUP_DATA", OUT / "data"))

PAIRS = [("gcn", "gat"), ("sage", "gat"), ("gcn", "sage"), ("gin", "gcn")]
TRIPLE = ("gcn", "sage", "gat")
BINARY = ("Minesweeper", "Tolokers")

#: per dataset: splits, depths, pairs, training epochs, eval_every -- trimmed where training on 2
#: shared cores is expensive (Tolokers: 1M directed edges, ~3-4 s per PyG training epoch)
GRID = {
    "Cora": dict(splits=("metis", "random", "class"), depths=(2, 3), pairs=PAIRS, epochs=60,
                 eval_every=2, lr=0.01, wd=5e-4),
    "CiteSeer": dict(splits=("metis", "random", "class"), depths=(2, 3), pairs=PAIRS, epochs=60,
                     eval_every=2, lr=0.01, wd=5e-4, depth3_splits=("metis", "random")),
    "Minesweeper": dict(splits=("metis", "random"), depths=(2, 3), pairs=PAIRS, epochs=40,
                        eval_every=5, lr=0.01, wd=0.0, depth3_splits=("metis",)),
    "Tolokers": dict(splits=("metis", "random"), depths=(2, 3), pairs=PAIRS, epochs=20,
                     eval_every=5, lr=0.01, wd=0.0, depth3_splits=("metis",)),
}
HIDDEN, HEADS = 64, 4  # widths multiples of 8 (ENVIRONMENT.md: 129 vs 128 columns ran 1.4x slower)


def say(*args):
    print(*args, file=sys.stderr, flush=True)


def parent(graph, regions, dataset, split, arch, region, k, depth):
    """A specialist (spec, state_dict), trained once and cached on disk."""
    g = GRID[dataset]
    path = PARENTS / f"{dataset}-{split}{k}-d{depth}-{arch}-r{region}.pt"
    # 3-layer GIN without normalisation diverged at lr 0.01 on Cora (val 0.12): BatchNorm in its
    # MLP (folded into UMPM at conversion) lets it train at the common lr (RESULTS.md, merge)
    norm = "batch" if arch == "gin" and depth >= 3 else "none"
    spec = ModelSpec(arch, graph.num_features, graph.num_classes, layers=depth, hidden=HIDDEN,
                     heads=HEADS if arch == "gat" else 1, norm=norm)
    if norm != "none":
        path = path.with_name(path.stem + f"-{norm}.pt")
    if path.exists():
        return spec, torch.load(path)
    start = time.perf_counter()
    model = build_model(spec, seed=100 + region)
    mask = graph.mask("train") & (regions == region)
    result = fit(model, graph, train_mask=mask, epochs=g["epochs"], lr=g["lr"],
                 weight_decay=g["wd"], seed=100 + region, eval_every=g["eval_every"])
    PARENTS.mkdir(parents=True, exist_ok=True)
    torch.save(result.state_dict, path)
    say(f"  trained {path.name}: val {result.metrics['val']:.3f} in {time.perf_counter() - start:.0f} s")
    return spec, result.state_dict


def cases(dataset: str):
    g = GRID[dataset]
    for split in g["splits"]:
        if split == "class" and dataset in BINARY:
            continue  # each parent would see a single class; its region's ROC-AUC is undefined
        for depth in g["depths"]:
            if depth == 3 and split not in g.get("depth3_splits", g["splits"]):
                continue
            for pair in g["pairs"]:
                yield split, depth, pair
        yield split, 2, TRIPLE


def setup_case(graph, dataset, split, depth, archs):
    k = len(archs)
    regions = specialist_regions(graph, split, k, seed=0)
    specs = [parent(graph, regions, dataset, split, a, r, k, depth) for r, a in enumerate(archs)]
    nets = [from_pyg(s, st, f"{a}-r{r}") for r, (a, (s, st)) in enumerate(zip(archs, specs))]
    trained_on = torch.where(graph.mask("train"), regions, torch.full_like(regions, -1))
    masks = [regions == r for r in range(k)]
    return nets, trained_on, masks


def run_merge_case(graph, nets, trained_on, masks, settings, repeats, timing=True):
    data = graph.data
    start = time.perf_counter()
    child = merge(nets, data.x, data.edge_index, trained_on=trained_on, settings=settings,
                  undirected=True)
    seconds = time.perf_counter() - start
    m = evaluate_merge(child, nets, graph, masks, [n.name for n in nets], repeats=repeats,
                       timing=timing)
    m["merge_seconds"] = seconds
    m["gate"] = child.info.get("gate")
    return m


def summary(m: dict) -> dict:
    out = {"test": m["test"], "retention": m["retention"], "retention_mean": m["retention_mean"],
           "retention_min": m["retention_min"], "parents_per_node": m["routing"]["parents_per_node"]}
    if "timing" in m:
        out["speedup"] = m["timing"]["speedup"]
        out["ms"] = {side: {r: v * 1e3 for r, v in m["timing"][side].items()}
                     for side in ("child", "ensemble")}
    return out


def part_main(graph, dataset, repeats):
    rows = []
    for split, depth, archs in cases(dataset):
        nets, trained_on, masks = setup_case(graph, dataset, split, depth, archs)
        m = run_merge_case(graph, nets, trained_on, masks, HGramaSettings(), repeats)
        row = {"dataset": dataset, "split": split, "depth": depth, "parents": list(archs),
               "metric": m["metric"], "child": summary(m), "parents_scores": m["parents"],
               "ensemble": {k: m["ensemble"][k] for k in ("test", "retention", "retention_mean",
                                                          "retention_min")},
               "merge_seconds": m["merge_seconds"], "gate": m["gate"], "ablations": {}}
        for name, settings in (("no_alignment", HGramaSettings(alignment="none")),
                               ("no_routing", HGramaSettings(routing="uniform", threshold=0.0)),
                               ("no_calibration", HGramaSettings(calibration=False))):
            a = run_merge_case(graph, nets, trained_on, masks, settings, repeats, timing=False)
            row["ablations"][name] = summary(a)
        rows.append(row)
        c = row["child"]
        say(f"{dataset:11s} {split:6s} d{depth} {'+'.join(archs):13s} ret {c['retention_mean']:.3f} "
            f"(worst {c['retention_min']:.3f}; ens {row['ensemble']['retention_mean']:.3f}) "
            f"speedup {c['speedup']['cached']:.2f}x (uncached {c['speedup']['uncached']:.2f}x, "
            f"att {c['speedup']['cached_attention']:.2f}x) | -align "
            f"{row['ablations']['no_alignment']['retention_mean']:.3f} -route "
            f"{row['ablations']['no_routing']['retention_mean']:.3f} -calib "
            f"{row['ablations']['no_calibration']['retention_mean']:.3f}")
    return rows


TRADEOFF = [("threshold=0", HGramaSettings(threshold=0.0)),
            ("threshold=0.2", HGramaSettings(threshold=0.2)),
            ("threshold=0.35", HGramaSettings(threshold=0.35)),
            ("threshold=0.5 (default)", HGramaSettings()),
            ("threshold=0.5 permutation", HGramaSettings(alignment="permutation"))]


def part_tradeoff(graph, dataset, repeats):
    rows = []
    for split, depth, archs in cases(dataset):
        if depth != 2:
            continue
        nets, trained_on, masks = setup_case(graph, dataset, split, depth, archs)
        for name, settings in TRADEOFF:
            m = run_merge_case(graph, nets, trained_on, masks, settings, repeats)
            rows.append({"dataset": dataset, "split": split, "depth": depth, "parents": list(archs),
                         "setting": name, "child": summary(m)})
            say(f"{dataset:11s} {split:6s} {'+'.join(archs):13s} {name:26s} ret "
                f"{m['retention_mean']:.3f} worst {m['retention_min']:.3f} speedup "
                f"{m['speedup_vs_ensemble']:.2f}x")
    return rows


FINDINGS = [("default", HGramaSettings()),
            ("route_target=confidence", HGramaSettings(route_target="confidence", anchors=2000)),
            ("reference=0 (GCN, not GAT)", HGramaSettings(reference=0)),
            ("reference=1 (SAGE, not GAT)", HGramaSettings(reference=1)),
            ("calibrate_output", HGramaSettings(calibrate_output=True)),
            ("gate_standardize", HGramaSettings(gate_standardize=True)),
            ("readout=logits", HGramaSettings(readout="logits"))]


def part_findings(graph, dataset, repeats):
    rows = []
    for split, depth, archs in cases(dataset):
        if depth != 2 or archs not in (("gcn", "gat"), TRIPLE):
            continue
        nets, trained_on, masks = setup_case(graph, dataset, split, depth, archs)
        for name, settings in FINDINGS:
            if name.startswith("reference=1") and archs != TRIPLE:
                continue  # two parents: Procrustes is symmetric, the reference cannot matter
            m = run_merge_case(graph, nets, trained_on, masks, settings, repeats, timing=False)
            rows.append({"dataset": dataset, "split": split, "depth": depth, "parents": list(archs),
                         "setting": name, "child": summary(m)})
            say(f"{dataset:11s} {split:6s} {'+'.join(archs):9s} {name:24s} ret "
                f"{m['retention_mean']:.3f} worst {m['retention_min']:.3f}")
    return rows


# --------------------------------------------------------------------------------- report
def _median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def report() -> str:
    lines = []
    main = [r for f in sorted(OUT.glob("merge_main_*.json")) for r in json.loads(f.read_text())]
    if main:
        lines.append("| dataset | split | d | parents | parent own (each) | parent all-test (each) "
                     "| child test | ens test | retention mean / worst | ens retention mean / worst "
                     "| speedup cached / uncached / +att | -align | -route | -calib |")
        lines.append("|" + "---|" * 14)
        for r in main:
            c, e, a = r["child"], r["ensemble"], r["ablations"]
            own = " / ".join(f"{p['own']:.3f}" for p in r["parents_scores"].values())
            allt = " / ".join(f"{p['test']:.3f}" for p in r["parents_scores"].values())
            s = c["speedup"]
            lines.append(
                f"| {r['dataset']} | {r['split']} | {r['depth']} | {'+'.join(r['parents'])} | {own} "
                f"| {allt} | {c['test']:.3f} | {e['test']:.3f} | {c['retention_mean']:.3f} / "
                f"{c['retention_min']:.3f} | {e['retention_mean']:.3f} / {e['retention_min']:.3f} | "
                f"{s['cached']:.2f} / {s['uncached']:.2f} / {s['cached_attention']:.2f} | "
                f"{a['no_alignment']['retention_mean']:.3f} | {a['no_routing']['retention_mean']:.3f} "
                f"| {a['no_calibration']['retention_mean']:.3f} |")
        lines.append("")
        lines.append("Summary (means over cases; speedups: medians):")
        lines.append("")
        lines.append("| group | cases | retention mean | worst-served (mean / min) | ens retention "
                     "| speedup cached (median / min) | uncached | +attention | -align | -route "
                     "| -calib |")
        lines.append("|" + "---|" * 11)
        groups = [("metis+random, 2 parents", lambda r: r["split"] != "class" and len(r["parents"]) == 2),
                  ("class, 2 parents", lambda r: r["split"] == "class" and len(r["parents"]) == 2),
                  ("3 parents (all splits)", lambda r: len(r["parents"]) == 3)]
        for split in ("metis", "random", "class"):
            groups.append((f"{split}, 2 parents",
                           lambda r, s=split: r["split"] == s and len(r["parents"]) == 2))
        for name, pred in groups:
            rs = [r for r in main if pred(r)]
            if not rs:
                continue
            mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
            sp = [r["child"]["speedup"]["cached"] for r in rs]
            lines.append(
                f"| {name} | {len(rs)} | {mean([r['child']['retention_mean'] for r in rs]):.3f} | "
                f"{mean([r['child']['retention_min'] for r in rs]):.3f} / "
                f"{min(r['child']['retention_min'] for r in rs):.3f} | "
                f"{mean([r['ensemble']['retention_mean'] for r in rs]):.3f} | "
                f"{_median(sp):.2f} / {min(sp):.2f} | "
                f"{_median([r['child']['speedup']['uncached'] for r in rs]):.2f} | "
                f"{_median([r['child']['speedup']['cached_attention'] for r in rs]):.2f} | "
                f"{mean([r['ablations']['no_alignment']['retention_mean'] for r in rs]):.3f} | "
                f"{mean([r['ablations']['no_routing']['retention_mean'] for r in rs]):.3f} | "
                f"{mean([r['ablations']['no_calibration']['retention_mean'] for r in rs]):.3f} |")
        for name, pred in (("GAT pairs", lambda r: "gat" in r["parents"] and len(r["parents"]) == 2),
                           ("pairs without GAT", lambda r: "gat" not in r["parents"])):
            rs = [r for r in main if pred(r)]
            if rs:
                d = [r["child"]["retention_mean"] - r["ablations"]["no_alignment"]["retention_mean"]
                     for r in rs]
                lines.append(f"\nAlignment gain ({name}): mean {sum(d) / len(d):+.3f} retention "
                             f"over {len(rs)} cases, max {max(d):+.3f}")
    trade = [r for f in sorted(OUT.glob("merge_tradeoff_*.json")) for r in json.loads(f.read_text())]
    if trade:
        lines.append("")
        lines.append("Trade-off over the settings (depth-2 cases; retention means over cases, "
                     "speedup medians, cached regime):")
        lines.append("")
        lines.append("| setting | split | cases | retention mean | worst-served min | speedup median "
                     "| parents per node |")
        lines.append("|---|---|---|---|---|---|---|")
        for name, _ in TRADEOFF:
            for split in ("metis", "random", "class"):
                rs = [r for r in trade if r["setting"] == name and r["split"] == split]
                if not rs:
                    continue
                lines.append(
                    f"| {name} | {split} | {len(rs)} | "
                    f"{sum(r['child']['retention_mean'] for r in rs) / len(rs):.3f} | "
                    f"{min(r['child']['retention_min'] for r in rs):.3f} | "
                    f"{_median([r['child']['speedup']['cached'] for r in rs]):.2f} | "
                    f"{sum(r['child']['parents_per_node'] for r in rs) / len(rs):.2f} |")
        plot(trade)
    finds = [r for f in sorted(OUT.glob("merge_findings_*.json")) for r in json.loads(f.read_text())]
    if finds:
        lines.append("")
        lines.append("Prototype findings checked (depth 2; retention mean / worst):")
        lines.append("")
        names = [n for n, _ in FINDINGS]
        lines.append("| dataset | split | parents | " + " | ".join(names) + " |")
        lines.append("|---|---|---|" + "---|" * len(names))
        keys = sorted({(r["dataset"], r["split"], "+".join(r["parents"])) for r in finds})
        for ds, split, ps in keys:
            cells = []
            for n in names:
                r = next((r for r in finds if (r["dataset"], r["split"], "+".join(r["parents"]),
                                               r["setting"]) == (ds, split, ps, n)), None)
                cells.append("-" if r is None else
                             f"{r['child']['retention_mean']:.3f} / {r['child']['retention_min']:.3f}")
            lines.append(f"| {ds} | {split} | {ps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(trade):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    markers = {"metis": "o", "random": "s", "class": "^"}
    for split, marker in markers.items():
        xs, ys, labels = [], [], []
        for name, _ in TRADEOFF[:4]:
            rs = [r for r in trade if r["setting"] == name and r["split"] == split]
            if not rs:
                continue
            xs.append(_median([r["child"]["speedup"]["cached"] for r in rs]))
            ys.append(sum(r["child"]["retention_mean"] for r in rs) / len(rs))
            labels.append(name.split()[0].replace("threshold=", "t="))
        if xs:
            ax.plot(xs, ys, marker=marker, label=f"{split} halves")
            for x, y, lab in zip(xs, ys, labels):
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("speedup vs. like-for-like ensemble (median, cached graph operators)")
    ax.set_ylabel("mean retention (child / parent on its region)")
    ax.set_title("H-GRAMA: retention vs. speed over the gate threshold")
    ax.legend()
    fig.tight_layout()
    fig.savefig(ROOT / "merge_tradeoff.png", dpi=120)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=list(GRID))
    parser.add_argument("--parts", nargs="+", default=["main", "tradeoff", "findings"])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--train-only", action="store_true")
    parser.add_argument("--report", action="store_true")
    args = parser.parse_args(argv)
    if args.report:
        print(report())
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        graph = load_dataset(dataset, DATA)
        graph.data.x = graph.data.x.contiguous()
        start = time.perf_counter()
        if args.train_only:
            for split, depth, archs in cases(dataset):
                setup_case(graph, dataset, split, depth, archs)
            say(f"{dataset}: parents ready in {time.perf_counter() - start:.0f} s")
            continue
        for part in args.parts:
            fn = {"main": part_main, "tradeoff": part_tradeoff, "findings": part_findings}[part]
            rows = fn(graph, dataset, args.repeats if part == "main" else max(5, args.repeats // 2))
            (OUT / f"merge_{part}_{dataset}.json").write_text(json.dumps(rows, indent=1))
            say(f"{dataset} {part}: {len(rows)} rows in {time.perf_counter() - start:.0f} s")
    print(report())


if __name__ == "__main__":
    main()

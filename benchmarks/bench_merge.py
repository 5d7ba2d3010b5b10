"""H-GRAMA benchmark: heterogeneous specialists merged without training, against their ensemble.

For each case (dataset x split x depth x parent pair, plus a 3-parent merge) the parents are
specialists trained on disjoint halves (thirds) of the training nodes -- by METIS region, at random,
or by class -- and merged with H-GRAMA. Reported per case: the child's test score next to the
ensemble's (the model it replaces) and the old default's (the owner gate on every split), each
parent's score, retention (child / parent on the parent's region), the routing used, and
full-graph inference time of child vs. the like-for-like ensemble (same kernels, same caches;
medians of interleaved runs in one process, 1 thread) in three regimes (uncached, cached graph
operators, cached graph operators + attention).

Parts:
  main       the grid, with the default settings and the ablations (no alignment, no routing,
             no calibration, the owner target) on every case;
  tradeoff   child - ensemble vs. speedup over the gate's sparsity (threshold, budget) on the
             depth-2 cases (other depths with --depths);
  findings   gate targets (owner, confidence), calibrating the output, readout, with merge times.

Usage:
  python benchmarks/bench_merge.py --train-only --datasets Cora         # parents only (cached)
  python benchmarks/bench_merge.py --datasets Cora CiteSeer --parts main tradeoff findings
  python benchmarks/bench_merge.py --datasets CiteSeer --splits metis --depths 2   # a subset
  python benchmarks/bench_merge.py --report                            # tables + plot from JSON

Parents are cached under benchmarks/out/merge_parents/, results in benchmarks/out/merge_*.json
(a subset run: merge_<part>_<dataset>_<splits>_d<depths>.json; --report reads them all),
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
HIDDEN, HEADS = 64, 4  # widths multiples of 8 (measured here: 129 vs 128 columns ran 1.4x slower)


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


def cases(dataset: str, keep=None):
    """``(split, depth, parents)`` of the grid; ``keep(split, depth)`` picks a subset."""
    for split, depth, archs in _grid_cases(dataset):
        if keep is None or keep(split, depth):
            yield split, depth, archs


def _grid_cases(dataset: str):
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


ABLATIONS = [("no_alignment", HGramaSettings(alignment="none")),
             ("no_routing", HGramaSettings(routing="uniform", threshold=0.0)),
             ("no_calibration", HGramaSettings(calibration=False)),
             # the default before route_target="auto": the owner gate on every split
             ("owner_target", HGramaSettings(route_target="owner"))]


def part_main(graph, dataset, repeats, keep, ablations=None):
    rows = []
    for split, depth, archs in cases(dataset, keep):
        nets, trained_on, masks = setup_case(graph, dataset, split, depth, archs)
        m = run_merge_case(graph, nets, trained_on, masks, HGramaSettings(), repeats)
        row = {"dataset": dataset, "split": split, "depth": depth, "parents": list(archs),
               "metric": m["metric"], "child": summary(m), "parents_scores": m["parents"],
               "ensemble": {k: m["ensemble"][k] for k in ("test", "retention", "retention_mean",
                                                          "retention_min")},
               "merge_seconds": m["merge_seconds"], "gate": m["gate"], "ablations": {}}
        for name, settings in ABLATIONS:
            if ablations is not None and name not in ablations:
                continue
            a = run_merge_case(graph, nets, trained_on, masks, settings, repeats, timing=False)
            row["ablations"][name] = summary(a)
        rows.append(row)
        c, ab = row["child"], row["ablations"]
        gap = lambda t: 100 * (t - row["ensemble"]["test"])  # noqa: E731
        owner = ab.get("owner_target", {"test": float("nan")})["test"]
        say(f"{dataset:11s} {split:6s} d{depth} {'+'.join(archs):13s} test {c['test']:.3f} vs "
            f"ens {row['ensemble']['test']:.3f} ({gap(c['test']):+.1f} pt; owner target "
            f"{gap(owner):+.1f}) ret {c['retention_mean']:.3f} speedup "
            f"{c['speedup']['cached']:.2f}x (uncached {c['speedup']['uncached']:.2f}x, "
            f"att {c['speedup']['cached_attention']:.2f}x)")
    return rows


TRADEOFF = [("threshold=0", HGramaSettings(threshold=0.0)),
            ("threshold=0.3 budget=0.35", HGramaSettings(threshold=0.3, budget=0.35)),
            ("threshold=0.3 budget=0.2", HGramaSettings(threshold=0.3, budget=0.2)),
            ("threshold=0.5 (default)", HGramaSettings())]


def part_tradeoff(graph, dataset, repeats, keep):
    rows = []
    for split, depth, archs in cases(dataset, keep):
        nets, trained_on, masks = setup_case(graph, dataset, split, depth, archs)
        for name, settings in TRADEOFF:
            m = run_merge_case(graph, nets, trained_on, masks, settings, repeats)
            rows.append({"dataset": dataset, "split": split, "depth": depth, "parents": list(archs),
                         "setting": name, "child": summary(m)})
            rows[-1]["ensemble_test"] = m["ensemble"]["test"]
            say(f"{dataset:11s} {split:6s} d{depth} {'+'.join(archs):13s} {name:26s} test "
                f"{m['test']:.3f} (ens {m['ensemble']['test']:.3f}) speedup "
                f"{m['speedup_vs_ensemble']:.2f}x")
    return rows


FINDINGS = [("default", HGramaSettings()),
            ("route_target=owner", HGramaSettings(route_target="owner")),
            ("route_target=confidence", HGramaSettings(route_target="confidence")),
            ("calibrate_output", HGramaSettings(calibrate_output=True)),
            ("readout=logits", HGramaSettings(readout="logits"))]


def part_findings(graph, dataset, repeats, keep):
    rows = []
    for split, depth, archs in cases(dataset, keep):
        if depth != 2 or archs not in (("gcn", "gat"), TRIPLE):
            continue
        nets, trained_on, masks = setup_case(graph, dataset, split, depth, archs)
        for name, settings in FINDINGS:
            if name.startswith("reference=1") and archs != TRIPLE:
                continue  # two parents: Procrustes is symmetric, the reference cannot matter
            m = run_merge_case(graph, nets, trained_on, masks, settings, repeats, timing=False)
            rows.append({"dataset": dataset, "split": split, "depth": depth, "parents": list(archs),
                         "setting": name, "child": summary(m), "ensemble_test": m["ensemble"]["test"],
                         "merge_seconds": m["merge_seconds"]})
            say(f"{dataset:11s} {split:6s} {'+'.join(archs):9s} {name:24s} test "
                f"{m['test']:.3f} (ens {m['ensemble']['test']:.3f}) in {m['merge_seconds']:.1f} s")
    return rows


# --------------------------------------------------------------------------------- report
def _median(values):
    values = [v for v in values if v == v]
    return statistics.median(values) if values else float("nan")


def _gap(test: float, ensemble: float) -> float:
    """Child minus ensemble, in points (percent of the metric)."""
    return 100.0 * (test - ensemble)


class _Missing(dict):
    """Ablations of a row; one that was not run (``--ablations``) reads as NaN, printed "nan"."""

    def __missing__(self, key):
        return {"test": float("nan"), "retention_mean": float("nan")}


def _rows(part: str) -> list[dict]:
    return [r for f in sorted(OUT.glob(f"merge_{part}_*.json")) for r in json.loads(f.read_text())]


def report() -> str:
    lines = []
    main = _rows("main")
    if main:
        lines.append("| dataset | split | d | parents | parent all-test (each) | child test | ens test "
                     "| child - ens (pt) | owner target - ens (pt) | gate | parents/node "
                     "| speedup cached / uncached / +att | retention mean / worst | -align | -route "
                     "| -calib |")
        lines.append("|" + "---|" * 16)
        for r in main:
            c, e, a = r["child"], r["ensemble"], _Missing(r["ablations"])
            allt = " / ".join(f"{p['test']:.3f}" for p in r["parents_scores"].values())
            sp = c["speedup"]
            used = (r.get("gate") or {}).get("used", "-")
            lines.append(
                f"| {r['dataset']} | {r['split']} | {r['depth']} | {'+'.join(r['parents'])} | {allt} "
                f"| {c['test']:.3f} | {e['test']:.3f} | {_gap(c['test'], e['test']):+.1f} | "
                f"{_gap(a['owner_target']['test'], e['test']):+.1f} | {used} | "
                f"{c['parents_per_node']:.2f} | {sp['cached']:.2f} / {sp['uncached']:.2f} / "
                f"{sp['cached_attention']:.2f} | {c['retention_mean']:.3f} / {c['retention_min']:.3f} "
                f"| {a['no_alignment']['retention_mean']:.3f} | {a['no_routing']['retention_mean']:.3f}"
                f" | {a['no_calibration']['retention_mean']:.3f} |")
        lines.append("")
        lines.append("Summary per split type (child - ensemble test in points; speedups: medians "
                     "and minimum over cases):")
        lines.append("")
        lines.append("| group | cases | child - ens median / min | owner target (old default) "
                     "median / min | speedup cached 2 parents | cached 3 parents | uncached median "
                     "/ min | retention mean |")
        lines.append("|" + "---|" * 8)
        groups = [(split, lambda r, s=split: r["split"] == s) for split in ("metis", "random", "class")]
        # by what the default decided: a gate that routes, or every parent on every node
        for used in ("owner", "mixture"):
            groups.append((f"gate: {used}", lambda r, u=used: (r.get("gate") or {}).get("used") == u))
        groups.append(("all", lambda r: True))
        for name, pred in groups:
            rs = [r for r in main if pred(r)]
            if not rs:
                continue
            gaps = [_gap(r["child"]["test"], r["ensemble"]["test"]) for r in rs]
            old = [_gap(_Missing(r["ablations"])["owner_target"]["test"], r["ensemble"]["test"])
                   for r in rs]
            old = [v for v in old if v == v] or [float("nan")]
            two = [r["child"]["speedup"]["cached"] for r in rs if len(r["parents"]) == 2]
            three = [r["child"]["speedup"]["cached"] for r in rs if len(r["parents"]) == 3]
            unc = [r["child"]["speedup"]["uncached"] for r in rs]
            speed = lambda xs: f"{_median(xs):.2f} / {min(xs):.2f}" if xs else "-"  # noqa: E731
            lines.append(
                f"| {name} | {len(rs)} | {_median(gaps):+.1f} / {min(gaps):+.1f} | "
                f"{_median(old):+.1f} / {min(old):+.1f} | {speed(two)} | {speed(three)} | "
                f"{speed(unc)} | {sum(r['child']['retention_mean'] for r in rs) / len(rs):.3f} |")
        lines += _losses(main)
    trade = _rows("tradeoff")
    if trade:
        lines.append("")
        lines.append("Trade-off over the gate's sparsity (child - ensemble test in points, median / "
                     "min; speedups: medians, cached and uncached):")
        lines.append("")
        lines.append("| setting | dataset | split | cases | child - ens median / min | speedup cached "
                     "| uncached | parents per node |")
        lines.append("|---|---|---|---|---|---|---|---|")
        datasets = sorted({r["dataset"] for r in trade})
        for name, _ in TRADEOFF:
            for dataset, split in ((d, s) for d in datasets for s in ("metis", "random", "class")):
                rs = [r for r in trade if (r["setting"], r["dataset"], r["split"]) == (name, dataset, split)]
                if not rs:
                    continue
                gaps = [_gap(r["child"]["test"], r["ensemble_test"]) for r in rs]
                lines.append(
                    f"| {name} | {dataset} | {split} | {len(rs)} | {_median(gaps):+.1f} / {min(gaps):+.1f} | "
                    f"{_median([r['child']['speedup']['cached'] for r in rs]):.2f} | "
                    f"{_median([r['child']['speedup']['uncached'] for r in rs]):.2f} | "
                    f"{sum(r['child']['parents_per_node'] for r in rs) / len(rs):.2f} |")
        plot(trade)
    finds = _rows("findings")
    if finds:
        lines.append("")
        lines.append("Settings checked (depth 2; child - ensemble test in points, merge seconds):")
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
                             f"{_gap(r['child']['test'], r['ensemble_test']):+.1f} "
                             f"({r['merge_seconds']:.1f} s)")
            lines.append(f"| {ds} | {split} | {ps} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _losses(main: list[dict], below: float = -1.0) -> list[str]:
    """Per parent region, the cases where the child is more than ``-below`` points under the
    ensemble: the parent, the child and the ensemble on the region's test nodes."""
    rows = [r for r in main if _gap(r["child"]["test"], r["ensemble"]["test"]) < below]
    if not rows:
        return []
    lines = ["", f"Where the child is more than {-below:.0f} point(s) below the ensemble, per parent "
             "region (test nodes of the region; the region's parent, the child, the ensemble):", "",
             "| dataset | split | d | parents | region of | parent | child | ensemble | child - ens (pt) |",
             "|" + "---|" * 9]
    for r in rows:
        for name, p in r["parents_scores"].items():
            lines.append(f"| {r['dataset']} | {r['split']} | {r['depth']} | {'+'.join(r['parents'])} "
                         f"| {name} | {p['own']:.3f} | {p['child_own']:.3f} | {p['ensemble_own']:.3f} "
                         f"| {_gap(p['child_own'], p['ensemble_own']):+.1f} |")
    return lines


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
            ys.append(_median([_gap(r["child"]["test"], r["ensemble_test"]) for r in rs]))
            labels.append(name.replace("threshold=", "t=").replace(" (default)", "").replace("budget=", "b="))
        if xs:
            ax.plot(xs, ys, marker=marker, label=f"{split} halves")
            for x, y, lab in zip(xs, ys, labels):
                ax.annotate(lab, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("speedup vs. like-for-like ensemble (median, cached graph operators)")
    ax.set_ylabel("child - ensemble test (points, median)")
    ax.set_title("H-GRAMA: accuracy against the ensemble vs. speed")
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
    parser.add_argument("--splits", nargs="+", default=None, help="a subset of the grid's splits")
    parser.add_argument("--depths", nargs="+", type=int, default=None, help="a subset of depths")
    parser.add_argument("--ablations", nargs="+", default=None, choices=[n for n, _ in ABLATIONS],
                        help="main part: only these ablations (default: all; each is one more "
                             "merge per case, minutes per case on Tolokers)")
    args = parser.parse_args(argv)

    # a subset run writes its own files (merge_main_Cora_d2.json), so subsets add up
    subset = "".join(["_" + "-".join(args.splits) if args.splits else "",
                      "_d" + "".join(map(str, args.depths)) if args.depths else ""])

    def keep(split, depth):
        return ((args.splits is None or split in args.splits)
                and (args.depths is None or depth in args.depths))

    if args.report:
        print(report())
        return
    OUT.mkdir(parents=True, exist_ok=True)
    for dataset in args.datasets:
        graph = load_dataset(dataset, DATA)
        graph.data.x = graph.data.x.contiguous()
        start = time.perf_counter()
        if args.train_only:
            for split, depth, archs in cases(dataset, keep):
                setup_case(graph, dataset, split, depth, archs)
            say(f"{dataset}: parents ready in {time.perf_counter() - start:.0f} s")
            continue
        for part in args.parts:
            if part == "main":
                rows = part_main(graph, dataset, args.repeats, keep, args.ablations)
            else:
                fn = {"tradeoff": part_tradeoff, "findings": part_findings}[part]
                # depth 2 unless --depths asks for others (the trade-off of Tolokers' depth-3 cases)
                keep_part = keep if args.depths else (lambda s, d: keep(s, d) and d == 2)
                rows = fn(graph, dataset, max(5, args.repeats // 2), keep_part)
            (OUT / f"merge_{part}_{dataset}{subset}.json").write_text(json.dumps(rows, indent=1))
            say(f"{dataset} {part}: {len(rows)} rows in {time.perf_counter() - start:.0f} s")
    print(report())


if __name__ == "__main__":
    main()

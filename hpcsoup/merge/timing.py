"""Full-graph inference time of a merged child against its ensemble, measured fairly.

The 2 cores of a shared machine make absolute times noisy, so the child and the
ensemble run **interleaved** in one process, each regime once per round, and the reported numbers
are medians over rounds; speedups are medians of the per-round ratios (a child run and the
ensemble run next to it share whatever load the machine has then). Three regimes:

- ``uncached``: every forward builds the graph operators (CSR, degrees), the child's routing and
  all attention from scratch, on both sides;
- ``cached`` (the headline ``speedup_vs_ensemble``): the graph operators are built once for both;
  the child also keeps its routing (rows, supports, sub-operators, support rows of the input),
  which a fixed graph with fixed features determines; attention is recomputed on both sides;
- ``cached_attention``: as ``cached``, and GAT attention computed once on the fixed graph, on
  both sides.
"""
from __future__ import annotations

import statistics
import time

import torch

from hpcsoup.merge.child import MergedGNN
from hpcsoup.merge.ensemble import Ensemble
from hpcsoup.merge.umpm import GraphOps, as_features

REGIMES = ("uncached", "cached", "cached_attention")


def time_child_vs_ensemble(child: MergedGNN, ensemble: Ensemble, x: torch.Tensor,
                           edge_index: torch.Tensor, repeats: int = 15, undirected: bool = True,
                           warmup: int = 2, threads: int = 1, ops: GraphOps | None = None,
                           routing=None) -> dict:
    """Median seconds and speedups (ensemble / child) in the three regimes.

    Returns ``{"child": {regime: s}, "ensemble": {regime: s}, "speedup": {regime: ratio},
    "repeats": n, "threads": torch threads}``. The torch thread count is fixed to ``threads``
    (default 1) while timing and restored afterwards. The cached regimes share one set of graph
    operators (``ops``, built here unless given) and one routing (``routing``, likewise), child
    and ensemble alike: four sets of their own did not fit in 24 GiB at 2.45M nodes.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _time(child, ensemble, as_features(x), edge_index, repeats, undirected, warmup,
                     ops or GraphOps(edge_index, x.size(0), undirected=undirected), routing)
    finally:
        torch.set_num_threads(previous)


def _time(child, ensemble, x, edge_index, repeats, undirected, warmup, ops, routing) -> dict:
    child_cache = child.make_cache(x, edge_index, undirected, attention=False, ops=ops,
                                   routing=routing)
    ens_cache = ensemble.make_cache(x, edge_index, undirected, attention=False, ops=ops)
    child_att = child.make_cache(x, edge_index, undirected, attention=True, ops=ops,
                                 routing=child_cache.routing)
    ens_att = ensemble.make_cache(x, edge_index, undirected, attention=True, ops=ops)
    runs = {
        ("child", "uncached"): lambda: child(x, edge_index, undirected=undirected),
        ("ensemble", "uncached"): lambda: ensemble(x, edge_index, undirected=undirected),
        ("child", "cached"): lambda: child(x, cache=child_cache),
        ("ensemble", "cached"): lambda: ensemble(x, cache=ens_cache),
        ("child", "cached_attention"): lambda: child(x, cache=child_att),
        ("ensemble", "cached_attention"): lambda: ensemble(x, cache=ens_att),
    }
    times = {key: [] for key in runs}
    keys = list(runs)
    for round_ in range(warmup + max(1, repeats)):
        # alternate who goes first within each regime's pair, so neither side always runs warm
        swapped = [k for i in range(0, len(keys), 2) for k in (keys[i + 1], keys[i])]
        order = keys if round_ % 2 == 0 else swapped
        for key in order:
            run = runs[key]
            start = time.perf_counter()
            run()
            if x.is_cuda:  # kernels run asynchronously: time them, not their launch
                torch.cuda.synchronize(x.device)
            if round_ >= warmup:
                times[key].append(time.perf_counter() - start)
    med = {key: statistics.median(v) for key, v in times.items()}
    # the speedup is the median of per-round ratios: a child run and its ensemble run are
    # adjacent in time, so a burst of load from other processes hits both
    ratio = {r: statistics.median(e / c for e, c in zip(times[("ensemble", r)],
                                                        times[("child", r)])) for r in REGIMES}
    return {
        "child": {r: med[("child", r)] for r in REGIMES},
        "ensemble": {r: med[("ensemble", r)] for r in REGIMES},
        "speedup": ratio,
        "repeats": max(1, repeats), "threads": torch.get_num_threads(),
    }

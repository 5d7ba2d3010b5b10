"""Full-graph inference time of a merged child against its ensemble, measured fairly.

The 2 cores of a shared machine make absolute times noisy, so the child and the
ensemble run **interleaved** in one process, one regime at a time, and the reported numbers
are medians over rounds; speedups are medians of the per-round ratios (a child run and the
ensemble run next to it share whatever load the machine has then). Three regimes:

- ``uncached``: every forward builds the graph operators (CSR, degrees), the child's routing and
  all attention from scratch, on both sides;
- ``cached`` (the headline ``speedup_vs_ensemble``): the graph operators are built once for both;
  the child also keeps its routing (rows, supports, sub-operators, support rows of the input),
  which a fixed graph with fixed features determines; attention is recomputed on both sides;
- ``cached_attention``: as ``cached``, and GAT attention computed once on the fixed graph, on
  both sides.

Memory: the regimes run one after another and each frees what it cached before the next builds
its own, so the timing holds at most one routing and one set of attention maps besides the graph
(all three regimes' caches at once, plus the uncached runs' operators, did not fit in 24 GiB at
2.45M nodes). The two cached regimes share one set of graph operators and one routing.
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
    operators (``ops``, built after the uncached regime unless given) and one routing
    (``routing``, likewise), child and ensemble alike.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _time(child, ensemble, as_features(x), edge_index, repeats, undirected, warmup,
                     ops, routing)
    finally:
        torch.set_num_threads(previous)


def _time(child, ensemble, x, edge_index, repeats, undirected, warmup, ops, routing) -> dict:
    rounds = max(1, repeats)
    times = {}
    # uncached first: nothing is cached yet, so its runs build their operators next to the graph only
    times["uncached"] = _rounds(lambda: child(x, edge_index, undirected=undirected),
                                lambda: ensemble(x, edge_index, undirected=undirected),
                                x, warmup, rounds)
    ops = ops or GraphOps(edge_index, x.size(0), undirected=undirected)
    times["cached"], routing = _cached_rounds(child, ensemble, x, edge_index, undirected, ops,
                                              routing, False, warmup, rounds)
    # the same routing (with its support rows of the input) serves the attention regime
    times["cached_attention"], _ = _cached_rounds(child, ensemble, x, edge_index, undirected, ops,
                                                  routing, True, warmup, rounds)
    # the speedup is the median of per-round ratios: a child run and its ensemble run are
    # adjacent in time, so a burst of load from other processes hits both
    return {
        "child": {r: statistics.median(times[r][0]) for r in REGIMES},
        "ensemble": {r: statistics.median(times[r][1]) for r in REGIMES},
        "speedup": {r: statistics.median(e / c for c, e in zip(*times[r])) for r in REGIMES},
        "repeats": rounds, "threads": torch.get_num_threads(),
    }


def _cached_rounds(child, ensemble, x, edge_index, undirected, ops, routing, attention: bool,
                   warmup: int, rounds: int):
    """One cached regime: both sides' caches built (``attention``: GAT attention too), timed,
    and freed on return; returns ``(seconds, the child's routing)``."""
    child_cache = child.make_cache(x, edge_index, undirected, attention=attention, ops=ops,
                                   routing=routing)
    ens_cache = ensemble.make_cache(x, edge_index, undirected, attention=attention, ops=ops)
    seconds = _rounds(lambda: child(x, cache=child_cache), lambda: ensemble(x, cache=ens_cache),
                      x, warmup, rounds)
    return seconds, child_cache.routing


def _rounds(run_child, run_ensemble, x, warmup: int, rounds: int) -> tuple[list, list]:
    """Seconds of ``rounds`` interleaved (child, ensemble) pairs after ``warmup`` unmeasured
    ones; who goes first alternates, so neither side always runs warm. Each result is dropped
    before the next run starts."""
    child_s, ensemble_s = [], []
    for round_ in range(warmup + rounds):
        pair = [(run_child, child_s), (run_ensemble, ensemble_s)]
        for run, seconds in (pair if round_ % 2 == 0 else pair[::-1]):
            start = time.perf_counter()
            run()
            if x.is_cuda:  # kernels run asynchronously: time them, not their launch
                torch.cuda.synchronize(x.device)
            if round_ >= warmup:
                seconds.append(time.perf_counter() - start)
    return child_s, ensemble_s

"""The merge stage's evaluation in bounded memory: one model at a time, the timing one regime at a
time -- and the same scores, to the bit, as scoring every model at once on the full graph."""
from __future__ import annotations

import math

import pytest
import torch

from hpcsoup.merge.child import ChildCache
from hpcsoup.merge.ensemble import Ensemble
from hpcsoup.merge.hgrama import HGramaSettings, merge
from hpcsoup.merge.run import evaluate_merge
from hpcsoup.merge.timing import REGIMES, time_child_vs_ensemble
from hpcsoup.merge.umpm import GraphOps, as_features, from_pyg

from merge_support import trained_on


def _all_at_once(child, parents, graph, regions, names) -> dict:
    """The evaluation as it was before it was bounded: child, ensemble and members' outputs held
    together from one set of operators, every score read from them."""
    x = as_features(graph.data.x)
    ops = GraphOps(graph.data.edge_index, x.size(0), undirected=True)
    routing = child.route(x, ops)
    out = child(x, cache=ChildCache(ops, routing))
    ens_out, member_out = Ensemble(parents)(x, cache={"ops": ops}, members=True)
    test = graph.mask("test")
    got = {"val": graph.score(out, "val"), "test": graph.score(out, "test"),
           "ensemble_test": graph.score(ens_out, "test"), "parents": {},
           "parents_per_node": float((routing.gate > 0).sum(1).float().mean())}
    for name, region, logits in zip(names, regions, member_out):
        own = test & region
        got["parents"][name] = {"own": graph.score(logits, own), "test": graph.score(logits, "test"),
                                "child_own": graph.score(out, own),
                                "ensemble_own": graph.score(ens_out, own),
                                "test_nodes": int(own.sum())}
    return got


@pytest.mark.parametrize("archs, settings", [
    (("gcn", "gat"), HGramaSettings(route_target="owner")),        # one parent per node
    (("gcn", "sage"), HGramaSettings(route_target="owner", threshold=0.0)),  # soft gate
    (("gcn", "sage", "gat"), HGramaSettings(route_target="confidence")),  # 3 parents
])
def test_bounded_evaluation_gives_the_all_at_once_scores(cora, cora_regions, specialists,
                                                         archs, settings):
    by_arch = {a: v for (a, _), v in specialists.items()}
    parents = [from_pyg(*by_arch[a], a) for a in archs]
    data = cora.data
    # the fixtures' halves: each parent's region is the half it was trained on (region = index % 2)
    regions = [cora_regions == next(r for (a, r) in specialists if a == arch) for arch in archs]
    child = merge(parents, data.x, data.edge_index, trained_on=trained_on(cora, cora_regions),
                  settings=settings, undirected=True)
    names = list(archs)
    expected = _all_at_once(child, parents, cora, regions, names)
    got = evaluate_merge(child, parents, cora, regions, names, timing=False)
    assert got["val"] == expected["val"] and got["test"] == expected["test"]
    assert got["ensemble"]["test"] == got["ensemble_test"] == expected["ensemble_test"]
    assert got["parents"] == expected["parents"]
    assert got["routing"]["parents_per_node"] == expected["parents_per_node"]
    for name, p in expected["parents"].items():
        assert got["retention"][name] == p["child_own"] / p["own"]
        assert got["ensemble"]["retention"][name] == p["ensemble_own"] / p["own"]
    # the scores are real: the child keeps most of its parents' accuracy on their regions
    assert got["retention_mean"] > 0.8 and got["test"] > 0.6
    # the child's stand-alone forward (no caches) scores the same
    assert abs(cora.score(child(data.x, data.edge_index), "test") - got["test"]) < 1e-6


def test_timing_one_regime_at_a_time_reports_every_regime(cora, cora_regions, specialists):
    by_arch = {a: v for (a, _), v in specialists.items()}
    parents = [from_pyg(*by_arch[a], a) for a in ("gcn", "gat")]
    data = cora.data
    child = merge(parents, data.x, data.edge_index, trained_on=trained_on(cora, cora_regions),
                  undirected=True)
    t = time_child_vs_ensemble(child, Ensemble(parents), data.x, data.edge_index, repeats=3,
                               warmup=1)
    assert t["repeats"] == 3 and t["threads"] == 1
    for side in ("child", "ensemble", "speedup"):
        assert set(t[side]) == set(REGIMES)
        assert all(math.isfinite(v) and v > 0 for v in t[side].values()), (side, t[side])
    # a cached forward skips the operators' construction: never slower than the uncached one
    # by more than the machine's noise
    assert t["child"]["cached"] < 2 * t["child"]["uncached"]
    assert torch.get_num_threads() == 1  # restored

"""Stage 5b: ``hpcsoup merge`` -- H-GRAMA over specialists read from the store.

``run_merge(cfg, parents=None)`` reads the parents (default: the config's specialists
``<arch>-s<k>`` for ``specialists.archs``, as ``hpcsoup train`` names them; or ``merge.parents``;
or the ids given), merges them (:func:`~hpcsoup.merge.hgrama.merge`), evaluates child, parents and
ensemble, times child against ensemble and writes ``merges/<merge_id>``:

- params: the child's tensors (:meth:`~hpcsoup.merge.child.MergedGNN.tensors`);
- attrs: ``method="hgrama"``, ``parents``, ``settings``, ``structure`` (what
  :func:`load_merged` needs), ``metrics`` {``metric``, ``val``, ``test``, ``retention``
  {parent: child / parent on the parent's region}, ``retention_mean``, ``retention_min`` (the
  worst-served parent), ``speedup_vs_ensemble`` (cached graph operators; also
  ``speedup_uncached``, ``speedup_cached_attention``), ``ensemble_test``, ``ensemble`` {...},
  ``parents`` {...}, ``routing`` {...},
  ``timing`` {...}}, ``seconds``, ``versions``.

Retention is measured on the test nodes of each parent's region (the region array stored with the
specialists). The merge itself reads no labels: only features, edges, the train mask and the
regions (which parent was trained on which node).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from typing import Callable

import torch

from hpcsoup.data import Graph, load_from_config
from hpcsoup.errors import MergeError, StoreError
from hpcsoup.memory import PeakMemory
from hpcsoup.merge.child import ChildCache, MergedGNN
from hpcsoup.merge.ensemble import Ensemble
from hpcsoup.merge.hgrama import HGramaSettings, merge
from hpcsoup.merge.timing import time_child_vs_ensemble
from hpcsoup.merge.umpm import GraphOps, UMPMNet, as_features, from_pyg
from hpcsoup.models import ModelSpec
from hpcsoup.progress import Progress, duration, significant
from hpcsoup.train.loop import check_device
from hpcsoup.train.sweep import require_experts
from hpcsoup.store import Store, provenance

log = logging.getLogger(__name__)
#: the phases of ``run_merge``, as its progress shows them
PHASES = ("load parents and graph", "merge", "evaluate and time", "write")


def default_parents(cfg) -> list[str]:
    """``merge.parents`` if set, else the config's specialists as ``hpcsoup train`` names them."""
    if list(cfg.merge.parents):
        return [str(p) for p in cfg.merge.parents]
    return [f"{arch}-s{k}" for k, arch in enumerate(cfg.specialists.archs)]


def load_parents(store: Store, ids: list[str]) -> tuple[list[UMPMNet], list[dict], list]:
    """``(UMPM parents, their attrs, their region arrays or None)`` from ``experts/<id>``."""
    known = [g.id for g in store.groups("experts")]
    missing = [i for i in ids if i not in known]
    if missing:
        raise MergeError(f"parents {missing} are not complete experts in store '{store.path}' "
                         f"(it has {known or 'none'}); train them first with "
                         f"`hpcsoup train --config <file> --all`, or pass --parents ID,ID")
    nets, attrs, regions = [], [], []
    for gid in ids:
        state_dict, a = store.load_group("experts", gid)
        spec = ModelSpec.from_dict(a["model"])
        nets.append(from_pyg(spec, state_dict, gid))
        attrs.append(a)
        try:
            regions.append(store.read_array("experts", gid, "region").long())
        except (StoreError, KeyError, FileNotFoundError):
            regions.append(None)
    return nets, attrs, regions


def trained_on(graph: Graph, attrs: list[dict], regions: list) -> torch.Tensor | None:
    """Which parent was trained on each node (``-1``: none), from the stored regions."""
    n = graph.num_nodes
    out = torch.full((n,), -1, dtype=torch.long)
    train = graph.mask("train")
    for k, (a, region) in enumerate(zip(attrs, regions)):
        nodes = a.get("train_nodes") or {}
        if region is None or nodes.get("region") is None:
            return None
        if region.numel() != n:
            raise MergeError(f"parent {k}: stored region has {region.numel()} nodes, the graph "
                             f"'{graph.name}' has {n}; merge parents trained on this dataset")
        out[train & (region == int(nodes["region"]))] = k
    return out


def parent_regions(graph: Graph, attrs: list[dict], regions: list) -> list[torch.Tensor]:
    """Per parent, its region's nodes (all nodes for a parent without a region)."""
    out = []
    for a, region in zip(attrs, regions):
        nodes = a.get("train_nodes") or {}
        if region is None or nodes.get("region") is None:
            out.append(torch.ones(graph.num_nodes, dtype=torch.bool))
        else:
            out.append(region == int(nodes["region"]))
    return out


def on_device(model, device: torch.device):
    """A copy of a child or of a UMPM parent with its tensors on ``device`` (itself on a CPU)."""
    if device.type == "cpu":
        return model
    if isinstance(model, MergedGNN):
        moved = MergedGNN.from_parts(model.structure(),
                                     {k: v.to(device) for k, v in model.tensors().items()})
        moved.info = model.info
        return moved
    layers = [layer.replace(**{k: v.to(device) for k, v in layer.tensors().items()})
              for layer in model.layers]
    return UMPMNet(layers, model.arch, model.name)


def evaluate_merge(child: MergedGNN, parents: list[UMPMNet], graph: Graph,
                   regions: list[torch.Tensor], names: list[str], *, repeats: int = 15,
                   timing: bool = True, device: str | torch.device = "cpu",
                   timing_graph: Callable[[], tuple] | None = None) -> dict:
    """Scores of child, parents and ensemble; retention per parent; timing of child vs ensemble.

    ``regions[k]`` is a boolean node mask of parent ``k``'s region; retention is measured on its
    test nodes: ``score(child) / score(parent k)``. Child, parents and graph run on ``device``
    (the merge itself, a one-time fit, ran on the CPU); tensors the kernels make without a
    device go there too (``torch.device`` as the default device).

    Memory is bounded by one model's inference, not all of them: the child runs and is scored,
    and its outputs and routing are freed before the ensemble runs (its parents in one lock-step
    pass, as always); then the timing, one regime at a time (:mod:`~hpcsoup.merge.timing`). The
    scores are those of the same full-graph passes, so they are exactly what scoring every model
    at once gave. ``timing_graph()``: ``(x, edge_index, info)`` of the graph to time on (default:
    the whole graph), made after the scores, when the scoring passes' memory is free.
    """
    device = torch.device(device)
    with device:
        return _evaluate(on_device(child, device), [on_device(p, device) for p in parents],
                         graph, regions, names, repeats, timing, device, timing_graph)


def _scores(graph: Graph, logits: torch.Tensor, masks: dict) -> dict:
    """``{name: graph.score(logits, mask)}``: what is kept of a model's outputs once they are freed."""
    return {name: graph.score(logits, mask) for name, mask in masks.items()}


def _evaluate(child, parents, graph, regions, names, repeats, timing, device,
              timing_graph=None) -> dict:
    data = graph.data
    x = as_features(data.x.to(device))
    edge_index = data.edge_index.to(device)
    test = graph.mask("test")
    masks = {"val": "val", "test": "test"}
    masks.update({("own", k): test & region for k, region in enumerate(regions)})
    ops = GraphOps(edge_index, x.size(0), undirected=True)  # one set of graph operators

    # the child alone; then its outputs and routing go (its routing is rebuilt for the timing:
    # held through the ensemble's pass, its sub-operators cost ~24 bytes per edge)
    routing = child.route(x, ops)
    sparse = routing.gate
    routing_stats = {"parents_per_node": float((sparse > 0).sum(1).float().mean()),
                     "share": {n: float((sparse[:, k] > 0).float().mean())
                               for k, n in enumerate(names)}}
    del sparse
    out = child(x, cache=ChildCache(ops, routing))
    child_scores = _scores(graph, out, masks)
    del out, routing

    # the ensemble: its mean and its members from one lock-step pass, scored, then freed
    ensemble = Ensemble(parents)
    ens_out, member_out = ensemble(x, cache={"ops": ops}, members=True)
    ens_scores = _scores(graph, ens_out, masks)
    member_scores = [_scores(graph, logits, {"test": "test", "own": masks[("own", k)]})
                     for k, logits in enumerate(member_out)]
    del ens_out, member_out, ops

    metrics = {"metric": graph.metric, "val": child_scores["val"], "test": child_scores["test"],
               "retention": {}, "parents": {},
               "ensemble": {"test": ens_scores["test"], "retention": {}}}
    for k, name in enumerate(names):
        parent_own = member_scores[k]["own"]
        child_own, ens_own = child_scores[("own", k)], ens_scores[("own", k)]
        metrics["parents"][name] = {"own": parent_own, "test": member_scores[k]["test"],
                                    "child_own": child_own, "ensemble_own": ens_own,
                                    "test_nodes": int(masks[("own", k)].sum())}
        metrics["retention"][name] = child_own / parent_own if parent_own else float("nan")
        metrics["ensemble"]["retention"][name] = ens_own / parent_own if parent_own else float("nan")
    metrics["ensemble_test"] = metrics["ensemble"]["test"]  # flat, for `hpcsoup report`
    for target in (metrics, metrics["ensemble"]):
        values = list(target["retention"].values())
        target["retention_mean"] = sum(values) / len(values)
        target["retention_min"] = min(values)
    metrics["routing"] = routing_stats
    if timing:
        if timing_graph is None:
            info = {"nodes": x.size(0), "edges": int(edge_index.size(1)), "sample": "whole graph"}
        else:
            del x, edge_index
            x, edge_index, info = timing_graph()
            x, edge_index = as_features(x.to(device)), edge_index.to(device)
        t = time_child_vs_ensemble(child, ensemble, x, edge_index, repeats=repeats)
        t["graph"] = info
        metrics["timing"] = t
        metrics["speedup_vs_ensemble"] = t["speedup"]["cached"]
        metrics["speedup_uncached"] = t["speedup"]["uncached"]
        metrics["speedup_cached_attention"] = t["speedup"]["cached_attention"]
    return metrics


def timing_sample(cfg, graph: Graph, limit: int) -> Callable[[], tuple] | None:
    """What :func:`evaluate_merge` times child and ensemble on: the whole graph (``None``) up to
    ``limit`` nodes (``merge.timing_nodes``; 0: no limit), else the subgraph induced by whole
    METIS partitions (the graph's stored partition, :func:`~hpcsoup.data.partition.partition_for`,
    as training and PLS read it), taken in order until ``limit`` nodes.

    Why: the cached timing holds the child's routing and both sides' operators for what it
    times (1M nodes: 6.2 GiB above the graph; at 2.45M it did not fit in 24 GiB). The speedup is
    a ratio of per-node and per-edge work, which whole partitions keep (their edges inside
    them; a random node sample would thin every neighbourhood).
    """
    if not limit or graph.num_nodes <= limit:
        return None

    def sample() -> tuple:
        from torch_geometric.utils import subgraph

        from hpcsoup.data.partition import part_nodes, partition_for

        k = max(2, int(cfg.experts.batch_partitions))
        parts = part_nodes(partition_for(cfg, k, seed=0, graph=graph), k)
        sizes = torch.tensor([p.numel() for p in parts]).cumsum(0)
        take = max(1, int((sizes <= limit).sum()))
        nodes = torch.cat(parts[:take]).sort().values
        data = graph.data
        edge_index, _ = subgraph(nodes, data.edge_index, relabel_nodes=True,
                                 num_nodes=graph.num_nodes)
        info = {"nodes": int(nodes.numel()), "edges": int(edge_index.size(1)),
                "sample": f"{take} of {k} METIS partitions (merge.timing_nodes = {limit})"}
        log.info("merge: timing child vs ensemble on %s: %d nodes, %d edges", info["sample"],
                 info["nodes"], info["edges"])
        return data.x.index_select(0, nodes), edge_index, info

    return sample


def merge_id(ids: list[str], settings: HGramaSettings) -> str:
    """``hgrama-<parent+parent>-<8 hex of the settings>``: one group per parents x settings."""
    digest = hashlib.sha1(json.dumps(settings.to_dict(), sort_keys=True).encode()).hexdigest()[:8]
    return f"hgrama-{'+'.join(ids)}-{digest}"


def run_merge(cfg, parents: list[str] | None = None, allow_partial: bool = False) -> dict:
    """Merge the parents of a config with H-GRAMA, evaluate, time and store the child.

    A parent that is not complete is an error naming it, unless ``allow_partial`` (then the
    complete ones, at least 2, are merged; :func:`hpcsoup.train.sweep.require_experts`).
    """
    check_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    ids = list(parents) if parents else default_parents(cfg)
    if len(ids) < 2:
        raise MergeError(f"hpcsoup merge needs at least 2 parents, got {ids}; list "
                         f"specialists.archs in the config or pass --parents ID,ID")
    store = Store.open(cfg.store)
    if allow_partial:  # without it, load_parents names any parent that is not complete
        ids = require_experts(store, ids, "merge", allow_partial=True, at_least=2)
    progress = Progress("merge", total=len(PHASES), unit="phases")
    with progress:
        return _run_merge(cfg, ids, store, progress, start)


def _run_merge(cfg, ids: list[str], store: Store, progress: Progress, start: float) -> dict:
    progress.set(0, PHASES[0])
    nets, attrs, stored_regions = load_parents(store, ids)
    graph = load_from_config(cfg)
    datasets = {a.get("dataset") for a in attrs}
    if datasets != {graph.name}:
        raise MergeError(f"parents {ids} were trained on {sorted(map(str, datasets))}, the config's "
                         f"dataset is '{graph.name}'; set data.dataset to theirs")
    settings = HGramaSettings.from_config(cfg.merge)
    owners = trained_on(graph, attrs, stored_regions)
    if owners is None and settings.routing == "ridge" and settings.route_target == "owner":
        raise MergeError(f"parents {ids} have no stored regions (they are not specialists), so "
                         f"'which parent was trained on the node' is unknown; use specialists or "
                         f"--set merge.route_target=\"confidence\"")
    log.info("merge: %s on %s (alignment %s, routing %s, calibration %s, threshold %s, %d thread(s))",
             " + ".join(ids), graph.name, settings.alignment, settings.routing, settings.calibration,
             settings.threshold, torch.get_num_threads())
    progress.set(1, PHASES[1])
    data = graph.data
    child = merge(nets, data.x, data.edge_index, trained_on=owners, settings=settings,
                  undirected=True)
    merge_seconds = child.info["merge_seconds"]
    regions = parent_regions(graph, attrs, stored_regions)
    progress.set(2, PHASES[2])
    with PeakMemory(device=cfg.device) as memory:
        metrics = evaluate_merge(child, nets, graph, regions, ids, repeats=cfg.merge.repeats,
                                 device=cfg.device,
                                 timing_graph=timing_sample(cfg, graph, cfg.merge.timing_nodes))
    metrics["memory"] = {"device": cfg.device, "peak_rss_bytes": memory.peak,
                         "peak_gpu_bytes": memory.gpu_peak}
    gid = merge_id(ids, settings)
    attrs_out = {
        "method": "hgrama", "parents": ids, "dataset": graph.name, "settings": settings.to_dict(),
        "structure": child.structure(), "reference": ids[child.info["reference"]],
        "metrics": metrics, "seconds": {"merge": merge_seconds,
                                        "total": time.perf_counter() - start},
        "config": cfg.to_dict(), "versions": provenance(),
    }
    progress.set(3, PHASES[3])
    store.write_group("merges", gid, child.tensors(), attrs_out, overwrite=True)
    progress.set(4, f"H-GRAMA itself {duration(merge_seconds)}")
    log.info("merge: %s test %.3f (ensemble %.3f); retention mean %.3f, worst %.3f; %sx faster "
             "than the ensemble (uncached %sx) -> merges/%s", graph.metric, metrics["test"],
             metrics["ensemble"]["test"], metrics["retention_mean"], metrics["retention_min"],
             significant(metrics["speedup_vs_ensemble"]), significant(metrics["speedup_uncached"]), gid)
    return {"merge_id": gid, "store": str(store.path), "parents": ids, "metrics": metrics,
            "seconds": attrs_out["seconds"]}


def load_merged(store: Store | str, merge_id: str) -> MergedGNN:
    """A stored child, ready to run alone: ``load_merged(store, id)(x, edge_index)``."""
    store = store if isinstance(store, Store) else Store.open(store)
    tensors, attrs = store.load_group("merges", merge_id)
    if attrs.get("method") != "hgrama" or "structure" not in attrs:
        raise MergeError(f"merges/{merge_id} in '{store.path}' is not an H-GRAMA child "
                         f"(method={attrs.get('method')!r}); pick an id from `hpcsoup store ls`")
    child = MergedGNN.from_parts(attrs["structure"], tensors)
    child.info = {"parents": attrs.get("parents"), "settings": attrs.get("settings")}
    return child

"""``hpcsoup soup``: read a store's experts, soup them with each method, write ``soups/``.

:func:`run_soup` is what the CLI calls; its pieces (:func:`load_ingredients`,
:func:`method_settings`, :func:`soup_attrs`, :func:`write_soup`) are reusable by
the distributed runner.
"""
from __future__ import annotations

import hashlib
import json
import logging
import time

import torch

from hpcsoup.errors import SoupError
from hpcsoup.memory import PeakMemory
from hpcsoup.soup.base import MERGE_HINT, Ingredients, SoupResult
from hpcsoup.soup.evaluate import Evaluator
from hpcsoup.soup.registry import get_method, method_class

log = logging.getLogger("hpcsoup.soup")


def soup_arch(cfg) -> str:
    return cfg.soup.arch or cfg.experts.arch


def graph_partition(cfg, graph):
    """The METIS partition PLS uses (``soup.pls.partitions``, ``soup.pls.partition_seed``),
    computed once per graph and stored (:func:`hpcsoup.data.partition.partition_for`):
    training's Cluster-GCN batches, the node reordering and PLS share it."""
    from hpcsoup.data.partition import partition_for

    pls = cfg.soup.pls
    return partition_for(cfg, min(pls.partitions, graph.num_nodes), seed=pls.partition_seed,
                         graph=graph)


def graph_order(cfg, graph):
    """The node order the shared evaluator stores the graph in (``soup.reorder``)."""
    from hpcsoup.soup.evaluate import locality_order

    return locality_order(graph_partition(cfg, graph)) if cfg.soup.reorder else None


def method_settings(cfg, name: str) -> dict:
    """The settings of method ``name``: the config's ``[soup.<name>]`` section (declared by
    the method itself, so every key is one of its settings; ``ranks`` is the runner's)."""
    cls = method_class(name)
    section = cfg.soup[name].to_dict() if cls.parameters else {}
    return {k: v for k, v in section.items() if k in cls.parameters}


def method_inputs(cfg, name: str, graph, evaluator) -> dict:
    """Keyword arguments a method's ``soup`` takes besides the experts and the evaluator."""
    if name != "pls":
        return {}
    from hpcsoup.soup.pls import LocalPartitionSource, resolve_scope

    pls = cfg.soup.pls
    fields = resolve_scope(pls.scope, evaluator) == "field"
    return {"source": LocalPartitionSource(graph, pls.partitions, pls.halo, cache=pls.cache,
                                           parts=graph_partition(cfg, graph),
                                           evaluator=evaluator if fields else None)}


def expert_infos(cfg, store, graph=None) -> list:
    """Complete experts (role ``expert``) of the config's soup architecture and dataset."""
    arch = soup_arch(cfg)
    infos = [g for g in store.groups("experts", role="expert")]
    if not infos:
        raise SoupError(f"store '{store.path}' has no complete experts (role 'expert'); "
                        f"train them first with `hpcsoup train --config <file> --all`")
    names = {cfg.data.dataset} | ({graph.name} if graph is not None else set())
    same_data = [g for g in infos if g.attrs.get("dataset") in names or "dataset" not in g.attrs]
    if not same_data:
        found = sorted({str(g.attrs.get("dataset")) for g in infos})
        raise SoupError(f"store '{store.path}' has experts for datasets {found}, none for "
                        f"'{cfg.data.dataset}'; set data.dataset to one of those")
    chosen = [g for g in same_data if g.attrs.get("arch") == arch]
    if not chosen:
        found = sorted({str(g.attrs.get("arch")) for g in same_data})
        raise SoupError(f"store '{store.path}' has no complete '{arch}' experts (it has "
                        f"{found}); set soup.arch to one of those")
    return chosen


def load_ingredients(cfg, store, graph=None) -> Ingredients:
    """The experts to soup, stacked (:class:`SoupError` if their shapes differ)."""
    return Ingredients.from_store(store, expert_infos(cfg, store, graph))


def soup_id(arch: str, method: str, ingredients: Ingredients, settings: dict, seed: int,
            graph: str = "", ranks: int = 1) -> str:
    """Deterministic id: the same experts, settings, seed, graph and rank count give the same
    soup id (so runs of a scaling study over graphs and ranks never overwrite each other)."""
    key = json.dumps({"ids": ingredients.ids, "settings": settings, "seed": seed, "graph": graph,
                      "ranks": ranks}, sort_keys=True, default=str)
    suffix = f"-r{ranks}" if ranks > 1 else ""
    return f"{arch}-{method}{suffix}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def soup_attrs(cfg, graph, ingredients: Ingredients, result: SoupResult, metrics: dict,
               settings: dict, seconds: float, memory: PeakMemory, ranks: int = 1) -> dict:
    """The attrs of a ``soups/<id>`` group (the store contract: :mod:`hpcsoup.store.zarr_store`)."""
    from hpcsoup.store import provenance

    extras = {k: v for k, v in result.extras.items() if k != "logits"}
    return {
        "method": result.method, "arch": ingredients.spec.arch, "model": ingredients.spec.to_dict(),
        "dataset": graph.name, "ingredients": list(ingredients.ids),
        "coefficients": result.coefficients, "metrics": metrics, "seconds": seconds,
        "peak_rss_bytes": memory.peak, "rss_above_start_bytes": memory.above_start,
        "peak_gpu_bytes": memory.gpu_peak, "ranks": ranks, "settings": settings,
        "seed": cfg.soup.seed, "extras": extras,
        "device": cfg.device, "versions": provenance(), "config": cfg.to_dict(),
    }


def write_soup(store, group_id: str, result: SoupResult, attrs: dict) -> None:
    state = {k: v.detach().cpu().contiguous() for k, v in result.state_dict.items()}
    arrays = {}
    if "logits" in result.extras:
        arrays["logits"] = torch.tensor(result.extras["logits"], dtype=torch.float32)
    store.write_group("soups", group_id, state, attrs, arrays=arrays, overwrite=True)


def run_soup(cfg, methods: list[str] | None = None, allow_partial: bool = False) -> dict:
    """Soup the complete experts of ``cfg``'s store with each method in this process; write
    ``soups/``. (On MPI ranks, :func:`hpcsoup.distributed.pls.run_soup_distributed` runs
    PLS over graph shards; the CLI picks it under ``mpiexec`` / ``srun``.)

    Args:
        cfg: a validated config (:func:`hpcsoup.config.load_config`).
        methods: method names (default: ``cfg.soup.methods``).
        allow_partial: soup the complete experts even when the config's sweep has more
            (default: refuse, naming the missing ones; :func:`hpcsoup.train.sweep.require_experts`).

    Returns:
        ``{"store", "dataset", "arch", "ingredients", "best_expert", "soups": [...]}``,
        each soup with ``id, method, metrics, seconds, peak_rss_bytes, extras``; the
        metrics are the full-graph scores of the soup's stored weights.
    """
    from hpcsoup.data import load_from_config
    from hpcsoup.store import Store
    from hpcsoup.train.loop import check_device
    from hpcsoup.train.sweep import soup_experts_ready

    check_device(cfg.device)
    soup_experts_ready(cfg, allow_partial)
    methods = list(methods or cfg.soup.methods)
    for name in methods:
        method_class(name)  # unknown names fail before any work
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    store = Store.open(cfg.store)
    graph = load_from_config(cfg)
    ingredients = load_ingredients(cfg, store, graph)
    if ingredients.spec.in_channels != graph.num_features or \
            ingredients.spec.out_channels != graph.num_classes:
        raise SoupError(f"experts of model {ingredients.spec.to_dict()} do not fit dataset "
                        f"'{graph.name}' ({graph.num_features} features, {graph.num_classes} "
                        f"classes); {MERGE_HINT}")
    device = torch.device(cfg.device)
    ingredients = ingredients.to(device)
    evaluator = Evaluator(ingredients.spec, graph, device, order=graph_order(cfg, graph))
    log.info("%d %s experts on %s (%s): %s", ingredients.n, ingredients.spec.arch, graph.name,
             graph.metric, ", ".join(ingredients.ids))
    experts = [store.group_attrs("experts", i).get("metrics", {}) for i in ingredients.ids]
    best = max(range(ingredients.n), key=lambda i: experts[i].get("val", float("-inf")))
    summary = {"store": str(cfg.store), "dataset": graph.name, "arch": ingredients.spec.arch,
               "metric": graph.metric, "ingredients": ingredients.ids,
               "best_expert": {"id": ingredients.ids[best], **experts[best]}, "soups": []}
    for name in methods:
        settings = method_settings(cfg, name)
        method = get_method(name, **settings)
        log.debug("%s: %s", name, settings)
        with PeakMemory(device=device) as memory:
            start = time.perf_counter()
            result = method.soup(ingredients, evaluator, seed=cfg.soup.seed,
                                 **method_inputs(cfg, name, graph, evaluator))
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = time.perf_counter() - start
        metrics = evaluator.metrics(result.state_dict)
        gid = soup_id(ingredients.spec.arch, name, ingredients, settings, cfg.soup.seed, graph.name)
        attrs = soup_attrs(cfg, graph, ingredients, result, metrics, settings, seconds, memory)
        write_soup(store, gid, result, attrs)
        log.info("%s: val %.4f test %.4f in %.2f s -> soups/%s", name, metrics["val"],
                 metrics["test"], seconds, gid)
        summary["soups"].append({"id": gid, "method": name, "metrics": metrics,
                                 "seconds": seconds, "peak_rss_bytes": memory.peak,
                                 "rss_above_start_bytes": memory.above_start,
                                 "peak_gpu_bytes": memory.gpu_peak, "extras": attrs["extras"]})
    return summary

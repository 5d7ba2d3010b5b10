"""Partition learned souping on MPI ranks, each holding a shard of the graph.

Zuber, Sarkar, Jennings, Jannesari, "Enhanced Soups for Graph Neural Networks",
arXiv 2503.11612 (2025), Partition Learned Souping, distributed as in DESIGN.md
("Distributed PLS"). PLS's step objective (:mod:`hpcsoup.soup.pls`) is a sum of
per-partition terms with a global normaliser,

.. math::
    \\nabla_R L_t = \\sum_{r=0}^{P-1} \\; \\sum_{k \\in D_t,\\ \\mathrm{owner}(k) = r}
        \\nabla_R \\frac{1}{Z_t} \\sum_{v \\in V_k \\cap V_{val}}
        \\mathrm{CE}\\big(f(X_{S_k}, A_{S_k}; W(R))_v, y_v\\big),
    \\qquad Z_t = \\sum_{k \\in D_t} |V_k \\cap V_{val}|,

so rank :math:`r` computes the inner sum over the drawn partitions it holds
(:math:`D_t` depends on the seed alone, :math:`Z_t` on partition metadata every
rank has) and one ``Allreduce`` of the ``[tensors, experts]`` gradient (plus the
loss: ``4 (T n + 1)`` bytes, whatever the graph) gives every rank the same
:math:`\\nabla_R L_t`; every rank applies the same optimizer update. The answer
depends on the number of ranks only through the summation order of floats.

- The graph is partitioned once into the store (:mod:`hpcsoup.dist.shards`); a rank
  reads only its partitions (``p mod P == rank``).
- The stopping check and the soup's final scores are gathered partition by
  partition from the shards (exact when ``halo >= layers``).
- Rank 0 alone writes the soup (same id, attrs and arrays as the single-process run).
- Threads: ``threads`` from the config, else the node's CPUs divided among its ranks
  (ranks x threads <= cores). Device: ``cuda`` means ``cuda:<local rank>`` (SLURM's
  ``SLURM_LOCALID`` via :class:`hpcsoup.slurm.SlurmEnv`, else the rank on the node).
- Failures: a step that can fail alike everywhere (missing expert, missing partition)
  raises the same error on every rank (:func:`hpcsoup.dist.mpi.agree`); anything else
  on one rank aborts the whole job (:func:`hpcsoup.dist.mpi.abort_on_error`).
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import time
from pathlib import Path
from typing import Callable

import torch

from hpcsoup.dist.mpi import Comm, abort_on_error, agree
from hpcsoup.dist.shards import Shard, graph_key, is_prepared, load_shard, prepare, shard_path
from hpcsoup.errors import SoupError
from hpcsoup.soup.pls import PartitionSource, partition_score

log = logging.getLogger("hpcsoup.dist")


# ----------------------------------------------------------------------------- placement


def threads_per_rank(comm: Comm, requested: int = 0) -> int:
    """Torch threads for this rank: ``requested`` if > 0, else the node's CPUs shared out
    among the node's ranks (at least 1), so that ranks x threads <= cores."""
    if requested > 0:
        return int(requested)
    cpus, ranks = comm.node_cpus()
    return max(1, cpus // max(1, ranks))


def rank_device(device: str, comm: Comm) -> torch.device:
    """The device this rank computes on.

    ``cpu`` -> cpu; ``cuda:N`` -> that GPU; ``cuda`` -> ``cuda:<local rank mod visible GPUs>``
    where the local rank is ``SLURM_LOCALID`` inside a SLURM step (read by
    :class:`hpcsoup.slurm.SlurmEnv`), else this rank's place among the ranks on its node.
    With ``--gpus-per-task=1`` SLURM shows each task one GPU, which is then ``cuda:0``.
    """
    if device == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SoupError(f"device {device!r} was asked for but torch sees no CUDA GPU on this node "
                        f"(torch {torch.__version__}); use --set device=\"cpu\" or a CUDA build of "
                        f"torch on a GPU node")
    if device != "cuda":
        return torch.device(device)
    local = None
    try:
        from hpcsoup.slurm import SlurmEnv
        local = SlurmEnv.from_env().localid
    except ImportError:
        pass
    if local is None:
        local = comm.node_ranks()[0]
    return torch.device(f"cuda:{local % torch.cuda.device_count()}")


# ----------------------------------------------------------------------------- the graph


def graph_name(cfg) -> str:
    """The name :func:`hpcsoup.data.load_dataset` gives the config's graph, without loading it."""
    from hpcsoup.data.datasets import SYNTHETIC

    if cfg.data.dataset == SYNTHETIC:
        return f"{SYNTHETIC}-{cfg.data.nodes}"
    return cfg.data.dataset


def shards_of_config(cfg) -> Path:
    """Where the config's partitioned graph lives (``<store>/graphs/<graph>/parts-K-halo-h-seed-s``)."""
    from hpcsoup.data.datasets import SYNTHETIC

    pls = cfg.soup.pls
    data_seed = cfg.data.seed if cfg.data.dataset == SYNTHETIC else 0
    return shard_path(cfg.store, graph_key(graph_name(cfg), cfg.data.split, data_seed),
                      pls.partitions, pls.halo, _partition_seed(cfg))


def _partition_seed(cfg) -> int:
    from hpcsoup.soup.pls import PartitionLearnedSoup
    return int(PartitionLearnedSoup.defaults["partition_seed"])


def prepare_from_config(cfg) -> Path:
    """Partition the config's graph into its store unless that was done (one process only).

    The check comes first, so that a prepared graph is never loaded again.
    """
    from hpcsoup.data import load_from_config

    path = shards_of_config(cfg)
    if is_prepared(path):
        return path
    start = time.perf_counter()
    graph = load_from_config(cfg)
    pls = cfg.soup.pls
    log.info("partitioning %s into %d METIS parts with a %d-hop halo -> %s", graph.name,
             pls.partitions, pls.halo, path)
    prepare(path, graph, pls.partitions, pls.halo, seed=_partition_seed(cfg))
    log.info("partitioned graph written in %.1f s", time.perf_counter() - start)
    return path


# ----------------------------------------------------------------------------- PLS plumbing


class ShardSource(PartitionSource):
    """PLS's :class:`~hpcsoup.soup.pls.PartitionSource` over one rank's :class:`Shard`.

    Every rank knows the metadata of all K partitions (their validation counts, the
    validation labels); it holds the subgraphs of its own partitions only.
    """

    def __init__(self, shard: Shard):
        self.shard = shard
        self.num_parts = shard.partitions
        self.halo = int(shard.attrs["halo"])
        self.val_counts = torch.tensor(shard.attrs["val_counts"], dtype=torch.long)
        self.test_counts = torch.tensor(shard.attrs["test_counts"], dtype=torch.long)
        self.val_labels = shard.val_labels
        self.test_labels = shard.test_labels
        self._parts = {k: p.for_pls() for k, p in shard.parts.items()}

    def owns(self, k: int) -> bool:
        return k in self._parts

    def part(self, k: int):
        try:
            return self._parts[k]
        except KeyError:
            raise SoupError(f"rank {self.shard.rank} was asked for partition {k}, which rank "
                            f"{self.shard.owner(k)} holds") from None


class ShardEvaluator:
    """The part of :class:`hpcsoup.soup.Evaluator` that PLS uses, without any graph.

    A rank has no full graph to evaluate on: ``forward`` runs on partition subgraphs
    only, with the same template model and adjacency format as the single-process
    :class:`~hpcsoup.soup.Evaluator` (hence the same numbers per partition).
    """

    graph = None

    def __init__(self, spec, metric: str, device: str | torch.device = "cpu"):
        from hpcsoup.soup.evaluate import make_template

        self.spec, self.metric, self.device = spec, metric, torch.device(device)
        self.template = make_template(spec, self.device)
        self.evaluations = 0
        self._adjacency: dict[int, tuple] = {}

    def adjacency(self, edge_index: torch.Tensor, num_nodes: int,
                  deg: torch.Tensor | None = None) -> torch.Tensor:
        """The adjacency of a held partition, built once: a rank keeps its partitions in memory
        anyway, so rebuilding it every step (what PLS does with ``cache=False``, to save the
        memory of partitions it would otherwise not keep) would only cost time."""
        from hpcsoup.soup.evaluate import build_adjacency

        key = id(edge_index)  # unique while cached: the entry keeps the tensor alive
        if key in self._adjacency:
            return self._adjacency[key][1]
        if deg is not None and deg.numel() == 0:
            deg = None
        adj = build_adjacency(self.spec.arch, edge_index.to(self.device), num_nodes,
                              None if deg is None else deg.to(self.device))
        self._adjacency[key] = (edge_index, adj)
        return adj

    def forward(self, params: dict, x: torch.Tensor, adj: torch.Tensor) -> torch.Tensor:
        from torch.func import functional_call
        return functional_call(self.template, params, (x, adj))

    def evaluate(self, params, split="val"):
        raise SoupError("pls check='full' scores the whole graph, which no rank of a distributed "
                        "soup holds; use check='partitions' (exact with soup.pls.halo >= layers)")


class Counted:
    """An allreduce hook that counts what it sends: ``calls``, ``bytes`` (this rank's payload)."""

    def __init__(self, comm: Comm):
        self.comm, self.calls, self.bytes, self.seconds = comm, 0, 0, 0.0

    def __call__(self, tensor: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        self.bytes += tensor.numel() * tensor.element_size()
        start = time.perf_counter()
        out = self.comm.allreduce(tensor)
        self.seconds += time.perf_counter() - start
        return out


class Subgraphs:
    """``(partition, adjacency)`` of a held partition (the adjacency built once, by the evaluator)."""

    def __init__(self, source: ShardSource, evaluator: ShardEvaluator):
        self.source, self.evaluator = source, evaluator

    def __call__(self, k: int):
        part = self.source.part(k)
        return part, self.evaluator.adjacency(part.edge_index, part.num_nodes, part.deg)


@torch.no_grad()
def shard_scores(params: dict, evaluator: ShardEvaluator, source: ShardSource,
                 subgraphs: Subgraphs, allreduce: Callable) -> dict:
    """``{"metric", "val", "test"}`` of ``params`` gathered partition by partition.

    Each rank writes its core validation/test nodes' results (accuracy: correct or
    not; ROC-AUC: positive-class probability) at their global positions; one sum
    over ranks completes both vectors. Equal to the full-graph scores when every
    partition's halo covers the model's receptive field (``halo >= layers``).
    """
    from hpcsoup.data.metrics import score as metric_score

    shard = source.shard
    num_val, num_test = int(source.val_counts.sum()), int(source.test_counts.sum())
    per_node = torch.zeros(num_val + num_test, dtype=torch.float64)
    for k, stored in shard.parts.items():
        if not (stored.val_mask.any() or stored.test_mask.any()):
            continue
        part, adj = subgraphs(k)
        out = evaluator.forward(params, part.x.to(evaluator.device), adj).cpu()
        for mask, pos, offset in ((stored.val_mask, stored.val_pos, 0),
                                  (stored.test_mask, stored.test_pos, num_val)):
            if evaluator.metric == "accuracy":
                value = (out[mask].argmax(-1) == stored.y[mask]).double()
            else:
                value = out[mask].float().softmax(-1)[:, 1].double()
            per_node[offset + pos] = value
    per_node = allreduce(per_node)
    val, test = per_node[:num_val], per_node[num_val:]
    if evaluator.metric == "accuracy":
        # float32 like metrics.accuracy (sums of 0/1 are exact): equal to the full-graph score
        scores = [float(v.float().mean()) if v.numel() else float("nan") for v in (val, test)]
    else:
        scores = [metric_score(evaluator.metric, v, labels)
                  for v, labels in ((val, source.val_labels), (test, source.test_labels))]
    return {"metric": evaluator.metric, "val": scores[0], "test": scores[1]}


# ----------------------------------------------------------------------------- the run


@dataclasses.dataclass
class RankRun:
    """What one rank did in a distributed PLS (all of it gathered on every rank)."""

    result: object                 # the SoupResult (the same on every rank)
    metrics: dict
    settings: dict
    seconds: float
    shard_stats: list              # every rank's Shard.stats()
    peak_rss: list                 # every rank's peak RSS while it read its shard and ran PLS
    start_rss: list                # every rank's RSS before it read its shard (bytes)
    step_bytes: int                # this rank's payload of one step's allreduce
    step_calls: int
    eval_bytes: int
    threads: int
    device: str
    ingredients: object
    shards: Path


def run_pls_ranks(cfg, comm: Comm, settings: dict | None = None) -> RankRun:
    """Distributed PLS on every rank of ``comm`` (collective: every rank must call it).

    Args:
        cfg: the validated config (store, data, ``soup.pls``, ``threads``, ``device``).
        comm: the communicator (any size, 1 included).
        settings: PLS settings (default: :func:`hpcsoup.soup.run.method_settings` of ``cfg``).
    """
    from hpcsoup.soup.registry import get_method
    from hpcsoup.soup.run import PeakMemory, load_ingredients, method_settings
    from hpcsoup.store import Store

    threads = threads_per_rank(comm, cfg.threads)
    torch.set_num_threads(threads)
    device = agree(comm, lambda: rank_device(cfg.device, comm), "choosing its device")

    def _settings():
        chosen = dict(method_settings(cfg, "pls") if settings is None else settings)
        if chosen.get("check", "partitions") != "partitions":
            raise SoupError(f"pls check={chosen['check']!r} needs the whole graph, which no rank "
                            f"holds; distributed PLS supports --set soup.pls.check=\"partitions\"")
        get_method("pls", **chosen)  # unknown settings fail here, on every rank alike
        return chosen
    settings = agree(comm, _settings, "checking the PLS settings")
    path = shards_of_config(cfg)

    def _experts():  # first: a store without experts fails before any partitioning
        store = Store.open(cfg.store)
        return store, load_ingredients(cfg, store, _Named(graph_name(cfg)))
    store, ingredients = agree(comm, _experts, "reading the experts")

    def _prepare():
        if comm.rank == 0:
            prepare_from_config(cfg)
            gc.collect()  # the whole graph was needed to partition it: let it go
    agree(comm, _prepare, "partitioning the graph into the store")

    with PeakMemory() as memory:
        shard = agree(comm, lambda: load_shard(path, comm.rank, comm.size), "reading its partitions")

        def _fits():
            spec, attrs = ingredients.spec, shard.attrs
            if spec.in_channels != attrs["num_features"] or spec.out_channels != attrs["num_classes"]:
                raise SoupError(f"experts of model {spec.to_dict()} do not fit the partitioned graph "
                                f"'{path}' ({attrs['num_features']} features, {attrs['num_classes']} "
                                f"classes); check data.dataset")
        agree(comm, _fits, "checking the experts against the graph")
        ingredients = ingredients.to(device)
        source = ShardSource(shard)
        evaluator = ShardEvaluator(ingredients.spec, shard.attrs["metric"], device)
        subgraphs = Subgraphs(source, evaluator)
        step_hook, eval_hook = Counted(comm), Counted(comm)

        def evaluate(weights):
            return partition_score(ingredients, evaluator, source, subgraphs, weights, eval_hook)

        method = get_method("pls", **settings)
        if comm.rank == 0:
            log.info("pls on %d ranks x %d threads (%s): %s", comm.size, threads, device, settings)
            per_step, parts = int(settings["per_step"]), source.num_parts
            if comm.size > parts:
                log.warning("%d ranks for %d partitions: ranks %d..%d hold none and only take part "
                            "in the allreduce; use at most soup.pls.partitions ranks", comm.size,
                            parts, parts, comm.size - 1)
            elif settings.get("draw") != "stratified" or per_step % comm.size:
                log.warning("ranks are balanced only with soup.pls.draw=\"stratified\" and ranks "
                            "dividing soup.pls.per_step (%d ranks, per_step %d, draw %s): the "
                            "busiest rank sets the step time", comm.size, per_step,
                            settings.get("draw"))
        log.info("rank %d/%d holds partitions %s: %d core + halo = %d node rows of %d",
                 comm.rank, comm.size, sorted(shard.parts), shard.core_nodes,
                 shard.resident_nodes, int(shard.attrs["num_nodes"]))
        comm.barrier()  # time PLS itself, not the slowest rank's loading
        start = time.perf_counter()
        result = method.soup(ingredients, evaluator, seed=cfg.soup.seed, source=source,
                             allreduce=step_hook, evaluate=evaluate)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = max(comm.allgather(time.perf_counter() - start))
    metrics = shard_scores(result.state_dict, evaluator, source, subgraphs, eval_hook)
    metrics.update({"check": "partitions", "halo": source.halo,
                    "exact": source.halo >= ingredients.spec.layers})
    steps = max(1, step_hook.calls)
    return RankRun(result, metrics, settings, seconds, comm.allgather(shard.stats()),
                   comm.allgather(memory.peak), comm.allgather(memory.start),
                   step_hook.bytes // steps, step_hook.calls,
                   eval_hook.bytes, threads, str(device), ingredients, path)


@dataclasses.dataclass
class _Named:
    """Stands in for a Graph where only its name is needed (no rank loads the whole graph)."""

    name: str


def write_distributed_soup(cfg, comm: Comm, run: RankRun) -> dict:
    """Rank 0 writes the soup group (collective: a failed write is reported on every rank)."""
    from hpcsoup.soup.run import PeakMemory, soup_attrs, soup_id, write_soup
    from hpcsoup.store import Store

    ingredients, result = run.ingredients, run.result
    gid = soup_id(ingredients.spec.arch, "pls", ingredients, run.settings, cfg.soup.seed)
    memory = PeakMemory()
    memory.peak = max(run.peak_rss)
    result.extras.update({
        "ranks": comm.size, "threads_per_rank": run.threads, "device": run.device,
        "peak_rss_bytes_per_rank": run.peak_rss, "shards": str(run.shards),
        "resident_nodes_per_rank": [s["resident_nodes"] for s in run.shard_stats],
        "core_nodes_per_rank": [s["core_nodes"] for s in run.shard_stats],
        "allreduce_bytes_per_step": run.step_bytes})
    attrs = soup_attrs(cfg, _Named(graph_name(cfg)), ingredients, result, run.metrics, run.settings,
                       run.seconds, memory, ranks=comm.size)

    def _write():
        if comm.rank == 0:
            write_soup(Store.open(cfg.store), gid, result, attrs)
    agree(comm, _write, "writing the soup (rank 0)")
    return {"id": gid, "method": "pls", "metrics": run.metrics, "seconds": run.seconds,
            "peak_rss_bytes": memory.peak, "rss_above_start_bytes": 0,
            "extras": attrs["extras"], "coefficients": result.coefficients}


def run_soup_distributed(cfg, methods: list[str] | None, comm: Comm) -> dict:
    """``hpcsoup soup`` on ``comm.size > 1`` ranks (what :func:`hpcsoup.soup.run.run_soup`
    dispatches to under ``mpiexec`` / ``srun``).

    PLS runs on every rank first. The other methods are single-process: rank 0 runs
    them afterwards (with the whole graph, as ``hpcsoup soup`` would) while the other
    ranks have returned; MPI_Finalize waits without spinning, so they take no CPU
    from rank 0. Every rank returns the summary; only rank 0's includes the
    single-process methods.
    """
    from hpcsoup.soup.registry import method_class
    from hpcsoup.soup.run import ensure_progress_output, run_soup

    ensure_progress_output()
    if comm.rank > 0:  # one progress log per job: the ranks' PLS steps are the same
        logging.getLogger("hpcsoup.soup").setLevel(logging.WARNING)
    methods = list(methods or cfg.soup.methods)
    with abort_on_error(comm):
        agree(comm, lambda: [method_class(name) for name in methods], "checking the methods")
    summary = {"store": str(cfg.store), "dataset": graph_name(cfg), "ranks": comm.size,
               "rank": comm.rank, "soups": []}
    with abort_on_error(comm):
        if "pls" in methods:
            run = run_pls_ranks(cfg, comm)
            soup = write_distributed_soup(cfg, comm, run)
            summary.update({"arch": run.ingredients.spec.arch, "metric": run.metrics["metric"],
                            "ingredients": run.ingredients.ids})
            summary["soups"].append(soup)
            if comm.rank == 0:
                log.info("pls on %d ranks: val %.4f test %.4f (%s) in %.2f s -> soups/%s", comm.size,
                         run.metrics["val"], run.metrics["test"],
                         "exact" if run.metrics["exact"] else f"halo {run.metrics['halo']}",
                         run.seconds, soup["id"])
        rest = [m for m in methods if m != "pls"]
        if rest and comm.rank == 0:
            single = run_soup(cfg, rest, comm=Comm(None))
            summary.update({k: v for k, v in single.items() if k != "soups"})
            summary["soups"].extend(single["soups"])
    return summary

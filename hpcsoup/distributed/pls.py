"""Partition learned souping on MPI ranks, each holding a shard of the graph.

Zuber, Sarkar, Jennings, Jannesari, "Enhanced Soups for Graph Neural Networks",
arXiv 2503.11612 (2025), Partition Learned Souping, distributed. PLS's step
objective (:mod:`hpcsoup.soup.pls`) is a sum of per-partition terms with a global normaliser,

.. math::
    \\nabla_R L_t = \\sum_{r=0}^{P-1} \\; \\sum_{k \\in D_t,\\ \\mathrm{owner}(k) = r}
        \\nabla_R \\frac{1}{Z_t} \\sum_{v \\in V_k \\cap V_{val}}
        \\mathrm{CE}\\big(f(X_{S_k}, A_{S_k}; W(R))_v, y_v\\big),
    \\qquad Z_t = \\sum_{k \\in D_t} |V_k \\cap V_{val}|,

so rank :math:`r` computes the terms of the drawn partitions it holds
(:math:`D_t` depends on the seed alone, :math:`Z_t` on partition metadata every
rank has), one row per partition (its ``[tensors, experts]`` gradient and its loss
term); one ``Allreduce`` of the ``R`` rows (``4 R (T n + 1)`` bytes, whatever the
graph; each row has one non-zero contribution, so the sum is exact) gives every rank
the same rows, which every rank adds in draw order: the same :math:`\\nabla_R L_t` to
the bit on any number of ranks, and the same optimizer update.

- The graph is partitioned once into the store (:mod:`hpcsoup.distributed.shards`); a rank
  reads only its partitions (``p mod P == rank``).
- The stopping check is gathered partition by partition from the shards (the same
  :func:`~hpcsoup.soup.pls.partition_scores` as in one process). The scores the soup
  records are exact (:func:`exact_scores`): gathered from the shards when
  ``halo >= layers``; with receptive fields (``scope = "field"``) from the set's scoring
  fields (each partition's validation and test nodes' field, :class:`ScoreFieldSource`),
  one field at a time on each rank; only a set without them (an earlier hpcsoup's) or a
  halo shorter than the depth makes rank 0 score the full graph.
- Rank 0 alone writes the soup (same id, attrs and arrays as the single-process run).
- Threads: ``threads`` from the config, else the node's CPUs divided among its ranks
  (ranks x threads <= cores). Device: ``cuda`` means ``cuda:<local rank>`` (SLURM's
  ``SLURM_LOCALID`` via :class:`hpcsoup.slurm.SlurmEnv`, else the rank on the node).
- Failures: a step that can fail alike everywhere (missing expert, missing partition)
  raises the same error on every rank (:func:`hpcsoup.distributed.mpi.agree`); anything else
  on one rank aborts the whole job (:func:`hpcsoup.distributed.mpi.abort_on_error`).
"""
from __future__ import annotations

import dataclasses
import gc
import hashlib
import json
import logging
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from hpcsoup.distributed.mpi import Comm, abort_on_error, agree
from hpcsoup.distributed.shards import (Shard, graph_key, has_score_fields, is_prepared, load_shard,
                                        owner_of, prepare, read_score_field, shard_path)
from hpcsoup.errors import SoupError
from hpcsoup.memory import PeakMemory, release_free_memory
from hpcsoup.soup.evaluate import Evaluator
from hpcsoup.soup.pls import Part, PartitionSource, keep_better_than_start, partition_scores

log = logging.getLogger("hpcsoup.distributed")


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


def shards_of_config(cfg, spec=None) -> Path:
    """Where the config's partitioned graph lives (``<store>/graphs/<graph>/parts-K-...``):
    with ``soup.pls.scope = "field"`` the receptive fields of the experts' model ``spec``."""
    from hpcsoup.data.datasets import SYNTHETIC

    pls, data = cfg.soup.pls, cfg.data
    data_seed = data.seed if data.dataset == SYNTHETIC else 0
    key = graph_key(graph_name(cfg), data.split, data_seed)
    if data.dataset.startswith("pyg/"):  # may have no masks: a random split from these keys
        split = json.dumps([data.seed, data.random_split, data.num_train_per_class, data.num_val,
                            data.num_test])
        key += "-rs" + hashlib.sha1(split.encode()).hexdigest()[:8]
    return shard_path(cfg.store, key, pls.partitions, pls.halo, pls.partition_seed,
                      field_model(cfg, spec))


def field_model(cfg, spec=None):
    """The model whose receptive fields the shards hold (``soup.pls.scope = "field"``; else
    ``None``): the experts' ``spec``, or without it (``hpcsoup partition`` before any expert
    exists) the config's soup architecture and depth, which are all a field depends on."""
    from hpcsoup.soup.run import soup_arch

    if cfg.soup.pls.scope != "field":
        return None
    if spec is not None:
        return spec if hasattr(spec, "layers") else None  # a user's module: partitions
    return SimpleNamespace(arch=soup_arch(cfg), layers=cfg.experts.layers)


def prepare_from_config(cfg, spec=None) -> Path:
    """Partition the config's graph into its store unless that was done (one process only).

    The check comes first, so that a prepared graph is never loaded again.
    """
    from hpcsoup.data import load_from_config
    from hpcsoup.models import ModelSpec
    from hpcsoup.soup.run import graph_partition

    path = shards_of_config(cfg, spec)
    if is_prepared(path):
        return path
    start = time.perf_counter()
    graph = load_from_config(cfg)
    pls = cfg.soup.pls
    field = field_model(cfg, spec)
    if field is not None and not isinstance(field, ModelSpec):
        field = ModelSpec(field.arch, graph.num_features, graph.num_classes, field.layers)
    log.info("partitioning %s into %d METIS parts (%s) -> %s", graph.name, pls.partitions,
             "their validation nodes' receptive fields, and their validation and test nodes' for "
             "the scores" if field else f"{pls.halo}-hop halo", path)
    prepare(path, graph, pls.partitions, pls.halo, seed=pls.partition_seed,
            parts=graph_partition(cfg, graph), field=field)
    log.info("partitioned graph written in %.1f s", time.perf_counter() - start)
    return path


# ----------------------------------------------------------------------------- PLS plumbing


class ShardSource(PartitionSource):
    """PLS's :class:`~hpcsoup.soup.pls.PartitionSource` over one rank's :class:`Shard`.

    Every rank knows the metadata of all K partitions (their validation/test counts and
    labels); it holds the subgraphs of its own partitions only, in memory.
    """

    keeps_parts = True

    def __init__(self, shard: Shard):
        attrs = shard.attrs
        self.shard = shard
        self.num_parts = shard.partitions
        self.halo = int(attrs["halo"])
        self.scope = attrs.get("scope", "partition")
        self.counts = {split: torch.tensor(attrs[f"{split}_counts"], dtype=torch.long)
                       for split in ("val", "test")}
        self.labels = {"val": shard.val_labels, "test": shard.test_labels}
        self.val_positives = torch.tensor(attrs["val_positives"], dtype=torch.long)

    def owns(self, k: int) -> bool:
        return self.shard.owns(k)

    def part(self, k: int):
        try:
            return self.shard.parts[k]
        except KeyError:
            raise SoupError(f"rank {self.shard.rank} was asked for partition {k}, which rank "
                            f"{self.shard.owner(k)} holds") from None


class ScoreFieldSource(PartitionSource):
    """The scoring fields of a rank's partitions (:func:`~hpcsoup.distributed.shards.build_score_fields`:
    each partition's validation and test nodes with their receptive field), read from the store
    one at a time when asked for and not kept: :func:`~hpcsoup.soup.pls.partition_scores` over
    it gives the full graph's validation and test scores with the memory of one field.

    The same ownership (``p mod P``) and labels as the rank's :class:`ShardSource`.
    """

    keeps_parts = False
    scope = "field"

    def __init__(self, shard: Shard):
        attrs = shard.attrs
        self.path, self.rank, self.size = shard.path, shard.rank, shard.size
        self._last = None  # the field handed out last (see part)
        self.num_parts = shard.partitions
        self.halo = int(attrs["halo"])
        # the fields' roots: the partitions' nodes of each split (the loop's fields have no test)
        self.counts = {split: torch.tensor(attrs[f"score_{split}_counts"], dtype=torch.long)
                       for split in ("val", "test")}
        self.labels = {"val": shard.val_labels, "test": shard.test_labels}
        self.val_positives = torch.tensor(attrs["val_positives"], dtype=torch.long)

    @classmethod
    def of(cls, shard: Shard) -> "ScoreFieldSource | None":
        """The source of ``shard``'s set, or ``None`` when the set has no scoring fields."""
        return cls(shard) if has_score_fields(shard.attrs) else None

    def owns(self, k: int) -> bool:
        return owner_of(k, self.size) == self.rank

    def part(self, k: int):
        """Partition ``k``'s scoring field. The field handed out before is emptied first: its
        caller's loop still names it while it asks for the next one, so two fields (each about
        a third of the graph's rows here) would otherwise be held at once."""
        if self._last is not None:
            for name in Part.TENSORS:
                tensor = getattr(self._last, name)  # (a slice would keep the storage)
                setattr(self._last, name, torch.empty((0,) + tuple(tensor.shape[1:]),
                                                      dtype=tensor.dtype))
        release_free_memory()  # the emptied field's (or the loop's) pages, before a field is read
        part = self._last = read_score_field(self.path, k)
        for split in ("val", "test"):  # the roots are the partition's nodes of both splits
            if int(part.mask(split).sum()) != int(self.counts[split][k]):
                raise SoupError(f"the scoring field of partition {k} in '{self.path}' has "
                                f"{int(part.mask(split).sum())} {split} nodes where the set "
                                f"counts {int(self.counts[split][k])}; rebuild the set")
        return part

    def exact(self, depth: int | None, split: str = "val") -> bool:
        return True  # every root's whole receptive field


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
    peak_gpu: list                 # every rank's peak CUDA memory then (None on a CPU)
    start_rss: list                # every rank's RSS before it read its shard (bytes)
    score_peak_rss: list           # every rank's peak RSS while the soup was scored
    score_seconds: float           # the exact scoring's wall time (the slowest rank's)
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
    from hpcsoup.soup.run import load_ingredients, method_settings
    from hpcsoup.store import Store

    threads = threads_per_rank(comm, cfg.threads)
    torch.set_num_threads(threads)
    device = agree(comm, lambda: rank_device(cfg.device, comm), "choosing its device")

    def _settings():
        chosen = dict(method_settings(cfg, "pls") if settings is None else settings)
        if chosen.get("check") == "full":
            raise SoupError("pls check='full' needs the whole graph, which no rank holds; "
                            "distributed PLS supports --set soup.pls.check=\"partitions\" "
                            "(or \"auto\")")
        get_method("pls", **chosen)  # unknown settings fail here, on every rank alike
        return chosen
    settings = agree(comm, _settings, "checking the PLS settings")

    def _experts():  # first: a store without experts fails before any partitioning
        store = Store.open(cfg.store)
        return store, load_ingredients(cfg, store, _Named(graph_name(cfg)))
    store, ingredients = agree(comm, _experts, "reading the experts")
    path = shards_of_config(cfg, ingredients.spec)

    def _prepare():
        if comm.rank == 0:
            prepare_from_config(cfg, ingredients.spec)
            gc.collect()  # the whole graph was needed to partition it: let it go
    agree(comm, _prepare, "partitioning the graph into the store")

    with PeakMemory(device=device) as memory:
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
        evaluator = Evaluator(ingredients.spec, None, device, metric=shard.attrs["metric"])
        hook = Counted(comm)
        method = get_method("pls", **settings)
        method.show_progress = comm.rank == 0  # the ranks take the same steps: one display
        if comm.rank == 0:
            log.info("pls on %d ranks x %d threads (%s): %s", comm.size, threads, device, settings)
            per_step = int(settings["per_step"])
            if settings.get("draw") != "stratified" or per_step % comm.size:
                log.warning("ranks are balanced only with soup.pls.draw=\"stratified\" and ranks "
                            "dividing soup.pls.per_step (%d ranks, per_step %d, draw %s): the "
                            "busiest rank sets the step time", comm.size, per_step,
                            settings.get("draw"))
        log.debug("rank %d/%d holds partitions %s: %d core + halo = %d node rows of %d",
                  comm.rank, comm.size, sorted(shard.parts), shard.core_nodes,
                  shard.resident_nodes, int(shard.attrs["num_nodes"]))
        comm.wait_quietly()  # time PLS itself, not the slowest rank's loading (sleeping, not spinning)
        comm.doing = "running the PLS steps"
        start = time.perf_counter()
        result = method.soup(ingredients, evaluator, seed=cfg.soup.seed, source=source,
                             allreduce=hook)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = max(comm.allgather(time.perf_counter() - start))
    stats = comm.allgather(shard.stats())
    start_logits = torch.tensor(result.extras["start_logits"], device=device)
    comm.doing = "scoring the soup"
    with PeakMemory(device=device) as scoring_memory:
        start = time.perf_counter()
        scoring = ScoreFieldSource.of(shard)
        if scoring is not None:
            # the loop's validation fields (and the adjacencies the evaluator kept of them) are
            # done with: the scoring fields take their place, one at a time
            shard.parts.clear()
            evaluator = Evaluator(ingredients.spec, None, device, metric=shard.attrs["metric"])
        result, metrics = exact_scores(cfg, result, ingredients, start_logits, evaluator, source,
                                       hook, comm, scoring)
        score_seconds = max(comm.allgather(time.perf_counter() - start))
    # a row per drawn partition: its gradient and its loss term
    step_bytes = 4 * int(settings["per_step"]) * (ingredients.num_tensors * ingredients.n + 1)
    return RankRun(result, metrics, settings, seconds, stats,
                   comm.allgather(memory.peak), comm.allgather(memory.gpu_peak),
                   comm.allgather(memory.start), comm.allgather(scoring_memory.peak),
                   score_seconds, step_bytes, result.extras["steps"], hook.bytes, threads,
                   str(device), ingredients, path)


def exact_scores(cfg, result, ingredients, start, evaluator: Evaluator, source: ShardSource,
                 allreduce, comm: Comm, scoring: ScoreFieldSource | None = None) -> tuple:
    """``(result, metrics)``: the full-graph scores of the soup's weights (collective), as every
    stored soup records.

    With ``halo >= layers`` every partition's predictions are exact, so the scores are
    gathered partition by partition from the shards (memory of one partition). Receptive
    fields hold no test nodes: their set's scoring fields (``scoring``, the fields of each
    partition's validation and test nodes) are gathered the same way, through one
    ``allreduce`` (memory of one field on each rank). Otherwise (a set without scoring
    fields, or a halo shorter than the depth) rank 0 scores the whole graph (inference
    forwards; the other ranks wait); with a short halo the partition-wise checks scored a
    graph without the cut edges, so, as single-process PLS does, it keeps the start
    (``start`` logits) when that scores higher on validation
    (:func:`~hpcsoup.soup.pls.keep_better_than_start`).
    """
    from hpcsoup.data import load_from_config

    depth = evaluator.spec.layers
    exact_val = source.exact(depth)
    if source.exact(depth, "test"):
        metrics = partition_scores(result.state_dict, evaluator, source, allreduce)
        return result, {**metrics, "exact": True,
                        "scored_on": f"partitions with a {source.halo}-hop halo (exact)"}
    if scoring is not None and exact_val:  # fields: the check was exact, the kept soup is learned
        metrics = partition_scores(result.state_dict, evaluator, scoring, allreduce)
        return result, {**metrics, "exact": True,
                        "scored_on": "partitions' validation and test fields (exact)"}
    if comm.rank == 0 and source.scope == "field":
        log.warning("the partitioned graph '%s' has no scoring fields (an earlier hpcsoup wrote "
                    "it): rank 0 loads the whole graph to score the soup. To score on the ranks, "
                    "rebuild it: `hpcsoup store rm %s graphs/%s/%s`, then `hpcsoup partition`",
                    source.shard.path, cfg.store, source.shard.path.parent.name,
                    source.shard.path.name)

    def _full():
        if comm.rank != 0:
            return None
        graph = load_from_config(cfg)
        full = Evaluator(evaluator.spec, graph, evaluator.device)
        learned = full.metrics(result.state_dict)
        start_metrics = None if exact_val else full.metrics(ingredients.mix(start.softmax(-1)))
        del full, graph
        gc.collect()
        return learned, start_metrics
    learned, start_metrics = comm.bcast(agree(comm, _full, "scoring the soup on the full graph "
                                                           "(rank 0)"))
    if exact_val:  # the check was exact: the kept soup is the learned one
        return result, {**learned, "exact": True, "scored_on": "full graph (rank 0)"}
    result = keep_better_than_start(result, ingredients, start, start_metrics["val"], learned["val"])
    metrics = learned if result.extras["exact_choice"] == "learned" else start_metrics
    return result, {**metrics, "exact": True, "scored_on": "full graph (rank 0)"}


@dataclasses.dataclass
class _Named:
    """Stands in for a Graph where only its name is needed (no rank loads the whole graph)."""

    name: str


def write_distributed_soup(cfg, comm: Comm, run: RankRun) -> dict:
    """Rank 0 writes the soup group (collective: a failed write is reported on every rank)."""
    from hpcsoup.soup.run import soup_attrs, soup_id, write_soup
    from hpcsoup.store import Store

    ingredients, result = run.ingredients, run.result
    gid = soup_id(ingredients.spec.arch, "pls", ingredients, run.settings, cfg.soup.seed,
                  graph_name(cfg), comm.size)
    memory = PeakMemory()
    memory.peak = max(run.peak_rss + run.score_peak_rss)  # the soup's and its scoring's
    gpu = [p for p in run.peak_gpu if p is not None]
    memory.gpu_peak = max(gpu) if gpu else None
    result.extras.update({
        "ranks": comm.size, "threads_per_rank": run.threads, "device": run.device,
        "peak_rss_bytes_per_rank": run.peak_rss, "peak_gpu_bytes_per_rank": run.peak_gpu,
        "score_peak_rss_bytes_per_rank": run.score_peak_rss, "score_seconds": run.score_seconds,
        "shards": str(run.shards),
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
            "peak_gpu_bytes": memory.gpu_peak, "extras": attrs["extras"],
            "coefficients": result.coefficients}


def run_soup_distributed(cfg, methods: list[str] | None, comm: Comm,
                         allow_partial: bool = False) -> dict:
    """``hpcsoup soup`` on ``comm.size > 1`` ranks (what the CLI runs under ``mpiexec`` /
    ``srun``; :func:`hpcsoup.soup.run.run_soup` is the single-process runner).

    PLS runs on every rank first. The other methods are single-process: rank 0 runs
    them afterwards (with the whole graph, as ``hpcsoup soup`` would) while the other
    ranks have returned; MPI_Finalize waits without spinning, so they take no CPU
    from rank 0. Every rank returns the summary; only rank 0's includes the
    single-process methods.
    """
    from hpcsoup.soup.registry import method_class
    from hpcsoup.soup.run import run_soup
    from hpcsoup.train.sweep import soup_experts_ready

    methods = list(methods or cfg.soup.methods)
    with abort_on_error(comm):
        agree(comm, lambda: [method_class(name) for name in methods], "checking the methods")
        agree(comm, lambda: soup_experts_ready(cfg, allow_partial), "checking the experts")
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
                log.info("pls on %d ranks: val %.4f test %.4f (scored on the %s) in %.2f s -> "
                         "soups/%s", comm.size, run.metrics["val"], run.metrics["test"],
                         run.metrics["scored_on"], run.seconds, soup["id"])
        rest = [m for m in methods if m != "pls"]
        if rest and comm.rank == 0:
            single = run_soup(cfg, rest, allow_partial=allow_partial)
            summary.update({k: v for k, v in single.items() if k != "soups"})
            summary["soups"].extend(single["soups"])
    return summary

"""``hpcsoup train``: train the experts of a config into the Zarr store.

One task trains one expert (:mod:`hpcsoup.train.sweep` says which):

- ``run_train(cfg, task_id=N)`` trains task N, the body of one SLURM array task
  (``task_id=None`` reads ``SLURM_ARRAY_TASK_ID`` through :class:`~hpcsoup.slurm.SlurmEnv`);
- ``run_train(cfg, all_tasks=True)`` trains every task on this machine in
  parallel worker processes (Dask ``LocalCluster``, one worker per core, one
  torch thread each): the embedded default when there is no SLURM.

Each task: opens the store (creating it race-free if needed), makes sure the
shared init of its model exists (computed deterministically, written once),
starts from it, trains with resume checkpoints under
``<store>/.checkpoints/``, writes ``experts/<id>`` with ``complete=true`` last
and removes its checkpoint. A task whose expert is already complete does nothing
and says so; a killed task leaves no visible expert and its rerun resumes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
import uuid

import torch

from hpcsoup.config import build_config
from hpcsoup.data import Graph, load_from_config
from hpcsoup.errors import ConfigError, HpcsoupError
from hpcsoup.memory import PeakMemory
from hpcsoup.models import ModelSpec, build_model
from hpcsoup.progress import Progress, display, duration
from hpcsoup.slurm import SlurmEnv
from hpcsoup.store import Store, provenance
from hpcsoup.train import sweep
from hpcsoup.train.checkpoint import STOP_SIGNALS, Checkpointer, Preempted, StopFlag
from hpcsoup.train.loop import ClusterBatches, check_device, fit
from hpcsoup.train.regions import specialist_regions

log = logging.getLogger(__name__)
CHECKPOINTS = ".checkpoints"
#: the Dask event topic on which workers report their epochs to the process that shows progress
EPOCH_TOPIC = "hpcsoup-train-epochs"


def available_cores() -> int:
    """CPU cores this process may use (SLURM allocation, affinity mask, or the machine)."""
    env = SlurmEnv.from_env()
    if env.cpus_per_task:
        return env.cpus_per_task
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _set_threads(cfg, default: int | None = None) -> int:
    threads = cfg.threads or default or 0
    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def open_store(cfg) -> Store:
    """The config's store, created (once, race-free) with the config and provenance as root attrs."""
    return Store.create(cfg.store, attrs={"name": cfg.name, "config": cfg.to_dict(),
                                          "created": provenance()})


def ensure_init(store: Store, spec: ModelSpec, init_seed: int) -> tuple[str, dict]:
    """``(init_id, state_dict)`` of the shared init of ``spec``; written to the store if missing.

    The init is a deterministic function of (spec, seed), so any task may compute
    it; the store keeps the first copy written (atomic rename), and every expert
    starts from the stored bytes.
    """
    iid = sweep.init_id(spec, init_seed)
    if not store.has_init(iid):
        state = build_model(spec, seed=init_seed).state_dict()
        store.write_init(iid, state, attrs={"arch": spec.arch, "model": spec.to_dict(),
                                            "init_seed": init_seed, "versions": provenance()})
    return iid, store.read_init(iid)


_GRAPHS: dict = {}


def _graph(cfg) -> Graph:
    """The config's dataset, cached per process (a worker trains several experts)."""
    key = json.dumps(cfg.data.to_dict(), sort_keys=True)
    if key not in _GRAPHS:
        _GRAPHS.clear()
        _GRAPHS[key] = load_from_config(cfg)
    return _GRAPHS[key]


def _train_nodes(cfg, graph: Graph, task: sweep.Task) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
    """The task's training mask, its region (specialists) and the ``train_nodes`` attr."""
    train = graph.mask("train")
    if task.role == "expert":
        return train, None, {"split": "all", "region": None, "parents": None, "seed": None,
                             "count": int(train.sum())}
    region = specialist_regions(graph, task.split, task.parents, seed=task.region_seed, cfg=cfg)
    mask = train & (region == task.region)
    if not mask.any():
        raise ConfigError(f"specialist '{task.expert_id}': region {task.region} of the "
                          f"'{task.split}' split holds no training node of '{graph.name}'; "
                          f"use fewer specialists or another specialists.split")
    return mask, region, {"split": task.split, "region": task.region, "parents": task.parents,
                          "seed": task.region_seed, "count": int(mask.sum())}


def _batches(cfg, graph: Graph) -> ClusterBatches | None:
    """Cluster mini-batches from METIS parts (cached beside the datasets) for big graphs."""
    e = cfg.experts
    if e.batching == "full":
        return None
    from hpcsoup.data.partition import partition_for

    # the graph's one stored partition (METIS seed 0), shared with the soup stage and PLS ranks
    parts = partition_for(cfg, e.batch_partitions, seed=0, graph=graph)
    return ClusterBatches(graph.data.edge_index, parts, e.parts_per_batch)


def _run_key(cfg, task: sweep.Task, iid: str, graph: Graph) -> str:
    """What a resume checkpoint must match: everything that shapes the run's result."""
    e = cfg.experts
    text = json.dumps({"task": task.to_dict(), "init_id": iid, "dataset": graph.info(),
                       "batching": [e.batching, e.batch_partitions, e.parts_per_batch],
                       "eval_every": e.eval_every, "patience": e.patience, "device": cfg.device},
                      sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()


def _on_epoch(task: sweep.Task, every: int, report):
    """``fit``'s epoch callback: ``report(epochs_done, line)`` every epoch, with the per-epoch
    detail ``line`` (shown with ``-v``) every ``every`` epochs and at the last one, else ``None``."""
    last = [time.perf_counter()]
    best = [float("-inf"), -1]

    def on_epoch(epoch: int, loss: float, scores: dict) -> None:
        now = time.perf_counter()
        seconds, last[0] = now - last[0], now
        if scores and scores["val"] > best[0]:
            best[:] = [scores["val"], epoch + 1]
        line = None
        if not (epoch + 1) % every or epoch + 1 == task.epochs:
            val = f" val {scores['val']:.3f} test {scores['test']:.3f}" if scores else ""
            line = (f"[{task.expert_id}] epoch {epoch + 1}/{task.epochs} loss {loss:.4f}{val} "
                    f"best val {best[0]:.3f}@{best[1]} ({seconds * 1e3:.0f} ms)")
        report(epoch + 1, line)
    return on_epoch


def _local_report(progress: Progress):
    """Epochs of a task trained in this process: its progress bar and the ``-v`` lines."""
    def report(done: int, line: str | None) -> None:
        progress.set(done)
        if line is not None:
            log.debug("%s", line)
    return report


def _task_line(result: dict) -> str:
    """One line per finished task (INFO): its status, scores and training time."""
    name, status = f"[{result.get('expert_id', result.get('task_id'))}]", result["status"]
    if status in ("failed", "preempted"):
        return f"{name} {status}: {result.get('error')}"
    m = result.get("metrics") or {}
    if status == "exists":
        return f"{name} already complete in the store: nothing to do"
    return (f"{name} {status}: val {m['val']:.3f} test {m['test']:.3f} ({m['metric']}, best epoch "
            f"{m['best_epoch'] + 1}) in {duration(result['train_seconds'])}")


def train_task(cfg, task: sweep.Task, store: Store | None = None, stop: StopFlag | None = None,
               report=None, force: bool = False) -> dict:
    """Train one task's expert into the store (a no-op when it is already complete, unless
    ``force``: then it is retrained and replaces the stored one, e.g. a corrupt expert).

    ``report(epochs_done, line)`` is called after every epoch (see :func:`_on_epoch`; default:
    a :class:`~hpcsoup.progress.Progress` of the task's epochs in this process).
    """
    check_device(cfg.device)
    store = store or open_store(cfg)
    if force and store.has_group("experts", task.expert_id):
        log.info("[%s] --force: retraining; the stored expert is replaced when done", task.expert_id)
    elif store.has_group("experts", task.expert_id):
        attrs = store.group_attrs("experts", task.expert_id)
        return {"task_id": task.task_id, "expert_id": task.expert_id, "status": "exists",
                "metrics": attrs.get("metrics"), "train_seconds": attrs.get("train_seconds")}
    graph = _graph(cfg)
    spec = task.model_spec(graph.num_features, graph.num_classes)
    iid, init_state = ensure_init(store, spec, task.init_seed)
    model = build_model(spec)
    model.load_state_dict(init_state)
    train_mask, region, train_nodes = _train_nodes(cfg, graph, task)
    checkpoint = Checkpointer(store.path / CHECKPOINTS / f"{task.expert_id}.pt",
                              key=_run_key(cfg, task, iid, graph), every=cfg.experts.checkpoint_every,
                              stop=stop, name=task.expert_id)
    progress = None
    if report is None:
        progress = Progress(f"train {task.expert_id}", total=task.epochs, unit="epochs")
        report = _local_report(progress)
    # a line of context in a task's own log (a SLURM array task); detail among many (train --all)
    log.log(logging.INFO if progress is not None else logging.DEBUG,
            "[%s] task %d: %s %s on %s (%d train nodes, seed %d, init %s, %d thread(s), %s)",
            task.expert_id, task.task_id, task.role, task.arch, graph.name, train_nodes["count"],
            task.seed, iid, torch.get_num_threads(), cfg.device)
    try:
        with PeakMemory(interval=0.05, device=cfg.device) as memory:
            result = fit(model, graph, train_mask=train_mask, epochs=task.epochs, lr=task.lr,
                         weight_decay=task.weight_decay, seed=task.seed, device=cfg.device,
                         on_epoch=_on_epoch(task, cfg.experts.progress_every, report),
                         batches=_batches(cfg, graph), eval_every=cfg.experts.eval_every,
                         patience=cfg.experts.patience, checkpoint=checkpoint)
    finally:
        if progress is not None:
            progress.close()
    metrics = {k: result.metrics[k] for k in ("metric", "val", "test", "best_epoch")}
    slurm = SlurmEnv.from_env()
    attrs = {
        "arch": task.arch, "model": spec.to_dict(), "dataset": graph.name, "init_id": iid,
        "seed": task.seed, "role": task.role, "task_id": task.task_id, "train_nodes": train_nodes,
        "hyper": {"epochs": task.epochs, "lr": task.lr, "weight_decay": task.weight_decay,
                  "dropout": task.dropout, "batching": cfg.experts.batching,
                  "patience": cfg.experts.patience},
        "epochs_trained": result.last_epoch + 1,
        "config": cfg.to_dict(), "metrics": metrics, "train_seconds": result.seconds,
        "resumed_from_epoch": None if result.resumed_from is None else result.resumed_from + 1,
        "threads": torch.get_num_threads(), "device": cfg.device, "versions": provenance(),
        "peak_rss_bytes": memory.peak, "peak_gpu_bytes": memory.gpu_peak,
        "slurm": slurm.to_dict() if slurm.in_job else None,
    }
    try:
        store.write_group("experts", task.expert_id, result.state_dict, attrs,
                          arrays={"region": region} if region is not None else None, overwrite=force)
    except HpcsoupError:
        if not force and store.has_group("experts", task.expert_id):  # a duplicate run finished first
            log.info("[%s] another run completed it first: keeping that one", task.expert_id)
            checkpoint.remove()
            return {"task_id": task.task_id, "expert_id": task.expert_id, "status": "exists",
                    "metrics": store.group_attrs("experts", task.expert_id).get("metrics")}
        raise
    checkpoint.remove()
    status = "resumed" if result.resumed_from is not None else "trained"
    return {"task_id": task.task_id, "expert_id": task.expert_id, "status": status,
            "metrics": metrics, "train_seconds": result.seconds, "init_id": iid,
            "peak_rss_bytes": memory.peak, "peak_gpu_bytes": memory.gpu_peak}


def _worker_signals(stop_file: str) -> bool:
    """Run in each Dask worker process (its main thread): a stop signal there also checkpoints.

    When SLURM or a terminal signals the whole process group, the workers get the signal
    too; by default it would kill them mid-epoch.
    """
    if threading.current_thread() is not threading.main_thread():
        return False
    flag = StopFlag(stop_file)
    for sig in STOP_SIGNALS:
        signal.signal(sig, flag._handle)
    return True


class _SendEpochs:
    """A Dask worker's ``report``: its epochs as events to the client, which shows the progress.

    An event at most every ``every`` seconds (and at the last epoch), plus one per ``-v`` line.
    """

    def __init__(self, expert_id: str, epochs: int, lines: bool, every: float = 0.5):
        self.expert_id, self.epochs, self.lines, self.every = expert_id, epochs, lines, every
        self.last = float("-inf")

    def __call__(self, done: int, line: str | None) -> None:
        from distributed import get_worker

        line = line if self.lines else None
        now = time.perf_counter()
        if line is None and done < self.epochs and now - self.last < self.every:
            return
        self.last = now
        get_worker().log_event(EPOCH_TOPIC, {"expert": self.expert_id, "done": done, "line": line})


def _worker_train(cfg_dict: dict, task_id: int, stop_file: str, threads: int, lines: bool,
                  force: bool) -> dict:
    """Body of one Dask task (a separate process): train one expert."""
    torch.set_num_threads(threads)
    cfg = build_config(cfg_dict)
    stop = StopFlag(stop_file)
    if stop:  # stopped before this task began: leave it for the rerun
        return {"task_id": task_id, "status": "preempted", "error": f"not started ({stop.reason})"}
    task = sweep.task(cfg, task_id)
    try:
        return train_task(cfg, task, stop=stop, force=force,
                          report=_SendEpochs(task.expert_id, task.epochs, lines))
    except Preempted as exc:
        return {"task_id": task_id, "expert_id": task.expert_id, "status": "preempted",
                "error": str(exc)}
    except HpcsoupError as exc:  # report it; the other experts still train
        return {"task_id": task_id, "expert_id": task.expert_id, "status": "failed",
                "error": f"{type(exc).__name__}: {exc}"}


class _TrainProgress:
    """The progress of ``train --all``: epochs of every expert (finished and running) with the
    experts done, fed by the workers' events (Dask's event thread) and finished futures (here)."""

    def __init__(self, todo: list[sweep.Task], existing: int):
        self.epochs = {t.expert_id: t.epochs for t in todo}
        self.done = {t.expert_id: 0 for t in todo}
        self.finished: set[str] = set()
        self.existing = existing
        self.lock = threading.Lock()
        self.progress = Progress("train", total=sum(self.epochs.values()), unit="epochs")

    def _postfix(self) -> str:
        text = f"experts {len(self.finished)}/{len(self.epochs)} done"
        running = [f"{e} {d}/{self.epochs[e]}" for e, d in self.done.items()
                   if d and e not in self.finished]
        return text + (f"; running {', '.join(running[:4])}" if running else "")

    def event(self, event) -> None:
        """A worker's event ``(timestamp, {"expert", "done", "line"})``."""
        message = event[1]
        if message.get("line"):
            log.debug("%s", message["line"])
        with self.lock:
            expert = message["expert"]
            if expert in self.finished or expert not in self.done:
                return
            self.done[expert] = int(message["done"])
            self.progress.set(sum(self.done.values()), self._postfix())

    def finished_task(self, result: dict) -> None:
        log.info("%s", _task_line(result))
        with self.lock:
            expert = result.get("expert_id")
            if expert in self.done:
                self.finished.add(expert)
                self.done[expert] = self.epochs[expert]
            self.progress.set(sum(self.done.values()), self._postfix())

    def close(self) -> None:
        if self.existing:
            self.progress.postfix += f" ({self.existing} already there)"
        self.progress.close()


def _run_all(cfg, store: Store, todo: list[sweep.Task], existing: int = 0,
             force: bool = False) -> list[dict]:
    """Train ``todo`` in a Dask LocalCluster of worker processes sized to this machine."""
    from distributed import Client, LocalCluster, as_completed

    cores = available_cores()
    workers = max(1, min(len(todo), cfg.experts.workers or cores))
    threads = max(1, cfg.threads or cores // workers)
    stop_file = store.path / CHECKPOINTS / f"stop-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    stop = StopFlag(stop_file)
    log.info("train: %d experts in %d Dask worker process(es), %d thread(s) each", len(todo), workers,
             threads)
    results = []
    progress = _TrainProgress(todo, existing)
    # dashboard_address ":0": any free port (the default 8787 is often taken on a shared node)
    with stop.installed(), LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                        dashboard_address=":0", memory_limit=0,
                                        silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        handled = client.run(_worker_signals, str(stop_file))
        if not all(handled.values()):
            log.warning("Dask workers could not install signal handlers: a signal to the whole "
                        "process group kills them (resume then uses their last checkpoint)")
        client.subscribe_topic(EPOCH_TOPIC, progress.event)
        config, lines = cfg.to_dict(), display().verbosity > 0
        futures = [client.submit(_worker_train, config, t.task_id, str(stop_file), threads, lines,
                                 force,
                                 key=f"train-{t.expert_id}-{uuid.uuid4().hex[:6]}", pure=False)
                   for t in todo]
        try:
            for future in as_completed(futures):
                try:
                    result = future.result()
                except Exception as exc:  # a worker died (e.g. out of memory): report, keep the rest
                    result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
                results.append(result)
                progress.finished_task(result)
        finally:
            client.unsubscribe_topic(EPOCH_TOPIC)
            progress.close()
    stop_file.unlink(missing_ok=True)
    return sorted(results, key=lambda r: r.get("task_id", -1))


def run_train(cfg, task_id: int | None = None, all_tasks: bool = False, force: bool = False) -> dict:
    """Train one task (``task_id``, default ``$SLURM_ARRAY_TASK_ID``) or all of them here.

    ``force`` retrains experts that are already complete and replaces them.

    Returns ``{"store", "mode", "tasks": [{task_id, expert_id, status, metrics, ...}],
    "trained", "existing", "seconds", "workers"}``. Raises :class:`Preempted` (exit
    code 75) when stopped by a signal after checkpointing, and :class:`HpcsoupError`
    when a task failed.
    """
    start = time.perf_counter()
    all_of_them = sweep.tasks(cfg)
    if not all_of_them:
        raise ConfigError("this config trains nothing: experts.count = 0 and specialists.archs = []; "
                          "set experts.count or list specialists.archs")
    check_device(cfg.device)  # before the store is made: a config error leaves nothing behind
    store = open_store(cfg)
    if all_tasks:
        todo = [t for t in all_of_them if force or not store.has_group("experts", t.expert_id)]
        done = [{"task_id": t.task_id, "expert_id": t.expert_id, "status": "exists"}
                for t in all_of_them if t not in todo]
        if done:
            log.info("train: %d expert(s) already complete in %s: %s", len(done), store.path,
                     ", ".join(d["expert_id"] for d in done))
        if todo:  # inits before the workers start: they then only read them
            graph = _graph(cfg)
            for t in todo:
                ensure_init(store, t.model_spec(graph.num_features, graph.num_classes), t.init_seed)
            # the workers load their own copy; this process (`hpcsoup run`) soups next, and a
            # kept copy would double its peak (2.45M nodes: +3.4 GiB)
            del graph
            _GRAPHS.clear()
        results = done + (_run_all(cfg, store, todo, len(done), force) if todo else [])
        workers = min(len(todo), cfg.experts.workers or available_cores()) if todo else 0
        mode = "all"
    else:
        if task_id is None:
            task_id = SlurmEnv.from_env().array_task_id
        if task_id is None:
            raise ConfigError(f"no task id: pass --task-id N (0..{len(all_of_them) - 1}), --all, or "
                              f"run inside a SLURM array job (SLURM_ARRAY_TASK_ID)")
        task = sweep.task(cfg, task_id)
        _set_threads(cfg, SlurmEnv.from_env().cpus_per_task)
        with StopFlag().installed() as stop:
            results = [train_task(cfg, task, store=store, stop=stop, force=force)]
        log.info("%s", _task_line(results[0]))
        workers, mode = 1, "task"
    results = sorted(results, key=lambda r: r.get("task_id", -1))
    out = {"store": str(store.path), "mode": mode, "tasks": results, "workers": workers,
           "trained": sum(r["status"] in ("trained", "resumed") for r in results),
           "existing": sum(r["status"] == "exists" for r in results),
           "seconds": time.perf_counter() - start}
    preempted = [r for r in results if r["status"] == "preempted"]
    failed = [r for r in results if r["status"] == "failed"]
    if failed:
        raise HpcsoupError(f"{len(failed)} of {len(results)} training task(s) failed: "
                           + "; ".join(f"task {r.get('task_id')}: {r['error']}" for r in failed))
    if preempted:
        raise Preempted(f"{len(preempted)} task(s) stopped by a signal after checkpointing; rerun "
                        f"`hpcsoup train --all` to resume them")
    return out

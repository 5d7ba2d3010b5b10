"""Training experts: sweep, shared inits, resumable fit, cluster batches, tasks, signals, --all."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.utils import coalesce

from hpcsoup.config import build_config
from hpcsoup.data import Graph
from hpcsoup.errors import ConfigError, ModelError
from hpcsoup.models import ModelSpec, build_model
from hpcsoup.store import Store
from hpcsoup.train import sweep
from hpcsoup.train.checkpoint import PREEMPTED_EXIT, Checkpointer, Preempted, StopFlag
from hpcsoup.train.loop import ClusterBatches, fit, predict
from hpcsoup.train.run import run_train

REPO = Path(__file__).resolve().parents[2]


def tiny_graph(n: int = 60, classes: int = 3, seed: int = 0) -> Graph:
    """A small random graph with class-dependent features (learnable in a few epochs)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(classes, (n,), generator=g)
    x = torch.randn(n, 8, generator=g) + torch.nn.functional.one_hot(y, 8).float() * 2
    src = torch.randint(n, (4 * n,), generator=g)
    dst = torch.randint(n, (4 * n,), generator=g)
    keep = src != dst
    edge_index = torch.stack([torch.cat([src[keep], dst[keep]]), torch.cat([dst[keep], src[keep]])])
    idx = torch.randperm(n, generator=g)
    masks = [torch.zeros(n, dtype=torch.bool) for _ in range(3)]
    for m, part in zip(masks, (idx[: n // 2], idx[n // 2: 3 * n // 4], idx[3 * n // 4:])):
        m[part] = True
    data = Data(x=x, y=y, edge_index=edge_index, train_mask=masks[0], val_mask=masks[1],
                test_mask=masks[2])
    return Graph("tiny", data, classes, "accuracy")


def _equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ sweep

def test_sweep_ids_seeds_and_shared_inits():
    cfg = build_config({"experts": {"arch": "sage", "count": 3, "seed": 10,
                                    "sweep": {"lr": [0.01, 0.005], "dropout": [0.1, 0.5, 0.6]}},
                        "specialists": {"archs": ["gcn", "gat", "gcn"], "seed": 7}})
    tasks = sweep.tasks(cfg)
    assert [t.expert_id for t in tasks] == ["sage-e000", "sage-e001", "sage-e002", "gcn-s0", "gat-s1",
                                            "gcn-s2"]
    assert [t.task_id for t in tasks] == list(range(6)) and sweep.array_size(cfg) == 6
    assert [t.seed for t in tasks] == [10, 11, 12, 7, 8, 9]
    assert [t.lr for t in tasks[:3]] == [0.01, 0.005, 0.01]
    assert [t.dropout for t in tasks[:3]] == [0.1, 0.5, 0.6]
    assert [t.role for t in tasks] == ["expert"] * 3 + ["specialist"] * 3
    assert [t.region for t in tasks[3:]] == [0, 1, 2] and tasks[3].parents == 3
    specs = [t.model_spec(1433, 7) for t in tasks]
    ids = [sweep.init_id(s, t.init_seed) for s, t in zip(specs, tasks)]
    assert len(set(ids[:3])) == 1, "a dropout/lr sweep must keep one shared init"
    assert ids[0].startswith("sage-") and ids[3] == ids[5] != ids[4]
    assert sweep.init_id(specs[0], 1) != ids[0]
    with pytest.raises(ConfigError, match=r"task id 6 is out of range: this config has 6 tasks"):
        sweep.task(cfg, 6)


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"'experts.arch' = 'mlp': 'mlp' is not allowed; choose from"):
        build_config({"experts": {"arch": "mlp"}})
    with pytest.raises(ConfigError, match=r"'specialists.archs'.*'transformer' is not allowed"):
        build_config({"specialists": {"archs": ["gcn", "transformer"]}})
    with pytest.raises(ModelError, match=r"unknown architecture 'mlp'"):
        ModelSpec("mlp", 4, 2)


# ------------------------------------------------------------------ fit

def _fit(graph, tmp_path=None, stop_at=None, every=3, epochs=12, batches=None, eval_every=1,
         patience=0):
    spec = ModelSpec("sage", graph.num_features, graph.num_classes, hidden=16, dropout=0.5)
    model = build_model(spec, seed=0)
    ckpt = None
    if tmp_path is not None:
        ckpt = Checkpointer(tmp_path / "ck.pt", key="k", every=every, stop=StopFlag(), name="t")

    def on_epoch(epoch, loss, scores):
        if stop_at is not None and epoch == stop_at:
            ckpt.stop.signal = signal.SIGTERM  # what the handler does on a real signal
    return fit(model, graph, epochs=epochs, lr=0.02, seed=3, on_epoch=on_epoch, checkpoint=ckpt,
               batches=batches, eval_every=eval_every, patience=patience)


def test_fit_is_deterministic_and_restores_the_global_rng():
    graph = tiny_graph()
    before = torch.get_rng_state()
    a, b = _fit(graph), _fit(graph)
    assert torch.equal(torch.get_rng_state(), before)
    assert _equal(a.state_dict, b.state_dict) and a.metrics == b.metrics
    assert set(a.metrics) == {"metric", "val", "test", "best_epoch"}


@pytest.mark.parametrize("batched", [False, True], ids=["full", "cluster"])
def test_stop_and_resume_equals_an_uninterrupted_run_bit_for_bit(tmp_path, batched):
    graph = tiny_graph()
    batches = ClusterBatches(graph.data.edge_index, torch.arange(60) % 6, 2) if batched else None
    whole = _fit(graph, batches=batches)
    with pytest.raises(Preempted, match=r"t: stopped by SIGTERM after epoch 5/12.*rerun the same task"):
        _fit(graph, tmp_path, stop_at=4, batches=batches)
    assert (tmp_path / "ck.pt").is_file()
    resumed = _fit(graph, tmp_path, batches=batches)
    assert resumed.resumed_from == 4 and resumed.epochs_run == 7
    assert _equal(resumed.state_dict, whole.state_dict) and resumed.metrics == whole.metrics


def test_checkpoint_of_other_settings_is_ignored(tmp_path):
    graph = tiny_graph()
    with pytest.raises(Preempted):
        _fit(graph, tmp_path, stop_at=2)
    ck = Checkpointer(tmp_path / "ck.pt", key="other", every=3)
    assert ck.load() is None
    model = build_model(ModelSpec("sage", 8, 3, hidden=16), seed=0)
    result = fit(model, graph, epochs=4, seed=3, checkpoint=ck)
    assert result.resumed_from is None and result.epochs_run == 4


def test_cluster_batches_cover_every_node_once_per_epoch():
    graph = tiny_graph()
    parts = torch.arange(60) % 7
    batches = ClusterBatches(graph.data.edge_index, parts, parts_per_batch=3)
    assert len(batches) == 3
    gen = torch.Generator().manual_seed(0)
    seen = [nodes for nodes, _ in batches.epoch(gen)]
    assert torch.equal(torch.cat(seen).sort().values, torch.arange(60))
    for nodes, local in batches.epoch(torch.Generator().manual_seed(0)):
        assert local.max() < nodes.numel()  # relabelled to the batch
        # only edges inside the batch survive
        inside = torch.isin(graph.data.edge_index, nodes).all(0).sum()
        assert local.size(1) == int(inside)
    with pytest.raises(ConfigError, match="parts_per_batch=0"):
        ClusterBatches(graph.data.edge_index, parts, 0)


def test_eval_every_checks_fewer_epochs_and_always_the_last():
    graph = tiny_graph()
    checked = []
    model = build_model(ModelSpec("gcn", 8, 3, hidden=8), seed=0)
    fit(model, graph, epochs=7, eval_every=3, on_epoch=lambda e, loss, s: s and checked.append(e))
    assert checked == [2, 5, 6]


@pytest.mark.parametrize("arch", ["gcn", "sage", "gat", "gin"])
def test_the_compact_sparse_forward_equals_the_layers_on_edge_index(arch):
    graph = tiny_graph()
    # the CSR form counts a repeated edge once; every loader's graphs are duplicate-free
    graph.data.edge_index = coalesce(graph.data.edge_index)
    model = build_model(ModelSpec(arch, 8, 3, hidden=16, heads=2), seed=1)
    plain = model.eval()(graph.data.x, graph.data.edge_index)
    assert torch.allclose(predict(model, graph), plain, atol=1e-5)


def test_patience_stops_after_p_checks_without_a_better_score_and_keeps_the_best():
    graph = tiny_graph(n=120, seed=2)
    stopped = _fit(graph, epochs=300, patience=4, eval_every=2)
    best = stopped.metrics["best_epoch"]
    assert stopped.last_epoch == best + 4 * 2 < 299 and stopped.epochs_run == stopped.last_epoch + 1
    # the same run without patience, cut at the epoch patience stopped: the same weights and scores
    cut = _fit(graph, epochs=stopped.last_epoch + 1, eval_every=2)
    assert _equal(stopped.state_dict, cut.state_dict) and stopped.metrics == cut.metrics
    with pytest.raises(ConfigError, match=r"patience=-1: must be an integer >= 0"):
        _fit(graph, patience=-1)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_fit_on_cuda_without_cuda_is_a_clear_error_before_any_work():
    model = build_model(ModelSpec("sage", 8, 3, hidden=16), seed=0)
    with pytest.raises(ConfigError, match=r"device='cuda:1', but this torch .* sees no CUDA device; "
                                          r"set device='cpu'"):
        fit(model, tiny_graph(), epochs=2, device="cuda:1")


def test_patience_survives_a_resume(tmp_path):
    graph = tiny_graph(n=120, seed=2)
    whole = _fit(graph, epochs=300, patience=3)
    stop_at = whole.metrics["best_epoch"] + 1            # between the best check and the stop
    with pytest.raises(Preempted):
        _fit(graph, tmp_path, stop_at=stop_at, every=1, epochs=300, patience=3)
    resumed = _fit(graph, tmp_path, every=1, epochs=300, patience=3)
    assert resumed.resumed_from == stop_at and resumed.last_epoch == whole.last_epoch
    assert _equal(resumed.state_dict, whole.state_dict) and resumed.metrics == whole.metrics


# ------------------------------------------------------------------ tasks on Cora

def _config(tmp_path: Path, data_root: Path, **experts) -> dict:
    return {"name": "t", "store": str(tmp_path / "s.zarr"), "threads": 1,
            "data": {"dataset": "Cora", "root": str(data_root)},
            "experts": {"arch": "sage", "count": 2, "epochs": 4, "hidden": 16,
                        "checkpoint_every": 2, **experts},
            "specialists": {"archs": ["gcn", "gat"], "split": "random", "epochs": 3, "hidden": 16}}


def test_train_all_keeps_no_graph_in_the_parent(tmp_path, data_root, monkeypatch):
    """`hpcsoup run` trains in Dask workers, then soups in its own process: the graph it loads
    for the inits' shapes must not stay cached there (a second copy at 2.45M nodes: +3.4 GiB).
    The workers are replaced by a stub (this test is about the parent)."""
    from hpcsoup.train import run

    seen = []
    monkeypatch.setattr(run, "_run_all", lambda cfg, store, todo, existing, force:
                        seen.append(dict(run._GRAPHS)) or [])
    run_train(build_config(_config(tmp_path, data_root)), all_tasks=True)
    assert seen == [{}] and run._GRAPHS == {}
    assert len(Store.open(tmp_path / "s.zarr").inits()) == 3  # the inits were made from it


def test_a_task_writes_its_expert_and_a_rerun_is_a_no_op(tmp_path, data_root):
    cfg = build_config(_config(tmp_path, data_root))
    out = run_train(cfg, task_id=1)
    assert out["tasks"][0]["status"] == "trained" and out["trained"] == 1
    store = Store.open(cfg.store)
    (info,) = store.groups("experts")
    a = info.attrs
    assert info.id == "sage-e001" and a["complete"] is True and a["role"] == "expert"
    assert a["arch"] == "sage" and a["dataset"] == "Cora" and a["seed"] == 1
    assert a["model"]["hidden"] == 16 and a["train_nodes"]["count"] == 140
    assert a["metrics"]["metric"] == "accuracy" and 0 < a["metrics"]["val"] <= 1
    assert 0 < a["metrics"]["test"] <= 1 and a["train_seconds"] > 0 and "torch" in a["versions"]
    assert a["config"]["experts"]["epochs"] == 4 and store.has_init(a["init_id"])
    assert not (store.path / ".checkpoints" / "sage-e001.pt").exists()
    # The stored init is the deterministic init of the expert's model spec.
    spec = ModelSpec.from_dict(a["model"])
    assert _equal(store.read_init(a["init_id"]), build_model(spec, seed=0).state_dict())
    again = run_train(cfg, task_id=1)
    assert again["tasks"][0]["status"] == "exists" and again["trained"] == 0
    assert len(store.groups("experts")) == 1


def test_specialists_record_their_region(tmp_path, data_root):
    cfg = build_config(_config(tmp_path, data_root))
    run_train(cfg, task_id=2)
    run_train(cfg, task_id=3)
    store = Store.open(cfg.store)
    assert [g.id for g in store.groups("experts", role="specialist")] == ["gat-s1", "gcn-s0"]
    r0 = store.read_array("experts", "gcn-s0", "region")
    r1 = store.read_array("experts", "gat-s1", "region")
    assert torch.equal(r0, r1) and r0.shape == (2708,) and set(r0.unique().tolist()) == {0, 1}
    attrs = store.group_attrs("experts", "gcn-s0")
    assert attrs["train_nodes"]["split"] == "random" and attrs["train_nodes"]["region"] == 0
    assert attrs["train_nodes"]["parents"] == 2
    other = store.group_attrs("experts", "gat-s1")
    assert attrs["train_nodes"]["count"] + other["train_nodes"]["count"] == 140
    assert store.group_attrs("experts", "gat-s1")["model"]["heads"] == 4


def test_partition_mini_batches_and_metis_specialists(tmp_path, data_root):
    values = _config(tmp_path, data_root, batching="partitions", batch_partitions=8, parts_per_batch=2,
                     epochs=3)
    values["specialists"]["split"] = "metis"
    cfg = build_config(values)
    run_train(cfg, task_id=0)
    run_train(cfg, task_id=2)
    store = Store.open(cfg.store)
    assert store.group_attrs("experts", "sage-e000")["hyper"]["batching"] == "partitions"
    assert store.group_attrs("experts", "sage-e000")["metrics"]["val"] > 1 / 7
    region = store.read_array("experts", "gcn-s0", "region")
    assert store.group_attrs("experts", "gcn-s0")["train_nodes"]["split"] == "metis"
    assert set(region.unique().tolist()) == {0, 1}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path, data_root):
    cfg = build_config(_config(tmp_path, data_root), ["device='cuda'"])
    with pytest.raises(ConfigError, match=r"device='cuda', but this torch .* sees no CUDA device"):
        run_train(cfg, task_id=0)


def test_task_id_is_required_outside_slurm(tmp_path, data_root, monkeypatch):
    monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
    cfg = build_config(_config(tmp_path, data_root))
    with pytest.raises(ConfigError, match=r"no task id: pass --task-id N \(0..3\), --all"):
        run_train(cfg)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "0")
    monkeypatch.setenv("SLURM_JOB_ID", "9")
    assert run_train(cfg)["tasks"][0]["expert_id"] == "sage-e000"


# ------------------------------------------------------------------ real signals in a subprocess

def _cli(config: Path, *args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "hpcsoup", "train", "-v", "--config", str(config), *args],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)


def _wait_for(proc: subprocess.Popen, text: str, timeout: float = 180) -> list[str]:
    lines, deadline = [], time.monotonic() + timeout
    for line in proc.stderr:
        lines.append(line)
        if text in line or time.monotonic() > deadline:
            break
    assert any(text in line for line in lines), "".join(lines[-20:])
    return lines


def _interrupted_run(tmp_path, data_root, sig, checkpoint_every):
    """Task 0 in a subprocess, hit by ``sig`` after epoch 3; then the same task in-process."""
    values = _config(tmp_path, data_root, epochs=12, checkpoint_every=checkpoint_every,
                     progress_every=1)
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(values))
    proc = _cli(config, "--task-id", "0")
    _wait_for(proc, "epoch 3/12")
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    store = Store.open(values["store"])
    assert store.groups("experts") == [], "an interrupted task must leave no visible expert"
    assert (store.path / ".checkpoints" / "sage-e000.pt").is_file()
    resumed = run_train(build_config(values), task_id=0)
    reference = run_train(build_config(values, [f"store='{tmp_path / 'ref.zarr'}'"]), task_id=0)
    assert reference["tasks"][0]["status"] == "trained"
    a, _ = store.load_group("experts", "sage-e000")
    b, _ = Store.open(tmp_path / "ref.zarr").load_group("experts", "sage-e000")
    return proc.returncode, err, resumed, a, b


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_is_bit_identical(tmp_path, data_root):
    rc, err, resumed, a, b = _interrupted_run(tmp_path, data_root, signal.SIGTERM, checkpoint_every=100)
    assert rc == PREEMPTED_EXIT, err
    assert "stopped by SIGTERM" in err
    assert resumed["tasks"][0]["status"] == "resumed"
    assert _equal(a, b), "SIGTERM + resume must equal the uninterrupted run bit for bit"


@pytest.mark.slow
def test_sigkill_is_invisible_and_the_rerun_completes_identically(tmp_path, data_root):
    rc, err, resumed, a, b = _interrupted_run(tmp_path, data_root, signal.SIGKILL, checkpoint_every=2)
    assert rc == -signal.SIGKILL
    assert resumed["tasks"][0]["status"] == "resumed"
    assert _equal(a, b)


# ------------------------------------------------------------------ --all through Dask

@pytest.mark.slow
def test_train_all_on_cora_with_eight_sage_experts(tmp_path, data_root):
    values = _config(tmp_path, data_root, count=8, epochs=3, progress_every=3)
    values["specialists"]["archs"] = []
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(values))
    proc = _cli(config, "--all", "--json")
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    assert result["trained"] == 8 and result["workers"] >= 1
    store = Store.open(values["store"])
    experts = store.groups("experts")
    assert [g.id for g in experts] == [f"sage-e{i:03d}" for i in range(8)]
    assert len({g.attrs["init_id"] for g in experts}) == 1 and store.inits() == [experts[0].attrs["init_id"]]
    for g in experts:
        assert set(g.attrs["metrics"]) >= {"metric", "val", "test"} and g.attrs["metrics"]["val"] > 0
    weights = [store.load_group("experts", g.id)[0]["convs.0.lin_l.weight"] for g in experts]
    assert all(not torch.equal(weights[i], weights[j]) for i in range(8) for j in range(i))
    # Same seed in a single task here gives the same weights as the Dask worker did.
    single = build_config(values, [f"store='{tmp_path / 'one.zarr'}'"])
    run_train(single, task_id=5)
    assert _equal(Store.open(tmp_path / "one.zarr").load_group("experts", "sage-e005")[0],
                  store.load_group("experts", "sage-e005")[0])
    # A second --all finds everything done.
    again = run_train(build_config(values), all_tasks=True)
    assert again["existing"] == 8 and again["trained"] == 0


@pytest.mark.slow
def test_sigterm_to_train_all_checkpoints_every_worker_and_the_rerun_resumes(tmp_path, data_root):
    """The whole process group gets SIGTERM (as from SLURM or `timeout`): exit 75, then resume."""
    values = _config(tmp_path, data_root, count=2, epochs=15, checkpoint_every=100, progress_every=1)
    values["specialists"]["archs"] = []
    config = tmp_path / "cfg.json"
    config.write_text(json.dumps(values))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "hpcsoup", "train", "-v", "--config", str(config),
                             "--all"],
                            stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    _wait_for(proc, "epoch 3/15")
    os.killpg(proc.pid, signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    store = Store.open(values["store"])
    assert store.groups("experts") == []
    saved = sorted(p.name for p in (store.path / ".checkpoints").glob("*.pt"))
    assert saved == ["sage-e000.pt", "sage-e001.pt"], "every worker checkpoints on the signal"
    resumed = run_train(build_config(values), task_id=0)
    assert resumed["tasks"][0]["status"] == "resumed"
    reference = run_train(build_config(values, [f"store='{tmp_path / 'ref.zarr'}'"]), task_id=0)
    assert reference["tasks"][0]["status"] == "trained"
    assert _equal(store.load_group("experts", "sage-e000")[0],
                  Store.open(tmp_path / "ref.zarr").load_group("experts", "sage-e000")[0])

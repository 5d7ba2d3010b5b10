"""``hpcsoup merge`` over a store of specialists written by the train stage."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hpcsoup.config import load_config
from hpcsoup.errors import MergeError

REPO = Path(__file__).resolve().parents[2]


def _write_config(path: Path, store: Path, data_root: Path) -> Path:
    path.write_text(f"""
name = "merge-test"
store = "{store}"
threads = 1
[data]
dataset = "Cora"
root = "{data_root}"
[experts]
count = 0
[specialists]
archs = ["gcn", "gat"]
split = "metis"
hidden = 16
heads = 2
epochs = 15
[merge]
repeats = 2
""")
    return path


@pytest.fixture(scope="module")
def specialist_store(tmp_path_factory, data_root):
    """A store holding a GCN and a GAT specialist on Cora's METIS halves (train stage API)."""
    from hpcsoup.train.run import run_train

    folder = tmp_path_factory.mktemp("merge-store")
    config = _write_config(folder / "exp.toml", folder / "s.zarr", data_root)
    cfg = load_config(config)
    for task in (0, 1):
        run_train(cfg, task_id=task)
    return config


def test_run_merge_stores_a_child_that_runs_alone(specialist_store):
    from hpcsoup.data import load_from_config
    from hpcsoup.merge.run import load_merged, run_merge
    from hpcsoup.store import Store

    cfg = load_config(specialist_store)
    result = run_merge(cfg)
    assert result["parents"] == ["gcn-s0", "gat-s1"]
    store = Store.open(cfg.store)
    assert [g.id for g in store.groups("merges", method="hgrama")] == [result["merge_id"]]
    _, attrs = store.load_group("merges", result["merge_id"])
    metrics = attrs["metrics"]
    assert set(metrics["retention"]) == {"gcn-s0", "gat-s1"}
    assert 0.5 < metrics["retention_min"] <= metrics["retention_mean"]
    assert all(math.isfinite(metrics[k]) and metrics[k] > 0  # measured timings, not placeholders
               for k in ("speedup_vs_ensemble", "speedup_uncached"))
    assert attrs["parents"] == ["gcn-s0", "gat-s1"] and attrs["settings"]["alignment"] == "procrustes"
    # METIS halves on Cora: the child keeps most of each parent's accuracy on its region
    assert metrics["retention_mean"] > 0.8

    graph = load_from_config(cfg)
    child = load_merged(store, result["merge_id"])
    logits = child(graph.data.x, graph.data.edge_index)
    assert abs(graph.score(logits, "test") - metrics["test"]) < 1e-6

    again = run_merge(cfg)  # same inputs -> the same group id and identical weights
    assert again["merge_id"] == result["merge_id"]
    tensors, _ = store.load_group("merges", result["merge_id"])
    for name, tensor in child.tensors().items():
        assert torch.equal(tensor, tensors[name]), name


def test_a_large_graphs_timing_runs_on_whole_metis_partitions(specialist_store):
    """Above merge.timing_nodes the child and the ensemble are timed on the subgraph of whole
    METIS partitions (the graph's stored partition); the scores are the whole graph's as ever."""
    from hpcsoup.merge.run import run_merge

    whole = run_merge(load_config(specialist_store))["metrics"]
    sampled = run_merge(load_config(specialist_store, ["merge.timing_nodes=1200"]))["metrics"]
    assert whole["timing"]["graph"] == {"nodes": 2708, "edges": 10556, "sample": "whole graph"}
    graph = sampled["timing"]["graph"]
    assert 0 < graph["nodes"] <= 1200 and 0 < graph["edges"] < 10556
    assert graph["sample"].endswith("of 32 METIS partitions (merge.timing_nodes = 1200)")
    assert all(v > 0 for v in sampled["timing"]["speedup"].values())
    assert (sampled["val"], sampled["test"], sampled["ensemble"]) == \
        (whole["val"], whole["test"], whole["ensemble"])


def test_merge_path_reads_no_labels(specialist_store, monkeypatch):
    """Labels shuffled on the graph the whole ``run_merge`` path loads give a bit-identical child
    (the merge reads features, edges, the train mask and the regions, never ``y``); the scores,
    which do read the labels, change -- so the shuffled graph did reach the merge."""
    from hpcsoup.data import load_from_config
    from hpcsoup.merge import run
    from hpcsoup.store import Store

    cfg = load_config(specialist_store)
    store = Store.open(cfg.store)
    honest = run.run_merge(cfg)
    tensors, _ = store.load_group("merges", honest["merge_id"])

    def shuffled_labels(config):
        graph = load_from_config(config)
        order = torch.randperm(graph.num_nodes, generator=torch.Generator().manual_seed(0))
        graph.data.y = graph.data.y[order]
        return graph

    monkeypatch.setattr(run, "load_from_config", shuffled_labels)
    blind = run.run_merge(cfg)
    assert blind["merge_id"] == honest["merge_id"]
    again, _ = store.load_group("merges", blind["merge_id"])
    assert tensors.keys() == again.keys()
    for name, tensor in tensors.items():
        assert torch.equal(tensor, again[name]), name
    assert blind["metrics"]["test"] < honest["metrics"]["test"] - 0.2


def test_cli_merge_prints_json(specialist_store, capsys):
    from hpcsoup.cli import main

    rc = main(["merge", "--config", str(specialist_store), "--parents", "gat-s1,gcn-s0",
               "--set", "merge.threshold=0.0", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["parents"] == ["gat-s1", "gcn-s0"]
    # threshold 0: every parent with a positive gate weight runs on a node (most nodes: both)
    assert out["metrics"]["routing"]["parents_per_node"] > 1.5


def test_missing_parents_are_a_clear_error(specialist_store):
    from hpcsoup.merge.run import run_merge

    cfg = load_config(specialist_store)
    with pytest.raises(MergeError, match=r"\['sage-s9'\] are not complete experts .*hpcsoup train"):
        run_merge(cfg, parents=["gcn-s0", "sage-s9"])
    with pytest.raises(MergeError, match="at least 2 parents"):
        run_merge(cfg, parents=["gcn-s0"])


@pytest.mark.slow
def test_merge_sh_runs_outside_slurm(specialist_store, tmp_path):
    env = dict(os.environ, HPCSOUP_PYTHON=sys.executable)
    env.pop("SLURM_JOB_ID", None)
    out = subprocess.run(["bash", str(REPO / "slurm" / "merge.sh"), str(specialist_store),
                          "merge.alignment=\"permutation\"", "--json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "not inside SLURM" in out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["metrics"]["retention_mean"] > 0.5


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_merge_sh(slurm_cluster, specialist_store, tmp_path):
    (tmp_path / "slurm-logs").mkdir()
    env = dict(os.environ, HPCSOUP_PYTHON=sys.executable, SLURM_CONF=slurm_cluster)
    out = subprocess.run(["sbatch", "--wait", "--parsable", f"--chdir={tmp_path}",
                          str(REPO / "slurm" / "merge.sh"), str(specialist_store), "--json"],
                         env=env, capture_output=True, text=True, timeout=900)
    job = out.stdout.strip().split(";")[0]
    log = tmp_path / "slurm-logs" / f"hpcsoup-merge-{job}.out"
    text = log.read_text() if log.exists() else ""
    assert out.returncode == 0, f"{out.stderr[-2000:]}\n{text[-3000:]}"
    assert json.loads(text.strip().splitlines()[-1])["parents"] == ["gcn-s0", "gat-s1"]


def test_merge_sh_rejects_a_missing_config(tmp_path):
    out = subprocess.run(["bash", str(REPO / "slurm" / "merge.sh"), str(tmp_path / "nope.toml")],
                         capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, HPCSOUP_PYTHON=sys.executable))
    assert out.returncode == 2 and "config file" in out.stderr

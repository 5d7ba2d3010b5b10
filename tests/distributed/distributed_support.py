"""Fixtures of the distributed-souping tests: a store of Cora experts and its config file.

Both the in-rank ``mpi`` tests and the tests that launch ``mpiexec`` themselves use
them; under ``mpiexec`` rank 0 builds the store and every rank gets its path.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_support import make_graph, train_experts

from hpcsoup.data import load_dataset
from hpcsoup.models import ModelSpec, build_model
from hpcsoup.train import fit

REPO = Path(__file__).resolve().parents[2]

#: a quick PLS: 8 METIS parts of Cora, 4 per step, 1-hop halo; the real stopping rule
#: check "partitions": "auto" would check the full graph in the one-rank run, the shards' on more
PLS = {"partitions": 8, "per_step": 4, "halo": 1, "steps": 60, "lr": 0.5, "patience": 3,
       "min_steps": 10, "eval_every": 5, "check": "partitions"}


def write_expert_store(store: Path, data_root: Path, n: int = 3, epochs: int = 20,
                       arch: str = "sage") -> Path:
    """``n`` Cora experts (2 layers, 16 hidden) trained from one shared init, as `hpcsoup train`
    would store them."""
    from hpcsoup.store import Store, provenance

    graph = load_dataset("Cora", data_root)
    spec = ModelSpec(arch, graph.num_features, graph.num_classes, layers=2, hidden=16)
    init = build_model(spec, seed=0).state_dict()
    st = Store.create(store, attrs={"name": "dist-tests"})
    st.write_init("init-0", init, attrs={"arch": arch, "model": spec.to_dict()})
    for i in range(n):
        model = build_model(spec)
        model.load_state_dict(init)
        result = fit(model, graph, epochs=epochs, lr=0.02, seed=i)
        st.write_group("experts", f"{arch}-e{i:03d}", result.state_dict, {
            "arch": arch, "model": spec.to_dict(), "dataset": "Cora", "init_id": "init-0",
            "seed": i, "role": "expert", "metrics": {k: v for k, v in result.metrics.items()},
            "train_nodes": {"split": "all", "count": int(graph.mask("train").sum())},
            "train_seconds": result.seconds, "versions": provenance()})
    return store


def write_config(path: Path, store: Path, data_root: Path, **pls) -> Path:
    """A TOML experiment file for the store (``pls`` overrides :data:`PLS`)."""
    settings = {**PLS, **pls}
    lines = [f'store = {json.dumps(str(store))}', 'threads = 1', '', '[data]',
             'dataset = "Cora"', f'root = {json.dumps(str(data_root))}', '', '[experts]',
             'arch = "sage"', 'layers = 2', 'hidden = 16', '', '[soup]', 'methods = ["pls"]',
             'seed = 3', '', '[soup.learned]', 'optimizer = "adam"', '', '[soup.pls]']
    lines += [f"{k} = {json.dumps(v)}" for k, v in settings.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="session")
def cora_store(tmp_path_factory, data_root) -> Path:
    """A store with 3 Cora experts (built once per session; never written to by tests)."""
    torch.set_num_threads(1)
    return write_expert_store(tmp_path_factory.mktemp("dist") / "experts.zarr", data_root)


def copy_store(source: Path, target: Path) -> Path:
    """A private copy of a store (each run writes its own soups and partitioned graph)."""
    import shutil
    shutil.copytree(source, target)
    return target


def launch(command: list[str], timeout: float = 300, env: dict | None = None) -> tuple:
    """Run a command; ``(returncode, stdout, stderr, seconds)``."""
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    for name in ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMI_HOSTNAME", "HYDI_CONTROL_FD",
                 "MPI_LOCALNRANKS", "MPI_LOCALRANKID"):  # a test run under mpiexec itself
        full_env.pop(name, None)
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=full_env,
                          cwd=REPO)
    return done.returncode, done.stdout, done.stderr, time.perf_counter() - start


def last_json(stdout: str) -> dict:
    lines = [line for line in stdout.strip().splitlines() if line.startswith("{")]
    assert lines, f"no JSON line in the output:\n{stdout[-2000:]}"
    return json.loads(lines[-1])


def python() -> str:
    return sys.executable


def tiny_graph(nodes: int = 300, **options):
    """tests/tiny_support.py's graph, a little larger (partitions of several dozen nodes)."""
    return make_graph(nodes, **options)


def tiny_experts(graph, arch: str = "sage", n: int = 3, epochs: int = 15):
    """``n`` experts of ``graph`` from one shared init (deterministic: every rank gets the same)."""
    return train_experts(graph, arch, n=n, epochs=epochs)

"""The Zarr store: exact round trips, complete-last visibility, concurrent writers, clear errors."""
from __future__ import annotations

import contextlib
import json
import multiprocessing
import queue
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import zarr

from hpcsoup.cli import main as cli_main
from hpcsoup.errors import StoreError, StoreNotFoundError
from hpcsoup.store import GroupInfo, Store, describe_store, provenance
from hpcsoup.store.zarr_store import _HOST


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"convs.0.lin_l.weight": torch.randn(8, 5, generator=g),
            "convs.0.lin_l.bias": torch.randn(8, generator=g),
            "convs.1.eps": torch.tensor(0.25), "counter": torch.tensor([3, 4], dtype=torch.int64)}


def _equal(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
                                      and torch.equal(a[k], b[k]) for k in a)


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.create(tmp_path / "s.zarr", attrs={"name": "test"})


@pytest.mark.parametrize("tensor", [
    torch.randn(3, 4), torch.randn(5).half(), torch.randn(6).bfloat16(), torch.arange(7),
    torch.tensor(2.5), torch.zeros(0, 3), torch.tensor([True, False, True]),
    torch.randn(4, 3).t(), torch.randn(3).to(torch.float8_e4m3fn), torch.randn(2, 2).double(),
], ids=["f32", "f16", "bf16", "i64", "0d", "empty", "bool", "non-contiguous", "f8", "f64"])
def test_every_dtype_and_shape_round_trips_exactly(store, tensor):
    store.write_group("experts", "x", {"t": tensor}, {"arch": "sage"})
    back = store.load_group("experts", "x")[0]["t"]
    assert back.dtype == tensor.dtype and back.shape == tensor.shape

    def bits(t):  # exact comparison for every dtype (float8 has no torch.equal)
        return t.contiguous().reshape(-1).view(torch.uint8)
    assert torch.equal(bits(back), bits(tensor))


def test_layout_attrs_and_extra_arrays(store):
    info = store.write_group("experts", "sage-e000", _state(), {"arch": "sage", "metrics": {"val": 0.5}},
                             arrays={"region": torch.tensor([0, 1, 1, 0])})
    assert info == GroupInfo("experts", "sage-e000", {"arch": "sage", "metrics": {"val": 0.5},
                                                      "complete": True})
    root = store.path
    assert (root / "experts/sage-e000/params/convs.0.lin_l.weight/zarr.json").is_file()
    meta = json.loads((root / "experts/sage-e000/zarr.json").read_text())
    assert meta["attributes"]["complete"] is True and meta["zarr_format"] == 3
    state, attrs = store.load_group("experts", "sage-e000")
    assert _equal(state, _state()) and attrs["arch"] == "sage"
    assert torch.equal(store.read_array("experts", "sage-e000", "region"), torch.tensor([0, 1, 1, 0]))
    assert store.array_names("experts", "sage-e000") == ["region"]
    assert store.param_info("experts", "sage-e000")["convs.0.lin_l.weight"]["shape"] == [8, 5]
    store.write_array("experts", "sage-e000", "gates", torch.ones(2, 3))
    assert torch.equal(store.read_array("experts", "sage-e000", "gates"), torch.ones(2, 3))
    with pytest.raises(StoreNotFoundError, match=r"'merges/m' is not in store"):
        store.write_array("merges", "m", "gates", torch.ones(2))
    with pytest.raises(StoreNotFoundError, match=r"'experts/sage-e000' has no array 'nope'"):
        store.read_array("experts", "sage-e000", "nope")
    assert Store.open(root).attrs["name"] == "test"


def test_create_is_idempotent_and_keeps_the_first_attrs(tmp_path):
    Store.create(tmp_path / "s.zarr", attrs={"name": "first"})
    again = Store.create(tmp_path / "s.zarr", attrs={"name": "second"})
    assert again.attrs["name"] == "first"


def test_only_complete_groups_are_visible_and_filters_apply(store):
    store.write_group("experts", "a", _state(0), {"arch": "sage", "role": "expert"})
    store.write_group("experts", "b", _state(1), {"arch": "gcn", "role": "specialist"})
    # An incomplete group at the final name (e.g. written by another tool, never completed).
    half = zarr.create_group(store=str(store.path / "experts" / "c"),
                             attributes={"arch": "sage", "complete": False})
    half.create_group("params")
    assert [g.id for g in store.groups("experts")] == ["a", "b"]
    assert [g.id for g in store.groups("experts", arch="sage")] == ["a"]
    assert [g.id for g in store.groups("experts", role="specialist")] == ["b"]
    assert [g.id for g in store.incomplete("experts")] == ["c"]
    with pytest.raises(StoreError, match=r"'experts/c'.*incomplete"):
        store.load_group("experts", "c")
    # The rerun replaces the incomplete group.
    store.write_group("experts", "c", _state(2), {"arch": "sage"})
    assert _equal(store.load_group("experts", "c")[0], _state(2))
    assert store.incomplete("experts") == []


def test_a_complete_group_is_never_silently_replaced(store):
    store.write_group("soups", "uniform", _state(0), {"method": "uniform"})
    with pytest.raises(StoreError, match=r"'soups/uniform' already exists and is complete.*overwrite=True"):
        store.write_group("soups", "uniform", _state(1), {"method": "uniform"})
    store.write_group("soups", "uniform", _state(1), {"method": "uniform"}, overwrite=True)
    assert _equal(store.load_group("soups", "uniform")[0], _state(1))


def test_inits_are_written_once(store):
    assert store.write_init("sage-abc", _state(0), {"arch": "sage"}) is True
    assert store.write_init("sage-abc", _state(1), {"arch": "sage"}) is False  # the first one stays
    assert _equal(store.read_init("sage-abc"), _state(0))
    assert store.inits() == ["sage-abc"]
    with pytest.raises(StoreNotFoundError, match=r"init 'gcn-x' is not in store .*sage-abc"):
        store.read_init("gcn-x")


def test_a_dead_writers_temporary_copy_is_invisible_and_cleaned_up(store):
    """A writer SIGKILLed mid-write leaves only a hidden temporary copy; the rerun removes it."""
    dead = subprocess.Popen(["true"])
    dead.wait()  # a pid that is certainly not running any more
    tmp = store.path / "experts" / f".tmp~sage-e002~{_HOST}~{dead.pid}~abcd1234"
    zarr.create_group(store=str(tmp), attributes={"arch": "sage", "complete": False})
    assert store.groups("experts") == []
    (info,) = store.incomplete("experts")
    assert info.id == "sage-e002" and info.attrs["writer"] == f"{_HOST}:{dead.pid}"
    store.write_group("experts", "sage-e002", _state(), {"arch": "sage"})
    assert not tmp.exists() and [g.id for g in store.groups("experts")] == ["sage-e002"]
    assert store.incomplete("experts") == []


# ------------------------------------------------------------------ bad input

def _chunk(store: Store, gid: str, name: str) -> Path:
    chunks = [p for p in (store.path / "experts" / gid / "params" / name / "c").rglob("*") if p.is_file()]
    assert chunks, "expected a chunk file"
    return chunks[0]


def test_corrupt_chunk_names_group_and_array(store):
    store.write_group("experts", "sage-e003", _state(), {"arch": "sage"})
    chunk = _chunk(store, "sage-e003", "convs.0.lin_l.weight")
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    with pytest.raises(StoreError, match=r"'experts/sage-e003': array 'convs.0.lin_l.weight'.*corrupt"):
        store.load_group("experts", "sage-e003")


def test_deleted_chunk_is_caught_by_the_checksum(store):
    # zarr reads a missing chunk as zeros without complaint: the manifest checksum catches it.
    store.write_group("experts", "sage-e004", _state(), {"arch": "sage"})
    _chunk(store, "sage-e004", "convs.0.lin_l.bias").unlink()
    with pytest.raises(StoreError, match=r"'experts/sage-e004': array 'convs.0.lin_l.bias'.*checksum"):
        store.load_group("experts", "sage-e004")


def test_missing_array_names_group_and_array(store):
    store.write_group("experts", "gcn-s0", _state(), {"arch": "gcn"})
    shutil.rmtree(store.path / "experts/gcn-s0/params/convs.1.eps")
    with pytest.raises(StoreError, match=r"'experts/gcn-s0': array 'convs.1.eps' is missing"):
        store.load_group("experts", "gcn-s0")


def test_nan_weights_name_group_and_array(store):
    state = _state()
    state["convs.0.lin_l.bias"][2] = float("nan")
    store.write_group("experts", "sage-e001", state, {"arch": "sage"})
    with pytest.raises(StoreError, match=r"'experts/sage-e001': array 'convs.0.lin_l.bias' holds 1 NaN"):
        store.load_group("experts", "sage-e001")


def test_wrong_store_path_and_missing_group(tmp_path, store):
    with pytest.raises(StoreNotFoundError, match=r"store '.*nope.zarr' does not exist"):
        Store.open(tmp_path / "nope.zarr")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "file.txt").write_text("x")
    with pytest.raises(StoreError, match=r"'.*plain' is not a hpcsoup store"):
        Store.open(tmp_path / "plain")
    with pytest.raises(StoreError, match=r"cannot create a store at '.*plain'"):
        Store.create(tmp_path / "plain")
    with pytest.raises(StoreNotFoundError, match=r"'experts/sage-e999' is not in store"):
        store.load_group("experts", "sage-e999")
    with pytest.raises(StoreError, match=r"kind 'expert' is unknown"):
        store.groups("expert")
    with pytest.raises(StoreError, match=r"id '../x' is not allowed"):
        store.write_group("experts", "../x", _state(), {})
    assert isinstance(StoreNotFoundError("x"), FileNotFoundError)


# ------------------------------------------------------------------ concurrency

def _writer(path: str, i: int, barrier, won) -> None:
    barrier.wait()
    store = Store.create(path, attrs={"writer": i})
    store.write_init("shared", _state(99), {"by": i})
    store.write_group("experts", f"w{i}", _state(i), {"arch": "sage", "writer": i})
    try:  # every writer also races for one shared id: exactly one may win
        store.write_group("experts", "dup", _state(100 + i), {"writer": i})
        won.put(i)
    except StoreError as exc:
        assert "already exists and is complete" in str(exc)


@pytest.mark.parametrize("round_", range(3))
def test_eight_concurrent_writers_lose_nothing(tmp_path, round_):
    """8 processes start together: each creates the root, the shared init and its own expert."""
    ctx = multiprocessing.get_context("fork")
    barrier, won = ctx.Barrier(8), ctx.Queue()
    path = str(tmp_path / "c.zarr")
    procs = [ctx.Process(target=_writer, args=(path, i, barrier, won)) for i in range(8)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * 8
    store = Store.open(path)
    winners = []
    with contextlib.suppress(queue.Empty):
        while True:
            winners.append(won.get(timeout=1))
    assert len(winners) == 1
    dup_state, dup_attrs = store.load_group("experts", "dup")
    assert dup_attrs["writer"] == winners[0] and _equal(dup_state, _state(100 + winners[0]))
    assert [g.id for g in store.groups("experts")] == ["dup"] + [f"w{i}" for i in range(8)]
    for i in range(8):
        assert _equal(store.load_group("experts", f"w{i}")[0], _state(i))
    assert _equal(store.read_init("shared"), _state(99))
    assert store.attrs["writer"] in range(8)
    leftovers = [p.name for d in (tmp_path, tmp_path / "c.zarr/inits", tmp_path / "c.zarr/experts")
                 for p in d.iterdir() if p.name.startswith(".")]
    assert leftovers == []


# ------------------------------------------------------------------ ls / show

def test_describe_store_and_cli(store, capsys):
    store.write_group("experts", "sage-e000", _state(), {
        "arch": "sage", "role": "expert", "init_id": "sage-1", "seed": 0,
        "train_nodes": {"split": "all", "count": 140},
        "metrics": {"metric": "accuracy", "val": 0.75, "test": 0.8}, "train_seconds": 1.5})
    out = describe_store(store.path, echo=False)
    assert out["experts"][0]["id"] == "sage-e000" and out["experts"][0]["val"] == 0.75
    assert cli_main(["store", "ls", str(store.path)]) == 0
    text = capsys.readouterr().out
    assert "sage-e000" in text and "0.7500" in text and "experts: 1 complete" in text
    assert cli_main(["store", "show", str(store.path), "experts/sage-e000", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["valid"] is True and shown["params"]["convs.0.lin_l.weight"]["shape"] == [8, 5]
    _chunk(store, "sage-e000", "convs.0.lin_l.bias").unlink()
    assert describe_store(store.path, "sage-e000", echo=False)["valid"] is False
    assert cli_main(["store", "ls", str(store.path) + "-missing"]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_provenance_names_versions():
    p = provenance()
    assert {"python", "torch", "torch_geometric", "zarr", "hpcsoup", "hostname", "time"} <= set(p)

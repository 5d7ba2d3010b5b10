"""The store's graph kind: a graph cut into shards, written once, read back one shard at a time.

Real Zarr on disk throughout; the read-only case is a real read-only bind mount (root only, as
in tests/test_faults.py, whose fixture it uses).
"""
from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
import zarr
from test_faults import read_only  # noqa: F401  (a fixture: a real read-only bind mount)
from tiny_support import make_graph

from hpcsoup.cli import main as cli_main
from hpcsoup.distributed.shards import is_prepared, load_shard, open_parts, prepare, shard_path
from hpcsoup.errors import StoreAccessError, StoreError, StoreNotFoundError
from hpcsoup.store import GRAPHS, Store
from hpcsoup.store.zarr_store import _HOST, GRAPH_FORMAT, GRAPH_FORMAT_ATTR

GID = "tiny/parts-2-halo1-seed0"


def _shard(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"x": torch.randn(5, 3, generator=g), "edge_index": torch.randint(0, 5, (2, 7), generator=g),
            "mask": torch.rand(5, generator=g) > 0.5}


def _write(store: Store, gid: str = GID, tag: str = "first") -> None:
    with store.write_graph(gid, {"dataset": "tiny", "tag": tag},
                           arrays={"labels": torch.arange(4)}) as writer:
        for k in range(2):
            writer.add(f"p{k:05d}", _shard(k), {"core_count": 3 + k})
        writer.attrs.update({"partitions": 2, "sizes": [5, 5]})


@pytest.fixture
def store(tmp_path) -> Store:
    return Store.create(tmp_path / "s.zarr")


def test_a_shard_set_round_trips_and_one_shard_is_read_alone(store):
    _write(store)
    folder = store.path / GRAPHS / "tiny" / "parts-2-halo1-seed0"
    assert store.graph_path(GID) == folder and Store.locate_graph(folder)[1] == GID
    attrs = store.graph_attrs(GID)
    assert attrs[GRAPH_FORMAT_ATTR] == GRAPH_FORMAT and attrs["complete"] is True
    assert attrs["partitions"] == 2 and attrs["tag"] == "first"
    assert [g.id for g in store.groups(GRAPHS)] == [GID] and store.has_group(GRAPHS, GID)
    tensors, shard_attrs = store.read_graph_arrays(GID, ["x", "edge_index", "mask"], "p00001")
    assert shard_attrs["core_count"] == 4
    for name, tensor in _shard(1).items():
        assert tensors[name].dtype == tensor.dtype and torch.equal(tensors[name], tensor), name
    assert torch.equal(store.read_graph_arrays(GID, ["labels"])[0]["labels"], torch.arange(4))
    # the same compressor and checksums as the other kinds
    meta = json.loads((folder / "p00000" / "x" / "zarr.json").read_text())
    assert [c["name"] for c in meta["codecs"][1:]] == ["zstd", "crc32c"] and "sha1" in meta["attributes"]
    # one shard is read without touching the others: a damaged p00000 does not matter to p00001
    shutil.rmtree(folder / "p00000" / "x" / "c")
    store.read_graph_arrays(GID, ["x"], "p00001")
    with pytest.raises(StoreError, match=rf"'graphs/{GID}/p00000': array 'x' does not match its "
                                         rf"checksum.*hpcsoup partition"):
        store.read_graph_arrays(GID, ["x"], "p00000")
    with pytest.raises(StoreNotFoundError, match=rf"'graphs/{GID}/p00002' is not in store"):
        store.read_graph_arrays(GID, ["x"], "p00002")
    # a second writer of the same set keeps the first one's copy (both hold the same graph)
    _write(store, tag="second")
    assert store.graph_attrs(GID)["tag"] == "first"
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no temporary copy left


@pytest.mark.parametrize("damage", ["incomplete", "old format", "dead writer"])
def test_a_half_written_or_stale_set_is_refused_clearly_and_rebuilt(store, damage):
    folder = store.path / GRAPHS / "tiny"
    if damage == "dead writer":  # SIGKILLed mid-write: only its hidden temporary copy is there
        dead = subprocess.Popen(["true"])
        dead.wait()  # a pid that is certainly not running any more
        zarr.create_group(store=str(folder / f".tmp~parts-2-halo1-seed0~{_HOST}~{dead.pid}~abcd1234"),
                          attributes={"complete": False})
    else:
        zarr.create_group(store=str(folder / "parts-2-halo1-seed0"), attributes={
            "complete": damage == "old format", GRAPH_FORMAT_ATTR: 1})
    assert store.groups(GRAPHS) == [] and not store.has_group(GRAPHS, GID)
    assert [g.id for g in store.incomplete(GRAPHS)] == [GID]
    problem = {"incomplete": StoreError("is incomplete"),
               "old format": StoreError(f"has format 1, this hpcsoup reads format {GRAPH_FORMAT}"),
               "dead writer": StoreNotFoundError("is not in store")}[damage]
    with pytest.raises(type(problem), match=rf"'graphs/{GID}' .*{problem}.*`hpcsoup partition"):
        store.graph_attrs(GID)
    _write(store)  # the rerun replaces it
    assert store.graph_attrs(GID)["tag"] == "first" and store.incomplete(GRAPHS) == []
    if damage == "dead writer":  # (its pid is not running on this host: its copy was removed)
        assert [p.name for p in folder.iterdir()] == ["parts-2-halo1-seed0"]


def test_the_partitioned_graph_is_rebuilt_when_incomplete_or_damaged(store):
    graph = make_graph(120)
    path = shard_path(store.path, "tiny", 3, 1, 0)
    prepare(path, graph, 3, 1)
    attrs = open_parts(path)
    assert attrs["partitions"] == 3 and sum(attrs["core"]) == 120 and "versions" in attrs
    group = zarr.open_group(str(path), mode="r+")
    group.attrs["complete"] = False  # as a writer of an older hpcsoup killed mid-way left it
    assert not is_prepared(path)
    with pytest.raises(StoreError, match="is incomplete"):
        load_shard(path, 0, 1)
    prepare(path, graph, 3, 1)
    shard = load_shard(path, 1, 2)
    assert sorted(shard.parts) == [1] and shard.attrs == attrs | {"versions": shard.attrs["versions"]}
    # a complete set that lost a partition: the error says how to rebuild it, and that works
    shutil.rmtree(path / "p00002")
    load_shard(path, 1, 2)  # rank 1 of 2 holds partition 1 only
    fix = rf"hpcsoup store rm {store.path} graphs/tiny/parts-3-halo1-seed0`, then `hpcsoup partition"
    with pytest.raises(StoreNotFoundError, match=rf"partition 2 is missing.*{fix}"):
        load_shard(path, 0, 2)
    assert cli_main(["store", "rm", str(store.path), "graphs/tiny/parts-3-halo1-seed0"]) == 0
    prepare(path, graph, 3, 1)
    assert sorted(load_shard(path, 0, 2).parts) == [0, 2]


def test_store_ls_show_and_rm_see_graph_shard_sets(store, capsys):
    _write(store)
    _write(store, "tiny/parts-4-halo0-seed0")
    assert cli_main(["store", "ls", str(store.path)]) == 0
    text = capsys.readouterr().out
    assert "graphs: 2 complete" in text and GID in text and "tiny/parts-4-halo0-seed0" in text
    listed = [g.id for g in Store.open(store.path).groups(GRAPHS)]
    assert listed == [GID, "tiny/parts-4-halo0-seed0"]
    assert cli_main(["store", "show", str(store.path), f"graphs/{GID}", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert shown["valid"] is True and shown["arrays"] == ["labels", "p00000", "p00001"]
    assert cli_main(["store", "rm", str(store.path), f"graphs/{GID}"]) == 0
    assert f"removed graphs/{GID}" in capsys.readouterr().out
    assert [g.id for g in store.groups(GRAPHS)] == ["tiny/parts-4-halo0-seed0"]
    assert cli_main(["store", "rm", str(store.path), "graphs/tiny/parts-4-halo0-seed0"]) == 0
    assert not (store.path / GRAPHS / "tiny").exists()  # the graph's folder went with its last set
    assert cli_main(["store", "rm", str(store.path), f"graphs/{GID}"]) == 2
    assert f"'graphs/{GID}' is not in store" in capsys.readouterr().err
    assert cli_main(["store", "rm", str(store.path), "graphs/tiny"]) == 2
    assert "give '<graph>/<set>'" in capsys.readouterr().err


def test_a_read_only_store_refuses_a_shard_set_in_one_line(tmp_path, read_only, capsys):  # noqa: F811
    writable = tmp_path / "rw"
    _write(Store.create(writable / "s.zarr"))
    mounted = read_only(writable) / "s.zarr"
    store = Store.open(mounted)
    with pytest.raises(StoreAccessError, match=rf"cannot write 'graphs/tiny/x': store '{mounted}' "
                                               rf"is on a read-only file system.*; pass a writable"):
        _write(store, "tiny/x")
    path = shard_path(mounted, "tiny", 3, 1, 0)
    with pytest.raises(StoreAccessError, match="read-only file system"):
        prepare(path, make_graph(120), 3, 1)
    assert cli_main(["store", "rm", str(mounted), f"graphs/{GID}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "read-only file system" in err, err
    assert store.graph_attrs(GID)["tag"] == "first"  # still readable, untouched
    assert sorted(p.name for p in (mounted / GRAPHS / "tiny").iterdir()) == ["parts-2-halo1-seed0"]


def test_a_row_reader_reads_row_ranges_one_chunk_at_a_time_and_checks_the_whole(store):
    """Arrays written in chunks of whole rows are read by row ranges with one chunk in memory;
    the array's sha1 is checked once the rows were read through in order, so a missing chunk
    (zarr reads it back as zeros) is an error, not a silently different input."""
    x = torch.randn(50, 3, generator=torch.Generator().manual_seed(0))
    with store.write_graph(GID, {"dataset": "tiny"}) as writer:
        writer.add("p00000", {"x": x}, chunk_rows={"x": 8})
    folder = store.graph_path(GID) / "p00000" / "x"
    assert json.loads((folder / "zarr.json").read_text())["chunk_grid"]["configuration"][
        "chunk_shape"] == [8, 3]

    def read_through(block: int) -> torch.Tensor:
        reader = store.read_graph_rows(GID, "p00000", ["x"])["x"]
        assert reader.size(0) == 50 and reader.shape == (50, 3) and reader.numel() == 150
        rows = [reader[start:start + block] for start in range(0, 50, block)]
        assert all(r.size(0) <= 8 for r in reader._held[2:])  # one chunk of rows held
        return torch.cat(rows)

    assert torch.equal(read_through(5), x) and torch.equal(read_through(16), x)
    assert read_through(5).dtype == x.dtype

    (folder / "c" / "3" / "0").unlink()  # a lost chunk: rows 24..31 read back as zeros
    reader = store.read_graph_rows(GID, "p00000", ["x"])["x"]
    assert torch.equal(reader[24:32], torch.zeros(8, 3))  # out of order: not checked yet
    with pytest.raises(StoreError, match="checksum.*hpcsoup store rm"):
        read_through(5)


def test_a_row_reader_names_a_corrupt_chunk(store):
    with store.write_graph(GID, {"dataset": "tiny"}) as writer:
        writer.add("p00000", {"x": torch.randn(40, 3)}, chunk_rows={"x": 8})
    chunk = store.graph_path(GID) / "p00000" / "x" / "c" / "2" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    reader = store.read_graph_rows(GID, "p00000", ["x"])["x"]
    assert reader[0:16].shape == (16, 3)  # the chunks before it read
    with pytest.raises(StoreError, match=r"p00000/x' cannot be read, a chunk is corrupt"):
        reader[16:20]
    with pytest.raises(StoreError, match="missing from store"):
        store.read_graph_rows(GID, "p00000", ["aggregate"])
    with pytest.raises(StoreNotFoundError, match="p00001' is not in store"):
        store.read_graph_rows(GID, "p00001", ["x"])

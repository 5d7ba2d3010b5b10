"""Faults injected for real: each ends in one clear line (exit 2), loses nothing and leaves nothing.

- disk full: a tiny ``tmpfs`` mounted for the test, filled to the brim;
- read-only store: a read-only bind mount of a store that holds an expert;
- a store path that is a regular file, or lies under one;
- two processes replacing one group id at once;
- a corrupt expert: the error names the commands that fix it, and they do;
- group ids that would leave the store, and configs that cannot work.

Mounting needs root (CI runs as root). Without it the mount tests skip saying why; under
``HPCSOUP_CI=1`` they fail instead. A quota (EDQUOT) cannot be exhausted without a quota-enabled
file system, so that message is checked from the errno alone (said so in its test).
"""
from __future__ import annotations

import errno
import json
import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest
import torch

from ci_support import missing as _missing  # skip, or fail under HPCSOUP_CI=1
from hpcsoup.cli import main
from hpcsoup.config import load_config
from hpcsoup.errors import ConfigError, StoreAccessError
from hpcsoup.store import Store
from hpcsoup.store.oserrors import explain

TEMP_MARKS = (".tmp~", ".tmp-", ".tmp")


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def tiny_fs(tmp_path):
    """A 1.5 MiB tmpfs: a real file system that runs out of space."""
    if os.geteuid() != 0:
        _missing("mounting a tmpfs needs root")
    where = tmp_path / "tiny"
    where.mkdir()
    done = _mount("-t", "tmpfs", "-o", "size=1536k", "tmpfs", str(where))
    if done.returncode != 0:
        _missing(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    yield where
    _umount(where)


@pytest.fixture
def read_only(tmp_path):
    """``read_only(src)`` -> a read-only bind mount of ``src`` (unmounted after the test)."""
    if os.geteuid() != 0:
        _missing("a read-only bind mount needs root")
    mounts = []

    def make(src: Path) -> Path:
        dst = tmp_path / f"ro-{len(mounts)}"
        dst.mkdir()
        done = _mount("--bind", str(src), str(dst))
        if done.returncode != 0:
            _missing(f"cannot bind-mount here: {done.stderr.strip()}")
        mounts.append(dst)
        done = _mount("-o", "remount,ro,bind", str(dst))
        if done.returncode != 0:
            _missing(f"cannot remount read-only here: {done.stderr.strip()}")
        return dst

    yield make
    for dst in reversed(mounts):
        _umount(dst)


def _config(tmp_path: Path, data_root: Path, store: Path, **experts) -> Path:
    values = {"name": "faults", "store": str(store), "threads": 1,
              "data": {"dataset": "Cora", "root": str(data_root)},
              "experts": {"arch": "sage", "count": 3, "epochs": 2, "hidden": 8, "checkpoint_every": 1,
                          "progress_every": 100, **experts}}
    path = tmp_path / f"{store.name}.json"
    path.write_text(json.dumps(values))
    return path


def _leftovers(root: Path) -> list[str]:
    """Temporary files or folders anywhere under ``root`` (a failed write must leave none)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if any(mark in p.name for mark in TEMP_MARKS))


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith(f"hpcsoup {command}: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _expert_ids(store: Path) -> list[str]:
    return [g.id for g in Store.open(store).groups("experts")]


# ------------------------------------------------------------------ disk full

def test_a_full_disk_is_one_line_leaves_no_temp_files_and_the_rerun_completes(
        tmp_path, tiny_fs, data_root, capsys):
    store = tiny_fs / "s.zarr"
    config = _config(tmp_path, data_root, store)
    assert main(["train", "--config", str(config), "--task-id", "0"]) == 0
    first = Store.open(store).load_group("experts", "sage-e000")[0]
    filler = tiny_fs / "filler"
    with open(filler, "wb", buffering=0) as handle:  # fill the file system to the last block
        with pytest.raises(OSError) as full:
            while True:
                handle.write(b"\0" * 4096)
    assert full.value.errno == errno.ENOSPC
    capsys.readouterr()

    assert main(["train", "--config", str(config), "--task-id", "1"]) == 2
    line = _one_line_error(capsys, "train")
    assert "full file system (no space left on device)" in line and str(store) in line, line
    assert "free space" in line
    assert _leftovers(tiny_fs) == []                           # nothing left ...
    assert _expert_ids(store) == ["sage-e000"]                 # ... nothing lost
    assert all(torch.equal(first[k], v) for k, v in Store.open(store).load_group(
        "experts", "sage-e000")[0].items())

    filler.unlink()  # space again: the same command now completes
    assert main(["train", "--config", str(config), "--task-id", "1"]) == 0
    assert _expert_ids(store) == ["sage-e000", "sage-e001"] and _leftovers(tiny_fs) == []


def test_a_full_disk_during_a_store_write_keeps_the_group_it_would_replace(tiny_fs):
    store = Store.create(tiny_fs / "w.zarr")
    small = {"w": torch.ones(4)}
    store.write_group("soups", "uniform-x", small, {"method": "uniform"})
    big = {"w": torch.randn(600_000)}  # 2.4 MB of incompressible floats: more than the disk
    with pytest.raises(StoreAccessError, match=r"cannot write 'soups/uniform-x': store .* is on a "
                                               r"full file system"):
        store.write_group("soups", "uniform-x", big, {"method": "uniform"}, overwrite=True)
    assert torch.equal(store.load_group("soups", "uniform-x")[0]["w"], small["w"])
    assert _leftovers(tiny_fs) == []


# ------------------------------------------------------------------ read-only

def test_a_read_only_store_is_one_line_and_untouched(tmp_path, read_only, data_root, capsys):
    writable = tmp_path / "rw"
    writable.mkdir()
    config = _config(tmp_path, data_root, writable / "s.zarr")
    assert main(["train", "--config", str(config), "--task-id", "0"]) == 0
    before = sorted(str(p.relative_to(writable)) for p in writable.rglob("*"))
    mounted = read_only(writable)
    capsys.readouterr()

    args = ["--config", str(config), "--store", str(mounted / "s.zarr")]
    assert main(["train", *args, "--task-id", "1"]) == 2
    line = _one_line_error(capsys, "train")
    assert f"store '{mounted / 's.zarr'}' is on a read-only file system" in line, line
    assert "pass a writable --store path" in line
    assert main(["store", "rm", str(mounted / "s.zarr"), "experts/sage-e000"]) == 2
    assert "read-only file system" in _one_line_error(capsys, "store")
    assert sorted(str(p.relative_to(writable)) for p in writable.rglob("*")) == before
    assert _expert_ids(mounted / "s.zarr") == ["sage-e000"]  # still readable


# ------------------------------------------------------------------ not a folder

@pytest.mark.parametrize("where", ["is", "under"])
def test_a_store_path_that_is_or_lies_under_a_file(tmp_path, where, capsys):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("not a store\n")
    path = blocker if where == "is" else blocker / "runs" / "x.zarr"
    for argv in (["store", "ls", str(path)], ["report", "--store", str(path)]):
        assert main(argv) == 2
        line = _one_line_error(capsys, argv[0])
        expected = "is a regular file" if where == "is" else f"lies under the regular file '{blocker}'"
        assert expected in line and "pass a --store path that is a folder" in line, line
    with pytest.raises(StoreAccessError, match="regular file"):
        Store.create(path)
    assert blocker.read_text() == "not a store\n" and _leftovers(tmp_path) == []


def test_quota_and_permission_messages_name_the_fix():
    """EDQUOT needs a quota-enabled file system to happen for real; its message is checked from
    the errno (the mapping the real ENOSPC / EROFS cases above go through)."""
    quota = explain(OSError(errno.EDQUOT, "Disk quota exceeded", "/scratch/x.zarr/experts/a"),
                    Path("/scratch/x.zarr"), "write 'experts/a'")
    assert isinstance(quota, OSError) and "over its disk quota" in str(quota)
    assert "lfs quota" in str(quota) and "/scratch/x.zarr/experts/a" in str(quota)
    denied = explain(PermissionError(errno.EACCES, "Permission denied"), Path("/shared/x.zarr"),
                     "create the store")
    assert "permission denied" in str(denied) and "chmod" in str(denied)


# ------------------------------------------------------------------ concurrent overwrites

def _overwrite(path: str, seed: int, rounds: int, barrier, failures) -> None:
    store = Store.open(path)
    state = {"w": torch.full((64,), float(seed))}
    barrier.wait()
    for _ in range(rounds):
        try:
            store.write_group("soups", "same-id", state, {"writer": seed}, overwrite=True)
        except Exception as exc:  # noqa: BLE001 -- any failure is what this test counts
            failures.put(f"{type(exc).__name__}: {exc}")


def test_concurrent_overwrites_of_one_id_never_fail(tmp_path):
    store = Store.create(tmp_path / "c.zarr")
    ctx = multiprocessing.get_context("fork")
    barrier, failures = ctx.Barrier(3), ctx.Queue()  # the old rmtree+rename failed 26 of 80 writes
    procs = [ctx.Process(target=_overwrite, args=(str(store.path), s, 30, barrier, failures))
             for s in (1, 2, 3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    errors = []
    while not failures.empty():
        errors.append(failures.get())
    assert errors == [] and all(p.exitcode == 0 for p in procs)
    state, attrs = store.load_group("soups", "same-id")  # one writer's complete copy
    assert torch.equal(state["w"], torch.full((64,), float(attrs["writer"])))
    assert [g.id for g in store.groups("soups")] == ["same-id"] and _leftovers(store.path) == []


# ------------------------------------------------------------------ corrupt expert: retrain or remove

def test_a_corrupt_expert_names_the_fix_and_force_and_rm_apply_it(tmp_path, data_root, capsys):
    store_path = tmp_path / "k.zarr"
    config = _config(tmp_path, data_root, store_path, count=2)
    for task in ("0", "1"):
        assert main(["train", "--config", str(config), "--task-id", task]) == 0
    good = Store.open(store_path).load_group("experts", "sage-e001")[0]
    chunk = next(p for p in (store_path / "experts/sage-e001/params").rglob("c/*") if p.is_file())
    chunk.write_bytes(b"\x00" * chunk.stat().st_size)
    capsys.readouterr()

    assert main(["store", "show", str(store_path), "experts/sage-e001"]) == 0
    out = capsys.readouterr().out
    assert "valid: NO" in out
    assert "`hpcsoup train --config <file> --task-id 1 --force`" in out
    assert f"`hpcsoup store rm {store_path} experts/sage-e001`" in out

    assert main(["train", "--config", str(config), "--task-id", "1"]) == 0  # no-op without --force
    assert "already complete" in capsys.readouterr().err
    assert main(["train", "--config", str(config), "--task-id", "1", "--force"]) == 0
    retrained = Store.open(store_path).load_group("experts", "sage-e001")[0]  # valid again
    assert all(torch.equal(good[k], v) for k, v in retrained.items())  # same seed, same weights

    assert main(["store", "rm", str(store_path), "experts/sage-e001"]) == 0
    assert _expert_ids(store_path) == ["sage-e000"] and _leftovers(store_path) == []
    assert main(["store", "rm", str(store_path), "experts/sage-e001"]) == 2
    assert "is not in store" in _one_line_error(capsys, "store")


# ------------------------------------------------------------------ ids and configs

@pytest.mark.parametrize("group", ["experts/../../etc", "../inits", "experts/a/b", "..", "experts/.x"])
def test_group_ids_cannot_leave_the_store(tmp_path, group, capsys):
    Store.create(tmp_path / "g.zarr")
    (tmp_path / "etc").mkdir()
    assert main(["store", "show", str(tmp_path / "g.zarr"), group]) == 2
    line = _one_line_error(capsys, "store")
    assert "not allowed" in line or "unknown" in line, line
    assert main(["store", "rm", str(tmp_path / "g.zarr"), group]) == 2
    assert (tmp_path / "etc").is_dir()


def test_impossible_configs_are_config_errors(capsys):
    with pytest.raises(ConfigError, match=r"'soup.pls.ranks' = 8 is more than 'soup.pls.partitions' "
                                          r"= 4.*lower soup.pls.ranks"):
        load_config(None, ["soup.pls.partitions=4", "soup.pls.ranks=8"])
    with pytest.raises(ConfigError, match=r"\['gcn-s0'\] listed more than once"):
        load_config(None, ['merge.parents=["gcn-s0","gcn-s0"]'])
    assert main(["merge", "--parents", "gcn-s0,gat-s1,gcn-s0"]) == 2
    assert "--parents = ['gcn-s0', 'gat-s1', 'gcn-s0']" in _one_line_error(capsys, "merge")

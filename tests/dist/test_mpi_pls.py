"""Distributed pieces, run INSIDE every rank: ``mpiexec -n 2 python -m pytest -m mpi tests/dist``.

Every test passes for any communicator size, 1 included, and runs the same body under
``COMM_SELF`` and ``COMM_WORLD`` (mpi4py's own test practice).
"""
from __future__ import annotations

import pytest
import torch

from hpcsoup.dist.mpi import CollectiveError, Comm, agree, self_comm, world
from hpcsoup.errors import StoreError, StoreNotFoundError

pytestmark = pytest.mark.mpi


@pytest.fixture(params=["self", "world"])
def comm(request) -> Comm:
    return self_comm() if request.param == "self" else world()


def test_allreduce_sums_over_ranks_on_every_rank(comm):
    local = torch.tensor([1.0, comm.rank + 1.0], dtype=torch.float32)
    total = comm.allreduce(local)
    p = comm.size
    assert total.tolist() == [float(p), p * (p + 1) / 2]
    assert local.tolist() == [1.0, comm.rank + 1.0]  # the input is not modified
    assert total.dtype == torch.float32


def test_allreduce_counts_bytes(comm):
    before = comm.bytes_allreduced
    comm.allreduce(torch.zeros(3, 5, dtype=torch.float64))
    assert comm.bytes_allreduced - before == 3 * 5 * 8


def test_allreduce_max_and_bad_op(comm):
    assert comm.allreduce(torch.tensor([comm.rank]), op="max").item() == comm.size - 1
    if comm.size > 1:
        with pytest.raises(ValueError, match="op 'prod' is unknown"):
            comm.allreduce(torch.ones(1), op="prod")


def test_allgather_tensor_concatenates_in_rank_order(comm):
    local = torch.full((comm.rank + 1, 2), float(comm.rank))
    out = comm.allgather_tensor(local)
    expected = torch.cat([torch.full((r + 1, 2), float(r)) for r in range(comm.size)])
    assert torch.equal(out, expected)


def test_bcast_and_allgather_objects(comm):
    assert comm.bcast({"seed": 7} if comm.rank == 0 else None) == {"seed": 7}
    assert comm.allgather(comm.rank) == list(range(comm.size))


def test_agree_raises_on_every_rank_when_one_rank_fails(comm):
    def read():
        if comm.rank == comm.size - 1:
            raise StoreNotFoundError("expert 'sage-e007' is not in store 'x.zarr'")
        return comm.rank

    with pytest.raises(StoreNotFoundError, match="sage-e007") as info:
        agree(comm, read, "reading the experts")
    assert isinstance(info.value, CollectiveError)
    if comm.size > 1:
        assert f"rank(s) {comm.size - 1} of {comm.size}" in str(info.value)
    assert agree(comm, lambda: comm.rank * 2, "doubling") == comm.rank * 2


def test_agree_keeps_the_error_class(comm):
    with pytest.raises(StoreError, match="corrupt"):
        agree(comm, lambda: (_ for _ in ()).throw(StoreError("chunk corrupt")), "reading")

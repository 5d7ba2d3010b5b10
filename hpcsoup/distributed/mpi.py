"""MPI for hpcsoup: the only module that imports ``mpi4py.MPI``.

Everything distributed takes a :class:`Comm` as an explicit argument (as in
``mpi4py.util``): a thin wrapper over an mpi4py intra-communicator, or a size-1
stand-in when mpi4py is missing or the process was not started by an MPI
launcher (``mpiexec``, ``srun --mpi=pmi2``). Code written against a ``Comm``
therefore runs unchanged in one plain process, under ``COMM_SELF`` and under
``COMM_WORLD``.

- Tensors travel through numpy buffers with the uppercase (buffer) methods:
  ``Allreduce`` of 1000 float32 takes ~11 µs on 2 ranks here, against ~1.6 ms for
  torch's ``gloo``. Pickled lowercase methods are used only for small metadata (``bcast``, ``allgather``).
- :func:`abort_on_error` is the ``python -m mpi4py`` rule: an exception on any rank
  prints once, with the rank, and calls ``MPI_Abort`` so that no peer waits forever
  in a collective; the launcher then ends the whole job with a non-zero code.
- :func:`agree` runs a step that may fail *the same way on every rank* (a missing
  expert or partition file) and turns it into the same clear error on every rank,
  without an abort and without a hang.

Example::

    from hpcsoup.distributed.mpi import abort_on_error, world

    comm = world()
    with abort_on_error(comm):
        grad = comm.allreduce(local_grad)        # sum over ranks, same on every rank
"""
from __future__ import annotations

import contextlib
import os
import sys
import time
import traceback
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from hpcsoup.errors import HpcsoupError

T = TypeVar("T")

#: Environment variables that MPI launchers set in every rank: Hydra (MPICH's mpiexec) and
#: ``srun --mpi=pmi2`` set the PMI ones, Open MPI its OMPI ones, PMIx launchers PMIX_RANK.
LAUNCHER_VARIABLES = ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                      "MPI_LOCALNRANKS")

#: seconds between printing a rank's error and ``MPI_Abort`` (so that the launcher forwards it)
ABORT_GRACE = 0.5

#: ``HPCSOUP_MPI=0`` never initialises MPI; ``HPCSOUP_MPI=1`` always does (a singleton world).
MPI_SWITCH = "HPCSOUP_MPI"


def launched_under_mpi() -> bool:
    """Whether this process was started by an MPI launcher (or ``HPCSOUP_MPI=1`` says so).

    Initialising MPI in a plain process works with MPICH (a singleton) but costs a
    process-manager start and can fail on clusters whose MPI needs a launcher, so a
    plain ``hpcsoup soup`` never touches MPI.
    """
    switch = os.environ.get(MPI_SWITCH, "")
    if switch in ("0", "1"):
        return switch == "1"
    return any(os.environ.get(name) for name in LAUNCHER_VARIABLES)


def _mpi():
    from mpi4py import MPI  # the only import of mpi4py.MPI in hpcsoup
    return MPI


class Comm:
    """A communicator passed explicitly to everything distributed.

    Args:
        mpi_comm: an ``mpi4py.MPI.Intracomm`` (e.g. ``MPI.COMM_WORLD``), or ``None`` for the
            size-1 stand-in that needs no MPI at all (default: ``None``).

    Attributes:
        bytes_allreduced: payload bytes this rank has passed to :meth:`allreduce` (what one
            rank contributes; a benchmark reads it to show that souping communicates the size
            of the mixing logits per step, whatever the graph).
        allreduce_calls: number of :meth:`allreduce` calls.
    """

    def __init__(self, mpi_comm: Any = None):
        self._comm = mpi_comm
        self.rank = 0 if mpi_comm is None else mpi_comm.Get_rank()
        self.size = 1 if mpi_comm is None else mpi_comm.Get_size()
        self.bytes_allreduced = 0
        self.allreduce_calls = 0
        self.doing = "starting"  # the step under way, for the message of a rank that dies

    @property
    def is_mpi(self) -> bool:
        """True when backed by a real MPI communicator (even of size 1)."""
        return self._comm is not None

    def __repr__(self) -> str:
        kind = "mpi" if self.is_mpi else "stand-in"
        return f"Comm(rank={self.rank}, size={self.size}, {kind})"

    # ---- tensors (buffers) ------------------------------------------------------------------
    def allreduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """Elementwise ``op`` ("sum", "max" or "min") of ``tensor`` over all ranks.

        Returns a new tensor of the same dtype, shape and device on every rank. The data
        goes through a contiguous CPU numpy buffer (the pip MPICH is not CUDA-aware).
        """
        out = tensor.detach().to("cpu", copy=True).contiguous()
        self.allreduce_calls += 1
        self.bytes_allreduced += out.numel() * out.element_size()
        if self._comm is None or self.size == 1:
            return out.to(tensor.device)
        MPI = _mpi()
        ops = {"sum": MPI.SUM, "max": MPI.MAX, "min": MPI.MIN}
        if op not in ops:
            raise ValueError(f"Comm.allreduce op {op!r} is unknown; use one of {sorted(ops)}")
        buffer = out.numpy()
        if buffer.dtype == np.bool_:
            raise ValueError("Comm.allreduce of a bool tensor: convert it to an integer dtype first")
        self._comm.Allreduce(MPI.IN_PLACE, buffer, op=ops[op])
        return out.to(tensor.device)

    def allgather_tensor(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's ``tensor`` along dim 0 in rank order (sizes may differ).

        Uses ``Allgatherv`` on raw bytes, so any dtype works; trailing dims must agree.
        """
        local = tensor.detach().to("cpu").contiguous()
        if self._comm is None or self.size == 1:
            return local.clone().to(tensor.device)
        rows = self.allgather(int(local.size(0)))
        if local.dim() == 0:
            raise ValueError("Comm.allgather_tensor needs a tensor with a first dimension")
        row_bytes = int(np.prod(local.shape[1:], dtype=np.int64)) * local.element_size()
        counts = [r * row_bytes for r in rows]
        displs = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64).tolist()
        received = np.empty(sum(counts), dtype=np.uint8)
        send = local.view(-1).view(torch.uint8).numpy() if local.numel() else np.empty(0, np.uint8)
        self._comm.Allgatherv(send, [received, counts, displs, _mpi().BYTE])
        flat = torch.from_numpy(received).view(local.dtype)
        return flat.view(sum(rows), *local.shape[1:]).to(tensor.device)

    # ---- the node ---------------------------------------------------------------------------
    def node_ranks(self) -> tuple[int, int]:
        """``(local rank, ranks on this node)``: this rank's place among the ranks that share
        its node (``MPI_Comm_split_type(COMM_TYPE_SHARED)``); ``(0, 1)`` without MPI."""
        if self._comm is None or self.size == 1:
            return 0, 1
        node = self._comm.Split_type(_mpi().COMM_TYPE_SHARED, key=self.rank)
        try:
            return node.Get_rank(), node.Get_size()
        finally:
            node.Free()

    def node_cpus(self) -> tuple[int, int]:
        """``(CPUs this rank's node offers its ranks, ranks on the node)``.

        The CPUs are the union of the CPU sets the ranks on this node may run on
        (``sched_getaffinity``): when a launcher binds each rank to its own cores the
        union is the sum of them, when all share one set it is that set.
        """
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else \
            list(range(os.cpu_count() or 1))
        if self._comm is None or self.size == 1:
            return len(cpus), 1
        node = self._comm.Split_type(_mpi().COMM_TYPE_SHARED, key=self.rank)
        try:
            sets = node.allgather(cpus)
            return len(set().union(*map(set, sets))), node.Get_size()
        finally:
            node.Free()

    # ---- small objects (pickled) ------------------------------------------------------------
    def bcast(self, obj: T, root: int = 0) -> T:
        """``obj`` from rank ``root`` on every rank (small, picklable metadata only)."""
        if self._comm is None or self.size == 1:
            return obj
        return self._comm.bcast(obj, root=root)

    def allgather(self, obj: T) -> list[T]:
        """Every rank's ``obj``, in rank order (small, picklable metadata only)."""
        if self._comm is None or self.size == 1:
            return [obj]
        return self._comm.allgather(obj)

    def barrier(self) -> None:
        if self._comm is not None and self.size > 1:
            self._comm.Barrier()

    def wait_quietly(self, longest_sleep: float = 0.05) -> None:
        """A barrier that sleeps while it waits (``Ibarrier`` polled with a growing sleep).

        MPICH's blocking collectives spin a core while they wait; a rank waiting minutes for
        rank 0 to partition the graph would burn a core another process on the node needs.
        Costs at most ``longest_sleep`` seconds of latency: for setup steps, not per PLS step.
        """
        if self._comm is None or self.size == 1:
            return
        request, sleep = self._comm.Ibarrier(), 0.0005
        while not request.Test():
            time.sleep(sleep)
            sleep = min(2 * sleep, longest_sleep)

    def abort(self, code: int = 1) -> None:
        """End the whole job now: ``MPI_Abort`` on the world, then leave this process.

        MPICH's ``MPI_Abort`` only *asks* the process manager to kill the job and returns
        (measured: a rank ran on into the next collective for ~0.1 s), so this process
        exits at once, before it can write or communicate anything more.
        """
        sys.stdout.flush()
        sys.stderr.flush()
        if self._comm is not None:
            # Hydra stops forwarding a rank's output once the job is aborting (measured: the
            # last lines were lost under load, and 1 run in 6 on an idle machine): give it a
            # moment to pass on what was just printed.
            time.sleep(ABORT_GRACE)
            _mpi().COMM_WORLD.Abort(code)
        os._exit(code)


_WORLD: Comm | None = None


def world() -> Comm:
    """``COMM_WORLD`` as a :class:`Comm`, or the size-1 stand-in.

    The stand-in is returned when mpi4py is not installed or the process was not
    started by an MPI launcher (see :func:`launched_under_mpi`).
    """
    global _WORLD
    if _WORLD is None:
        comm = None
        if launched_under_mpi():
            try:
                comm = _mpi().COMM_WORLD
            except ImportError:
                print("hpcsoup: started by an MPI launcher but mpi4py is not installed "
                      "(pip install 'hpcsoup[mpi]'); running as one process", file=sys.stderr)
        _WORLD = Comm(comm)
    return _WORLD


def self_comm() -> Comm:
    """``COMM_SELF`` as a :class:`Comm` when MPI is up, else the stand-in (size 1)."""
    if world().is_mpi:
        return Comm(_mpi().COMM_SELF)
    return Comm(None)


class CollectiveError(HpcsoupError):
    """Mixin marker: this error was raised on every rank alike (no abort needed)."""


def _collective(exc_type: type, message: str) -> HpcsoupError:
    """An instance of ``exc_type`` that :func:`abort_on_error` lets through on every rank."""
    cls = type(f"Collective{exc_type.__name__}", (exc_type, CollectiveError), {})
    cls.__module__ = exc_type.__module__
    return cls(message)


def agree(comm: Comm, fn: Callable[[], T], what: str) -> T:
    """Run ``fn()`` on every rank; if it raised an :class:`HpcsoupError` on any rank,
    raise one on *every* rank (no rank is left waiting in a later collective).

    The error has the class of the first failure and its message names the failing
    ranks. Other exceptions are bugs: they propagate and :func:`abort_on_error` aborts.

    Args:
        comm: the communicator.
        fn: the step that may fail, e.g. opening the store or reading this rank's shard.
        what: what the step does, for the message ("reading the experts").
    """
    result, failure = None, None
    comm.doing = what
    try:
        result = fn()
    except HpcsoupError as exc:
        failure = (type(exc), str(exc))
    comm.wait_quietly()  # ranks done first sleep while the others finish fn (no busy-wait)
    failures = comm.allgather(failure)
    failed = [(rank, f) for rank, f in enumerate(failures) if f is not None]
    if failed:
        first_rank, (exc_type, message) = failed[0]
        ranks = ", ".join(str(rank) for rank, _ in failed)
        where = "" if comm.size == 1 else f" [failed on rank(s) {ranks} of {comm.size} while {what}]"
        raise _collective(exc_type, message + where)
    return result  # type: ignore[return-value]


#: what running out of host or GPU memory raises
OUT_OF_MEMORY = (MemoryError, torch.cuda.OutOfMemoryError)


@contextlib.contextmanager
def abort_on_error(comm: Comm, stream=None) -> Iterator[None]:
    """Abort the whole MPI job when this rank raises (``python -m mpi4py`` semantics).

    With ``comm.size > 1``: an exception leaving the block is printed once, prefixed
    with ``[rank r/P]``, then :meth:`Comm.abort` ends every rank (a peer blocked in an
    ``Allreduce`` would otherwise wait forever). Errors raised alike on every rank by
    :func:`agree` pass through unchanged, so each rank reports them and exits cleanly.
    With one rank, exceptions pass through as usual.
    """
    try:
        yield
    except BaseException as exc:
        if comm.size == 1 or isinstance(exc, CollectiveError):
            raise
        if isinstance(exc, SystemExit) and exc.code in (0, None):
            raise
        stream = stream or sys.stderr
        text = "".join(traceback.format_exception(exc))
        prefix = f"[rank {comm.rank}/{comm.size}] "
        print("".join(prefix + line + "\n" for line in text.rstrip().splitlines()),
              file=stream, end="", flush=True)
        if isinstance(exc, OUT_OF_MEMORY):
            print(f"{prefix}out of memory while {comm.doing} ({type(exc).__name__}); give each "
                  f"rank more memory (SLURM: --mem-per-cpu) or run more ranks (a rank holds about "
                  f"1/P of the graph)", file=stream, flush=True)
        print(f"{prefix}aborting the MPI job (MPI_Abort) so that no rank hangs", file=stream,
              flush=True)
        comm.abort(1)


def measure_allreduce(comm: Comm, sizes: list[int], repeats: int = 200,
                      dtype: torch.dtype = torch.float32) -> list[dict]:
    """Median wall time of one ``Allreduce`` of ``n`` elements, for each ``n`` in ``sizes``.

    Every rank must call this. Ranks are synchronised with a barrier before each
    timed call, so the time is that of the collective, not of a late peer.
    Returns ``[{"elements", "bytes", "seconds"} ...]`` (the max over ranks of the median).
    """
    results = []
    for n in sizes:
        tensor = torch.ones(n, dtype=dtype)
        times = []
        for _ in range(repeats):
            comm.barrier()
            start = time.perf_counter()
            comm.allreduce(tensor)
            times.append(time.perf_counter() - start)
        median = float(np.median(times))
        worst = comm.allgather(median)
        results.append({"elements": n, "bytes": n * tensor.element_size(), "seconds": max(worst)})
    return results

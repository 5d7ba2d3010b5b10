"""Memory: the peak a block of work used, and the room a process has before it starts.

Every stage records its peaks beside its seconds (``peak_rss_bytes``; ``peak_gpu_bytes`` when it
ran on a CUDA device, else ``None``), so a scaling study reads them from the store or the stage's
JSON instead of guessing. :func:`available_bytes` is what a config is checked against before a
large graph is built (the smaller of the machine's free memory and a SLURM job's cgroup limit).
"""
from __future__ import annotations

import ctypes
import functools
import resource
import threading
from pathlib import Path

import torch


def release_free_memory() -> None:
    """Hand the heap's free pages back to the operating system (glibc's ``malloc_trim(0)``; a
    no-op where there is no glibc). glibc keeps freed buffers below its mmap threshold in the
    heap for reuse; between large, separate pieces of work (a rank's scoring fields, each about
    a third of the graph's rows) that heap only raises the next piece's peak."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or ``None`` where the C library has none."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _rss_bytes() -> int:
    return _resident()[0]


def _resident() -> tuple[int, int]:
    """``(rss, anonymous)`` bytes: all resident pages, and those not backed by a file (the
    process's own data; RSS also counts the shared libraries' code it has paged in)."""
    with open("/proc/self/statm") as handle:
        fields = handle.read().split()
    page = resource.getpagesize()
    return int(fields[1]) * page, (int(fields[1]) - int(fields[2])) * page


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None  # absent, unreadable or "max" (no limit)


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's memory cgroup (v2 or v1; a SLURM job's ``--mem``)."""
    root = Path("/sys/fs/cgroup")
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one unified hierarchy
            candidates += [(root / path.lstrip("/"), "memory.max", "memory.current"),
                           (root, "memory.max", "memory.current")]
        elif "memory" in controllers.split(","):
            v1 = root / "memory"
            candidates += [(v1 / path.lstrip("/"), "memory.limit_in_bytes", "memory.usage_in_bytes"),
                           (v1, "memory.limit_in_bytes", "memory.usage_in_bytes")]
    for folder, limit_name, usage_name in candidates:
        limit, usage = _read_int(folder / limit_name), _read_int(folder / usage_name)
        if limit is not None and usage is not None:
            return max(0, limit - usage) if limit < 2 ** 60 else None  # 2^63-ish means none
    return None


def available_bytes() -> int | None:
    """Memory this process can still get: the smaller of ``MemAvailable`` (``/proc/meminfo``)
    and its cgroup's room; ``None`` where neither can be read."""
    free = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    room = [v for v in (free, _cgroup_room()) if v is not None]
    return min(room) if room else None


class PeakMemory:
    """Peak resident memory of this process (and of a CUDA device) while the block runs.

    A thread samples RSS (``/proc/self/statm``) every ``interval`` seconds;
    ``peak`` is the largest value seen, ``above_start`` the peak minus the RSS
    when the block began (what the block itself added); ``anon_above_start`` the same for
    anonymous pages alone (RSS less file-backed pages: a process's first backward pass, for
    one, pages in megabytes of libtorch's code). Without ``/proc`` it falls back to
    ``ru_maxrss`` (the process's lifetime peak; ``anon_above_start`` is then ``None``).
    With a CUDA ``device``, ``gpu_peak`` is ``torch.cuda.max_memory_allocated`` over the
    block (the counter is reset on entry); otherwise it is ``None``.
    """

    def __init__(self, interval: float = 0.005, device: str | torch.device | None = None):
        self.interval = interval
        self.start = self.peak = 0
        self.anon_start = self.anon_peak = None
        self.device = torch.device(device) if device is not None else None
        self.gpu_peak = None
        self._stop = threading.Event()

    @property
    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def _sample(self):
        while not self._stop.wait(self.interval):
            self._update()

    def _update(self):
        rss, anon = _resident()
        self.peak, self.anon_peak = max(self.peak, rss), max(self.anon_peak, anon)

    def __enter__(self):
        if self._cuda:
            torch.cuda.init()  # a rank may not have touched CUDA yet: the counters need it
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            rss, anon = _resident()
            self.start = self.peak = rss
            self.anon_start = self.anon_peak = anon
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        except OSError:
            self._thread = None
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._update()
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self._cuda:
            self.gpu_peak = int(torch.cuda.max_memory_allocated(self.device))
        return False

    @property
    def above_start(self) -> int:
        return max(0, self.peak - self.start)

    @property
    def anon_above_start(self) -> int | None:
        return None if self.anon_start is None else max(0, self.anon_peak - self.anon_start)

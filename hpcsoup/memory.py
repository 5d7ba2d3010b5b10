"""Peak memory of a block of work: the process's resident memory and, on a GPU, CUDA's.

Every stage records both beside its seconds (``peak_rss_bytes``; ``peak_gpu_bytes`` when it ran
on a CUDA device, else ``None``), so a scaling study reads them from the store or the stage's
JSON instead of guessing.
"""
from __future__ import annotations

import resource
import threading

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


class PeakMemory:
    """Peak resident memory of this process (and of a CUDA device) while the block runs.

    A thread samples RSS (``/proc/self/statm``) every ``interval`` seconds;
    ``peak`` is the largest value seen, ``above_start`` the peak minus the RSS
    when the block began (what the block itself added). Without ``/proc`` it falls
    back to ``ru_maxrss`` (the process's lifetime peak). With a CUDA ``device``,
    ``gpu_peak`` is ``torch.cuda.max_memory_allocated`` over the block (the counter is
    reset on entry); otherwise it is ``None``.
    """

    def __init__(self, interval: float = 0.005, device: str | torch.device | None = None):
        self.interval = interval
        self.start = self.peak = 0
        self.device = torch.device(device) if device is not None else None
        self.gpu_peak = None
        self._stop = threading.Event()

    @property
    def _cuda(self) -> bool:
        return self.device is not None and self.device.type == "cuda"

    def _sample(self):
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, _rss_bytes())

    def __enter__(self):
        if self._cuda:
            torch.cuda.init()  # a rank may not have touched CUDA yet: the counters need it
            torch.cuda.reset_peak_memory_stats(self.device)
        try:
            self.start = self.peak = _rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        except OSError:
            self._thread = None
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self.peak = max(self.peak, _rss_bytes())
        else:
            self.peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if self._cuda:
            self.gpu_peak = int(torch.cuda.max_memory_allocated(self.device))
        return False

    @property
    def above_start(self) -> int:
        return max(0, self.peak - self.start)

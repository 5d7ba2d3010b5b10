"""Resume checkpoints and pre-emption signals for expert training.

A task is killed at any moment (SIGKILL, node failure) or asked to stop
(SLURM sends SIGTERM at the time limit or on pre-emption, and the sbatch script
asks for ``--signal=B:USR1@90``). Training survives both:

- every ``checkpoint_every`` epochs, :class:`Checkpointer` saves everything the
  rest of the run depends on — weights, optimizer state, the global and the
  mini-batch RNG states, the epoch, the best-so-far weights and scores — to
  ``<store>/.checkpoints/<expert_id>.pt`` (temp file + ``os.replace``: a kill
  during the save leaves the previous checkpoint intact);
- SIGTERM / SIGUSR1 / SIGUSR2 only set a flag (:class:`StopFlag`); the loop
  finishes its epoch, saves a checkpoint and raises :class:`Preempted`, whose
  exit code is :data:`PREEMPTED_EXIT` (75, EX_TEMPFAIL: "try again later");
- the rerun of the task loads the checkpoint and continues, so its final weights
  equal an uninterrupted run's bit for bit (same seed, same device and threads).

A checkpoint carries a key (a hash of everything that defines the run); one that
belongs to other settings is ignored and training restarts cleanly.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import threading
import uuid
from pathlib import Path

import torch

from hpcsoup.errors import HpcsoupError
from hpcsoup.store.oserrors import store_os_errors

log = logging.getLogger(__name__)

#: exit status of a task that stopped on a signal after saving its checkpoint
PREEMPTED_EXIT = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2)


class Preempted(HpcsoupError):
    """Training stopped on request (a signal) after saving a resume checkpoint."""

    exit_code = PREEMPTED_EXIT


class StopFlag:
    """Whether this process was asked to stop: by a signal, or by a stop file.

    The stop file serves worker processes that cannot install signal handlers
    (Dask runs tasks outside the main thread): the parent that caught the signal
    creates the file and every worker sees it at the end of its epoch.
    """

    def __init__(self, stop_file: str | Path | None = None):
        self.signal: int | None = None
        self.stop_file = Path(stop_file) if stop_file else None

    def __bool__(self) -> bool:
        return self.signal is not None or (self.stop_file is not None and self.stop_file.exists())

    @property
    def reason(self) -> str:
        if self.signal is not None:
            return signal.Signals(self.signal).name
        return f"stop file {self.stop_file}"

    def _handle(self, signum, frame):
        if self.signal is None:
            log.warning("received %s: stopping after this epoch with a checkpoint",
                        signal.Signals(signum).name)
        self.signal = signum
        if self.stop_file is not None:
            self.stop_file.parent.mkdir(parents=True, exist_ok=True)
            self.stop_file.touch()

    @contextlib.contextmanager
    def installed(self, signals=STOP_SIGNALS):
        """Handle ``signals`` with this flag while in the block (main thread only; else a no-op)."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self._handle) for s in signals}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


class Checkpointer:
    """Save / load one expert's resume state at ``path`` every ``every`` epochs.

    Args:
        path: the checkpoint file (e.g. ``<store>/.checkpoints/<expert_id>.pt``).
        key: identifies the run's settings; a checkpoint with another key is ignored.
        every: epochs between checkpoints (default: ``10``).
        stop: a :class:`StopFlag` checked at the end of every epoch (default: none).
        name: what to call the run in messages (default: the file's stem).
    """

    def __init__(self, path: str | Path, key: str, every: int = 10, stop: StopFlag | None = None,
                 name: str | None = None):
        self.path = Path(path)
        self.key = key
        self.every = max(1, int(every))
        self.stop = stop if stop is not None else StopFlag()
        self.name = name or self.path.stem
        self.resumed_from: int | None = None

    def load(self) -> dict | None:
        """The saved state, or None (no checkpoint, unreadable, or other settings)."""
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated file cannot happen (atomic save), but be safe
            log.warning("%s: checkpoint %s is unreadable (%s); starting over", self.name, self.path, exc)
            return None
        if state.get("key") != self.key:
            log.warning("%s: checkpoint %s belongs to other settings; starting over",
                        self.name, self.path)
            return None
        self.resumed_from = int(state["epoch"])
        log.info("[%s] resuming after epoch %d from checkpoint '%s'", self.name, self.resumed_from + 1,
                 self.path)
        return state

    def save(self, state: dict) -> None:
        """Write ``state`` atomically (temp file + rename).

        The state is serialised in memory first: ``torch.save`` to a file reports a full disk as
        an opaque ``RuntimeError``; a plain write raises ``OSError(ENOSPC)``, which becomes a
        :class:`~hpcsoup.errors.StoreAccessError` naming the path. A failed save removes its
        temporary file and keeps the previous checkpoint.
        """
        buffer = io.BytesIO()
        torch.save({**state, "key": self.key}, buffer)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
        try:
            with store_os_errors(self.path.parent.parent, f"save the resume checkpoint '{self.path}'"):
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(tmp, "wb") as handle:
                    handle.write(buffer.getbuffer())
                os.replace(tmp, self.path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def due(self, epoch: int) -> bool:
        """Whether to save after ``epoch`` (0-based): every ``every`` epochs or when stopping."""
        return bool(self.stop) or (epoch + 1) % self.every == 0

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def rng_state(device: torch.device) -> dict:
    """The global RNG states dropout draws from (CPU, and the CUDA device when used)."""
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

"""Progress of long loops, and the one place that decides what reaches stderr.

Libraries log, applications configure (Python's logging HOWTO): every hpcsoup module logs to a
logger under ``hpcsoup`` and reports its long loops (experts, epochs, soup steps, merge phases)
through :class:`Progress`; no module attaches a handler. The command line calls
:func:`configure` once, and that decides what is shown on stderr:

- on a terminal: a tqdm bar per running loop (count, rate, ETA); log lines print above the bars;
- elsewhere (a SLURM log, a pipe): no bars; a loop prints one plain line every ``interval``
  seconds (``$HPCSOUP_PROGRESS_SECONDS``, default 60) and a last line when it ends, e.g.
  ``train: 420/1000 epochs (42%), experts 3/10 done, 20 s elapsed, ETA 28 s``;
- the verbosity: ``-1`` (``-q``) warnings and errors only; ``0`` progress and results; ``1``
  (``-v``) also the per-epoch and per-step detail (DEBUG records of ``hpcsoup.*``).

Without :func:`configure` (hpcsoup used as a library) a :class:`Progress` sends its plain lines as
INFO records of the ``hpcsoup.progress`` logger: they appear wherever the application sends logs.

A soup loop adopts it in three lines::

    progress = Progress("soup learned", total=steps, unit="steps")
    ...
        progress.update(postfix=f"val {score:.3f}")   # once per step
    progress.close()
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import sys
import threading
import time
from typing import TextIO

LOGGER = "hpcsoup"
log = logging.getLogger("hpcsoup.progress")


@dataclasses.dataclass
class Display:
    """What :func:`configure` decided; the defaults are those of an unconfigured library."""

    verbosity: int = 0
    bars: bool = False              # tqdm bars (a terminal) rather than plain lines
    interval: float = 60.0          # seconds between plain progress lines
    stream: TextIO | None = None    # where bars go (None: sys.stderr at the time of writing)


_display = Display()


def display() -> Display:
    """The current :class:`Display` (read by runners that start workers or child processes)."""
    return _display


def verbosity_flags() -> list[str]:
    """Command-line flags that give a child ``hpcsoup`` process this process's verbosity."""
    v = _display.verbosity
    return ["-q"] if v < 0 else ["-v"] * v


class _Handler(logging.StreamHandler):
    """A stream handler that writes through tqdm while bars are shown, so lines do not tear them.

    Without a stream of its own it writes to ``sys.stderr`` as it is at each record (a test or an
    application may swap it after :func:`configure`).
    """

    def __init__(self, stream: TextIO | None = None):
        super().__init__(stream or sys.stderr)
        self.follow = stream is None

    def emit(self, record: logging.LogRecord) -> None:
        if self.follow:
            self.stream = sys.stderr
        if not _display.bars:
            return super().emit(record)
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging must never raise into the caller
            self.handleError(record)


class _Format(logging.Formatter):
    """Plain messages; warnings and errors say so."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING:
            text = f"{record.levelname.lower()}: {text}"
        return text


def configure(verbosity: int = 0, stream: TextIO | None = None, bars: bool | None = None,
              interval: float | None = None) -> Display:
    """Route ``hpcsoup.*`` logs and progress to ``stream`` (default: ``sys.stderr``).

    Called by the command line, nowhere else in the package; replaces the handler a previous call
    installed.

    Args:
        verbosity: ``-1`` warnings only, ``0`` progress and results, ``1`` also per-epoch and
            per-step lines (default: ``0``).
        stream: where everything goes (default: ``sys.stderr``).
        bars: tqdm bars (default: when ``stream`` is a terminal and ``verbosity >= 0``).
        interval: seconds between plain progress lines (default: ``$HPCSOUP_PROGRESS_SECONDS``
            or ``60``).
    """
    global _display
    shown = stream or sys.stderr
    if bars is None:
        bars = verbosity >= 0 and hasattr(shown, "isatty") and shown.isatty()
    if interval is None:
        interval = float(os.environ.get("HPCSOUP_PROGRESS_SECONDS", "60") or 60)
    reset()
    _display = Display(verbosity, bool(bars), interval, stream)
    logger = logging.getLogger(LOGGER)
    handler = _Handler(stream)
    handler.setFormatter(_Format("%(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG if verbosity > 0 else logging.INFO if verbosity == 0
                    else logging.WARNING)
    logger.propagate = False  # the application's root handlers would print everything twice
    return _display


def reset() -> None:
    """Undo :func:`configure`: back to an unconfigured library (no handler, plain lines as logs)."""
    global _display
    _display = Display()
    logger = logging.getLogger(LOGGER)
    for handler in [h for h in logger.handlers if isinstance(h, _Handler)]:
        logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)
    logger.propagate = True


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 20 s"``, ``"2 h 05 min"``: a duration a person reads at a glance."""
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def significant(value: float | None, digits: int = 2) -> str:
    """``value`` to ``digits`` significant figures without an exponent: ``520``, ``0.42``, ``1.3``.

    (``f"{x:.2g}"`` writes 520 as ``5.2e+02``.) ``None`` and non-finite values give ``"-"``.
    """
    if value is None or not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    exponent = math.floor(math.log10(abs(value)))
    rounded = round(value, digits - 1 - exponent)
    if rounded and abs(rounded) >= 10 ** (exponent + 1):  # 0.999 -> 1.0: one digit more before the point
        exponent += 1
    return f"{rounded:.{max(0, digits - 1 - exponent)}f}"


class Progress:
    """Count of a loop with its ETA: a tqdm bar on a terminal, sparse plain lines elsewhere.

    Args:
        desc: what runs, the prefix of every line (e.g. ``"train"``, ``"soup learned"``).
        total: the count at which the loop is done (``None``: unknown, no ETA).
        unit: what is counted (e.g. ``"epochs"``, ``"steps"``, ``"phases"``).
        logger: where plain lines go (default: ``hpcsoup.progress``).
        show: ``False`` makes it count without showing anything, e.g. on every MPI rank but the
            first, whose progress is the same (default: ``True``).

    :meth:`update` adds to the count, :meth:`set` sets it; both take a ``postfix``, a short text
    shown after the count (e.g. ``"experts 3/10 done"``). The ETA extrapolates the rate since
    the first update, so time spent before the loop (or epochs restored by a resume) does not
    distort it. Safe to update from several threads.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "it",
                 logger: logging.Logger | None = None, show: bool = True):
        self.desc, self.total, self.unit, self.show = desc, total, unit, show
        self.log = logger or log
        self.done, self.postfix = 0, ""
        self.start = time.perf_counter()
        self._first: tuple[float, int] | None = None   # (time, count) of the first update
        self._last_line = self.start
        self._lock = threading.Lock()
        self._closed = False
        self._bar = None
        if show and _display.bars and _display.verbosity >= 0:
            from tqdm import tqdm
            self._bar = tqdm(total=total, desc=desc, unit=f" {unit}", file=_display.stream or sys.stderr,
                             dynamic_ncols=True, mininterval=0.5, leave=True)

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False

    def update(self, n: int = 1, postfix: str | None = None) -> None:
        """Add ``n`` to the count."""
        self.set(self.done + n, postfix)

    def set(self, done: int, postfix: str | None = None) -> None:
        """Set the count to ``done``."""
        with self._lock:
            if self._closed:
                return
            now = time.perf_counter()
            if self._first is None:
                self._first = (now, self.done)
            previous, self.done = self.done, done
            if postfix is not None:
                self.postfix = postfix
            if self._bar is not None:
                if postfix is not None:
                    self._bar.set_postfix_str(postfix, refresh=False)
                self._bar.update(done - previous)
            elif self.show and now - self._last_line >= _display.interval:
                self._last_line = now
                self.log.info("%s", self.line(now))

    def eta(self, now: float | None = None) -> float | None:
        """Seconds left at the rate since the first update (``None`` when unknown)."""
        now = time.perf_counter() if now is None else now
        if self.total is None or self._first is None:
            return None
        t0, d0 = self._first
        if self.done <= d0 or now <= t0:
            return None
        return (self.total - self.done) * (now - t0) / (self.done - d0)

    def line(self, now: float | None = None) -> str:
        """The plain progress line: count, share, postfix, elapsed time and ETA."""
        now = time.perf_counter() if now is None else now
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        parts = [f"{self.desc}: {count} {self.unit}{share}"]
        if self.postfix:
            parts.append(self.postfix)
        parts.append(f"{duration(now - self.start)} elapsed")
        eta = self.eta(now)
        if eta is not None and self.done < (self.total or 0):
            parts.append(f"ETA {duration(eta)}")
        return ", ".join(parts)

    def close(self) -> None:
        """End the loop: the bar stays with its final count; plain mode prints a last line,
        e.g. ``train: 1000/1000 epochs in 1 min 02 s (experts 10/10 done)``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._bar is not None:
                self._bar.close()
                return
            if not self.show:
                return
            now = time.perf_counter()
            count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
            tail = f" ({self.postfix})" if self.postfix else ""
            self.log.info("%s: %s %s in %s%s", self.desc, count, self.unit,
                          duration(now - self.start), tail)

"""Progress of long passes and epochs: tqdm's bar on a terminal, a line per interval in a log.

Under ``make``, ``nohup``, a batch scheduler or CI, stderr is a file or a pipe, where a bar
either vanishes or floods the log with carriage returns. There a pass prints one line at most
every :func:`interval` seconds (30 unless ``PIPELINE_PROGRESS_INTERVAL`` says otherwise) and
one at its end, and a fine-tune prints one line per epoch, as Keras' ``fit`` and PyTorch's
tutorials do. Everything goes to stderr, so a command's ``--json`` on stdout stays clean.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable
from typing import TextIO

from pipeline.core.errors import PipelineError

__all__ = ["INTERVAL_ENV", "MODES", "EpochLines", "Progress", "duration", "interval", "note",
           "progress_mode"]

INTERVAL_ENV = "PIPELINE_PROGRESS_INTERVAL"
# Seconds between two lines of one pass in a log: often enough to see a job is alive, rarely
# enough that a day-long extraction writes a few thousand lines, not millions.
DEFAULT_INTERVAL = 30.0
# bar: tqdm on a terminal; lines: a line per interval; off: nothing (--quiet).
MODES = ("bar", "lines", "off")


def interval() -> float:
    """Seconds between two progress lines: ``PIPELINE_PROGRESS_INTERVAL``, else 30."""
    value = os.environ.get(INTERVAL_ENV, "")
    if not value:
        return DEFAULT_INTERVAL
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise PipelineError(f"{INTERVAL_ENV} must be a number of seconds (such as 30), not "
                            f"{value!r}")
    return seconds


def progress_mode(progress: bool | str | None = None, stream: TextIO | None = None) -> str:
    """What ``progress`` asks for on ``stream`` (stderr): one of :data:`MODES`.

    ``None`` or ``True``: a bar where the stream is a terminal, lines elsewhere; ``False``:
    nothing; ``"bar"``, ``"lines"`` or ``"off"``: that.
    """
    if progress is None or progress is True:
        stream = sys.stderr if stream is None else stream
        return "bar" if _isatty(stream) else "lines"
    if progress is False:
        return "off"
    if progress not in MODES:
        raise ValueError(f"progress must be None, a bool or one of {', '.join(MODES)}, not "
                         f"{progress!r}")
    return progress


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


class Progress:
    """Counted progress of one pass (images, fits): a bar, a line per interval, or nothing.

    Used as a context manager, with :meth:`update` after each batch. In ``lines`` mode a
    line (done/total, rate, ETA) is printed when ``every`` seconds have passed since the
    last one, and a final line (total, time, rate) when the pass ends without an error.

    Parameters
    ----------
    total
        Items of the whole pass, ``initial`` included.
    desc
        What the lines start with, such as ``"extract resnet50"``.
    unit
        What is counted (``"img"``, ``"fit"``).
    progress
        As for :func:`progress_mode`.
    initial
        Items done before this run (a resumed pass); the rate counts this run's alone.
    every
        Seconds between lines; None: :func:`interval`.
    stream, clock
        Where lines go (stderr) and the time they are measured by (for tests).
    """

    def __init__(self, total: int, desc: str, unit: str = "img", *,
                 progress: bool | str | None = None, initial: int = 0,
                 every: float | None = None, stream: TextIO | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.total, self.desc, self.unit = total, desc, unit
        self.stream = sys.stderr if stream is None else stream
        self.mode = progress_mode(progress, self.stream)
        self.done = self.initial = initial
        self.every = interval() if every is None and self.mode == "lines" else (every or 0.0)
        self.clock = clock
        self.started = self.last = clock()
        self._bar = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(total=total, initial=initial, unit=unit, desc=desc,
                             dynamic_ncols=True, file=self.stream)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind, _error, _trace) -> None:
        self.close(finished=kind is None)

    def update(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        if self.mode != "lines" or self.done >= self.total:  # the end line says the rest
            return
        now = self.clock()
        if now - self.last >= self.every:
            self.last = now
            _print(self.stream, self._line(now))

    def close(self, finished: bool = True) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        elif self.mode == "lines" and finished:
            elapsed = self.clock() - self.started
            self.mode = "off"  # one end line, however often close is called
            _print(self.stream, f"{self.desc}: {self.done:,}/{self.total:,} {self.unit} in "
                                f"{duration(elapsed)}{self._rate(elapsed, ', ')}")

    def _line(self, now: float) -> str:
        elapsed = now - self.started
        share = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        text = f"{self.desc}: {self.done:,}/{self.total:,} {self.unit}{share}"
        text += self._rate(elapsed, ", ")
        new = self.done - self.initial
        if new > 0 and elapsed > 0:
            text += f", ETA {duration((self.total - self.done) * elapsed / new)}"
        return text

    def _rate(self, elapsed: float, sep: str) -> str:
        new = self.done - self.initial
        if new <= 0 or elapsed <= 0:
            return ""
        rate = new / elapsed
        if rate >= 1:
            return f"{sep}{rate:.1f} {self.unit}/s"
        return f"{sep}{1 / rate:.1f} s/{self.unit}"


class EpochLines:
    """One line per training epoch, as Keras prints them: losses, accuracies, lr, seconds.

    Called with ``(epoch, history_row)`` (the fine-tune's ``on_epoch``); prints unless
    ``progress`` is off.
    """

    def __init__(self, desc: str, epochs: int, progress: bool | str | None = None,
                 stream: TextIO | None = None):
        self.desc, self.epochs = desc, epochs
        self.stream = sys.stderr if stream is None else stream
        self.mode = progress_mode(progress, self.stream)

    def __call__(self, epoch: int, row: dict) -> None:
        if self.mode == "off":
            return
        _print(self.stream, f"{self.desc}: epoch {epoch}/{self.epochs}: "
                            f"train_loss {row['train_loss']:.4f}, "
                            f"train_accuracy {row['train_accuracy']:.4f}, "
                            f"val_loss {row['val_loss']:.4f}, "
                            f"val_accuracy {row['val_accuracy']:.4f}, lr {row['lr']:.3g}, "
                            f"{row['seconds']:.1f} s")


def note(text: str, progress: bool | str | None = None, stream: TextIO | None = None) -> None:
    """One timestamped line on stderr (a wait, a repair), unless ``progress`` is off."""
    stream = sys.stderr if stream is None else stream
    if progress_mode(progress, stream) != "off":
        _print(stream, text)


def duration(seconds: float) -> str:
    """``42s``, ``13m 07s``, ``2h 03m``: a time as a log reader skims it."""
    if not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m {seconds % 60:02d}s"
    return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"


def _print(stream: TextIO, text: str) -> None:
    # A clock time on each line: a log read later says when, not only how far.
    stream.write(f"[{time.strftime('%H:%M:%S')}] {text}\n")
    stream.flush()

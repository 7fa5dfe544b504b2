"""Writer locks: one run writes a cache file at a time; the others wait, then reuse its work.

HDF5's own file locking guards one open file, not the rule "who may delete or resume this
partial file", and on a network file system it may be off or fail with errors that are not
``BlockingIOError``. So each writer first creates ``<file>.lock`` exclusively (``O_EXCL``,
which NFS v3 and later honour), holding its host, pid and start time, and touches it every
:data:`HEARTBEAT_S` seconds while it writes.

A lock whose writer is gone is taken over: on the same host when its pid no longer runs,
and on any host (another host's pids cannot be seen from here, and a pid can be reused) when
it has not been touched for :data:`STALE_S` seconds. A live lock is waited for, with one
message, up to a timeout; then the caller checks whether the other run finished the file,
and reuses it if it did. No run removes or resumes a partial file without holding its lock,
so none touches another live run's file.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from pipeline.core.errors import LockTimeout

__all__ = ["HEARTBEAT_S", "LOCK_SUFFIX", "STALE_S", "LockTimeout", "holder", "writing"]

LOCK_SUFFIX = ".lock"
# A live writer touches its lock this often ...
HEARTBEAT_S = 10.0
# ... so one untouched for this long, on another host, is a run that died there.
STALE_S = 120.0
_POLL_S = 0.5



def lock_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + LOCK_SUFFIX)


def holder(path: str | os.PathLike) -> dict | None:
    """Who holds the lock of ``path`` (host, pid, started), None when nobody does."""
    try:
        return json.loads(lock_path(path).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # being written this instant, or damaged: a holder all the same
        return {}


@contextmanager
def writing(path: str | os.PathLike, timeout: float = 3600.0,
            on_wait: Callable[[str], None] | None = None) -> Iterator[None]:
    """Hold the writer lock of ``path`` for the block, waiting up to ``timeout`` seconds.

    ``on_wait`` is called once with a message when another live run holds the lock. After the
    wait the caller should look again for the finished file before writing it.

    Raises
    ------
    LockTimeout
        The other run still holds the lock after ``timeout`` seconds.
    """
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    mine = json.dumps({"host": platform.node(), "pid": os.getpid(),
                       "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    deadline, told = time.monotonic() + timeout, False
    while not _create(lock, mine):
        seen = holder(path)
        if seen is None:
            continue  # released between our attempt and our look
        if not _alive(seen, lock):
            _break(lock, seen)
            continue
        if not told and on_wait is not None:
            on_wait(f"waiting for {_who(seen)}, which is writing {Path(path).name} (up to "
                    f"{timeout:.0f} s)")
            told = True
        if time.monotonic() >= deadline:
            raise LockTimeout(f"{path} is still being written by {_who(seen)} after "
                              f"{timeout:.0f} s; wait for it, or, if that run is gone, remove "
                              f"{lock}")
        time.sleep(_POLL_S)
    stop = threading.Event()
    beat = threading.Thread(target=_heartbeat, args=(lock, stop), daemon=True)
    beat.start()
    try:
        yield
    finally:
        stop.set()
        beat.join()
        _release(lock, mine)


def _create(lock: Path, content: str) -> bool:
    try:
        fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(content + "\n")
    return True


def _alive(seen: dict, lock: Path) -> bool:
    """Whether the run that holds ``lock`` still runs (see the module docstring).

    Untouched for :data:`STALE_S` seconds, a lock is dead on any host: on this one its pid
    may have been reused by another process since its writer died.
    """
    try:
        if time.time() - lock.stat().st_mtime >= STALE_S:
            return False
    except FileNotFoundError:
        return False
    if seen.get("host") == platform.node() and isinstance(seen.get("pid"), int):
        try:
            os.kill(seen["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's live process
            return True
    return True


def _break(lock: Path, seen: dict) -> None:
    """Remove a dead run's lock, unless another run took it over first.

    The lock is renamed away (one rename wins), then read: if it is not the dead run's, a
    live one replaced it meanwhile and it is put back.
    """
    aside = lock.with_name(f"{lock.name}.stale-{os.getpid()}-{time.monotonic_ns()}")
    try:
        os.rename(lock, aside)
    except FileNotFoundError:
        return
    try:
        taken = json.loads(aside.read_text())
    except (OSError, ValueError):
        taken = {}
    if taken != seen:
        with contextlib.suppress(OSError):  # yet another run may hold the lock by now
            os.link(aside, lock)  # back into place
    aside.unlink(missing_ok=True)


def _heartbeat(lock: Path, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        try:
            os.utime(lock)
        except OSError:
            return


def _release(lock: Path, mine: str) -> None:
    try:
        if lock.read_text().strip() == mine:
            lock.unlink()
    except FileNotFoundError:
        pass


def _who(seen: dict) -> str:
    if not seen:
        return "another run"
    return f"pid {seen.get('pid')} on {seen.get('host')} (since {seen.get('started')})"

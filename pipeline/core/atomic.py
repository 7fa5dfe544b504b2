"""Atomic file writes: a uniquely named temporary beside the target, then ``os.replace``.

Why one mechanism: an incomplete file must never carry the final name (a kill, a full disk),
two processes writing the same file must never share a temporary, and a write that fails must
leave the previous file as it was and say in one line what it needed, instead of a traceback
and a stray temporary.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pipeline.core.errors import WriteError

_MODES = ("wb", "w")
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT)
_UNITS = ("kB", "MB", "GB", "TB", "PB")


class _Counted(io.FileIO):
    """The temporary's raw file: it remembers how far the furthest write reached, the one
    that failed included, so that a full disk can say how much room was needed."""

    reached = 0

    def write(self, data) -> int:
        self.reached = max(self.reached, self.tell() + memoryview(data).nbytes)
        return super().write(data)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "wb", *, size: int | None = None,
                 encoding: str | None = None) -> Iterator[IO]:
    """Write ``path`` all at once or not at all.

    Parameters
    ----------
    path
        The file to write; its folder must exist.
    mode
        ``"wb"`` for bytes, ``"w"`` for text (``encoding`` as ``open`` takes it).
    size
        The bytes the write needs, when known up front; it is what a failure reports.
    encoding
        Text mode only, as for ``open``.

    Yields
    ------
    IO
        A file object for a temporary in ``path``'s folder, named after ``path``. When the
        block ends it is flushed, fsync'ed and renamed onto ``path``.

    Raises
    ------
    WriteError
        Any ``OSError`` while creating, writing or renaming the temporary (a full disk, a
        quota, an I/O error). The temporary is removed and the previous file is unchanged.
        Other exceptions propagate as they are, also after removing the temporary.
    """
    if mode not in _MODES:
        raise ValueError(f"atomic_write writes with mode 'wb' or 'w', not {mode!r}")
    path = Path(path)
    existed = path.exists()
    try:
        # A unique name: concurrent writers of one target never write into each other's file.
        fd, name = tempfile.mkstemp(prefix=f"{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise _write_error(path, error, size, 0, existed) from error
    tmp = Path(name)
    raw = fh = None
    try:
        raw = _Counted(fd, "wb")
        fh = io.BufferedWriter(raw)
        if mode == "w":  # as open(path, "w", encoding=encoding) would wrap it
            fh = io.TextIOWrapper(fh, encoding=encoding)
        yield fh
        fh.flush()
        os.fsync(fh.fileno())  # the data is on disk before the name points at it
        fh.close()
        # mkstemp makes the file private (0600); give it what a plain open() would have.
        os.chmod(tmp, _default_permissions())
        os.replace(tmp, path)
    except BaseException as error:
        written = _bytes_written(raw, fh, tmp)
        _discard(fd, raw, fh, tmp)
        if isinstance(error, OSError):
            raise _write_error(path, error, size, written, existed) from error
        raise


def _default_permissions() -> int:
    """0o666 less the umask, as for a file that ``open`` creates."""
    # The umask can only be read by setting it; it is put back at once.
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def _bytes_written(raw: _Counted | None, fh: IO | None, tmp: Path) -> int:
    """How far the write got: the furthest write, the caller's position, what is on disk."""
    sizes = [0 if raw is None else raw.reached]
    if fh is not None:
        with contextlib.suppress(OSError, ValueError):  # a failed flush, a closed file
            sizes.append(fh.tell())
    with contextlib.suppress(OSError):
        sizes.append(tmp.stat().st_size)
    return max(sizes)


def _discard(fd: int, raw: _Counted | None, fh: IO | None, tmp: Path) -> None:
    """Close and remove the temporary, ignoring the errors that closing a failed write
    raises again."""
    with contextlib.suppress(OSError):
        if fh is not None:
            fh.close()  # closes raw and fd, even when its final flush fails
        elif raw is not None:
            raw.close()
        else:
            os.close(fd)
    with contextlib.suppress(OSError):
        tmp.unlink(missing_ok=True)


def _write_error(path: Path, error: OSError, size: int | None, written: int,
                 existed: bool) -> WriteError:
    """The one line for a failed write: why, what it needed (``size`` when known, else at
    least what was ``written``), what is free, and that the previous file stands."""
    reason = error.strerror or str(error) or type(error).__name__
    facts = []
    if size is not None:
        facts.append(f"needs {_amount(size)}")
    elif written:
        facts.append(f"needs at least {_amount(written)}")
    with contextlib.suppress(OSError):  # the folder itself may be what is missing
        facts.append(f"{_amount(shutil.disk_usage(path.parent).free)} free there")
    previous = (f"the previous {path.name} is unchanged" if existed
                else f"no {path.name} was written")
    todo = ("free some space and run it again" if error.errno in _NO_ROOM
            else "fix that and run it again")
    details = f" ({', '.join(facts)})" if facts else ""
    return WriteError(f"could not write {path}: {reason}{details}; {previous}; {todo}")


def _amount(count: int) -> str:
    """``1,234,567 bytes (1.2 MB)``: exact for the record, rounded for the eye."""
    if count < 1000:
        return f"{count} bytes"
    power = min(len(str(count)) - 1, 3 * len(_UNITS)) // 3
    return f"{count:,} bytes ({count / 1000 ** power:.1f} {_UNITS[power - 1]})"


def write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """``text`` into ``path`` all at once (:func:`atomic_write`), its folder made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, "w", encoding=encoding) as fh:
        fh.write(text)
    return path


def write_json(path: str | os.PathLike, obj) -> Path:
    """``obj`` as indented JSON (paths and other values as their ``str``), all at once."""
    import json  # noqa: PLC0415 - json is light, but most callers of this module need no JSON

    return write_text(path, json.dumps(obj, indent=2, default=str) + "\n")


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` into ``path`` all at once, its folder made if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path, size=len(data)) as fh:
        fh.write(data)
    return path


def save_figure(fig, path: str | os.PathLike, **savefig) -> Path:
    """A matplotlib ``Figure`` as a file all at once (its format from ``path``'s suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    savefig.setdefault("format", path.suffix.lstrip(".") or "png")
    with atomic_write(path) as fh:
        fig.savefig(fh, **savefig)
    return path

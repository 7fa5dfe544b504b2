"""Damaged caches: HDF5's checksums read back, one-line errors, and files moved aside.

The numeric datasets carry HDF5's per-chunk Fletcher-32 checksum, so a changed byte fails on read
instead of being served. :func:`verify_cache` reads every chunk; a cache found damaged (a chunk
that fails its checksum, a truncated file) is moved aside to ``<name>.damaged``
(:func:`quarantine`), never deleted, and the command that wrote it builds it again.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import h5py

from pipeline.core.errors import CacheDamaged, CacheError
from pipeline.store.paths import DAMAGED, is_export

__all__ = ['is_hdf5', 'is_hdf5_failure', 'not_an_export']


FORMAT = "pipeline-features"


FORMAT_VERSION = 2


_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"



def not_an_export(path: Path) -> None:
    if is_export(path):
        raise CacheError(f"{path} is an engine's export of the network, not a feature cache",
                         path=path, reason="engine-export")


def is_hdf5_failure(error: BaseException | None) -> bool:
    # HDF5's errors reach Python as plain OSError without an errno; the system's carry one.
    return type(error) is OSError and error.errno is None


def is_hdf5(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(len(_HDF5_SIGNATURE)) == _HDF5_SIGNATURE
    except OSError:
        return False


def damaged(path: Path, reason: str, move: bool = False) -> CacheDamaged:
    """The one-line error for a damaged cache; with ``move``, once it is moved aside
    (:func:`quarantine`), which a derived file the next run rebuilds by itself can be.

    A feature cache a reader finds damaged stays in place: the extract command that made it
    verifies it, moves it aside and builds it again (``--no-repair``: stops instead).
    """
    if move:
        try:
            aside = quarantine(path)
        except FileNotFoundError:  # another process (a loader worker) moved it first
            aside = path.with_name(path.name + DAMAGED)
        except OSError as err:  # a read-only cache folder, say
            return CacheDamaged(f"{path} is damaged ({reason}) and cannot be moved aside "
                                f"({failure_reason(err)}); remove it and run the same "
                                "command again")
        return CacheDamaged(f"{path} is damaged ({reason}); moved it to {aside.name}: run the "
                            "same command again to build it anew")
    return CacheDamaged(f"{path} is damaged ({reason}); run the extract command that made it "
                        "again: it moves the file aside and builds it anew")


def quarantine(path: str | os.PathLike) -> Path:
    """Move a damaged cache out of the way (``<name>.damaged``, then ``.damaged-2`` ...), so
    the next run of its key builds it again and the damaged bytes stay for a look."""
    path = Path(path)
    aside, n = path.with_name(path.name + DAMAGED), 1
    while aside.exists():
        n += 1
        aside = path.with_name(f"{path.name}{DAMAGED}-{n}")
    os.replace(path, aside)
    return aside


def verify_cache(path: str | os.PathLike) -> dict:
    """Read every chunk of every dataset of a cache file and report what fails.

    Returns
    -------
    dict
        ``path``, ``status`` (``ok``, ``damaged``, or ``unchecked``: readable, but written
        before checksums, so changed numbers could not be seen), ``problems`` (one line
        each), ``checksummed`` and ``unchecksummed`` (dataset names), ``bytes``, ``seconds``.
    """
    started = time.perf_counter()
    path = Path(path)
    not_an_export(path)
    out = {"path": str(path), "status": "ok", "problems": [], "checksummed": [],
           "unchecksummed": [], "bytes": path.stat().st_size if path.exists() else 0}
    try:
        f = h5py.File(path, "r")
    except OSError as err:
        out["problems"].append(f"cannot be opened: {failure_reason(err)}")
    else:
        with f:
            out["problems"] += _structure_problems(f)
            for name, ds in _datasets(f):
                out["checksummed" if ds.fletcher32 else "unchecksummed"].append(name)
                out["problems"] += _read_problems(name, ds)
    if out["problems"]:
        out["status"] = "damaged"
    elif any(n in out["unchecksummed"] for n in ("features", "valid")):
        out["status"] = "unchecked"
    out["seconds"] = time.perf_counter() - started
    return out


def _structure_problems(f: h5py.File) -> list[str]:
    if f.attrs.get("format") != FORMAT:
        return ["not a feature cache written by pipeline"]
    problems = [] if f.attrs.get("complete") else ["incomplete (an interrupted extraction)"]
    if "features" not in f or "valid" not in f:
        return [*problems, "no /features or /valid dataset"]
    n = len(f["valid"])
    if f.attrs.get("complete") and int(f.attrs.get("rows_done", -1)) != n:
        problems.append(f"rows_done is {f.attrs.get('rows_done')}, not its {n} rows")
    for name in ("features", "content_sha256", "paths", "labels", "split"):
        if name in f and len(f[name]) != n:
            problems.append(f"/{name} has {len(f[name])} rows, /valid {n}")
    return problems


def _datasets(f: h5py.File) -> list[tuple[str, h5py.Dataset]]:
    found: list[tuple[str, h5py.Dataset]] = []
    # A layer's view (layers/<name>) is features' own columns: read, and checked, once.
    f.visititems(lambda name, obj: found.append((name, obj))
                 if isinstance(obj, h5py.Dataset) and not obj.is_virtual else None)
    return found


def _read_problems(name: str, ds: h5py.Dataset) -> list[str]:
    """Every chunk of ``ds`` read once; the rows of each one that fails."""
    if ds.shape is None or ds.size == 0:
        return []
    problems = []
    selections = ds.iter_chunks() if ds.chunks else [(slice(0, ds.shape[0]),)]
    for selection in selections:
        try:
            ds[selection]
        except OSError as err:
            rows = selection[0]
            problems.append(f"/{name} rows {rows.start}-{rows.stop - 1}: {failure_reason(err)}")
    return problems


def failure_reason(err: BaseException) -> str:
    text = " ".join((getattr(err, "strerror", None) or str(err) or type(err).__name__).split())
    return text if len(text) <= 160 else text[:157] + "..."

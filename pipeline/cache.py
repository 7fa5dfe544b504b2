"""The HDF5 feature store: one file per cache key, written atomically, resumable.

Layout of ``<backbone>-<key>.h5`` (readable with h5py, ``h5ls``, ``h5dump``)::

    /features         (N, D) float32|float16, chunked by rows; NaN rows for unreadable images
    /valid            (N,)   bool, False where the image could not be read
    /paths            (N,)   str, relative to the data root, the file name's bytes as on disk
    /content_sha256   (N,)   64-byte hex SHA-256 of each image file ("" if unreadable)
    /labels           (N,)   int64 index into /classes       } only in a labelled set
    /split            (N,)   str, train | val | test         }
    /classes          (C,)   str                             }
    /failed_index     (M,)   int64 rows that could not be read
    /failed_reason    (M,)   str, why
    /ignored_path     (K,)   str, files and folders of the data that were not taken
    /ignored_reason   (K,)   str, why
    attrs: format, format_version, key, spec (JSON of the whole key, with where each split
           came from), complete, rows_done, labelled, data_root, request (JSON: the backbone
           arguments), versions (JSON), timings (JSON), created

Names are stored as the bytes they have on disk; a name that is not UTF-8 reads back
losslessly with ``dataset.asstr(errors="surrogateescape")`` (h5py), as ``os.fsdecode`` gives it.

Until it is complete the file is named ``<name>.partial``; only a finished file is renamed
(``os.replace``) to its final name, so an interrupted run never passes for a complete cache.
One run writes a key at a time: it holds ``<name>.lock`` (:mod:`pipeline.locks`) while it
creates, resumes or finishes the partial file.

The numeric datasets carry HDF5's per-chunk Fletcher-32 checksum, so a changed byte fails on
read instead of being served. :func:`verify_cache` reads every chunk; a cache found damaged
(a chunk that fails its checksum, a truncated file) is moved aside to ``<name>.damaged``
(:func:`quarantine`), never deleted, and the command that wrote it builds it again.

Under torchrun each rank writes a shard file ``<name>.shard-<rank>-of-<world>`` of the same
layout holding only its rows, plus ``/index`` (the rows' positions in the whole data set, which
``/failed_index`` also uses); one rank then assembles the shards into ``<name>`` in data-set
order (:func:`assemble_shards`) and removes them.

The same folder holds the exported engines' copies of the network
(``<backbone>-<key>.exported/``, :mod:`pipeline.engines`), with ``.refused.json`` notes where
``auto`` could not use one: :func:`list_caches`, :func:`find_cache` and :func:`remove_cache`
take them too, so that every byte a run leaves in the cache folder can be seen and removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.engines import EXPORTED, REFUSED, refusal_path
from pipeline.errors import CacheError, DataError
from pipeline.layouts import as_bytes, display
from pipeline.locks import LOCK_SUFFIX
from pipeline.run_record import extract_record_path

FORMAT = "pipeline-features"
FORMAT_VERSION = 2
SUFFIX = ".h5"
PARTIAL = ".partial"
SHARD = ".shard-"
DAMAGED = ".damaged"
_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# HDF5 chunks of at most 256 KiB (h5py's guidance: 10 KiB to 1 MiB). Each batch's flush
# rewrites and checksums the chunk it ends in: measured 2026-12-04, batches of 8 rows of 1,280
# float32, 2.43 ms a batch in 1 MiB chunks, 0.88 ms in 256 KiB ones (0.41 ms in 1 MiB chunks
# without the checksum), against a forward pass of about 45 ms for the batch.
_CHUNK_BYTES = 256 << 10
_READ_BYTES = 64 << 20  # rows read at a time when splitting a cache into its splits
_STR = h5py.string_dtype()
_SHA = "S64"
# Duplicate groups listed by `cache info` and the extract summary; the count is always whole.
_DUPLICATES_SHOWN = 20


class CacheDamaged(CacheError):
    """A complete cache whose bytes changed on disk: a chunk fails its checksum, or the file
    is truncated."""


def cache_key(spec: dict) -> str:
    """A stable hash of a key spec: same spec, same key; any change, another key."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def cache_path(cache_dir: str | os.PathLike, backbone: str, key: str) -> Path:
    safe = backbone.replace("/", "_")
    return Path(cache_dir) / f"{safe}-{key}{SUFFIX}"


@dataclass
class FeatureSplit:
    """Features of one split, as one contiguous float32 array, with their labels and paths."""

    X: np.ndarray
    y: np.ndarray
    paths: list[str]


class FeatureWriter:
    """Streams feature rows into the partial file of a cache key, resuming where it stopped.

    Rows are written in data-set order; after each block the file is flushed and only then is
    ``rows_done`` advanced, so a kill at any moment leaves a file whose ``rows_done`` rows are
    all on disk.
    """

    def __init__(self, final: Path, spec: dict, key: str, dim: int, dtype: str, meta: dict,
                 chunk_bytes: int | None = None):
        self.final = final
        self.partial = final.with_name(final.name + PARTIAL)
        # the largest chunk of /features (whole rows); read here, so tests may shrink it
        self.chunk_bytes = _CHUNK_BYTES if chunk_bytes is None else chunk_bytes
        final.parent.mkdir(parents=True, exist_ok=True)
        self.file = self._open_partial(spec, key) or self._create(spec, key, dim, dtype, meta)
        self.rows_done = int(self.file.attrs["rows_done"])

    def _open_partial(self, spec: dict, key: str) -> h5py.File | None:
        if not self.partial.exists():
            return None
        try:
            f = h5py.File(self.partial, "r+")
        except BlockingIOError:
            raise CacheError(f"{self.partial} is being written by another run; wait for it "
                             "or remove the file") from None
        except OSError:
            # Killed while HDF5 was writing its own metadata: nothing in it can be trusted.
            self.partial.unlink()
            return None
        if f.attrs.get("key") != key or f.attrs.get("format_version") != FORMAT_VERSION:
            f.close()
            self.partial.unlink()
            return None
        return f

    def _create(self, spec: dict, key: str, dim: int, dtype: str, meta: dict) -> h5py.File:
        n = len(meta["paths"])
        f = h5py.File(self.partial, "w")
        f.attrs.update({
            "format": FORMAT, "format_version": FORMAT_VERSION, "key": key,
            "spec": json.dumps(spec, sort_keys=True), "complete": False, "rows_done": 0,
            "data_root": display(meta["data_root"]),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "request": json.dumps(meta.get("request", {}), sort_keys=True),
            "labelled": bool(meta["classes"]),
        })
        rows = max(1, min(n, self.chunk_bytes // (dim * np.dtype(dtype).itemsize)))
        f.create_dataset("features", shape=(n, dim), maxshape=(None, dim), dtype=dtype,
                         chunks=(rows, dim), fillvalue=np.nan, fletcher32=True)
        f.create_dataset("valid", shape=(n,), maxshape=(None,), dtype=bool, fillvalue=False,
                         fletcher32=True)
        f.create_dataset("content_sha256", shape=(n,), maxshape=(None,), dtype=_SHA,
                         fletcher32=True)
        _strings(f, "paths", meta["paths"], resizable=True)
        if meta["classes"]:
            f.create_dataset("labels", data=np.asarray(meta["labels"], np.int64),
                             maxshape=(None,), fletcher32=True)
            _strings(f, "split", meta["split"], resizable=True)
            _strings(f, "classes", meta["classes"])
        ignored = meta.get("ignored", [])
        _strings(f, "ignored_path", [p for p, _ in ignored])
        _strings(f, "ignored_reason", [r for _, r in ignored])
        if "index" in meta:  # a shard: where its rows go in the whole data set
            f.create_dataset("index", data=np.asarray(meta["index"], np.int64))
        f.create_dataset("failed_index", shape=(0,), maxshape=(None,), dtype=np.int64)
        f.create_dataset("failed_reason", shape=(0,), maxshape=(None,), dtype=_STR)
        f.flush()
        return f

    @property
    def chunk_rows(self) -> int:
        """Rows in a chunk of /features: a write of that many rows fills a chunk at once."""
        return int(self.file["features"].chunks[0])

    def write(self, start: int, features: np.ndarray, valid: np.ndarray,
              failures: list[tuple[int, str]], digests: np.ndarray | None = None) -> None:
        """Write rows ``start:start+len(features)`` (and their files' SHA-256) durably."""
        if start != self.rows_done:
            raise ValueError(f"rows must arrive in order: expected {self.rows_done}, got {start}")
        stop = start + len(features)
        try:
            self.file["features"][start:stop] = features
            self.file["valid"][start:stop] = valid
            if digests is not None:
                self.file["content_sha256"][start:stop] = np.asarray(digests, _SHA)
            if failures:
                for name, values in (("failed_index", [i for i, _ in failures]),
                                     ("failed_reason", _encoded([r for _, r in failures]))):
                    ds = self.file[name]
                    ds.resize((len(ds) + len(values),))
                    ds[-len(values):] = values
            self.file.flush()
            self.file.attrs["rows_done"] = stop
            self.file.flush()
        except OSError as err:  # a full disk, a quota, an I/O error
            raise self._write_failed(err) from None
        self.rows_done = stop

    def _write_failed(self, err: OSError) -> CacheError:
        """One line: what failed, what the whole file needs, what the disk has. The rows
        written before stay (``rows_done`` did not advance past them), so the same command
        resumes once there is room; a chunk the failure half-wrote fails its checksum."""
        features = self.file["features"]
        needed = features.shape[0] * features.shape[1] * features.dtype.itemsize
        free = shutil.disk_usage(self.partial.parent).free
        return CacheError(
            f"writing {self.partial} failed ({failure_reason(err)}) after {self.rows_done} of "
            f"{features.shape[0]} rows; the cache needs about {_size(needed)}, "
            f"{_size(free)} are free there; free some space (or use another --cache-dir) and "
            "run the same command to resume")

    def failures(self) -> list[tuple[str, str]]:
        return _failures(self.file)

    def finish(self, attrs: dict) -> Path:
        """Mark the file complete and give it its final name."""
        if self.rows_done != len(self.file["features"]):
            raise ValueError("finish() before every row was written")
        self.file.attrs.update({k: json.dumps(v) for k, v in attrs.items()})
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.partial, self.final)
        return self.final

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def shard_path(final: Path, rank: int, world_size: int) -> Path:
    """The file in which rank ``rank`` of ``world_size`` writes its rows of cache ``final``."""
    return final.with_name(f"{final.name}{SHARD}{rank}-of-{world_size}")


def shard_paths(final: Path) -> list[Path]:
    """Every shard file of ``final``, complete or partial, whatever the world size."""
    return sorted(final.parent.glob(f"{final.name}{SHARD}*"))


def assemble_shards(writer: FeatureWriter, shards: list[Path]) -> None:
    """Copy complete shard files into ``writer`` in data-set order, block by block.

    Each block of the final file takes, from every shard, the contiguous run of shard rows
    whose ``/index`` falls in the block (indices are sorted within a shard), so memory holds
    one block and every read and write is a slice. Resumes at ``writer.rows_done``.
    """
    files = [open_cache(s) for s in shards]
    try:
        index = [f["index"][:] for f in files]
        # Failures are few: read once, not once per block; indices are data-set positions.
        failed = sorted((int(i), r) for f in files for i, r in
                        zip(f["failed_index"][:], read_strings(f["failed_reason"])))
        n, dim = writer.file["features"].shape
        if sum(len(i) for i in index) != n:
            raise CacheError(f"the shards of {writer.final.name} hold "
                             f"{sum(len(i) for i in index)} rows, the data set {n}")
        chunk = writer.file["features"].chunks[0]
        block = chunk * max(1, _READ_BYTES // (chunk * dim * 4))
        for lo in range(writer.rows_done, n, block):
            hi = min(n, lo + block)
            features, valid, digests = _gather_block(files, index, lo, hi, dim,
                                                     writer.file["features"].dtype)
            writer.write(lo, features, valid, [(i, r) for i, r in failed if lo <= i < hi],
                         digests)
    finally:
        for f in files:
            f.close()


def _gather_block(files, index, lo: int, hi: int, dim: int, dtype):
    features = np.empty((hi - lo, dim), dtype)
    valid = np.zeros(hi - lo, bool)
    digests = np.zeros(hi - lo, _SHA)
    filled = np.zeros(hi - lo, bool)
    for f, ix in zip(files, index):
        a, b = np.searchsorted(ix, [lo, hi])
        rows = ix[a:b] - lo
        features[rows] = f["features"][a:b]
        valid[rows] = f["valid"][a:b]
        digests[rows] = f["content_sha256"][a:b]
        filled[rows] = True
    if not filled.all():
        raise CacheError(f"no shard holds rows {lo + int(np.argmin(filled))} and others; "
                         "remove the shard files and extract again")
    return features, valid, digests


def open_cache(path: str | os.PathLike) -> h5py.File:
    """Open a complete cache file of ours for reading, or say clearly why it cannot be used."""
    path = Path(path)
    _not_an_export(path)
    if path.name.endswith(PARTIAL):
        raise CacheError(f"{path} is an interrupted extraction; run the same extract command "
                         "again to finish it")
    if not path.is_file():
        raise CacheError(f"{path}: no such cache file")
    try:
        f = _CacheFile(path, "r")
    except OSError as err:
        if not _is_hdf5(path):
            raise CacheError(f"{path} is not an HDF5 file") from None
        raise damaged(path, f"it cannot be opened: {failure_reason(err)}") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise CacheError(f"{path} is not a feature cache written by pipeline")
    if not f.attrs.get("complete"):
        f.close()
        raise CacheError(f"{path} is incomplete; run the extract command again to finish it")
    return f


def _not_an_export(path: Path) -> None:
    if is_export(path):
        raise CacheError(f"{path} is an engine's export of the network, not a feature cache; "
                         "`pipeline cache info` describes it")


class _CacheFile(h5py.File):
    """An open cache whose read failures (a chunk failing its checksum) end, once the file
    is closed, as :class:`CacheDamaged` with the file moved aside."""

    def __exit__(self, kind, error, trace) -> None:
        path = Path(self.filename)
        super().__exit__(kind, error, trace)
        if _is_hdf5_failure(error):
            raise damaged(path, failure_reason(error)) from None


def _is_hdf5_failure(error: BaseException | None) -> bool:
    # HDF5's errors reach Python as plain OSError without an errno; the system's carry one.
    return type(error) is OSError and error.errno is None


def _is_hdf5(path: Path) -> bool:
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
    _not_an_export(path)
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
    f.visititems(lambda name, obj: found.append((name, obj))
                 if isinstance(obj, h5py.Dataset) else None)
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


def check_disk(folder: str | os.PathLike, needed: int, what: str, advice: str) -> None:
    """Stop before writing when the disk under ``folder`` cannot hold ``needed`` more bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CacheError(f"{what} needs {_size(needed)} but {folder} has {_size(free)} free; "
                         f"{advice}")


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def failure_reason(err: BaseException) -> str:
    text = " ".join((getattr(err, "strerror", None) or str(err) or type(err).__name__).split())
    return text if len(text) <= 160 else text[:157] + "..."


def _encoded(values) -> np.ndarray:
    """Names as the bytes they have on disk (surrogate escapes back to their raw bytes)."""
    return np.array([as_bytes(v) for v in values], dtype=object)


def _strings(f: h5py.File, name: str, values, resizable: bool = False) -> None:
    f.create_dataset(name, data=_encoded(values), dtype=_STR,
                     maxshape=(None,) if resizable else None)


def read_strings(ds: h5py.Dataset) -> np.ndarray:
    """A string dataset as str, names that are not UTF-8 as ``os.fsdecode`` gives them."""
    return ds.asstr(errors="surrogateescape")[:]


def _failures(f: h5py.File) -> list[tuple[str, str]]:
    paths = f["paths"].asstr(errors="surrogateescape")
    return [(paths[int(i)], r) for i, r in zip(f["failed_index"][:],
                                                read_strings(f["failed_reason"]))]


def _ignored(f: h5py.File) -> list[tuple[str, str]]:
    if "ignored_path" not in f:  # format 1
        return []
    return list(zip(read_strings(f["ignored_path"]).tolist(),
                    read_strings(f["ignored_reason"]).tolist()))


def ignored_counts(ignored: list[tuple[str, str]]) -> dict[str, int]:
    """How many entries were ignored for each kind of reason (the text before a colon)."""
    counts: dict[str, int] = {}
    for _, why in ignored:
        kind = why.split(":")[0]
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def find_duplicates(digests: np.ndarray, valid: np.ndarray, paths: np.ndarray,
                    labels: np.ndarray | None, split: np.ndarray | None,
                    classes: list[str]) -> dict:
    """Images stored twice (identical bytes) under other paths, and where they conflict.

    A group that spans two classes is a labelling error; one that spans two splits leaks:
    a test image that is also a training image inflates every score.
    """
    rows = np.flatnonzero(valid & (digests != b""))
    order = rows[np.argsort(digests[rows], kind="stable")]  # a group's rows stay in order
    same = digests[order]
    groups = [g for g in np.split(order, np.flatnonzero(same[1:] != same[:-1]) + 1)
              if len(g) > 1]
    groups.sort(key=lambda g: g[0])
    out = {"groups": len(groups), "images": int(sum(len(g) for g in groups)),
           "across_classes": 0, "across_splits": 0, "shown": []}
    for g in groups:
        classes_here = sorted({classes[i] for i in labels[g]}) if labels is not None else []
        splits_here = sorted(set(split[g].tolist())) if split is not None else []
        out["across_classes"] += len(classes_here) > 1
        out["across_splits"] += len(splits_here) > 1
        if len(out["shown"]) < _DUPLICATES_SHOWN and (len(classes_here) > 1 or
                                                      len(splits_here) > 1 or labels is None):
            out["shown"].append({"paths": paths[g].tolist(), "classes": classes_here,
                                 "splits": splits_here})
    return out


def stored_duplicates(path: str | os.PathLike) -> dict | None:
    """:func:`find_duplicates` over a complete cache's stored hashes (None: not recorded)."""
    with open_cache(path) as f:
        return _duplicates(f)


def _duplicates(f: h5py.File) -> dict | None:
    if "content_sha256" not in f:  # format 1: not recorded
        return None
    labelled = "labels" in f
    return find_duplicates(f["content_sha256"][:], f["valid"][:], read_strings(f["paths"]),
                           f["labels"][:] if labelled else None,
                           read_strings(f["split"]) if labelled else None,
                           read_strings(f["classes"]).tolist() if labelled else [])


def stored_summary(path: Path) -> tuple[int, int, list[tuple[str, str]]]:
    """Images, feature dimension and failures of a complete cache, from one open."""
    with open_cache(path) as f:
        return len(f["valid"]), int(f["features"].shape[1]), _failures(f)


def read_splits(path: str | os.PathLike,
                splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, FeatureSplit]:
    """The readable images of each split, each as one preallocated float32 array.

    One pass over the file in blocks of whole chunks: every block is read once and its rows
    are copied into their split's array, so memory holds the outputs plus one block, never a
    second N x D copy (splits made by a seeded shuffle interleave their rows).
    """
    with open_cache(path) as f:
        if "labels" not in f:
            raise DataError(f"{path} holds unlabelled images (no classes, no splits); heads "
                            "and fine-tuning need class folders or a manifest with labels. "
                            "`pipeline predict` and `pipeline cache export` take it")
        features = f["features"]
        split, valid = read_strings(f["split"]), f["valid"][:]
        paths, labels = read_strings(f["paths"]), f["labels"][:]
        rows = {s: np.flatnonzero((split == s) & valid) for s in splits}
        out = {s: np.empty((len(r), features.shape[1]), np.float32) for s, r in rows.items()}
        block = features.chunks[0] * max(1, _READ_BYTES // (features.chunks[0] *
                                                             features.shape[1] * 4))
        for lo in range(0, len(valid), block):
            buffer = features[lo:lo + block]
            for s, r in rows.items():
                start, stop = np.searchsorted(r, [lo, lo + block])
                out[s][start:stop] = buffer[r[start:stop] - lo]
        return {s: FeatureSplit(out[s], labels[r], paths[r].tolist()) for s, r in rows.items()}


def read_split(path: str | os.PathLike, split: str) -> FeatureSplit:
    """The readable images of one split, as one float32 array with labels and paths."""
    return read_splits(path, (split,))[split]


def cache_info(path: str | os.PathLike) -> dict:
    """What a cache holds: its key spec, sizes, where its splits came from, failures, what
    was ignored in the data, images stored twice, and timings."""
    with open_cache(path) as f:
        valid = f["valid"][:]
        labelled = "labels" in f
        split = read_strings(f["split"]) if labelled else np.array([])
        spec = json.loads(f.attrs["spec"])
        ignored = _ignored(f)
        return {
            "path": str(path),
            "key": f.attrs["key"],
            "images": int(len(valid)),
            "failed": int((~valid).sum()),
            "dim": int(f["features"].shape[1]),
            "dtype": str(f["features"].dtype),
            "labelled": labelled,
            "classes": read_strings(f["classes"]).tolist() if labelled else [],
            "splits": ({s: int(((split == s) & valid).sum()) for s in ("train", "val", "test")}
                       if labelled else {}),
            "split_sources": spec.get("splits", {}).get("source", {}),
            "ignored": ignored_counts(ignored),
            "ignored_paths": [{"path": p, "reason": r} for p, r in ignored],
            "duplicates": _duplicates(f),
            "spec": spec,
            "data_root": f.attrs["data_root"],
            "request": json.loads(f.attrs.get("request", "{}")),
            "created": f.attrs["created"],
            "timings": json.loads(f.attrs.get("timings", "{}")),
            "versions": json.loads(f.attrs.get("versions", "{}")),
            "bytes": Path(path).stat().st_size,
        }


def cache_spec(path: str | os.PathLike) -> dict:
    """The JSON spec a complete cache is keyed by, read without touching its datasets."""
    with open_cache(path) as f:
        return json.loads(f.attrs["spec"])


def cache_kind(spec: dict) -> str:
    """``features``, or ``activations`` for fine-tuning's caches of block inputs
    (:mod:`pipeline.activations`), which share this layout: ``spec`` as :func:`cache_spec`
    reads it."""
    return "activations" if "activations" in spec else "features"


def _cache_files(cache_dir: str | os.PathLike) -> list[Path]:
    """The cache files of a folder, without the writer locks beside them."""
    return sorted(p for p in Path(cache_dir).glob(f"*{SUFFIX}*")
                  if not p.name.endswith(LOCK_SUFFIX) and LOCK_SUFFIX + ".stale-" not in p.name)


def list_caches(cache_dir: str | os.PathLike) -> list[dict]:
    """One row per cache file in ``cache_dir``, complete ones and interrupted ones."""
    rows = []
    for path in _cache_files(cache_dir):
        if path.name.endswith(SUFFIX):
            try:
                info = cache_info(path)
            except CacheError as err:
                rows.append({"path": str(path), "status": str(err)})
                continue
            kind = cache_kind(info["spec"])
            rows.append({"path": str(path), "status": "complete", "kind": kind, "backbone":
                         info["spec"]["backbone"], "images": info["images"], "dim": info["dim"],
                         "bytes": info["bytes"], "created": info["created"]})
        elif SUFFIX + SHARD in path.name:
            status = "shard (partial)" if path.name.endswith(PARTIAL) else "shard"
            rows.append({"path": str(path), "status": status, "bytes": path.stat().st_size})
        elif path.name.endswith(SUFFIX + PARTIAL):
            rows.append({"path": str(path), "status": "partial", "bytes": path.stat().st_size})
        elif SUFFIX + DAMAGED in path.name:
            rows.append({"path": str(path), "status": "damaged (moved aside)",
                         "bytes": path.stat().st_size})
    return rows + [_export_row(path) for path in _export_files(cache_dir)]


def _export_files(cache_dir: str | os.PathLike) -> list[Path]:
    """The engines' exports in a cache folder: finished and interrupted export folders, and
    auto's refusal notes."""
    return sorted(p for p in Path(cache_dir).glob(f"*{EXPORTED}*") if is_export(p))


def is_export(path: Path) -> bool:
    """An engine's export folder (finished or interrupted) or auto's refusal note."""
    name = path.name
    return (path.is_dir() and (name.endswith(EXPORTED) or EXPORTED + ".partial-" in name)
            or path.is_file() and name.endswith(EXPORTED + REFUSED))


def _export_row(path: Path) -> dict:
    if path.name.endswith(REFUSED):
        refused = ", ".join(sorted(_read_json(path)))
        return {"path": str(path), "status": f"auto refused {refused or 'no engine'}",
                "bytes": path.stat().st_size}
    if not path.name.endswith(EXPORTED):
        return {"path": str(path), "status": "export (partial)", "bytes": _folder_bytes(path)}
    info = export_info(path)
    if not info["complete"]:
        return {"path": str(path), "status": "export (no model.onnx)", "bytes": info["bytes"]}
    return {"path": str(path), "status": "complete", "kind": "export",
            "backbone": info["backbone"], "network": info["network_part"],
            "bytes": info["bytes"], "created": info["created"]}


def export_info(path: str | os.PathLike) -> dict:
    """What an engine's export folder holds: the network it was exported from (its record,
    ``exported.json``), the part of it (the whole feature network, or the trunk below
    fine-tuning's cut), its size and files."""
    path = Path(path)
    record = _read_json(path / "exported.json")
    network = record.get("network") or {}
    cut = network.get("activation") or network.get("activations")
    if isinstance(cut, list):
        cut = ", ".join(cut)
    return {"path": str(path), "complete": (path / "model.onnx").is_file(),
            "backbone": network.get("backbone", "?"),
            "network_part": f"trunk to {cut}" if cut else "features",
            "network": network, "input_shape": record.get("input_shape"),
            "exporters": record.get("exporters", {}), "created": record.get("created", "?"),
            "files": sorted(p.name for p in path.iterdir()), "bytes": _folder_bytes(path)}


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # a missing or half-written record: shown as unknown
        return {}


def find_cache(cache_dir: str | os.PathLike, name: str) -> Path:
    """A cache file by path, file name, or (a prefix of) its key."""
    as_path = Path(name)
    if as_path.exists():
        return as_path
    matches = [p for p in _cache_files(cache_dir) + _export_files(cache_dir) if name in p.name]
    if len(matches) > 1 and SHARD not in name:  # a key names its cache before its shards
        matches = [p for p in matches if SUFFIX + SHARD not in p.name] or matches
    if len(matches) > 1 and REFUSED not in name:  # and an export before auto's note on it
        matches = [p for p in matches if not p.name.endswith(REFUSED)] or matches
    if len(matches) != 1:
        what = "no cache" if not matches else f"{len(matches)} caches"
        raise CacheError(f"{what} in {cache_dir} match {name!r}; `pipeline cache list` shows them")
    return matches[0]


def remove_cache(path: Path) -> None:
    """Remove a cache file (with its extraction record), or an engine's export (with auto's
    refusal note beside it)."""
    if is_export(path) and path.is_dir():
        shutil.rmtree(path)
        refusal_path(path).unlink(missing_ok=True)
        return
    if is_export(path):  # a refusal note
        path.unlink()
        return
    if not (path.name.endswith((SUFFIX, SUFFIX + PARTIAL)) or SUFFIX + SHARD in path.name
            or SUFFIX + DAMAGED in path.name):
        raise CacheError(f"{path} is not a cache file")
    path.unlink()
    if path.name.endswith(SUFFIX):  # the record of the extraction that wrote it goes too
        extract_record_path(path).unlink(missing_ok=True)

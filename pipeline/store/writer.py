"""Writing a cache: rows streamed into its partial file, resumed, and shards assembled.

Until it is complete the file is named ``<name>.partial``; only a finished file is renamed
(``os.replace``) to its final name, so an interrupted run never passes for a complete cache.
Under torchrun each rank writes a shard file of the same layout holding only its rows, plus
``/index``; one rank then assembles the shards in data-set order (:func:`assemble_shards`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.errors import CacheError
from pipeline.data.layouts import display
from pipeline.store import cache
from pipeline.store.cache import (
    SHA_DTYPE,
    STRING_DTYPE,
    encoded,
    failures,
    open_cache,
    read_strings,
    write_strings,
)
from pipeline.store.integrity import FORMAT, FORMAT_VERSION, failure_reason
from pipeline.store.paths import PARTIAL

# HDF5 chunks of at most 256 KiB (h5py's guidance: 10 KiB to 1 MiB). Each batch's flush
# rewrites and checksums the chunk it ends in: measured 2026-12-04, batches of 8 rows of 1,280
# float32, 2.43 ms a batch in 1 MiB chunks, 0.88 ms in 256 KiB ones (0.41 ms in 1 MiB chunks
# without the checksum), against a forward pass of about 45 ms for the batch.
_CHUNK_BYTES = 256 << 10


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
        if meta.get("layers"):  # several layers side by side: [[name, start, stop], ...]
            f.attrs["layers"] = json.dumps([list(layer) for layer in meta["layers"]])
        rows = max(1, min(n, self.chunk_bytes // (dim * np.dtype(dtype).itemsize)))
        f.create_dataset("features", shape=(n, dim), maxshape=(None, dim), dtype=dtype,
                         chunks=(rows, dim), fillvalue=np.nan, fletcher32=True)
        f.create_dataset("valid", shape=(n,), maxshape=(None,), dtype=bool, fillvalue=False,
                         fletcher32=True)
        f.create_dataset("content_sha256", shape=(n,), maxshape=(None,), dtype=SHA_DTYPE,
                         fletcher32=True)
        write_strings(f, "paths", meta["paths"], resizable=True)
        if meta["classes"]:
            f.create_dataset("labels", data=np.asarray(meta["labels"], np.int64),
                             maxshape=(None,), fletcher32=True)
            write_strings(f, "split", meta["split"], resizable=True)
            write_strings(f, "classes", meta["classes"])
        ignored = meta.get("ignored", [])
        write_strings(f, "ignored_path", [p for p, _ in ignored])
        write_strings(f, "ignored_reason", [r for _, r in ignored])
        if "index" in meta:  # a shard: where its rows go in the whole data set
            f.create_dataset("index", data=np.asarray(meta["index"], np.int64))
        f.create_dataset("failed_index", shape=(0,), maxshape=(None,), dtype=np.int64)
        f.create_dataset("failed_reason", shape=(0,), maxshape=(None,), dtype=STRING_DTYPE)
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
                self.file["content_sha256"][start:stop] = np.asarray(digests, SHA_DTYPE)
            if failures:
                for name, values in (("failed_index", [i for i, _ in failures]),
                                     ("failed_reason", encoded([r for _, r in failures]))):
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
            f"{_size(free)} are free there; free some space and run the same command to "
            "resume", path=self.partial, needed=needed, free=free, reason="cache-write-failed")

    def failures(self) -> list[tuple[str, str]]:
        return failures(self.file)

    def finish(self, attrs: dict) -> Path:
        """Mark the file complete and give it its final name."""
        if self.rows_done != len(self.file["features"]):
            raise ValueError("finish() before every row was written")
        self.file.attrs.update({k: json.dumps(v) for k, v in attrs.items()})
        add_layer_views(self.file)
        self.file.attrs["complete"] = True
        self.file.close()
        os.replace(self.partial, self.final)
        return self.final

    def close(self) -> None:
        if self.file.id.valid:
            self.file.close()


def add_layer_views(f: h5py.File) -> None:
    """``layers/<name>``: one dataset per layer of a multi-layer cache, each a virtual view of
    its columns of ``features`` (no second copy of the numbers; h5py reads it as any dataset,
    and the checksums stay those of ``features``)."""
    if "layers" not in f.attrs or "layers" in f:
        return
    features = f["features"]
    n, dim = features.shape
    group = f.create_group("layers")
    for name, start, stop in json.loads(f.attrs["layers"]):
        layout = h5py.VirtualLayout(shape=(n, stop - start), dtype=features.dtype)
        layout[:] = h5py.VirtualSource(".", "features", shape=(n, dim))[:, start:stop]
        group.create_virtual_dataset(name.replace("/", "_"), layout, fillvalue=np.nan)


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
        # read at call time: the tests shrink it to force many blocks
        block = chunk * max(1, cache.READ_BYTES // (chunk * dim * 4))
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
    digests = np.zeros(hi - lo, SHA_DTYPE)
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


def check_disk(folder: str | os.PathLike, needed: int, what: str, reason: str) -> None:
    """Stop before writing when the disk under ``folder`` cannot hold ``needed`` more bytes;
    ``reason`` names the case for the command line's advice (:mod:`pipeline.cli.messages`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise CacheError(f"{what} needs {_size(needed)} but {folder} has {_size(free)} free; "
                         "free some space", path=folder, needed=needed, free=free, reason=reason)


def _size(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"

"""A feature cache as plain files that numpy, pandas and polars read without this package.

Every format holds one row per image, in cache order: ``path`` (relative to the data root;
bytes that are not UTF-8 written as ``\\xNN``), ``label`` (the class name) and ``split`` (empty
for an unlabelled set), ``valid`` (False for an image that could not be read, whose features
are NaN) and the features. ``npy`` and ``parquet`` also keep ``path_bytes``, each name's bytes as
on disk. Rows are read and written block by block, so memory does not grow with the cache.

:func:`export_cache` checks the cache and plans the export, reading no features;
``result.write(out)`` streams the blocks into the files, each written all at once
(:mod:`pipeline.core.atomic`): a file never carries its name half-written.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_write, write_bytes, write_json
from pipeline.core.contract import Result
from pipeline.core.errors import ExportError
from pipeline.core.extras import require, require_all
from pipeline.core.options import EXPORT_FORMATS, CacheExportOptions
from pipeline.data.layouts import as_bytes, display
from pipeline.store.cache import open_cache, read_strings

__all__ = ["FORMATS", "CacheExportOptions", "CacheExportResult", "export_cache"]

FORMATS = EXPORT_FORMATS
_BLOCK_BYTES = 32 << 20  # features read per block: what the export holds in memory at once

@dataclass
class _Block:
    """Rows ``start:start+len(valid)`` of a cache, every column ready to write."""

    start: int
    features: np.ndarray
    valid: np.ndarray
    path: list[str]
    path_bytes: list[bytes]
    label: list[str | None]
    split: list[str | None]


@dataclass
class CacheExportResult(Result):
    """A planned export of a cache's rows; :meth:`write` streams them into the files."""

    cache: Path  # the complete feature cache the rows are read from
    format: str  # npy, parquet or csv
    rows: int
    dim: int
    # The files of the last write(out); empty until the result is written.
    files: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"rows": self.rows, "dim": self.dim, "format": self.format,
                "files": list(self.files)}

    def write(self, out: str | os.PathLike) -> list[Path]:
        """Stream the cache's rows, block by block, to ``out``: a folder of ``.npy`` files
        (``columns.json`` last, so that a complete folder has it) for npy, one file for
        parquet and csv; the paths written.

        Raises
        ------
        ExportError
            ``out`` of the wrong kind (a file for npy, a folder for parquet or csv), before
            anything is read; or a cache whose shape changed since :func:`export_cache`.
        """
        out = Path(out)
        _check_out(out, self.format)
        with open_cache(self.cache) as f:
            n, dim = f["features"].shape
            if (n, dim) != (self.rows, self.dim):
                raise ExportError(f"{self.cache} changed since the export was planned: "
                                  f"{n} x {dim} features, not {self.rows} x {self.dim}",
                                  path=self.cache, rows=int(n), dim=int(dim))
            writer = {"npy": _write_npy, "parquet": _write_parquet, "csv": _write_csv}
            files = writer[self.format](out, _blocks(f), n, dim, f["features"].dtype)
        self.files = [str(p) for p in files]
        return files


def export_cache(cache: str | os.PathLike, *,
                 options: CacheExportOptions = CacheExportOptions()) -> CacheExportResult:
    """The features of ``cache`` with path, label, split and valid, as plain files.

    Checks the cache and plans the export; reads no features and writes nothing:
    ``result.write(out)`` streams the rows into the files.

    Parameters
    ----------
    cache
        A complete feature cache (``.h5``).
    options
        :class:`~pipeline.core.options.CacheExportOptions`: ``format``, one of ``npy`` (a
        folder that receives ``features.npy``, N x D, memory-mappable with
        ``np.load(..., mmap_mode="r")``, ``valid.npy``, ``path.npy``, ``path_bytes.npy``,
        ``label.npy``, ``split.npy``), ``parquet`` (one file with a fixed-size list column
        ``features``; needs pyarrow: the ``parquet`` extra) or ``csv`` (one file with feature
        columns ``f0`` ... ``f<D-1>``).

    Returns
    -------
    CacheExportResult
        ``rows``, ``dim`` and ``format``; ``files`` once written.
    """
    if options.format == "parquet":  # before anything is read
        require_all(["pyarrow"], "Parquet export")
    with open_cache(cache) as f:
        n, dim = f["features"].shape
    return CacheExportResult(Path(cache), options.format, int(n), int(dim))


def _check_out(out: Path, format: str) -> None:
    """npy writes a folder, parquet and csv one file: say so before anything is read."""
    if format == "npy" and out.exists() and not out.is_dir():
        raise ExportError(f"{out} is a file; npy writes a folder of .npy files: give a folder",
                          path=out, format=format)
    if format != "npy" and out.is_dir():
        example = out / f"features.{format}"
        raise ExportError(f"{out} is a folder; {format} writes one file: give a file name "
                          f"such as {example}", path=out, format=format, example=example)


def _blocks(f) -> Iterator[_Block]:
    features = f["features"]
    n, dim = features.shape
    paths = read_strings(f["paths"])
    labelled = "labels" in f
    classes = read_strings(f["classes"]) if labelled else None
    labels = f["labels"][:] if labelled else None
    split = read_strings(f["split"]) if labelled else None
    rows = max(1, _BLOCK_BYTES // max(1, dim * features.dtype.itemsize))
    for lo in range(0, n, rows):
        hi = min(n, lo + rows)
        names = paths[lo:hi].tolist()
        yield _Block(
            lo, features[lo:hi], f["valid"][lo:hi], [display(p) for p in names],
            [as_bytes(p) for p in names],
            classes[labels[lo:hi]].tolist() if labelled else [None] * (hi - lo),
            split[lo:hi].tolist() if labelled else [None] * (hi - lo))


def _write_npy(out: Path, blocks: Iterator[_Block], n: int, dim: int, dtype) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.dtype(dtype)
    # The header np.save writes for an (n, dim) C-order array, then its rows as they come.
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {
        "descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
        "shape": (n, dim)})
    columns: dict[str, list] = {"valid": [], "path": [], "path_bytes": [], "label": [],
                                "split": []}
    size = header.tell() + n * dim * dtype.itemsize
    with atomic_write(out / "features.npy", size=size) as fh:
        fh.write(header.getvalue())
        for block in blocks:
            fh.write(np.ascontiguousarray(block.features, dtype).tobytes())
            for name in columns:
                columns[name] += list(getattr(block, name))
    files = [out / "features.npy"]
    labelled = n == 0 or columns["label"][0] is not None
    for name, values in columns.items():
        if name in ("label", "split") and not labelled:
            continue
        # Fixed-width str and bytes arrays: np.load reads them without allow_pickle.
        array = (np.array(values, bool) if name == "valid" else
                 np.array(values, "S") if name == "path_bytes" else np.array(values, str))
        files.append(write_bytes(out / f"{name}.npy", _npy(array)))
    write_json(out / "columns.json",
               {"rows": n, "dim": dim, "labelled": labelled, "files": [p.name for p in files]})
    return files + [out / "columns.json"]


def _npy(array: np.ndarray) -> bytes:
    """``array`` as the bytes of its ``.npy`` file."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _write_parquet(out: Path, blocks: Iterator[_Block], n: int, dim: int, dtype) -> list[Path]:
    pa = require("pyarrow", "Parquet export")
    pq = require("pyarrow.parquet", "Parquet export")
    value_type = pa.float16() if np.dtype(dtype) == np.float16 else pa.float32()
    schema = pa.schema([("path", pa.string()), ("path_bytes", pa.binary()),
                        ("label", pa.string()), ("split", pa.string()), ("valid", pa.bool_()),
                        ("features", pa.list_(value_type, dim))])
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out) as fh, pq.ParquetWriter(fh, schema) as writer:
        for b in blocks:
            flat = pa.array(np.ascontiguousarray(b.features).reshape(-1), value_type)
            writer.write_table(pa.table({
                "path": b.path, "path_bytes": pa.array(b.path_bytes, pa.binary()),
                "label": pa.array(b.label, pa.string()), "split": pa.array(b.split, pa.string()),
                "valid": b.valid, "features": pa.FixedSizeListArray.from_arrays(flat, dim),
            }, schema=schema))
    return [out]


def _write_csv(out: Path, blocks: Iterator[_Block], n: int, dim: int, dtype) -> list[Path]:
    out.parent.mkdir(parents=True, exist_ok=True)
    # 9 significant digits give a float32 back exactly; float16 needs 5.
    fmt = "%.5g" if np.dtype(dtype) == np.float16 else "%.9g"
    with atomic_write(out) as raw:
        # newline="": the csv module ends its rows itself (RFC 4180's \r\n)
        fh = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split", "valid", *(f"f{j}" for j in range(dim))])
        for b in blocks:
            values = np.char.mod(fmt, b.features.astype(np.float64))
            for i in range(len(b.valid)):
                writer.writerow([b.path[i], b.label[i] or "", b.split[i] or "",
                                 bool(b.valid[i]), *values[i]])
        fh.detach()  # flushed; atomic_write closes the file and renames it into place
    return [out]

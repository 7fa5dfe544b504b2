"""A feature cache as plain files that numpy, pandas and polars read without this package.

Every format holds one row per image, in cache order: ``path`` (relative to the data root;
bytes that are not UTF-8 written as ``\\xNN``), ``label`` (the class name) and ``split`` (empty
for an unlabelled set), ``valid`` (False for an image that could not be read, whose features
are NaN) and the features. ``npy`` and ``parquet`` also keep ``path_bytes``, each name's bytes as
on disk. Rows are read and written block by block, so memory does not grow with the cache.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.atomic import write_json
from pipeline.core.errors import ExportError
from pipeline.core.extras import require, require_all
from pipeline.core.options import EXPORT_FORMATS
from pipeline.data.layouts import as_bytes, display
from pipeline.store.cache import open_cache, read_strings

FORMATS = EXPORT_FORMATS
_BLOCK_BYTES = 32 << 20



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


def export_cache(cache: str | os.PathLike, out: str | os.PathLike, format: str = "parquet"
                 ) -> dict:
    """Write the features of ``cache`` with path, label, split and valid to ``out``.

    Parameters
    ----------
    cache
        A complete feature cache (``.h5``).
    out
        ``npy``: a folder that receives ``features.npy`` (N x D, memory-mappable with
        ``np.load(..., mmap_mode="r")``), ``valid.npy``, ``path.npy``, ``path_bytes.npy``,
        ``label.npy``, ``split.npy``; ``parquet``: one file with a fixed-size list column
        ``features`` (needs pyarrow: the ``parquet`` extra); ``csv``: one file with feature
        columns ``f0`` ... ``f<D-1>``.
    format
        ``npy``, ``parquet`` or ``csv``.

    Returns
    -------
    dict
        ``rows``, ``dim``, ``format`` and ``files`` written.
    """
    if format not in FORMATS:
        raise ExportError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    out = Path(out)
    _check_out(out, format)
    if format == "parquet":  # before anything is read
        require_all(["pyarrow"], "Parquet export")
    with open_cache(cache) as f:
        n, dim = f["features"].shape
        writer = {"npy": _write_npy, "parquet": _write_parquet, "csv": _write_csv}[format]
        files = writer(out, _blocks(f), n, dim, f["features"].dtype)
    return {"rows": int(n), "dim": int(dim), "format": format, "files": [str(p) for p in files]}


def _check_out(out: Path, format: str) -> None:
    """npy writes a folder, parquet and csv one file: say so before anything is read."""
    if format == "npy" and out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; npy writes a folder of .npy files: give a "
                          "folder")
    if format != "npy" and out.is_dir():
        raise ExportError(f"--out {out} is a folder; {format} writes one file: give a file "
                          f"name such as {out / ('features.' + format)}")


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
    features = np.lib.format.open_memmap(out / "features.npy", "w+", dtype, (n, dim))
    columns: dict[str, list] = {"valid": [], "path": [], "path_bytes": [], "label": [],
                                "split": []}
    for block in blocks:
        features[block.start:block.start + len(block.valid)] = block.features
        for name in columns:
            columns[name] += list(getattr(block, name))
    features.flush()
    del features
    files = [out / "features.npy"]
    labelled = n == 0 or columns["label"][0] is not None
    for name, values in columns.items():
        if name in ("label", "split") and not labelled:
            continue
        # Fixed-width str and bytes arrays: np.load reads them without allow_pickle.
        array = (np.array(values, bool) if name == "valid" else
                 np.array(values, "S") if name == "path_bytes" else np.array(values, str))
        np.save(out / f"{name}.npy", array)
        files.append(out / f"{name}.npy")
    write_json(out / "columns.json",
               {"rows": n, "dim": dim, "labelled": labelled, "files": [p.name for p in files]})
    return files + [out / "columns.json"]


def _write_parquet(out: Path, blocks: Iterator[_Block], n: int, dim: int, dtype) -> list[Path]:
    pa = require("pyarrow", "Parquet export")
    pq = require("pyarrow.parquet", "Parquet export")
    value_type = pa.float16() if np.dtype(dtype) == np.float16 else pa.float32()
    schema = pa.schema([("path", pa.string()), ("path_bytes", pa.binary()),
                        ("label", pa.string()), ("split", pa.string()), ("valid", pa.bool_()),
                        ("features", pa.list_(value_type, dim))])
    out.parent.mkdir(parents=True, exist_ok=True)
    with pq.ParquetWriter(out, schema) as writer:
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
    with open(out, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["path", "label", "split", "valid", *(f"f{j}" for j in range(dim))])
        for b in blocks:
            values = np.char.mod(fmt, b.features.astype(np.float64))
            for i in range(len(b.valid)):
                writer.writerow([b.path[i], b.label[i] or "", b.split[i] or "",
                                 bool(b.valid[i]), *values[i]])
    return [out]

"""Parquet files and Arrow files (a ``save_to_disk`` folder's ``data-*.arrow``): images in a column.

A table holds one image per row: the image column is the one the Hugging Face schema metadata
types ``Image``, else a column named ``image`` or ``img``, else the only column of plain
bytes or of ``{bytes, path}`` structs. Labels come from the column typed ``ClassLabel`` (its
integers named by the metadata's ``names``), else a column named ``label``, ``labels``,
``class`` or ``category`` (integers or strings); a ``split`` column gives each row's split.

Nothing reads a whole column into memory: listing reads the label and split columns only,
a batch at a time, and an image is read through :class:`RowReader`, which keeps one batch of
the image column (:data:`BATCH_ROWS` rows) and walks forward through the file, so a pass in
row order reads each row group once.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import DataError
from pipeline.core.extras import require
from pipeline.data.layouts import display

__all__ = ["BATCH_ROWS", "RowReader", "TableRows", "list_arrow", "list_parquet", "row_reader"]

# Rows of the image column held at once when reading images (a few MB of typical photos).
BATCH_ROWS = 64
# Rows of the label and split columns read at a time while listing (small values).
_LIST_ROWS = 1 << 16
# Parquet pages are read through a buffer of this size, without pre-buffering, instead of a
# column chunk at once (pyarrow's default, which holds a row group's whole image column:
# 34 MB against 6 MB for 32 MB of images in one row group, measured). A page is the least a
# reader holds: pyarrow's writer ends one every 1,024 rows by default, Hugging Face's row
# groups hold 100 images.
_BUFFER = 1 << 20
_IMAGE_NAMES = ("image", "img")
_LABEL_NAMES = ("label", "labels", "class", "category")


@dataclass
class TableRows:
    """What one file holds: its row count, each row's label name and given split, if any.

    ``labels`` is None without a label column (a None entry: that row has no label);
    ``classes`` is the ClassLabel's names in their order, when the metadata has them.
    """

    rows: int
    labels: list[str | None] | None = None
    given: list[str] | None = None
    classes: list[str] | None = None
    ignored: list[tuple[str, str]] = field(default_factory=list)


def _pa():
    return require("pyarrow", "reading Parquet and Arrow files")


def _features(schema, fallback: dict | None = None) -> dict:
    """The Hugging Face features of a schema (``{"info": {"features": {...}}}`` under the
    metadata key ``huggingface``), else ``fallback`` (a ``dataset_info.json``'s)."""
    raw = (schema.metadata or {}).get(b"huggingface")
    if raw:
        try:
            found = json.loads(raw).get("info", {}).get("features")
        except (ValueError, AttributeError):
            found = None
        if isinstance(found, dict):
            return found
    return fallback or {}


def _is_image_type(t) -> bool:
    pa = _pa()
    binary = (pa.types.is_binary(t) or pa.types.is_large_binary(t)
              or getattr(pa.types, "is_binary_view", lambda _: False)(t))
    if binary:
        return True
    return (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
            and _is_image_type(t.field("bytes").type))


def image_column(schema, features: dict, where: str) -> str:
    """The name of the column that holds the images, or a DataError naming the columns."""
    usable = [f.name for f in schema if _is_image_type(f.type)]
    typed = [n for n in usable if (features.get(n) or {}).get("_type") == "Image"]
    named = [n for n in usable if n.lower() in _IMAGE_NAMES]
    for choice in (typed, named, usable if len(usable) == 1 else []):
        if choice:
            return choice[0]
    columns = ", ".join(f"{f.name} ({f.type})" for f in schema) or "none"
    why = (f"{len(usable)} columns of bytes ({', '.join(usable)}) and none named image"
           if usable else "no column of image bytes")
    raise DataError(f"{where}: {why}; the images must be a column of the Hugging Face Image "
                    f"type, a column named image or img, or the only column of bytes or "
                    f"{{bytes, path}} structs (its columns: {columns})")


def _label_column(schema, features: dict) -> tuple[str | None, list[str] | None]:
    """The label column and its ClassLabel names (None: integers or strings as they are)."""
    pa = _pa()
    for f in schema:
        feature = features.get(f.name) or {}
        if feature.get("_type") == "ClassLabel" and isinstance(feature.get("names"), list):
            return f.name, [str(n) for n in feature["names"]]
    for f in schema:
        if f.name.lower() in _LABEL_NAMES and (pa.types.is_integer(f.type)
                                               or pa.types.is_string(f.type)
                                               or pa.types.is_large_string(f.type)):
            return f.name, None
    return None, None


def _split_column(schema) -> str | None:
    pa = _pa()
    for f in schema:
        if f.name.lower() == "split" and (pa.types.is_string(f.type)
                                          or pa.types.is_large_string(f.type)):
            return f.name
    return None


class _Lister:
    """Label and split columns of one file, batch after batch, into a :class:`TableRows`."""

    def __init__(self, where: str, schema, features: dict, rows: int):
        from pipeline.data.layouts import SPLIT_ALIASES

        self.where, self.aliases = where, SPLIT_ALIASES
        image_column(schema, features, where)  # fails here, at listing, if there is none
        self.label, names = _label_column(schema, features)
        self.split = _split_column(schema)
        self.index = {n: i for i, n in enumerate(names)} if names is not None else None
        self.out = TableRows(rows, [] if self.label else None, [] if self.split else None,
                             names)
        if rows == 0:
            raise DataError(f"{where}: an empty shard (no rows); remove it or write its rows")

    @property
    def columns(self) -> list[str]:
        return [c for c in (self.label, self.split) if c]

    def add(self, batch) -> None:
        start = len(self.out.labels if self.label else self.out.given or [])
        if self.label:
            values = batch.column(self.label).to_pylist()
            self.out.labels += [self._name(v, start + r) for r, v in enumerate(values)]
        if self.split:
            self.out.given += [self._split(v, start + r)
                               for r, v in enumerate(batch.column(self.split).to_pylist())]

    def _name(self, value, row: int) -> str | None:
        if value is None or value == -1:  # Hugging Face's "no label" (test sets without them)
            return None
        names = self.out.classes
        if isinstance(value, int):
            if names is None:
                return str(value)
            if 0 <= value < len(names):
                return names[value]
            raise DataError(f"{self.where}: row {row}: label {value} is not one of the "
                            f"{len(names)} class names of its ClassLabel (0 to "
                            f"{len(names) - 1})")
        if self.index is not None and value not in self.index:
            shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
            raise DataError(f"{self.where}: row {row}: label {value!r} is not one of the "
                            f"names of its ClassLabel ({shown})")
        return str(value)

    def _split(self, value, row: int) -> str:
        cell = (value or "").strip().lower()
        if cell and cell not in self.aliases:
            raise DataError(f"{self.where}: row {row}: split {value!r} must be one of train, "
                            "val (valid, validation), test or empty")
        return self.aliases.get(cell, "")


def list_parquet(path: Path) -> TableRows:
    """Labels and splits of every row of a Parquet file, read a batch at a time."""
    pq = require("pyarrow.parquet", "reading Parquet")
    where = display(str(path))
    try:
        file = pq.ParquetFile(path, buffer_size=_BUFFER, pre_buffer=False)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise DataError(f"{where}: not a Parquet file pyarrow can read ({err})") from None
    with file:
        schema = file.schema_arrow
        lister = _Lister(where, schema, _features(schema), file.metadata.num_rows)
        if lister.columns:
            for batch in file.iter_batches(batch_size=_LIST_ROWS, columns=lister.columns):
                lister.add(batch)
    return lister.out


def _dataset_info(path: Path) -> dict:
    """``dataset_info.json`` beside an Arrow file (``save_to_disk``), or {}."""
    info = path.parent / "dataset_info.json"
    try:
        return json.loads(info.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def list_arrow(path: Path) -> TableRows:
    """Labels and splits of every row of an Arrow IPC file or stream (``save_to_disk``)."""
    where = display(str(path))
    batches = _ArrowBatches(path, where)
    info = _dataset_info(path).get("features")
    schema = batches.schema
    lister = _Lister(where, schema, _features(schema, info if isinstance(info, dict) else None),
                     batches.rows)
    if lister.columns:
        for i in range(len(batches.starts)):
            lister.add(batches.batch(i).select(lister.columns))
    return lister.out


class _ArrowBatches:
    """An Arrow file's record batches, memory-mapped: a batch is a view of the mapped file,
    so holding them costs no memory beyond the pages the OS keeps."""

    def __init__(self, path: Path, where: str):
        pa = _pa()
        try:
            self.source = pa.memory_map(str(path))
            try:  # the random-access file format
                reader = pa.ipc.open_file(self.source)
                self.batches = [reader.get_batch(i) for i in range(reader.num_record_batches)]
            except pa.ArrowInvalid:  # the stream format, which save_to_disk writes
                self.source.seek(0)
                reader = pa.ipc.open_stream(self.source)
                self.batches = list(reader)
        except (OSError, ValueError) as err:
            raise DataError(f"{where}: not an Arrow file pyarrow can read ({err})") from None
        self.schema = reader.schema
        self.starts, total = [], 0
        for b in self.batches:
            self.starts.append(total)
            total += b.num_rows
        self.rows = total

    def batch(self, i: int):
        return self.batches[i]


class RowReader:
    """One image cell after another from a table file, one batch of its image column held.

    Reading rows in order walks forward through the file; a row behind the current batch (or
    in a later row group) starts again at its row group. Safe to share between threads.
    """

    def __init__(self, path: Path):
        self.path, self.where = path, display(str(path))
        self.lock = threading.Lock()
        self.batch, self.batch_start = None, 0
        if path.suffix.lower() == ".arrow":
            self.arrow = _ArrowBatches(path, self.where)
            info = _dataset_info(path).get("features")
            features = _features(self.arrow.schema, info if isinstance(info, dict) else None)
            self.column = image_column(self.arrow.schema, features, self.where)
            self.rows = self.arrow.rows
        else:
            pq = require("pyarrow.parquet", "reading Parquet")
            self.arrow = None
            self.file = pq.ParquetFile(path, buffer_size=_BUFFER, pre_buffer=False)
            schema = self.file.schema_arrow
            self.column = image_column(schema, _features(schema), self.where)
            meta = self.file.metadata
            self.rows = meta.num_rows
            self.group_starts = [0]
            for g in range(meta.num_row_groups):
                self.group_starts.append(self.group_starts[-1] + meta.row_group(g).num_rows)
            self.batches, self.next_start = None, 0
        self.largest_batch = 0  # rows of the largest batch held, for tests and curiosity

    def cell(self, row: int):
        """Row ``row``'s image cell: bytes, or a ``{bytes, path}`` dict."""
        if not 0 <= row < self.rows:
            raise IndexError(row)
        with self.lock:
            if self.arrow is not None:
                i = bisect.bisect_right(self.arrow.starts, row) - 1
                column = self.arrow.batch(i).column(self.column)
                return column[row - self.arrow.starts[i]].as_py()
            if self.batch is None or not (self.batch_start <= row
                                          < self.batch_start + len(self.batch)):
                self._seek(row)
            return self.batch[row - self.batch_start].as_py()

    def _seek(self, row: int) -> None:
        group = bisect.bisect_right(self.group_starts, row) - 1
        next_group = bisect.bisect_right(self.group_starts, self.next_start) - 1
        if self.batches is None or row < self.next_start or group > next_group:
            self.batches = self.file.iter_batches(batch_size=BATCH_ROWS, columns=[self.column],
                                                  row_groups=range(group,
                                                                   len(self.group_starts) - 1))
            self.next_start = self.group_starts[group]
        while True:
            batch = next(self.batches).column(0)
            self.batch, self.batch_start = batch, self.next_start
            self.next_start += len(batch)
            self.largest_batch = max(self.largest_batch, len(batch))
            if row < self.next_start:
                return

    def image_bytes(self, row: int) -> bytes:
        """Row ``row``'s image bytes; ValueError when the cell holds none."""
        value = self.cell(row)
        if isinstance(value, dict):
            data = value.get("bytes")
            if data is None:
                raise ValueError(f"row {row} has no image bytes"
                                 + (f" (only a path, {value['path']!r})" if value.get("path")
                                    else ""))
            return data
        if value is None:
            raise ValueError(f"row {row} has no image (an empty cell)")
        return value


_READERS: dict[tuple, RowReader] = {}
_READERS_LOCK = threading.Lock()
# Open files kept per process; a DataLoader worker opens its own (forked handles are shared).
_MAX_READERS = 8


def row_reader(path: str | os.PathLike) -> RowReader:
    """This process's reader of the file at ``path``, opened again when the file changed."""
    st = os.stat(path)
    key = (os.getpid(), os.fspath(path), st.st_size, st.st_mtime_ns)
    with _READERS_LOCK:
        reader = _READERS.get(key)
        if reader is None:
            if len(_READERS) >= _MAX_READERS:
                _READERS.pop(next(iter(_READERS)))
            reader = _READERS[key] = RowReader(Path(path))
        return reader

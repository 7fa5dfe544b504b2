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
One run writes a key at a time: it holds ``<name>.lock`` (:mod:`pipeline.store.locks`) while it
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
(``<backbone>-<key>.exported/``, :mod:`pipeline.models.engines`), with ``.refused.json`` notes where
``auto`` could not use one: :func:`list_caches`, :func:`find_cache` and :func:`remove_cache`
take them too, so that every byte a run leaves in the cache folder can be seen and removed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.errors import CacheError, DataError
from pipeline.data.layouts import as_bytes
from pipeline.store.integrity import (
    FORMAT,
    damaged,
    failure_reason,
    is_hdf5,
    is_hdf5_failure,
    not_an_export,
)
from pipeline.store.paths import PARTIAL

__all__ = ['READ_BYTES', 'SHA_DTYPE', 'STRING_DTYPE', 'encoded', 'failures', 'write_strings']


READ_BYTES = 64 << 20  # rows read at a time when splitting a cache into its splits


STRING_DTYPE = h5py.string_dtype()


SHA_DTYPE = "S64"


# Duplicate groups listed by `cache info` and the extract summary; the count is always whole.
_DUPLICATES_SHOWN = 20


@dataclass
class FeatureSplit:
    """Features of one split, as one contiguous float32 array, with their labels and paths."""

    X: np.ndarray
    y: np.ndarray
    paths: list[str]


def open_cache(path: str | os.PathLike) -> h5py.File:
    """Open a complete cache file of ours for reading, or say clearly why it cannot be used."""
    path = Path(path)
    not_an_export(path)
    if path.name.endswith(PARTIAL):
        raise CacheError(f"{path} is an interrupted extraction; run the same extract command "
                         "again to finish it")
    if not path.is_file():
        raise CacheError(f"{path}: no such cache file")
    try:
        f = _CacheFile(path, "r")
    except OSError as err:
        if not is_hdf5(path):
            raise CacheError(f"{path} is not an HDF5 file") from None
        raise damaged(path, f"it cannot be opened: {failure_reason(err)}") from None
    if f.attrs.get("format") != FORMAT:
        f.close()
        raise CacheError(f"{path} is not a feature cache written by pipeline")
    if not f.attrs.get("complete"):
        f.close()
        raise CacheError(f"{path} is incomplete; run the extract command again to finish it")
    return f


class _CacheFile(h5py.File):
    """An open cache whose read failures (a chunk failing its checksum) end, once the file
    is closed, as :class:`CacheDamaged` with the file moved aside."""

    def __exit__(self, kind, error, trace) -> None:
        path = Path(self.filename)
        super().__exit__(kind, error, trace)
        if is_hdf5_failure(error):
            raise damaged(path, failure_reason(error)) from None


def encoded(values) -> np.ndarray:
    """Names as the bytes they have on disk (surrogate escapes back to their raw bytes)."""
    return np.array([as_bytes(v) for v in values], dtype=object)


def write_strings(f: h5py.File, name: str, values, resizable: bool = False) -> None:
    f.create_dataset(name, data=encoded(values), dtype=STRING_DTYPE,
                     maxshape=(None,) if resizable else None)


def read_strings(ds: h5py.Dataset) -> np.ndarray:
    """A string dataset as str, names that are not UTF-8 as ``os.fsdecode`` gives them."""
    return ds.asstr(errors="surrogateescape")[:]


def failures(f: h5py.File) -> list[tuple[str, str]]:
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
        return len(f["valid"]), int(f["features"].shape[1]), failures(f)


def read_splits(path: str | os.PathLike,
                splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, FeatureSplit]:
    """The readable images of each split, each as one preallocated float32 array.

    One pass over the file in blocks of whole chunks: every block is read once and its rows
    are copied into their split's array, so memory holds the outputs plus one block, never a
    second N x D copy (splits made by a seeded shuffle interleave their rows).
    """
    with open_cache(path) as f:
        if "labels" not in f:
            raise DataError(f"{path} holds unlabelled images (no classes, no splits): this "
                            "needs class folders or a manifest with labels", path=path,
                            reason="unlabelled-cache")
        features = f["features"]
        split, valid = read_strings(f["split"]), f["valid"][:]
        paths, labels = read_strings(f["paths"]), f["labels"][:]
        rows = {s: np.flatnonzero((split == s) & valid) for s in splits}
        out = {s: np.empty((len(r), features.shape[1]), np.float32) for s, r in rows.items()}
        block = features.chunks[0] * max(1, READ_BYTES // (features.chunks[0] *
                                                             features.shape[1] * 4))
        for lo in range(0, len(valid), block):
            buffer = features[lo:lo + block]
            for s, r in rows.items():
                start, stop = np.searchsorted(r, [lo, lo + block])
                out[s][start:stop] = buffer[r[start:stop] - lo]
        return {s: FeatureSplit(out[s], labels[r], paths[r].tolist()) for s, r in rows.items()}


def cache_layers_of(f) -> list[tuple[str, int, int]]:
    """``(layer, first column, column after the last)`` of each layer a multi-layer cache
    holds side by side in ``features``; empty for a cache of one layer."""
    return [tuple(layer) for layer in json.loads(f.attrs.get("layers", "[]"))]


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
            "layers": cache_layers_of(f),
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
    (:mod:`pipeline.finetuning.activations`), which share this layout: ``spec`` as
    :func:`cache_spec`
    reads it."""
    return "activations" if "activations" in spec else "features"

"""Every readable row of a feature cache, labelled or not, as one float32 array."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.store.cache import READ_BYTES, cache_info, open_cache, read_strings

__all__ = ["AuditRows", "read_rows"]


@dataclass
class AuditRows:
    """The readable images of a cache in file order, with what the audits need of each."""

    path: Path
    info: dict  # pipeline.store.cache.cache_info
    X: np.ndarray  # (n, d) float32
    paths: list[str]  # relative to info["data_root"]
    digests: np.ndarray  # (n,) SHA-256 hex bytes, b"" where not recorded
    labels: np.ndarray | None  # (n,) int64 into classes; None for an unlabelled set
    split: np.ndarray | None  # (n,) str: train, val or test; None for an unlabelled set

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]

    @property
    def labelled(self) -> bool:
        return self.labels is not None


def read_rows(path: str | os.PathLike) -> AuditRows:
    """The readable rows of the cache at ``path``, in one pass over blocks of whole chunks.

    Memory holds the output array plus one block (:data:`~pipeline.store.cache.READ_BYTES`).
    """
    info = cache_info(path)
    with open_cache(path) as f:
        features, valid = f["features"], f["valid"][:]
        rows = np.flatnonzero(valid)
        X = np.empty((len(rows), features.shape[1]), np.float32)
        block = features.chunks[0] * max(1, READ_BYTES // (features.chunks[0] *
                                                             features.shape[1] * 4))
        for lo in range(0, len(valid), block):
            start, stop = np.searchsorted(rows, [lo, lo + block])
            if stop > start:
                X[start:stop] = features[lo:lo + block][rows[start:stop] - lo]
        paths = read_strings(f["paths"])[rows].tolist()
        digests = (f["content_sha256"][:][rows] if "content_sha256" in f
                   else np.full(len(rows), b"", "S64"))
        labelled = "labels" in f
        labels = f["labels"][:][rows] if labelled else None
        split = read_strings(f["split"])[rows] if labelled else None
    return AuditRows(Path(path), info, X, paths, digests, labels, split)

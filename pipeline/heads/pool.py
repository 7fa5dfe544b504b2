"""The unlabelled pool: a second feature cache read beside a labelled one, in chunks.

A pool is the cache of a flat folder of unlabelled images (or a labelled cache whose labels
are set aside) made with the same backbone, weights, layer and preprocessing as the labelled
cache, so that its rows live in the same feature space. It is never read whole: a pass over
it reads blocks of whole HDF5 chunks (:data:`BLOCK_BYTES`), so a pool larger than memory is
scored block by block, and only the rows chosen as pseudo-labels are gathered.

Pool images whose bytes are those of an image of the labelled cache (train, val or test:
same SHA-256) are left out: a test image in the pool would let its own pseudo-label into
training.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import PoolError
from pipeline.store.cache import cache_layers_of, open_cache, read_strings

__all__ = ["BLOCK_BYTES", "MATCHED_FIELDS", "Pool", "PoolError", "feature_space", "open_pool",
           "pool_from_arrays", "space_differences"]

# Bytes of features read at a time from a pool file: bounded memory whatever the pool's size.
BLOCK_BYTES = 64 << 20
# What decides the feature space (pipeline.models.backbones.BackboneSpec.key, the engine and
# autocast of pipeline.extract.features.feature_key_spec): a pool must match the labelled cache
# on each. The stored dtype may differ (float16 rows are read as float32).
MATCHED_FIELDS = ("backbone", "family", "weights", "weights_sha256", "layer", "pool",
                  "preprocessing", "image_size", "engine", "autocast")


@dataclass
class Pool:
    """Rows of unlabelled features, read in blocks.

    Attributes
    ----------
    path
        The pool's cache file; None for a pool given as an array (:func:`pool_from_arrays`).
    key
        The pool cache's key (None for an array).
    rows
        The file rows used, ascending (readable images not found in the labelled cache).
    paths
        Each used row's image path.
    labels
        Each used row's class as an index into the labelled cache's classes, -1 where the pool
        has no label or one the labelled cache lacks; None: the pool is unlabelled. Only ever
        used to score the pseudo-labels, never to fit.
    dropped
        Readable pool images left out because an identical image is in the labelled cache.
    X
        The features in memory (a pool given as an array); None: read from ``path``.
    """

    path: Path | None
    key: str | None
    rows: np.ndarray
    paths: list[str]
    labels: np.ndarray | None
    dropped: int = 0
    X: np.ndarray | None = field(default=None, repr=False)
    block_bytes: int = BLOCK_BYTES

    def __len__(self) -> int:
        return len(self.rows)

    def blocks(self) -> Iterator[tuple[int, np.ndarray]]:
        """``(start, features)``: consecutive blocks of the used rows as float32, ``start``
        the position of the block's first row among them."""
        if self.X is not None:
            step = max(1, self.block_bytes // max(1, self.X.shape[1] * 4))
            for lo in range(0, len(self.X), step):
                yield lo, np.asarray(self.X[lo:lo + step], np.float32)
            return
        with open_cache(self.path) as f:
            features = f["features"]
            rows_per_chunk = features.chunks[0] if features.chunks else 1
            step = rows_per_chunk * max(1, self.block_bytes //
                                        (rows_per_chunk * features.shape[1] * 4))
            done = 0
            for lo in range(0, int(self.rows[-1]) + 1 if len(self.rows) else 0, step):
                stop = int(np.searchsorted(self.rows, lo + step))
                if stop == done:
                    continue
                block = features[lo:lo + step]
                yield done, np.asarray(block[self.rows[done:stop] - lo], np.float32)
                done = stop

    def take(self, positions: np.ndarray) -> np.ndarray:
        """The features of the used rows at ``positions`` (any order), as float32, read in
        one pass over the blocks."""
        positions = np.asarray(positions, np.int64)
        out = np.empty((len(positions), self.dim), np.float32)
        order = np.argsort(positions, kind="stable")
        wanted = positions[order]
        for start, block in self.blocks():
            lo, hi = np.searchsorted(wanted, [start, start + len(block)])
            out[order[lo:hi]] = block[wanted[lo:hi] - start]
        return out

    @property
    def dim(self) -> int:
        if self.X is not None:
            return int(self.X.shape[1])
        with open_cache(self.path) as f:
            return int(f["features"].shape[1])


def pool_from_arrays(X: np.ndarray, labels: np.ndarray | None = None,
                     paths: list[str] | None = None) -> Pool:
    """A pool of features held in memory (such as the training images left unlabelled in a
    labels-per-class experiment); ``labels`` (indices into the labelled classes) only score
    the pseudo-labels."""
    if len(X) == 0:
        raise PoolError("the pool holds no images")
    return Pool(None, None, np.arange(len(X)), paths or [f"pool/{i}" for i in range(len(X))],
                None if labels is None else np.asarray(labels, np.int64),
                X=np.asarray(X, np.float32))


def open_pool(path: str | os.PathLike, cache_path: str | os.PathLike, cache_info: dict
              ) -> Pool:
    """The pool cache at ``path``, checked against the labelled cache (``cache_info`` as
    :func:`pipeline.store.cache.cache_info` gives it).

    Raises
    ------
    PoolError
        The pool is the labelled cache itself, lies in another feature space (one line naming
        the fields that differ), has no readable image, or holds only images of the labelled
        cache.
    """
    path = Path(path)
    with open_cache(path) as f:
        spec, key = json.loads(f.attrs["spec"]), str(f.attrs["key"])
        if key == cache_info["key"]:
            raise PoolError(f"{path} is the labelled cache itself; give the cache of other "
                            "images (a flat folder of unlabelled ones) as the pool")
        _check_space(path, spec, int(f["features"].shape[1]), cache_layers_of(f),
                     cache_path, cache_info)
        valid = f["valid"][:]
        digests = f["content_sha256"][:] if "content_sha256" in f else None
        paths = read_strings(f["paths"])
        labels = None
        if "labels" in f:  # a labelled cache given as pool: its labels only score pseudo-labels
            classes = read_strings(f["classes"]).tolist()
            mapping = np.array([cache_info["classes"].index(c) if c in cache_info["classes"]
                                else -1 for c in classes], np.int64)
            labels = mapping[f["labels"][:]]
    if not valid.any():
        raise PoolError(f"{path}: the pool holds no readable image")
    known = _labelled_digests(cache_path)
    duplicate = (np.isin(digests, list(known)) & (digests != b"")
                 if digests is not None and known else np.zeros(len(valid), bool))
    rows = np.flatnonzero(valid & ~duplicate)
    if len(rows) == 0:
        raise PoolError(f"{path}: every readable image of the pool is also in "
                        f"{Path(cache_path).name}; give a pool of other images")
    return Pool(path, key, rows, paths[rows].tolist(),
                None if labels is None else labels[rows],
                dropped=int((valid & duplicate).sum()))


def _check_space(path: Path, spec: dict, dim: int, layers, cache_path, cache_info: dict) -> None:
    """Refuse a pool whose features are not comparable with the labelled cache's."""
    if "activations" in spec:
        raise PoolError(f"{path} is an activation cache written by fine-tuning, not a feature "
                        "cache; give the feature cache of the pool's images")
    differ = space_differences(feature_space(spec, dim, layers),
                               feature_space(cache_info["spec"], cache_info["dim"],
                                             cache_info.get("layers", [])))
    if differ:
        raise PoolError(f"{path} was extracted differently from {Path(cache_path).name} "
                        f"({differ}); extract the pool with the same backbone, weights, layer "
                        "and image size", path=path, cache=Path(cache_path), differ=differ,
                        reason="pool-space")


def feature_space(spec: dict, dim: int, layers) -> dict:
    """What decides a cache's feature space: :data:`MATCHED_FIELDS` of its key ``spec``, its
    ``layers`` and its ``dim``."""
    return {**{name: spec.get(name) for name in MATCHED_FIELDS},
            "layers": [list(x) for x in layers or []], "dim": dim}


def space_differences(ours: dict, theirs: dict) -> str:
    """How two :func:`feature_space` values differ, as ``name ours vs theirs`` for the first
    three fields that do ("" where none does)."""
    differ = []
    for name in ours:
        mine, other = ours.get(name), theirs.get(name)
        if isinstance(mine, dict) and isinstance(other, dict):  # name the inner fields
            differ += [(f"{name}.{key}", mine.get(key), other.get(key))
                       for key in sorted(mine.keys() | other.keys())
                       if mine.get(key) != other.get(key)]
        elif mine != other:
            differ.append((name, mine, other))
    return "; ".join(f"{name} {_short(a)} vs {_short(b)}" for name, a, b in differ[:3])


def _short(value) -> str:
    text = json.dumps(value, sort_keys=True) if isinstance(value, dict) else repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _labelled_digests(cache_path) -> set[bytes]:
    with open_cache(cache_path) as f:
        if "content_sha256" not in f:  # format 1: not recorded, nothing can be matched
            return set()
        digests = f["content_sha256"][:]
        return set(digests[f["valid"][:] & (digests != b"")].tolist())

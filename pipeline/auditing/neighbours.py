"""Exact cosine nearest neighbours in chunks, exact and near duplicates, leakage across splits.

Features are L2-normalised, so the dot product is the cosine similarity. The kNN is exact: the
rows are compared with every row, ``chunk`` query rows at a time, and only each row's ``k``
best are kept, so memory holds the normalised features and one ``chunk x n`` block of
similarities, never an ``n x n`` matrix.

It is written here rather than taken from scikit-learn: ``pairwise_distances_chunked`` with
the cosine metric (what ``NearestNeighbors(metric="cosine", algorithm="brute")`` runs) found
the same neighbours but took 24.0-24.6 s of CPU against 18.2-20.9 s on 20,000 x 1,280 float32
rows, since it normalises every row again for each block (BENCHMARKS.md, 2026-12-07); it held
less memory (+145 MB against +194 MB).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from pipeline.core.options import AuditOptions

__all__ = ["DEFAULT_THRESHOLD", "Neighbours", "Pair", "exact_pairs", "leakage_counts",
           "near_pairs", "nearest_neighbours", "normalised"]

# Cosine similarity at or above which two images are called near-duplicates. A copy that was
# re-encoded or slightly resized changes its bottleneck features by little, so its cosine stays
# close to 1, while two different photographs of one class are rarely that alike; 0.97 leaves a
# margin below 1 for such copies. It is a judgement, not yet calibrated on real images:
# docs/audit.md says what was measured (the planted synthetic set only) and how to choose it.
DEFAULT_THRESHOLD = AuditOptions.threshold

_CHUNK_BYTES = 64 << 20  # similarities held at a time (argpartition adds 3x that)


@dataclass
class Neighbours:
    """Each row's ``k`` nearest other rows, by cosine similarity, highest first."""

    index: np.ndarray  # (n, k) int64
    similarity: np.ndarray  # (n, k) float32


@dataclass(frozen=True)
class Pair:
    """Two images that are the same (same bytes) or nearly the same (cosine >= threshold)."""

    a: int  # rows, a < b
    b: int
    kind: str  # "exact" or "near"
    similarity: float


def normalised(X: np.ndarray, copy: bool = True) -> np.ndarray:
    """Rows scaled to unit length (a zero row stays zero), as float32; ``copy=False`` scales
    a float32 ``X`` in place (a 70,000 x 1,280 set is 358 MB a copy)."""
    X = np.array(X, np.float32, copy=copy or None)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return np.divide(X, np.where(norms > 0, norms, 1.0), out=X)


def nearest_neighbours(Xn: np.ndarray, k: int, on_rows: Callable[[int], None] | None = None,
                       chunk: int | None = None) -> Neighbours:
    """The ``k`` most similar other rows of each row of unit-length ``Xn``, exactly.

    Parameters
    ----------
    Xn
        ``(n, d)`` unit-length rows (:func:`normalised`).
    k
        Neighbours kept per row (at most ``n - 1``).
    on_rows
        Called with the number of query rows done after each chunk (progress).
    chunk
        Query rows per block; None: as many as fit in 64 MiB of similarities.
    """
    n = len(Xn)
    k = max(0, min(k, n - 1))
    chunk = chunk or max(1, _CHUNK_BYTES // max(1, 4 * n))
    index = np.empty((n, k), np.int64)
    similarity = np.empty((n, k), np.float32)
    for lo in range(0, n, chunk):
        hi = min(n, lo + chunk)
        sims = Xn[lo:hi] @ Xn.T
        sims[np.arange(hi - lo), np.arange(lo, hi)] = -np.inf  # not its own neighbour
        if k:
            top = np.argpartition(-sims, k - 1, axis=1)[:, :k] if k < n else \
                np.argsort(-sims, axis=1)[:, :k]
            values = np.take_along_axis(sims, top, axis=1)
            order = np.argsort(-values, axis=1, kind="stable")
            index[lo:hi] = np.take_along_axis(top, order, axis=1)
            similarity[lo:hi] = np.take_along_axis(values, order, axis=1)
        if on_rows is not None:
            on_rows(hi - lo)
    return Neighbours(index, similarity)


def exact_pairs(digests: np.ndarray) -> list[Pair]:
    """Every pair of rows with the same content hash (rows without one are left out)."""
    rows = np.flatnonzero(digests != b"")
    order = rows[np.argsort(digests[rows], kind="stable")]
    same = digests[order]
    pairs = []
    for group in np.split(order, np.flatnonzero(same[1:] != same[:-1]) + 1):
        group = np.sort(group)
        pairs += [Pair(int(a), int(b), "exact", 1.0)
                  for i, a in enumerate(group) for b in group[i + 1:]]
    return pairs


def near_pairs(neighbours: Neighbours, threshold: float,
               exclude: set[tuple[int, int]] = frozenset()) -> list[Pair]:
    """Pairs of rows whose cosine similarity is at least ``threshold``, most similar first.

    Only pairs among each row's ``k`` nearest are seen: a group of more than ``k + 1``
    near-identical images shows as pairs of its members with their ``k`` nearest. Pairs in
    ``exclude`` (the exact duplicates) are left out.
    """
    rows, cols = np.nonzero(neighbours.similarity >= threshold)
    found: dict[tuple[int, int], float] = {}
    for r, c in zip(rows.tolist(), cols.tolist()):
        other = int(neighbours.index[r, c])
        key = (min(r, other), max(r, other))
        if key not in exclude:
            found[key] = float(neighbours.similarity[r, c])
    ordered = sorted(found.items(), key=lambda kv: (-kv[1], kv[0]))
    return [Pair(a, b, "near", s) for (a, b), s in ordered]


def leakage_counts(pairs: list[Pair], split: np.ndarray) -> dict[str, dict[str, int]]:
    """Pairs whose two images lie in different splits, per split pair and kind.

    Returns ``{"train-test": {"exact": 3, "near": 1}, ...}`` for the split pairs that occur,
    named in the order train, val, test.
    """
    order = {"train": 0, "val": 1, "test": 2}
    counts: dict[str, dict[str, int]] = {}
    for p in pairs:
        sa, sb = str(split[p.a]), str(split[p.b])
        if sa == sb:
            continue
        name = "-".join(sorted((sa, sb), key=lambda s: order.get(s, 3)))
        kinds = counts.setdefault(name, {"exact": 0, "near": 0})
        kinds[p.kind] += 1
    return dict(sorted(counts.items()))

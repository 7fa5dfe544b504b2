"""Synthetic feature caches with planted faults: the shape of a real cache, built in seconds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.conftest import write_cache


def digest(i: int) -> bytes:
    return hashlib.sha256(str(i).encode()).hexdigest().encode()


@dataclass
class Planted:
    """A cache and the faults planted in it (rows of the cache)."""

    path: Path
    flipped: list[int] = field(default_factory=list)
    copies: list[tuple[int, int]] = field(default_factory=list)  # (train row, test copy row)
    copies_relabelled: list[tuple[int, int]] = field(default_factory=list)
    near: list[tuple[int, int]] = field(default_factory=list)  # (train row, test near copy)
    noise: int | None = None
    true: np.ndarray | None = None  # the class each original row was drawn from


def planted_cache(path: Path, n: int = 3000, dim: int = 64, classes: int = 5,
                  flip: float = 0.05, copies: int = 6, near: int = 4, noise: bool = True,
                  seed: int = 0) -> Planted:
    """Well-separated class clusters (non-negative, as bottleneck features are), a share
    ``flip`` of labels moved to another class, train images copied into test (half keeping
    their label, half given another), near copies (a little noise added), and one
    off-manifold noise row."""
    rng = np.random.default_rng(seed)
    means = rng.gamma(2.0, 1.0, size=(classes, dim))
    y = rng.integers(0, classes, size=n)
    X = np.abs(means[y] + rng.normal(0, 1.0, size=(n, dim)))
    split = rng.choice(["train", "val", "test"], size=n, p=[0.7, 0.1, 0.2]).tolist()
    paths = [f"c{y[i]}/{i:05d}.png" for i in range(n)]
    digests = [digest(i) for i in range(n)]
    labels = y.copy()
    planted = Planted(path, true=y)
    planted.flipped = sorted(rng.choice(n, int(flip * n), replace=False).tolist())
    for i in planted.flipped:
        labels[i] = (y[i] + rng.integers(1, classes)) % classes
    clean = [i for i in range(n) if split[i] == "train" and i not in set(planted.flipped)]
    sources = rng.choice(clean, copies + near, replace=False).tolist()
    rows_X, rows = [X], n
    for j, src in enumerate(sources):
        is_near = j >= copies
        vector = X[src] + (rng.normal(0, 0.02, dim) if is_near else 0)
        rows_X.append(vector[None])
        label = labels[src]
        if not is_near and j % 2:
            label = (label + 1) % classes
            planted.copies_relabelled.append((src, rows))
        elif not is_near:
            planted.copies.append((src, rows))
        else:
            planted.near.append((src, rows))
        labels = np.append(labels, label)
        split.append("test")
        paths.append(f"copies/{rows:05d}.png")
        digests.append(digests[src] if not is_near else digest(rows))
        rows += 1
    if noise:
        rows_X.append(rng.normal(0, 3.0, size=(1, dim)) * np.sign(rng.normal(size=dim)))
        labels = np.append(labels, 0)
        split.append("test")
        paths.append("noise/static.png")
        digests.append(digest(rows))
        planted.noise = rows
    write_cache(path, np.concatenate(rows_X), paths=paths, digests=digests, labels=labels,
                split=split, classes=[f"c{c}" for c in range(classes)])
    return planted

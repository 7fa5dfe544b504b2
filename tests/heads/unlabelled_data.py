"""Generated feature caches for the unlabelled-pool tests: a labelled cache and a pool cache of
our format with planted cluster structure, built in milliseconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from tests.conftest import write_cache


def clusters(n: int, means: np.ndarray, spread: float, rng, weights=None):
    """``n`` rows around ``means`` (one row per class) and their classes."""
    y = rng.choice(len(means), size=n, p=weights)
    return means[y] + rng.normal(0, spread, size=(n, means.shape[1])), y


def planted_pair(folder: Path, *, shots: int = 2, classes: int = 4, dim: int = 20,
                 spread: float = 1.6, pool_n: int = 1200, val_n: int = 80, test_n: int = 400,
                 pool_weights=None, pool_spread: float | None = None, seed: int = 0):
    """A labelled cache with ``shots`` training images per class and a pool cache of the same
    clusters: few labels are a noisy guess of each cluster, the pool shows where they are."""
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 1.6, size=(classes, dim))
    train_y = np.repeat(np.arange(classes), shots)
    train_X = means[train_y] + rng.normal(0, spread, size=(len(train_y), dim))
    val_X, val_y = clusters(val_n, means, spread, rng)
    test_X, test_y = clusters(test_n, means, spread, rng)
    X = np.concatenate([train_X, val_X, test_X])
    y = np.concatenate([train_y, val_y, test_y])
    split = ["train"] * len(train_y) + ["val"] * val_n + ["test"] * test_n
    names = [f"c{i}" for i in range(classes)]
    cache = write_cache(folder / "labelled.h5", X, labels=y, split=split, classes=names,
                        key="labelled0000")
    pool_X, pool_y = clusters(pool_n, means, pool_spread or spread, rng, pool_weights)
    pool = write_cache(folder / "pool.h5", pool_X, key="pool00000000", prefix="pool")
    labelled_pool = write_cache(folder / "pool_labelled.h5", pool_X, labels=pool_y,
                                split=["train"] * pool_n, classes=names, key="poolL0000000",
                                prefix="pool")
    return cache, pool, labelled_pool


def one_torch_thread():
    """A fixture body: torch on one thread for the test (on a loaded 2-core machine its thread
    pool fights the other processes: a 1,500-row fit took 30 s with the default, 0.9 s with one)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)

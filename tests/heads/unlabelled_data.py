"""Generated feature caches for the unlabelled-pool tests: a labelled cache and a pool cache of
our format with planted cluster structure, built in milliseconds."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import h5py
import numpy as np

from pipeline.store.cache import SHA_DTYPE, write_strings
from pipeline.store.integrity import FORMAT, FORMAT_VERSION

SPEC = {"backbone": "synthetic", "family": "synthetic", "weights": "random",
        "weights_sha256": None, "layer": "bottleneck", "pool": "avg",
        "preprocessing": {"crop": 8}, "image_size": 8, "autocast": None}


def digest(text: str) -> bytes:
    return hashlib.sha256(text.encode()).hexdigest().encode()


def write_cache(path: Path, X: np.ndarray, *, labels=None, split=None, classes=None,
                key: str = "labelled0000", spec: dict | None = None, prefix: str = "img",
                digests: list[bytes] | None = None) -> Path:
    """A complete cache file of our format holding exactly these rows."""
    path.parent.mkdir(parents=True, exist_ok=True)
    paths = [f"{prefix}/{i:06d}.png" for i in range(len(X))]
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=X.astype(np.float32),
                         chunks=(max(1, min(len(X), 256)), X.shape[1]), fletcher32=True)
        f.create_dataset("valid", data=np.ones(len(X), bool))
        write_strings(f, "paths", paths)
        f.create_dataset("content_sha256", data=np.array(
            digests if digests is not None else [digest(p) for p in paths], dtype=SHA_DTYPE))
        if labels is not None:
            f.create_dataset("labels", data=np.asarray(labels, np.int64))
            write_strings(f, "split", split)
            write_strings(f, "classes", classes)
        f.create_dataset("failed_index", data=np.zeros(0, np.int64))
        write_strings(f, "failed_reason", [])
        full = {**SPEC, **(spec or {}), "dataset": {"fingerprint": key},
                "splits": {"source": {}}}
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, key=key,
                       spec=json.dumps(full), complete=True, rows_done=len(X),
                       labelled=labels is not None, data_root="", request="{}",
                       versions="{}", timings="{}", created="2026-12-07")
    return path


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
    cache = write_cache(folder / "labelled.h5", X, labels=y, split=split, classes=names)
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

"""Self-training and distillation with a pool larger than one wants in memory: time and peak RSS.

Writes a labelled cache (10 classes of clustered 1,280-d features, 20 training images a class)
and a pool cache of ``--rows`` rows in the same feature space, streamed to disk in chunks so the
writer never holds the pool; then runs ``self_train`` (the pool scored block by block) and
``distill`` with a logistic-regression teacher (its predictions stored beside the pool; the
student trains on a 50,000-row sample of the pool) and prints each one's seconds and the
process's peak resident memory after it.

Usage:
    python scripts/measure_large_pool.py [--rows 200000] [--dim 1280] [--folder /tmp/pool]
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import h5py
import numpy as np

from pipeline.core.options import DistillOptions, SelfTrainOptions
from pipeline.store.cache import SHA_DTYPE, write_strings
from pipeline.store.integrity import FORMAT, FORMAT_VERSION

SPEC = {"backbone": "generated", "family": "generated", "weights": "none",
        "weights_sha256": None, "layer": "bottleneck", "pool": "avg",
        "preprocessing": {}, "image_size": 224, "autocast": None}
CHUNK = 4096  # rows written at a time


def _cache(path: Path, key: str, n: int, dim: int, rows, labelled: dict | None) -> Path:
    with h5py.File(path, "w") as f:
        features = f.create_dataset("features", shape=(n, dim), dtype=np.float32,
                                    chunks=(min(n, 256), dim), fletcher32=True)
        for lo in range(0, n, CHUNK):
            features[lo:lo + CHUNK] = rows(lo, min(n, lo + CHUNK))
        f.create_dataset("valid", data=np.ones(n, bool))
        names = [f"{key}/{i:07d}.png" for i in range(n)]
        write_strings(f, "paths", names)
        f.create_dataset("content_sha256", data=np.array(
            [f"{key}{i:060d}".encode()[:64] for i in range(n)], dtype=SHA_DTYPE))
        if labelled:
            f.create_dataset("labels", data=labelled["labels"])
            write_strings(f, "split", labelled["split"])
            write_strings(f, "classes", labelled["classes"])
        f.create_dataset("failed_index", data=np.zeros(0, np.int64))
        write_strings(f, "failed_reason", [])
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, key=key,
                       spec=json.dumps({**SPEC, "dataset": {"fingerprint": key},
                                        "splits": {"source": {}}}),
                       complete=True, rows_done=n, labelled=bool(labelled), data_root="",
                       request="{}", versions="{}", timings="{}", created="2026-12-07")
    return path


def write_caches(folder: Path, rows: int, dim: int, seed: int = 0) -> tuple[Path, Path]:
    rng = np.random.default_rng(seed)
    means = np.abs(rng.normal(0, 1, size=(10, dim))).astype(np.float32)
    counts = {"train": 20, "val": 50, "test": 100}
    y = np.concatenate([np.repeat(np.arange(10), c) for c in counts.values()])
    split = [s for s, c in counts.items() for _ in range(10 * c)]
    labelled_X = np.abs(means[y] + rng.normal(0, 1.5, size=(len(y), dim))).astype(np.float32)
    cache = _cache(folder / "labelled.h5", "labelled", len(y), dim,
                   lambda lo, hi: labelled_X[lo:hi],
                   {"labels": y, "split": split, "classes": [f"c{i}" for i in range(10)]})

    def pool_rows(lo: int, hi: int) -> np.ndarray:
        block = np.random.default_rng([seed, lo])
        labels = block.integers(0, 10, hi - lo)
        return np.abs(means[labels] + block.normal(0, 1.5, size=(hi - lo, dim))
                      ).astype(np.float32)

    pool = _cache(folder / "pool.h5", "pool", rows, dim, pool_rows, None)
    return cache, pool


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--folder", type=Path, default=Path("/tmp/large-pool"))
    args = parser.parse_args()
    args.folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    cache, pool = write_caches(args.folder, args.rows, args.dim)
    print(f"wrote {args.rows:,} x {args.dim} float32 ({pool.stat().st_size / 1e9:.2f} GB) in "
          f"{time.perf_counter() - started:.0f} s; peak RSS {peak_mb():.0f} MB")
    from pipeline.distillation.run import distill
    from pipeline.heads.logreg import LogRegHead
    from pipeline.heads.self_training import self_train
    from pipeline.store.cache import cache_info, read_split
    from pipeline.store.persistence import save_head

    started = time.perf_counter()
    result = self_train(cache, pool=pool, progress="lines", options=SelfTrainOptions(
        heads=("logreg:Cs=(0.1,1.0)",), thresholds=(0.9,), rounds=2))
    row = result.rows[0]
    print(f"self_train: {time.perf_counter() - started:.0f} s, peak RSS {peak_mb():.0f} MB; "
          f"{row['chosen']}, test {row['test_accuracy']:.3f} vs {row['base_test_accuracy']:.3f}")
    info = cache_info(cache)
    train = read_split(cache, "train")
    teacher = save_head(args.folder / "teacher.head", LogRegHead(Cs=(1.0,)).fit(train.X, train.y),
                        {"head": "logreg", "backbone": "generated", "classes": info["classes"],
                         "dim": args.dim, "cache_key": info["key"], "spec": info["spec"],
                         "request": {}})
    for attempt in ("first", "second"):
        started = time.perf_counter()
        result = distill(cache, teacher=teacher, pool=pool, progress="lines",
                         options=DistillOptions(student="linear", temperatures=(2.0,),
                                                alphas=(0.9,), max_pool=50_000))
        how = "reused" if result.teacher["reused"] else "computed"
        print(f"distill ({attempt} run, teacher {how}): "
              f"{time.perf_counter() - started:.0f} s, peak RSS {peak_mb():.0f} MB; student "
              f"{result.rows[0]['test_accuracy']:.3f}, alone {result.rows[1]['test_accuracy']:.3f}")


if __name__ == "__main__":
    main()

"""The data audit at scale: seconds per screen and peak memory on generated class features."""

from __future__ import annotations

import resource
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.bench.heads import class_features

__all__ = ["bench_audit", "print_audit", "write_feature_cache"]


def write_feature_cache(path: Path, X: np.ndarray, y: np.ndarray, classes: int) -> Path:
    """A complete labelled cache of ``X`` (no images behind it), 70/10/20 splits."""
    import hashlib
    import json

    import h5py

    from pipeline.store.cache import SHA_DTYPE, write_strings
    from pipeline.store.integrity import FORMAT, FORMAT_VERSION

    n = len(X)
    split = np.random.default_rng(0).choice(["train", "val", "test"], n, p=[0.7, 0.1, 0.2])
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=X, chunks=(256, X.shape[1]), fletcher32=True)
        f.create_dataset("valid", data=np.ones(n, bool))
        write_strings(f, "paths", [f"{i:06d}.png" for i in range(n)])
        f.create_dataset("content_sha256", data=np.array(
            [hashlib.sha256(str(i).encode()).hexdigest() for i in range(n)], SHA_DTYPE))
        f.create_dataset("labels", data=y.astype(np.int64))
        write_strings(f, "split", split.tolist())
        write_strings(f, "classes", [f"c{c}" for c in range(classes)])
        f.create_dataset("failed_index", data=np.zeros(0, np.int64))
        write_strings(f, "failed_reason", [])
        f.attrs.update(format=FORMAT, format_version=FORMAT_VERSION, key="bench",
                       spec=json.dumps({"backbone": "generated", "splits": {"source": {}}}),
                       complete=True, rows_done=n, labelled=True, data_root="",
                       request="{}", versions="{}", timings="{}", created="bench")
    return path


def bench_audit(rows: int = 70_000, dim: int = 1280, classes: int = 10) -> dict:
    """``pipeline.audit.run.audit`` on ``rows`` x ``dim`` float32 features in this process."""
    from pipeline.audit.run import audit

    X, y = class_features(rows, dim, classes, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_feature_cache(Path(tmp) / "bench.h5", X.astype(np.float32), y, classes)
        del X
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        started = time.perf_counter()
        result = audit(cache, Path(tmp) / "out", progress=False)
        seconds = time.perf_counter() - started
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        cache_mb = cache.stat().st_size / 2**20
    return {"rows": rows, "dim": dim, "classes": classes, "seconds": seconds,
            "stages": result.seconds, "peak_rss_mb": peak, "rss_before_mb": before,
            "cache_mb": cache_mb, "label_issues": len(result.label_issues),
            "out_of_fold_accuracy": result.out_of_fold_accuracy,
            "map_points": result.map_points}


def print_audit(result: dict) -> None:
    print(f"audit of {result['rows']} x {result['dim']} generated features, "
          f"{result['classes']} classes: {result['seconds']:.1f} s, peak RSS "
          f"{result['peak_rss_mb']:.0f} MB (cache {result['cache_mb']:.0f} MB)")
    print(" | ".join(f"{k} {v:.1f} s" for k, v in result["stages"].items()))


if __name__ == "__main__":
    import json
    import sys

    out = bench_audit(int(sys.argv[1]) if len(sys.argv) > 1 else 70_000)
    print_audit(out)
    print(json.dumps(out))

"""The data audit at scale: seconds per screen and peak memory on generated class features."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from pipeline.bench.heads import class_features
from pipeline.bench.memory import peak_rss_mb

__all__ = ["audit_child", "bench_audit", "print_audit", "write_feature_cache"]


def write_feature_cache(path: Path, X: np.ndarray, y: np.ndarray, classes: int) -> Path:
    """A complete labelled cache of ``X`` (no images behind it), 70/10/20 splits."""
    import hashlib

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
    """``pipeline.auditing.run.audit`` on ``rows`` x ``dim`` float32 features, in a fresh process.

    This process generates the features and writes the cache; the audit runs in a child
    (:func:`audit_child`), so its peak memory is the audit's own, imports included.
    """
    X, y = class_features(rows, dim, classes, seed=1)
    with tempfile.TemporaryDirectory() as tmp:
        cache = write_feature_cache(Path(tmp) / "bench.h5", X.astype(np.float32), y, classes)
        del X
        run = subprocess.run([sys.executable, "-m", "pipeline.bench.audit", "--child",
                              str(cache), str(Path(tmp) / "out")], capture_output=True, text=True)
        if run.returncode != 0:
            raise RuntimeError(f"audit bench child failed:\n{run.stderr[-4000:]}")
        out = json.loads(run.stdout.strip().splitlines()[-1])
        out.update(rows=rows, dim=dim, classes=classes, cache_mb=cache.stat().st_size / 2**20)
    return out


def audit_child(cache: Path, out: Path) -> dict:
    """The audit of ``cache`` in this process: its seconds per stage and peak memory, with
    the memory after its imports (what any audit pays before reading a row)."""
    from pipeline.auditing.run import audit

    imported = peak_rss_mb()
    started = time.perf_counter()
    result = audit(cache, progress=False)
    result.write(out)  # the drawing counts too, as when the audit wrote its own files
    return {"seconds": time.perf_counter() - started, "stages": result.seconds,
            "peak_rss_mb": peak_rss_mb(), "rss_after_imports_mb": imported,
            "label_issues": len(result.label_issues),
            "out_of_fold_accuracy": result.out_of_fold_accuracy,
            "map_points": result.map_points}


def print_audit(result: dict) -> None:
    print(f"audit of {result['rows']} x {result['dim']} generated features, "
          f"{result['classes']} classes: {result['seconds']:.1f} s, peak RSS "
          f"{result['peak_rss_mb']:.0f} MB in its own process, "
          f"{result['rss_after_imports_mb']:.0f} MB after imports "
          f"(cache {result['cache_mb']:.0f} MB)")
    print(" | ".join(f"{k} {v:.1f} s" for k, v in result["stages"].items()))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        print(json.dumps(audit_child(Path(sys.argv[2]), Path(sys.argv[3]))))
    else:
        result = bench_audit(int(sys.argv[1]) if len(sys.argv) > 1 else 70_000)
        print_audit(result)
        print(json.dumps(result))

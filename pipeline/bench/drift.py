"""``make bench --only drift``: the kernel two-sample test's time and memory as the samples grow.

The MMD's permutation test reads the whole ``N x N`` kernel once, block by block
(:mod:`pipeline.monitoring.kernel`), so its time grows as ``N²`` and its memory only as
``N x permutations``. Each size runs in a fresh process (its peak memory its own) on Gaussian
rows of the bottleneck's width with a small mean shift; the largest size users meet (50,000
new images against 50,000 reference rows) is extrapolated from the measured exponent, not run:
it would take minutes of this machine for each run of the bench.
"""

from __future__ import annotations

import numpy as np

__all__ = ["bench_drift", "print_drift"]

SIZES = (2000, 4000, 8000)  # rows per side
TARGET = 50_000


def bench_drift(sizes=SIZES) -> dict:
    from pipeline.bench.children import in_child

    # each run is pipeline.bench.children.mmd_once in a fresh process
    runs = [in_child("mmd", rows=n) for n in sizes]
    # time ~ c N^k: the exponent from the two largest sizes, where the products dominate
    a, b = runs[-2], runs[-1]
    exponent = float(np.log(b["seconds"] / a["seconds"]) / np.log(b["rows"] / a["rows"]))
    extrapolated = b["seconds"] * (TARGET / b["rows"]) ** exponent
    # the kernel's N² products dominate in the end: the bound a user should plan for
    quadratic = b["seconds"] * (TARGET / b["rows"]) ** 2
    result = {"dim": runs[0]["dim"], "permutations": runs[0]["permutations"], "runs": runs,
              "exponent": exponent, "target_rows": TARGET,
              "target_seconds_extrapolated": extrapolated,
              "target_seconds_quadratic": quadratic}
    print_drift(result)
    return result


def print_drift(r: dict) -> None:
    print(f"MMD permutation test, {r['permutations']} permutations, {r['dim']} features, "
          "N rows a side; each in a fresh process")
    for run in r["runs"]:
        print(f"  N = {run['rows']:6d}: {run['seconds']:7.1f} s, peak {run['peak_rss_mb']:6.0f} "
              f"MB, p = {run['p_value']:.3f}")
    print(f"  time grows as N^{r['exponent']:.2f}: {r['target_rows']:,} a side would take about "
          f"{r['target_seconds_extrapolated'] / 60:.1f} min (extrapolated), "
          f"{r['target_seconds_quadratic'] / 60:.1f} min as N²")

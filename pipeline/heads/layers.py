"""Which layer transfers best: a linear probe on each layer of a multi-layer cache.

A cache extracted with several layers (``pipeline extract --layer blocks``) holds each one's
pooled features side by side; the probe is fitted on each layer's columns alone, with the same
splits and seed, and chosen on validation like any head. Validation and test accuracy against
depth is the layer-wise probe curve: where it peaks below the bottleneck, the top of the
network is too specific to its pretraining task for this data (Yosinski et al. 2014; the
basis of Head2Toe, Evci et al. 2022).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from sklearn.base import clone

from pipeline.heads.linear_probe import LinearProbe
from pipeline.metrics.significance import accuracy_interval
from pipeline.report import plots, tables
from pipeline.store.cache import FeatureSplit

__all__ = ["layer_columns", "probe_layers", "write_layer_curve"]


def layer_columns(split: FeatureSplit, start: int, stop: int) -> FeatureSplit:
    """The split with only one layer's columns."""
    return FeatureSplit(np.ascontiguousarray(split.X[:, start:stop]), split.y, split.paths)


def probe_layers(data: Sequence, seed: int, probe: LinearProbe | None = None) -> list[dict]:
    """One row per layer of each multi-layer cache in ``data`` (:class:`CacheData`): the
    layer, its depth (0: lowest), width, and the probe's validation and test accuracy with
    the test accuracy's exact 95% interval."""
    template = probe if probe is not None else LinearProbe()
    rows = []
    for cache in data:
        for depth, (name, start, stop) in enumerate(cache.info.get("layers") or []):
            train, val, test = (layer_columns(s, start, stop)
                                for s in (cache.train, cache.val, cache.test))
            estimator = clone(template).set_params(random_state=seed)
            estimator.fit(train.X, train.y, X_val=val.X, y_val=val.y)
            right = int(np.sum(estimator.predict(test.X) == test.y))
            low, high = accuracy_interval(right, len(test.y))
            rows.append({"backbone": cache.backbone, "layer": name, "depth": depth,
                         "features": stop - start,
                         "val_accuracy": float(np.mean(estimator.predict(val.X) == val.y)),
                         "test_accuracy": right / len(test.y), "test_accuracy_ci_low": low,
                         "test_accuracy_ci_high": high, "cache_key": cache.info["key"]})
    return rows


def write_layer_curve(rows: list[dict], out: Path) -> dict[str, str]:
    """``layers.csv|md`` and ``layers.png``: accuracy against depth, test with its interval."""
    csv, md = tables.write_table(rows, out / "layers")
    series = {}
    for key in dict.fromkeys(r["cache_key"] for r in rows):
        mine = [r for r in rows if r["cache_key"] == key]
        label = mine[0]["backbone"] + (f" {key[:8]}" if len({r["cache_key"] for r in rows}) > 1
                                       else "")
        depth = [r["depth"] for r in mine]
        series[f"{label}: test"] = (depth, [r["test_accuracy"] for r in mine],
                                    [r["test_accuracy_ci_low"] for r in mine],
                                    [r["test_accuracy_ci_high"] for r in mine])
        series[f"{label}: validation"] = (depth, [r["val_accuracy"] for r in mine], None,
                                          None)
    names = " < ".join(r["layer"] for r in rows if r["cache_key"] == rows[0]["cache_key"])
    png = plots.curve_plot(series, out / "layers.png",
                           "Linear probe on each layer (test: 95% interval)",
                           f"depth: {names}", "accuracy")
    return {"layers_csv": str(csv), "layers_md": str(md), "layers_png": str(png)}

"""Heads on generated class features: fit seconds and scores of each head at scale."""

from __future__ import annotations

import time

import numpy as np

__all__ = ["bench_heads", "class_features", "print_heads"]


def class_features(n: int, dim: int, classes: int, seed: int, separation: float = 0.03
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Bottleneck-like features: non-negative, as after a ReLU and pooling, with class means
    close enough that a head has work to do (far apart, every head scores 1.0 in no time)."""
    rng = np.random.default_rng(seed)
    means = np.random.default_rng(0).gamma(1.0, separation, size=(classes, dim))
    means = means.astype(np.float32)
    y = rng.integers(0, classes, size=n)
    X = means[y] + rng.gamma(1.0, 0.6, size=(n, dim)).astype(np.float32)
    return X, y


def bench_heads(rows: int, dim: int = 1280, classes: int = 10) -> dict:
    """Fit time of each head on ``rows`` x ``dim`` features, and the linear grid's cost."""
    from pipeline.heads import LinearProbe, make_head

    X, y = class_features(rows, dim, classes, seed=1)
    X_val, y_val = class_features(rows // 10, dim, classes, seed=2)
    X_test, y_test = class_features(rows // 6, dim, classes, seed=3)
    fits = []
    for spec in ("logreg", "mlp", "linear"):
        head = make_head(spec)
        started = time.perf_counter()
        head.fit(X, y, X_val=X_val, y_val=y_val)
        fits.append({"head": spec, "fit_s": time.perf_counter() - started,
                     "test_accuracy": head.score(X_test, y_test)})
    grid = {}
    for name, decays in (("grid_8", tuple(np.logspace(-6, -1, 8))), ("single", (1e-4,))):
        # Fixed epochs (no early stop) so both runs do the same number of passes.
        head = LinearProbe(weight_decays=decays, max_epochs=10, patience=10)
        started = time.perf_counter()
        head.fit(X, y, X_val=X_val, y_val=y_val)
        grid[name] = {"fit_s": time.perf_counter() - started, "epochs": head.n_epochs_}
    per_epoch = {k: v["fit_s"] / v["epochs"] for k, v in grid.items()}
    return {"rows": rows, "dim": dim, "fits": fits, "linear_grid": grid,
            "grid_cost_ratio": per_epoch["grid_8"] / per_epoch["single"]}


def print_heads(result: dict) -> None:
    print(f"heads on {result['rows']} x {result['dim']} generated features")
    print("head | fit s | test accuracy")
    for f in result["fits"]:
        print(f"{f['head']} | {f['fit_s']:.1f} | {f['test_accuracy']:.3f}")
    g = result["linear_grid"]
    print(f"linear probe, 8 weight decays: {g['grid_8']['fit_s']:.1f} s for "
          f"{g['grid_8']['epochs']} epochs; one: {g['single']['fit_s']:.1f} s for "
          f"{g['single']['epochs']} epochs; cost ratio per epoch {result['grid_cost_ratio']:.2f}"
          " (target <= 2)")

"""Several layers from one pass against the bottleneck alone, and the layer curve, on the demo.

Each extraction runs in a fresh process (:func:`~pipeline.bench.children.in_child`) into an
empty cache folder, single and multi-layer alternately (A B A B), so that the shared machine's
drift falls on both; the ratio is of the extraction loops' seconds per image.
"""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from pipeline.bench.children import in_child

__all__ = ["bench_layers", "print_layers"]

TARGET = 1.2  # multi-layer seconds per image at most this times single-layer's (issue 27)


def bench_layers(args, rounds: int = 2) -> dict:
    """Seconds per image of ``--layer blocks`` against the bottleneck on ``args.data``, and
    the linear probe curve of the blocks' cache."""
    from pipeline.core.options import HeadsOptions
    from pipeline.heads.compare import fit_heads

    net = {"backbone": args.backbone, "weights": args.weights}
    runs: dict[str, list[dict]] = {"bottleneck": [], "blocks": []}
    for _ in range(rounds):
        for layer in runs:
            cache_dir = Path(args.out) / f"cache-layers-{layer}"
            shutil.rmtree(cache_dir, ignore_errors=True)
            runs[layer].append(in_child("extract", data=str(args.data), cache_dir=str(cache_dir),
                                        progress=False, layer=None if layer == "bottleneck"
                                        else layer, **net))
    per_image = {layer: sum(r["loop_seconds"] for r in rs) / sum(r["images"] for r in rs)
                 for layer, rs in runs.items()}
    started = time.perf_counter()
    fitted = fit_heads([runs["blocks"][-1]["cache_path"]],
                       options=HeadsOptions(heads=("linear",)), progress=False)
    fitted.write(Path(args.out) / "layers-heads")
    curve = fitted.layers
    return {"images": runs["blocks"][0]["images"], "dim": runs["blocks"][0]["dim"],
            "ms_per_image": {k: 1000 * v for k, v in per_image.items()},
            "runs_ms_per_image": {k: [1000 * r["loop_seconds"] / r["images"] for r in rs]
                                  for k, rs in runs.items()},
            "ratio": per_image["blocks"] / per_image["bottleneck"], "target": TARGET,
            "peak_rss_mb": {k: max(r["peak_rss_mb"] for r in rs) for k, rs in runs.items()},
            "curve_s": time.perf_counter() - started,
            "curve": [{k: r[k] for k in ("layer", "features", "val_accuracy", "test_accuracy",
                                         "test_accuracy_ci_low", "test_accuracy_ci_high")}
                      for r in curve]}


def print_layers(result: dict) -> None:
    ms = result["ms_per_image"]
    print(f"--layer blocks ({result['dim']} columns) {ms['blocks']:.2f} ms/image against the "
          f"bottleneck's {ms['bottleneck']:.2f}: {result['ratio']:.3f}x (target <= "
          f"{result['target']}); peak RSS {result['peak_rss_mb']['blocks']:.0f} against "
          f"{result['peak_rss_mb']['bottleneck']:.0f} MB")
    runs = result["runs_ms_per_image"]
    print("  runs, ms/image: " + "; ".join(
        f"{k} {', '.join(f'{v:.2f}' for v in vs)}" for k, vs in runs.items()))
    print(f"layer curve ({result['curve_s']:.1f} s, linear probe):")
    for r in result["curve"]:
        print(f"  {r['layer']:<12} {r['features']:>5}  val {r['val_accuracy']:.3f}  test "
              f"{r['test_accuracy']:.3f} [{r['test_accuracy_ci_low']:.3f}, "
              f"{r['test_accuracy_ci_high']:.3f}]")

"""Startup: ``pipeline --help`` and a cache hit in fresh processes, against ``import torch``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from pipeline.bench.children import generate_images

__all__ = ["bench_startup", "pipeline_command", "startup_ratios", "timed_runs"]


# Startup time against `import torch`, the floor of any command that runs a model: --help and
# a cache hit need no model, so they should cost a fraction of it.
STARTUP_TARGETS = {"help": 0.1, "cache_hit": 0.5}


def timed_runs(command: list[str], runs: int) -> tuple[float, str]:
    """Median wall seconds of ``command`` over ``runs`` fresh processes, and the last one's
    standard output; a failing run stops the bench with its error."""
    seconds, stdout = [], ""
    for _ in range(runs):
        started = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        seconds.append(time.perf_counter() - started)
        if run.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed:\n{run.stderr[-4000:]}")
        stdout = run.stdout
    return float(np.median(seconds)), stdout


def pipeline_command() -> list[str]:
    """The console script next to this Python, as a user runs it; else ``python -m pipeline``."""
    script = Path(sys.executable).with_name("pipeline")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "pipeline"]


def startup_ratios(seconds: dict) -> dict:
    """Each startup time over ``import torch``'s, with its target (at most that ratio)."""
    floor = seconds["import_torch"]
    return {name: {"seconds": seconds[name], "ratio": seconds[name] / floor,
                   "target": STARTUP_TARGETS[name]} for name in STARTUP_TARGETS}


def bench_startup(args) -> dict:
    """``import torch``, ``pipeline --help`` and a cache hit of ``pipeline extract``, each the
    median of ``args.startup_runs`` fresh processes, on demo-like generated images (28 px)."""
    data = generate_images(args.out / f"generated-startup-{args.startup_images}",
                           args.startup_images, size=28)
    cache_dir = args.out / "cache-startup"
    shutil.rmtree(cache_dir, ignore_errors=True)
    extract = [*pipeline_command(), "extract", str(data), "--backbone", args.backbone,
               "--weights", args.weights, "--cache-dir", str(cache_dir), "--json"]
    timed_runs(extract, 1)  # the miss: from here on the features are in the cache
    runs = args.startup_runs
    seconds = {"import_torch": timed_runs([sys.executable, "-c", "import torch"], runs)[0],
               "help": timed_runs([*pipeline_command(), "--help"], runs)[0]}
    seconds["cache_hit"], summary = timed_runs(extract, runs)
    if not json.loads(summary.strip().splitlines()[-1])["hit"]:
        raise RuntimeError(f"the second `pipeline extract` of {data} was not a cache hit")
    ratios = startup_ratios(seconds)
    print(f"startup, median of {runs} fresh processes ({' '.join(pipeline_command())}; cache "
          f"hit on {args.startup_images} generated 28 px images, {args.backbone}):")
    print("command | s | x import torch | target")
    print(f"python -c 'import torch' | {seconds['import_torch']:.2f} | 1.00 | -")
    for name, label in (("help", "pipeline --help"), ("cache_hit", "pipeline extract (hit)")):
        r = ratios[name]
        print(f"{label} | {r['seconds']:.2f} | {r['ratio']:.2f} | <= {r['target']}")
    return {"runs": runs, "images": args.startup_images, "command": pipeline_command(),
            "import_torch_s": seconds["import_torch"], **ratios}

"""What ``make bench`` runs: startup, extraction throughput against forward-only, cache hits,
memory, heads, fine-tuning (from cached block activations against from images), several
processes.

Extraction and forward-only each run in a fresh process (:func:`in_child`, which runs
:func:`child` under ``python -m pipeline.bench --child``), so both start from the same state
and each peak memory is its own; forward-only runs the same model, prepared the same way
(:func:`pipeline.extract.batches.prepare_model`), on the same batch size of ready tensors. On a GPU
the peak GPU memory (``torch.cuda.max_memory_allocated``) is reported too; ``--weights none``
measures a torchvision backbone whose weight file is not on the machine (speed does not depend
on the weights' values). Startup times the command line in fresh processes against
``import torch``. Engines (``--only engines``): forward-only and end-to-end images per second
of every installed engine against the eager network extraction ran before engines existed.
Photos (``--only photos``, :mod:`pipeline.bench.photos`): ``pipeline extract`` on
12-megapixel JPEGs against the PyTorch tutorial's loop on the same files. Drift
(``--only drift``, :mod:`pipeline.bench.drift`): the MMD test's time and memory as N grows.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.audit import bench_audit, print_audit
from pipeline.bench.children import child, extract_named, generate_images, in_child
from pipeline.bench.drift import bench_drift
from pipeline.bench.engines import bench_engines
from pipeline.bench.finetuning import bench_finetune
from pipeline.bench.heads import bench_heads, print_heads
from pipeline.bench.layers import bench_layers, print_layers
from pipeline.bench.numbers import mb
from pipeline.bench.photos import bench_photos
from pipeline.bench.startup import bench_startup
from pipeline.core.devices import (
    default_batch_size,
    resolve_device,
)
from pipeline.models.backbones import DEFAULT_BACKBONE
from pipeline.store.cache import cache_info


def bench_set(name: str, data: Path, out: Path, backbone: str, weights: str) -> dict:
    cache_dir = out / f"cache-{name}"
    for old in cache_dir.glob("*"):
        old.unlink()
    # Forward-only before and after the extraction: this shared machine drifts by about 10%
    # from minute to minute, and the mean brackets the extraction in time.
    net = {"backbone": backbone, "weights": weights}
    before = in_child("forward", data=str(data), **net)
    miss = in_child("extract", data=str(data), cache_dir=str(cache_dir), progress=False, **net)
    after = in_child("forward", data=str(data), **net)
    forward = (before["img_s"] + after["img_s"]) / 2
    extract_named(data, cache_dir=cache_dir, progress=False, **net)  # imports
    hit = extract_named(data, cache_dir=cache_dir, progress=False, **net)
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pipeline", "extract", str(data), "--backbone",
                    backbone, "--weights", weights, "--cache-dir", str(cache_dir), "--json"],
                   check=True, capture_output=True)
    hit_cli = time.perf_counter() - started
    end_to_end = miss["images"] / miss["seconds"]
    return {
        "set": name, "images": miss["images"], "end_to_end_img_s": end_to_end,
        "forward_only_img_s": forward, "ratio": end_to_end / forward,
        "extract_s": miss["seconds"], "hit_s": hit.seconds, "hit_fraction": hit.seconds /
        miss["seconds"], "hit_cli_s": hit_cli, "peak_rss_mb": miss["peak_rss_mb"],
        "forward_peak_rss_mb": before["peak_rss_mb"],
        "gpu_peak_mb": miss.get("gpu_peak_mb"), "forward_gpu_peak_mb": before.get("gpu_peak_mb"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("data/fashion-mnist-mini"))
    parser.add_argument("--large", type=int, default=3000, help="images in the generated set")
    parser.add_argument("--backbone", default=DEFAULT_BACKBONE)
    parser.add_argument("--weights", default="default",
                        help="none: random weights, for a backbone whose file is not here")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes for --only distributed [default: GPUs, or 2]")
    parser.add_argument("--out", type=Path, default=Path("bench"))
    parser.add_argument("--head-rows", type=int, default=60000, help="rows for the head fits")
    parser.add_argument("--startup-images", type=int, default=1700,
                        help="generated 28 px images for the startup cache hit (the demo's 1,700)")
    parser.add_argument("--startup-runs", type=int, default=3,
                        help="fresh processes per startup measurement (median)")
    parser.add_argument("--finetune-images", type=int, default=600,
                        help="images of --data for the fine-tuning runs (spread over its splits "
                             "and classes; more than it has repeats them)")
    parser.add_argument("--engine", default="torch",
                        help="--engine of the fine-tuning section (features, activation pass "
                             "and the image loop's frozen trunk)")
    parser.add_argument("--finetune-epochs", type=int, default=10,
                        help="epochs of each freeze depth in the sweeps")
    parser.add_argument("--audit-rows", type=int, default=70000, help="rows for the audit")
    parser.add_argument("--photos", type=int, default=120,
                        help="12-megapixel JPEGs made for --only photos")
    parser.add_argument("--only", choices=("startup", "extract", "layers", "engines", "heads",
                                           "audit", "finetune", "distributed", "photos",
                                           "drift"),
                        default=None)
    # One measurement in this fresh process (what in_child runs), its result as JSON.
    parser.add_argument("--child", nargs=2, metavar=("MODE", "KWARGS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child[0], json.loads(args.child[1]))))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    if args.only in (None, "startup"):
        results["startup"] = bench_startup(args)
    if args.only in (None, "heads"):
        results["heads"] = bench_heads(args.head_rows)
        print_heads(results["heads"])
    if args.only in (None, "audit"):
        results["audit"] = bench_audit(args.audit_rows)
        print_audit(results["audit"])
    if args.only in (None, "extract"):
        results.update(bench_extract(args))
    if args.only in (None, "photos"):
        results["photos"] = bench_photos(args.out, args.photos, args.backbone)
    if args.only in (None, "drift"):
        results["drift"] = bench_drift()
    if args.only in (None, "layers"):
        results["layers"] = bench_layers(args)
        print_layers(results["layers"])
    if args.only in (None, "engines"):
        results["engines"] = bench_engines(args)
    if args.only in (None, "finetune"):
        results["finetune"] = bench_finetune(args)
    if args.only in (None, "distributed"):
        results["distributed"] = bench_distributed(args)
    machine = {"cpu_count": os.cpu_count(), "platform": platform.platform(),
               "device": str(resolve_device("auto")), "torch": torch.__version__,
               "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    (args.out / "results.json").write_text(json.dumps({"machine": machine, **results},
                                                      indent=2) + "\n")
    print(f"written to {args.out / 'results.json'}")


def bench_extract(args) -> dict:
    large = generate_images(args.out / f"generated-{args.large}", args.large)
    rows = [bench_set("demo", args.data, args.out, args.backbone, args.weights),
            bench_set(f"generated-{args.large}", large, args.out, args.backbone, args.weights)]
    print(f"backbone {args.backbone}, {resolve_device()}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} torch threads, batch {default_batch_size(resolve_device())}")
    header = ("set", "images", "e2e img/s", "fwd img/s", "ratio", "extract s", "hit s",
              "hit/extract", "hit CLI s", "peak RSS MB", "fwd peak RSS MB", "peak GPU MB",
              "fwd peak GPU MB")
    print(" | ".join(header))
    for r in rows:
        print(" | ".join([r["set"], str(r["images"]), f"{r['end_to_end_img_s']:.1f}",
                          f"{r['forward_only_img_s']:.1f}", f"{r['ratio']:.2f}",
                          f"{r['extract_s']:.1f}", f"{r['hit_s']:.3f}",
                          f"{100 * r['hit_fraction']:.2f}%", f"{r['hit_cli_s']:.2f}",
                          f"{r['peak_rss_mb']:.0f}", f"{r['forward_peak_rss_mb']:.0f}",
                          mb(r["gpu_peak_mb"]), mb(r["forward_gpu_peak_mb"])]))
    small = generate_images(args.out / "generated-1000", 1000)
    shutil.rmtree(args.out / "cache-mem", ignore_errors=True)
    small_run = in_child("extract", data=str(small), cache_dir=str(args.out / "cache-mem"),
                         backbone=args.backbone, weights=args.weights, progress=False)
    memory = [{"images": 1000, "peak_rss_mb": small_run["peak_rss_mb"]},
              {"images": args.large, "peak_rss_mb": rows[1]["peak_rss_mb"]}]
    print("peak memory of extraction against images (same kind of data): " +
          ", ".join(f"{m['images']} images: {m['peak_rss_mb']:.0f} MB" for m in memory))
    return {"extract": rows, "memory": memory}


def _launcher(processes: int) -> list[str]:
    """``python -m pipeline`` for one process, torchrun's one-machine form for several."""
    if processes == 1:
        return [sys.executable, "-m", "pipeline"]
    return [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node",
            str(processes), "-m", "pipeline"]


def bench_distributed(args) -> dict:
    """One process against torchrun's ``--nproc`` on the demo set: extraction (with the shard
    assembly) and fine-tuning seconds per epoch (top block, 2 epochs, batch 32 per process)."""
    cuda = torch.cuda.is_available()
    nproc = args.nproc or (torch.cuda.device_count() if cuda else 2)
    net = ["--backbone", args.backbone, "--weights", args.weights]
    rows = []
    for procs in sorted({1, nproc}):
        cache_dir, out = args.out / f"cache-dist-{procs}", args.out / f"finetune-dist-{procs}"
        for old in (cache_dir, out):
            shutil.rmtree(old, ignore_errors=True)
        run = subprocess.run([*_launcher(procs), "extract", str(args.data), *net, "--cache-dir",
                              str(cache_dir), "--json"], check=True, capture_output=True,
                             text=True)
        summary = json.loads(run.stdout.strip().splitlines()[-1])
        timings = cache_info(summary["cache_path"])["timings"]
        subprocess.run([*_launcher(procs), "finetune", str(args.data), *net, "--cache-dir",
                        str(cache_dir), "--out", str(out), "--unfreeze", "1", "--epochs", "2",
                        "--patience", "5", "--json"], check=True, capture_output=True)
        history = (out / "unfreeze-1" / "history.csv").read_text().splitlines()[1:]
        epoch_s = float(np.mean([float(line.split(",")[-1]) for line in history]))
        rows.append({"processes": procs, "images": summary["images"],
                     "extract_s": summary["seconds"],
                     "extract_img_s": summary["images"] / summary["seconds"],
                     "assemble_s": timings.get("assemble_seconds", 0.0),
                     "finetune_epoch_s": epoch_s})
    print(f"one process against torchrun --nproc-per-node {nproc} ({args.backbone}, "
          f"{'cuda' if cuda else 'cpu, gloo'}), demo set:")
    print("processes | extraction s | img/s | shard assembly s | fine-tune s/epoch")
    for r in rows:
        print(f"{r['processes']} | {r['extract_s']:.1f} | {r['extract_img_s']:.1f} | "
              f"{r['assemble_s']:.3f} | {r['finetune_epoch_s']:.1f}")
    return {"rows": rows}


if __name__ == "__main__":
    main()

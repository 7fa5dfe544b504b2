"""Fine-tuning from cached block activations against from images: epochs and sweeps."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.bench.children import timed_child
from pipeline.bench.numbers import mb
from pipeline.core.options import ActivationOptions, TrainingOptions

__all__ = ["activation_bytes", "bench_finetune", "finetune_ratios", "print_finetune",
           "sized_image_set", "spread"]


# Issue 11: a top-block epoch from cached activations against an every-block epoch, and the
# freeze-depth sweep from the cache (its one-off activation pass included) against from images.
FINETUNE_TARGETS = {"epoch": 0.1, "sweep": 0.25}


SWEEP_DEPTHS = (0, 1, 2)


def sized_image_set(source: Path, root: Path, n: int) -> Path:
    """``n`` of ``source``'s images under ``root``, same relative paths (so the same splits and
    classes), evenly spread over the sorted files so that splits and classes keep their shares;
    where ``n`` exceeds them each file is repeated as ``<stem>-copyK``. ``source`` itself when
    ``n`` is its size; an existing ``root`` is reused (it is moved into place only when whole).
    """
    suffixes = set(Image.registered_extensions())
    files = sorted(p.relative_to(source) for p in source.rglob("*")
                   if p.is_file() and p.suffix.lower() in suffixes)
    if n == len(files):
        return source
    if root.exists():
        return root
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for index, copy in spread(len(files), n):
        rel = files[index]
        if copy:
            rel = rel.with_name(f"{rel.stem}-copy{copy}{rel.suffix}")
        (partial / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source / files[index], partial / rel)
    os.replace(partial, root)
    return root


def spread(total: int, n: int) -> list[tuple[int, int]]:
    """``n`` picks of ``total`` ordered items, evenly spaced: ``(index, copy)`` pairs, ``copy``
    counting an item's repeats from 0 (above 0 only when ``n`` exceeds ``total``)."""
    seen: dict[int, int] = {}
    picks = []
    for index in (np.arange(n, dtype=np.int64) * total) // max(n, 1):
        copy = seen.get(int(index), 0)
        seen[int(index)] = copy + 1
        picks.append((int(index), copy))
    return picks


def finetune_ratios(cached_epoch_s: float, all_epoch_s: float, cached_sweep_s: float,
                    images_sweep_s: float) -> dict:
    """Issue 11's two ratios with their targets (at most that ratio): a top-block epoch from
    cached activations against an every-block epoch, and the sweep from the cache (one-off pass
    included) against the sweep from images."""
    ratios = {"epoch": cached_epoch_s / all_epoch_s, "sweep": cached_sweep_s / images_sweep_s}
    return {name: {"ratio": ratio, "target": FINETUNE_TARGETS[name],
                   "met": ratio <= FINETUNE_TARGETS[name]} for name, ratio in ratios.items()}


def activation_bytes(path: Path) -> dict:
    """What one activation cache holds per row: the stored values (``row_bytes``: flattened
    size x dtype) and the file's size over its rows (values plus paths, labels, hashes)."""
    import h5py

    with h5py.File(path, "r") as f:
        features = f["features"]
        rows, dim = features.shape
        shape = [int(s) for s in f.attrs["activation_shape"]]
        dtype = str(features.dtype)
        row_bytes = dim * features.dtype.itemsize
    size = path.stat().st_size
    return {"file": path.name, "shape": shape, "dtype": dtype, "rows": rows,
            "row_bytes": row_bytes, "file_bytes": size, "file_bytes_per_row": size / rows}


def bench_finetune(args) -> dict:
    """Fine-tuning from cached block activations against from images (issue 11).

    On ``args.finetune_images`` images of ``args.data``, each run a fresh child process, one
    cache folder made empty first (so the one-off activation pass is measured), patience above
    the epochs (no run stops early), augmentation on both ways (the cache with its default
    views per training image, images with a fresh crop every epoch, as before the cache):

    - the sweep ``--unfreeze 0,1,2`` x ``args.finetune_epochs`` from the cache
      (:func:`pipeline.finetuning.run.sweep_depths`: one trunk pass writes the three caches) and
      from
      images (``from_images=True``); each sweep's time is its child's wall time; the seconds
      per epoch of each depth come from these runs;
    - ``--unfreeze all`` (images: nothing to cache) for 2 epochs;
    - the bytes per image of each depth's activation cache;
    - peak RSS of a cached ``--unfreeze 1`` run (features, activation pass, 2 epochs, a fresh
      cache) at ``args.finetune_images`` and at twice as many images.
    The features are extracted first in their own child, so neither sweep pays for them.
    """
    n, epochs = args.finetune_images, args.finetune_epochs
    data = sized_image_set(args.data, args.out / f"finetune-data-{n}", n)
    root = args.out / "finetune"
    shutil.rmtree(root, ignore_errors=True)
    cache_dir = root / "cache"
    net = {"backbone": args.backbone, "weights": args.weights, "engine": args.engine}
    common = {**net, "data": str(data), "cache_dir": str(cache_dir), "progress": False}
    started = time.perf_counter()
    features = timed_child("extract", **common)
    # patience above the epochs: every run trains every epoch, so both ways do the same work.
    train = {**common, "epochs": epochs, "patience": epochs + 1}
    sweeps, per_epoch = {}, []
    for way, extra in (("cached", {}), ("images", {"from_images": True})):
        out = root / f"sweep-{way}"
        run = timed_child("sweep", depths=list(SWEEP_DEPTHS), out=str(out), **train, **extra)
        sweeps[way] = {key: run[key] for key in ("wall_s", "seconds", "before_first_epoch_s",
                                                 "peak_rss_mb")}
        sweeps[way]["epochs_s"] = float(sum(sum(s) for s in run["epoch_s"]))
        sweeps[way]["gpu_peak_mb"] = run.get("gpu_peak_mb")
        for depth, seconds in zip(SWEEP_DEPTHS, run["epoch_s"]):
            row = json.loads((out / f"unfreeze-{depth}" / "results.json").read_text())[0]
            per_epoch.append({"unfreeze": str(depth), "way": way,
                              "trained_from": row["trained_from"], "epochs": len(seconds),
                              "epoch_s": float(np.mean(seconds)),
                              "trainable_parameters": row["trainable_parameters"]})
    every = timed_child("finetune", out=str(root / "unfreeze-all"), unfreeze="all",
                         **{**train, "epochs": 2, "patience": 3})
    per_epoch.append({"unfreeze": "all", "way": "images", "trained_from": every["trained_from"],
                      "epochs": len(every["epoch_s"]), "epoch_s": float(np.mean(every["epoch_s"])),
                      "trainable_parameters": every["trainable_parameters"],
                      "peak_rss_mb": every["peak_rss_mb"]})
    boundaries = []
    for depth in SWEEP_DEPTHS:
        checkpoint = torch.load(root / "sweep-cached" / f"unfreeze-{depth}" / "checkpoint.pt",
                                map_location="cpu", weights_only=True)
        name = json.loads(checkpoint["args"])["activations"]
        boundaries.append({"unfreeze": depth, **activation_bytes(cache_dir / name)})
    memory = []
    for size in (n, 2 * n):
        sized = sized_image_set(args.data, args.out / f"finetune-data-{size}", size)
        run = timed_child("finetune", **net, data=str(sized), progress=False,
                           cache_dir=str(root / f"cache-memory-{size}"),
                           out=str(root / f"memory-{size}"), unfreeze=1, epochs=2, patience=3)
        memory.append({"images": size, "trained_from": run["trained_from"],
                       "peak_rss_mb": run["peak_rss_mb"], "gpu_peak_mb": run.get("gpu_peak_mb"),
                       "wall_s": run["wall_s"]})
    cached_u1 = next(r for r in per_epoch if r["unfreeze"] == "1" and r["way"] == "cached")
    ratios = finetune_ratios(cached_u1["epoch_s"], per_epoch[-1]["epoch_s"],
                             sweeps["cached"]["wall_s"], sweeps["images"]["wall_s"])
    result = {"data": str(data), "images": features["images"], "epochs": epochs,
              "engine": args.engine,
              "views": ActivationOptions.views, "augment": TrainingOptions.augment,
              "features_s": features["wall_s"], "per_epoch": per_epoch, "sweeps": sweeps,
              "boundaries": boundaries, "memory": memory, "ratios": ratios,
              "section_s": time.perf_counter() - started}
    print_finetune(result, args.backbone)
    return result


def print_finetune(result: dict, backbone: str) -> None:
    print(f"fine-tuning {backbone} (--engine {result.get('engine', 'torch')}) on "
          f"{result['data']} ({result['images']} images), augment "
          f"{result['augment']} both ways (cache: {result['views']} views per training image), "
          f"patience above the epochs; features extracted first ({result['features_s']:.1f} s)")
    print("unfreeze | trained from | trainable parameters | epochs | mean s/epoch | peak RSS MB "
          "(the sweeps': below)")
    for r in result["per_epoch"]:
        print(f"{r['unfreeze']} | {r['trained_from']} | {r['trainable_parameters']} | "
              f"{r['epochs']} | {r['epoch_s']:.2f} | {mb(r.get('peak_rss_mb'))}")
    depths = ",".join(str(d) for d in SWEEP_DEPTHS)
    print(f"sweep --unfreeze {depths} x {result['epochs']} epochs | child wall s | in-process s | "
          "before the first epoch s | epochs s | peak RSS MB")
    for way, s in result["sweeps"].items():
        print(f"{way} | {s['wall_s']:.1f} | {s['seconds']:.1f} | {s['before_first_epoch_s']:.1f} "
              f"| {s['epochs_s']:.1f} | {s['peak_rss_mb']:.0f}")
    print("unfreeze | boundary shape | dtype | rows | row bytes | file bytes / row | file MiB")
    for b in result["boundaries"]:
        print(f"{b['unfreeze']} | {'x'.join(map(str, b['shape']))} | {b['dtype']} | {b['rows']} | "
              f"{b['row_bytes']} | {b['file_bytes_per_row']:.0f} | {b['file_bytes'] / 2**20:.1f}")
    print("peak RSS of a cached --unfreeze 1 run (features, activation pass, 2 epochs): " +
          ", ".join(f"{m['images']} images {m['peak_rss_mb']:.0f} MB ({m['wall_s']:.0f} s)"
                    for m in result["memory"]))
    r = result["ratios"]
    print(f"top-block epoch from the cache / every-block epoch: {r['epoch']['ratio']:.3f} "
          f"(target <= {r['epoch']['target']})")
    print(f"sweep from the cache, activation pass included / sweep from images: "
          f"{r['sweep']['ratio']:.3f} (target <= {r['sweep']['target']})")
    print(f"finetune section: {result['section_s'] / 60:.1f} min")

"""What ``make bench`` runs: startup, extraction throughput against forward-only, cache hits,
memory, heads, fine-tuning (from cached block activations against from images), several
processes.

Extraction and forward-only each run in a fresh process (:func:`in_child`, which runs
:func:`child` under ``python -m pipeline.bench --child``), so both start from the same state
and each peak memory is its own; forward-only runs the same model, prepared the same way
(:func:`pipeline.extract.features.prepare_model`), on the same batch size of ready tensors. On a GPU
the peak GPU memory (``torch.cuda.max_memory_allocated``) is reported too; ``--weights none``
measures a torchvision backbone whose weight file is not on the machine (speed does not depend
on the weights' values). Startup times the command line in fresh processes against
``import torch``. Engines (``--only engines``): forward-only and end-to-end images per second
of every installed engine against the eager network extraction ran before engines existed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.core.devices import (
    autocast,
    default_batch_size,
    device_type,
    keep_freed_memory,
    resolve_device,
)
from pipeline.core.options import FinetuneConfig
from pipeline.data.images import ImageFiles, load_image_set
from pipeline.extract.features import example_images, extract_features, prepare_model
from pipeline.models import engines
from pipeline.models.backbones import DEFAULT_BACKBONE, resolve_backbone
from pipeline.store.cache import cache_info

FORWARD_SECONDS = 8.0
CHILD_MODES = ("extract", "finetune", "forward", "sweep", "engine")
# Startup time against `import torch`, the floor of any command that runs a model: --help and
# a cache hit need no model, so they should cost a fraction of it.
STARTUP_TARGETS = {"help": 0.1, "cache_hit": 0.5}
# Issue 11: a top-block epoch from cached activations against an every-block epoch, and the
# freeze-depth sweep from the cache (its one-off activation pass included) against from images.
FINETUNE_TARGETS = {"epoch": 0.1, "sweep": 0.25}
SWEEP_DEPTHS = (0, 1, 2)
# Issue 12: end-to-end with --engine auto against the eager network's forward-only (at least),
# and end-to-end with each engine against that engine's forward-only (at least).
ENGINE_TARGETS = {"auto_over_eager": 1.5, "end_to_end_over_forward": 0.9}
# "eager": the network as extraction ran it before engines (channels_last, nothing folded).
BENCH_ENGINES = ("eager", "torch", "onnxruntime", "openvino")


def generate_images(root: Path, n: int, classes: int = 10, size: int = 256, seed: int = 0) -> Path:
    """``n`` photo-sized JPEGs (smooth colour fields plus noise) in ``classes`` folders."""
    if root.exists() and sum(1 for _ in root.rglob("*.jpg")) == n:
        return root
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        c = i % classes
        base = np.stack([np.sin(xx * (c + 1) * 3), np.cos(yy * (c + 2) * 2), xx * yy], -1)
        pixels = (base * 100 + 128 + rng.normal(0, 25, base.shape)).clip(0, 255)
        path = root / f"class{c:02d}" / f"{i:06d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels.astype(np.uint8)).save(path, quality=90)
    return root


def in_child(mode: str, **kw) -> dict:
    """:func:`child` in a fresh Python process, so that its time and peak memory are its own."""
    run = subprocess.run([sys.executable, "-m", "pipeline.bench", "--child", mode,
                          json.dumps(kw)], capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"bench child {mode} failed:\n{run.stderr[-4000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def child(mode: str, kw: dict) -> dict:
    """One measurement in this process: an extraction (its summary), a fine-tune or a sweep
    (seconds per epoch), or forward-only (images per second); with the process's peak memory.

    Parameters
    ----------
    mode
        ``"extract"`` (``kw`` for :func:`pipeline.extract_features`), ``"finetune"`` (for
        :func:`pipeline.finetuning.run`), ``"sweep"`` (for
        :func:`pipeline.finetuning.run.sweep_depths`,
        into a fresh ``out``) or ``"forward"`` (for :func:`forward_only`).
    """
    if device_type("auto") == "cpu":  # as the `pipeline` command does on a CPU
        keep_freed_memory()
    if mode == "extract":
        if kw.pop("one_stream", False):  # one run at a time over every core, as before streams
            for engine in engines._ENGINES.values():
                engine.streams = lambda device_type, workers: 1
        out = extract_features(**kw).to_json()
        if not out["hit"]:  # the extraction loop alone, without the run's fixed start
            out["loop_seconds"] = cache_info(out["cache_path"])["timings"].get("loop_seconds")
    elif mode == "finetune":
        from pipeline.finetuning.run import finetune

        started = time.perf_counter()
        result = finetune(**kw)
        out = {"seconds": time.perf_counter() - started,
               "epoch_s": [h["seconds"] for h in result.history],
               "trainable_parameters": result.row["trainable_parameters"],
               "trained_from": result.row["trained_from"]}
    elif mode == "sweep":
        out = _sweep(kw)
    elif mode == "forward":
        out = {"img_s": forward_only(**kw)}
    elif mode == "engine":
        out = prepare_engine(**kw)
    else:
        raise ValueError(f"mode must be one of {', '.join(CHILD_MODES)}, not {mode!r}")
    out["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def _sweep(kw: dict) -> dict:
    """A freeze-depth sweep: its seconds, each run's epoch seconds, and the seconds before its
    first epoch (features read, models built, probes fitted, the one-off activation pass)."""
    from pipeline.finetuning.run import sweep_depths

    runs: list[list[float]] = []
    first_epoch_at = []

    def on_epoch(epoch: int, row: dict) -> None:
        if not first_epoch_at:
            first_epoch_at.append(time.perf_counter() - row["seconds"])
        if epoch == 1:  # the sweep's next depth (``out`` is fresh: no run resumes)
            runs.append([])
        runs[-1].append(row["seconds"])

    started = time.perf_counter()
    sweep_depths(on_epoch=on_epoch, **kw)
    return {"seconds": time.perf_counter() - started, "epoch_s": runs,
            "before_first_epoch_s": first_epoch_at[0] - started if first_epoch_at else None}


def peak_rss_mb() -> float:
    """This process's peak resident memory in MiB.

    VmHWM, which exec resets, on Linux: ``ru_maxrss`` would carry over the peak of the process
    that forked this one.
    """
    try:
        with open("/proc/self/status") as fh:
            hwm = next(line for line in fh if line.startswith("VmHWM"))
        return int(hwm.split()[1]) / 1024
    except (OSError, StopIteration):
        import resource

        scale = 2**20 if sys.platform == "darwin" else 1024  # bytes there, KiB on Linux
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _prepared(spec, images, device: torch.device, engine: str,
              cache_dir: str) -> engines.Prepared:
    """``engine`` as extraction prepares it (in its streams, with in-process loading), its
    export looked for (or written) in ``cache_dir``."""
    crop = spec.preprocessing.crop
    export = engines.export_path(cache_dir, spec.name, spec.key(), (3, crop, crop))
    name = engines.resolve_engine(engine, device.type, export=export)
    return engines.prepare(name, spec.build(), example_images(spec, images), spec.adapter,
                           device, export, spec.key(),
                           streams=engines.get_engine(name).streams(device.type, 0))


def _engine_model(spec, images, device: torch.device, engine: str, cache_dir: str | None
                  ) -> tuple[Callable, int]:
    """What extraction would run for ``engine`` (``eager``: the unprepared network), and how
    many batches it runs at once."""
    if engine == "eager":
        return spec.build().to(device, memory_format=torch.channels_last), 1
    if engine == "torch":
        return prepare_model(spec, device), 1
    ready = _prepared(spec, images, device, engine, cache_dir or "cache")
    return ready.run, ready.streams


def prepare_engine(data: str, backbone: str, weights: str, engine: str, cache_dir: str) -> dict:
    """Prepare ``engine`` (exporting into ``cache_dir`` if needed): its seconds and check."""
    ready = _prepared(resolve_backbone(backbone, weights), load_image_set(data),
                      resolve_device("auto"), engine, cache_dir)
    return {"engine": ready.engine, "seconds": ready.seconds, "exported": ready.exported,
            "difference": ready.difference, "note": ready.note}


@torch.inference_mode()
def forward_only(data: str, backbone: str, weights: str = "default", engine: str = "torch",
                 cache_dir: str | None = None) -> float:
    """Images per second of the model alone, on preprocessed tensors already in memory.

    ``engine`` as extraction takes it, or ``eager`` (the unprepared network); an exported
    engine's export is looked for (or written) in ``cache_dir``.
    """
    spec = resolve_backbone(backbone, weights)
    device = resolve_device("auto")
    bs = default_batch_size(device)
    images = load_image_set(data)
    model, streams = _engine_model(spec, images, device, engine, cache_dir)
    crop = spec.preprocessing.crop
    files = ImageFiles(images, spec.preprocessing.transform(), (3, crop, crop))
    batches = [torch.stack([files[i][0] for i in range(j, j + bs)]).to(device)
               for j in range(0, 4 * bs, bs)]
    model(batches[0])
    done, started = [0] * streams, time.perf_counter()

    @torch.inference_mode()  # per thread
    def stream(k: int) -> None:
        while time.perf_counter() - started < FORWARD_SECONDS:
            for x in batches:
                if device.type == "cuda":  # as extraction feeds it
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast(device):
                    model(x).float().cpu()
                done[k] += len(x)

    if streams == 1:
        stream(0)
    else:  # as extraction runs it: that many batches at once, each from its own thread
        threads = [threading.Thread(target=stream, args=(k,)) for k in range(streams)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return sum(done) / (time.perf_counter() - started)


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
    extract_features(data, cache_dir=cache_dir, progress=False, **net)  # imports
    hit = extract_features(data, cache_dir=cache_dir, progress=False, **net)
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


def _timed_child(mode: str, **kw) -> dict:
    """:func:`in_child`, with the wall seconds of the whole child (start and imports too)."""
    started = time.perf_counter()
    out = in_child(mode, **kw)
    out["wall_s"] = time.perf_counter() - started
    return out


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
    features = _timed_child("extract", **common)
    # patience above the epochs: every run trains every epoch, so both ways do the same work.
    train = {**common, "epochs": epochs, "patience": epochs + 1}
    sweeps, per_epoch = {}, []
    for way, extra in (("cached", {}), ("images", {"from_images": True})):
        out = root / f"sweep-{way}"
        run = _timed_child("sweep", depths=list(SWEEP_DEPTHS), out=str(out), **train, **extra)
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
    every = _timed_child("finetune", out=str(root / "unfreeze-all"), unfreeze="all",
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
        run = _timed_child("finetune", **net, data=str(sized), progress=False,
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
              "views": FinetuneConfig.views, "augment": FinetuneConfig.augment,
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
              f"{r['epochs']} | {r['epoch_s']:.2f} | {_mb(r.get('peak_rss_mb'))}")
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
    parser.add_argument("--only", choices=("startup", "extract", "engines", "heads",
                                           "finetune", "distributed"), default=None)
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
    if args.only in (None, "extract"):
        results.update(bench_extract(args))
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
                          _mb(r["gpu_peak_mb"]), _mb(r["forward_gpu_peak_mb"])]))
    small = generate_images(args.out / "generated-1000", 1000)
    shutil.rmtree(args.out / "cache-mem", ignore_errors=True)
    small_run = in_child("extract", data=str(small), cache_dir=str(args.out / "cache-mem"),
                         backbone=args.backbone, weights=args.weights, progress=False)
    memory = [{"images": 1000, "peak_rss_mb": small_run["peak_rss_mb"]},
              {"images": args.large, "peak_rss_mb": rows[1]["peak_rss_mb"]}]
    print("peak memory of extraction against images (same kind of data): " +
          ", ".join(f"{m['images']} images: {m['peak_rss_mb']:.0f} MB" for m in memory))
    return {"extract": rows, "memory": memory}


def bench_engines_here(device: torch.device) -> list[str]:
    """The engines of :data:`BENCH_ENGINES` that run here: eager, torch, and the exported
    engines that are installed and run on ``device``."""
    out = []
    for name in BENCH_ENGINES:
        engine = None if name == "eager" else engines.get_engine(name)
        if engine is None or (engine.installed() and device.type in engine.devices):
            out.append(name)
    return out


def engine_ratios(forward: dict[str, float], end_to_end: dict[str, float]) -> dict:
    """Issue 12's ratios with their targets (at least): end-to-end with ``auto`` over the
    eager network's forward-only, and each engine's end-to-end over its own forward-only;
    beside them each engine's forward-only over the eager one's (no target)."""
    auto = end_to_end["auto"] / forward["eager"]
    target = ENGINE_TARGETS["end_to_end_over_forward"]
    return {
        "forward_over_eager": {e: forward[e] / forward["eager"] for e in forward},
        "auto_over_eager": {"ratio": auto, "target": ENGINE_TARGETS["auto_over_eager"],
                            "met": auto >= ENGINE_TARGETS["auto_over_eager"]},
        "end_to_end_over_forward": {
            e: {"ratio": end_to_end[e] / forward[e], "target": target,
                "met": end_to_end[e] / forward[e] >= target}
            for e in end_to_end if e in forward},
    }


def bench_engines(args) -> dict:
    """Every engine that runs here, on the demo set and the generated set (issue 12).

    One cache folder holds the exports, made first in their own children (their seconds are
    reported on their own), so that neither forward-only nor extraction pays for them.
    Per set, each measurement a fresh child: forward-only of every engine (and of the eager
    network), end-to-end extraction with every engine, with ``auto``, and with ``auto`` in
    one stream (one run at a time over every core, the next batches decoded by a background
    thread where the engine does that: extraction before streams), then forward-only again;
    forward-only is the mean of the two, which bracket the extractions in time.
    """
    device = resolve_device("auto")
    names = bench_engines_here(device)
    auto = engines.resolve_engine("auto", device.type)
    net = {"backbone": args.backbone, "weights": args.weights}
    cache_dir = args.out / "cache-engines"
    shutil.rmtree(cache_dir, ignore_errors=True)
    started, loads = time.perf_counter(), [os.getloadavg()]
    exports = {e: in_child("engine", data=str(args.data), engine=e, cache_dir=str(cache_dir),
                           **net)
               for e in names if e not in ("eager", "torch")}
    large = generate_images(args.out / f"generated-{args.large}", args.large)
    sets = []
    for name, data in (("demo", args.data), (f"generated-{args.large}", large)):
        common = {**net, "data": str(data), "cache_dir": str(cache_dir)}
        before = {e: in_child("forward", engine=e, **common)["img_s"] for e in names}
        runs = {}
        for label, extra in ([(e, {"engine": e}) for e in names if e != "eager"]
                             + [("auto", {"engine": "auto"}),
                                ("auto, one stream", {"engine": "auto",
                                                      "one_stream": True})]):
            for old in cache_dir.glob("*.h5*"):
                old.unlink()
            runs[label] = in_child("extract", progress=False, **common, **extra)
        after = {e: in_child("forward", engine=e, **common)["img_s"] for e in names}
        loads.append(os.getloadavg())
        forward = {e: (before[e] + after[e]) / 2 for e in names}
        end_to_end = {label: r["images"] / r["seconds"] for label, r in runs.items()}
        # The loop alone: decoding, forward and writing at the rate a large set runs at; the
        # whole run adds a fixed start (imports, building the network) of several seconds.
        loop = {label: r["images"] / r["loop_seconds"] for label, r in runs.items()
                if r.get("loop_seconds")}
        compared = {k: v for k, v in end_to_end.items() if k in forward or k == "auto"}
        sets.append({"set": name, "images": runs["auto"]["images"], "auto": auto,
                     "forward_before": before, "forward_after": after, "forward": forward,
                     "end_to_end": end_to_end, "loop": loop,
                     "engine_of": {label: r["engine"] for label, r in runs.items()},
                     "ratios": engine_ratios(forward, compared),
                     "loop_ratios": engine_ratios(forward, {k: v for k, v in loop.items()
                                                            if k in compared})})
    result = {"engines": names, "auto": auto, "exports": exports, "sets": sets,
              "loadavg": loads, "section_s": time.perf_counter() - started}
    print_engines(result, args.backbone)
    return result


def print_engines(result: dict, backbone: str) -> None:
    print(f"engines, {backbone}: auto is {result['auto']} here; exports: " + ", ".join(
        f"{e} {x['seconds']:.1f} s (check {x['difference']:.1e})"
        for e, x in result["exports"].items()))
    for s in result["sets"]:
        r, lr = s["ratios"], s["loop_ratios"]
        print(f"{s['set']} ({s['images']} images): engine | forward-only img/s (before, after) "
              "| x eager | end-to-end img/s, whole run; loop alone | end-to-end / forward-only "
              f"(target >= {ENGINE_TARGETS['end_to_end_over_forward']}), whole run; loop alone")
        for e in s["forward"]:
            ratio = r["end_to_end_over_forward"].get(e, {}).get("ratio")
            loop_ratio = lr["end_to_end_over_forward"].get(e, {}).get("ratio")
            print(f"{e} | {s['forward'][e]:.1f} ({s['forward_before'][e]:.1f}, "
                  f"{s['forward_after'][e]:.1f}) | {r['forward_over_eager'][e]:.2f} | "
                  f"{_num(s['end_to_end'].get(e), '.1f')}; {_num(s['loop'].get(e), '.1f')} | "
                  f"{_num(ratio, '.2f')}; {_num(loop_ratio, '.2f')}")
        for label in ("auto", "auto, one stream"):
            print(f"{label} ({s['engine_of'][label]}) | end-to-end {s['end_to_end'][label]:.1f} "
                  f"img/s whole run, {_num(s['loop'].get(label), '.1f')} loop alone")
        print(f"end-to-end with auto / eager forward-only: {r['auto_over_eager']['ratio']:.2f} "
              f"whole run, {lr['auto_over_eager']['ratio']:.2f} loop alone (target >= "
              f"{r['auto_over_eager']['target']})")
    print("load average (1, 5, 15 min) at the start and after each set: " + "; ".join(
        ", ".join(f"{v:.2f}" for v in load) for load in result["loadavg"]))
    print(f"engines section: {result['section_s'] / 60:.1f} min")


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


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

"""Each measurement in a fresh process, so every run starts from the same state and its peak
memory is its own (:func:`in_child` runs :func:`child` under ``python -m pipeline.bench --child``).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipeline.bench.memory import peak_rss_mb
from pipeline.core.devices import (
    autocast,
    default_batch_size,
    device_type,
    keep_freed_memory,
    resolve_device,
)
from pipeline.core.options import ExtractOptions
from pipeline.data.images import ImageFiles, load_image_set
from pipeline.extract.batches import prepare_model
from pipeline.extract.features import example_images, extract_features
from pipeline.models import engines
from pipeline.models.backbones import build_feature_model, resolve_backbone
from pipeline.models.families import family_of
from pipeline.store.cache import cache_info

__all__ = ["child", "extract_named", "forward_only", "generate_images", "in_child", "mmd_once",
           "peak_rss_mb", "prepare_engine", "timed_child"]


FORWARD_SECONDS = 8.0


CHILD_MODES = ("extract", "finetune", "forward", "sweep", "engine", "mmd")


# What the benchmarks name of the backbone beside its name: resolve_backbone's keywords.
_BACKBONE_ARGS = ("weights", "layer", "pool", "image_size", "offline")


def extract_named(data, backbone: str, progress: bool | str | None = False, **settings):
    """:func:`pipeline.extract_features` from plain values (a child's JSON arguments): the
    backbone's keywords resolve ``backbone``, the rest build the
    :class:`~pipeline.core.options.ExtractOptions`."""
    named = {k: settings.pop(k) for k in _BACKBONE_ARGS if k in settings}
    options = ExtractOptions(**settings)
    spec = resolve_backbone(backbone, **named, seed=options.seed)
    return extract_features(data, backbone=spec, options=options, progress=progress)


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
        into a fresh ``out``), ``"forward"`` (for :func:`forward_only`) or ``"mmd"`` (for
        :func:`mmd_once`).
    """
    if device_type("auto") == "cpu":  # as the `pipeline` command does on a CPU
        keep_freed_memory()
    if mode == "extract":
        if kw.pop("one_stream", False):  # one run at a time over every core, as before streams
            for engine in engines._ENGINES.values():
                engine.streams = lambda device_type, workers: 1
        out = extract_named(**kw).to_json()
        if not out["hit"]:  # the extraction loop alone, without the run's fixed start
            out["loop_seconds"] = cache_info(out["cache_path"])["timings"].get("loop_seconds")
    elif mode == "finetune":
        from pipeline.finetuning.run import finetune

        started = time.perf_counter()
        args = finetune_args(kw)
        result = finetune(**args)
        result.write(args["workdir"])
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
    elif mode == "mmd":
        out = mmd_once(**kw)
    else:
        raise ValueError(f"mode must be one of {', '.join(CHILD_MODES)}, not {mode!r}")
    out["peak_rss_mb"] = peak_rss_mb()
    if torch.cuda.is_available():
        out["gpu_peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def mmd_once(rows: int, dim: int = 1280, permutations: int = 200) -> dict:
    """One MMD test of ``rows`` against ``rows`` Gaussian rows with a small mean shift, of
    Lite0's bottleneck width and ``pipeline drift``'s permutations by default (for
    :mod:`pipeline.bench.drift`, in a fresh process)."""
    from pipeline.monitoring.kernel import mmd_test

    rng = np.random.default_rng(0)
    X = rng.normal(size=(rows, dim)).astype(np.float32)
    Y = (rng.normal(size=(rows, dim)) + 0.02).astype(np.float32)
    started = time.perf_counter()
    test = mmd_test(X, Y, permutations=permutations)
    return {"rows": rows, "dim": dim, "permutations": permutations,
            "seconds": time.perf_counter() - started, "p_value": test.p_value}


def finetune_args(kw: dict) -> dict:
    """A fine-tune's flat settings, as the bench passes them through JSON (the former
    ``finetune(data, backbone, weights=..., lr=..., cache_dir=..., out=...)`` keywords), as
    :func:`pipeline.finetuning.run.finetune`'s arguments: the backbone resolved, the options
    by concern, ``out`` as the working folder (the files are written there too)."""
    from pipeline.core.options import DEFAULT_BACKBONE, FinetuneOptions
    from pipeline.models.backbones import resolve_backbone

    kw = dict(kw)
    call = {k: kw.pop(k) for k in ("data", "depths", "progress", "positive", "tta",
                                    "split_seed", "track", "repeats") if k in kw}
    workdir = kw.pop("out", None)
    name = kw.pop("backbone", DEFAULT_BACKBONE)
    backbone = {k: kw.pop(k) for k in ("weights", "image_size", "offline") if k in kw}
    options = FinetuneOptions.from_flat(kw)
    spec = resolve_backbone(name, **backbone, seed=options.training.seed)
    return {**call, "backbone": spec, "options": options, "workdir": workdir}


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
    args = finetune_args(kw)
    sweep_depths(on_epoch=on_epoch, **args).write(args["workdir"])
    return {"seconds": time.perf_counter() - started, "epoch_s": runs,
            "before_first_epoch_s": first_epoch_at[0] - started if first_epoch_at else None}


def _prepared(spec, images, device: torch.device, engine: str,
              cache_dir: str) -> engines.Prepared:
    """``engine`` as extraction prepares it (in its streams, with in-process loading), its
    export looked for (or written) in ``cache_dir``."""
    crop = spec.preprocessing.crop
    export = engines.export_path(cache_dir, spec.name, spec.key(), (3, crop, crop))
    name = engines.resolve_engine(engine, device.type, export=export)
    return engines.prepare(name, build_feature_model(spec), example_images(spec, images),
                           family_of(spec), device, export, spec.key(),
                           streams=engines.get_engine(name).streams(device.type, 0))


def _engine_model(spec, images, device: torch.device, engine: str, cache_dir: str | None
                  ) -> tuple[Callable, int]:
    """What extraction would run for ``engine`` (``eager``: the unprepared network), and how
    many batches it runs at once."""
    if engine == "eager":
        return build_feature_model(spec).to(device, memory_format=torch.channels_last), 1
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


def timed_child(mode: str, **kw) -> dict:
    """:func:`in_child`, with the wall seconds of the whole child (start and imports too)."""
    started = time.perf_counter()
    out = in_child(mode, **kw)
    out["wall_s"] = time.perf_counter() - started
    return out

"""Predictions on new images: the saved head's own backbone, then the head."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np
import torch
from torch import nn

from pipeline.backbones import BackboneSpec, replace_classifier, resolve_backbone
from pipeline.cache import SUFFIX as CACHE_SUFFIX
from pipeline.cache import open_cache, read_strings
from pipeline.data import ImageSet
from pipeline.devices import keep_freed_memory, resolve_device
from pipeline.errors import DataError
from pipeline.extract import FeatureBatch, feature_batches, prepare_model
from pipeline.layouts import display, find_images
from pipeline.persistence import ModelFileError, SavedHead, load_head

# Key fields that decide the features a head was trained on; all must match at prediction.
_FEATURE_FIELDS = ("backbone", "weights", "weights_sha256", "layer", "pool", "preprocessing")


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files given directly or found (recursively, sorted, each once) in given folders.

    A dangling link is kept: it gets an error row like any unreadable image.
    """
    found: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found += [item / p for p in find_images(item).paths]
        elif item.is_file() or item.is_symlink():
            found.append(item)
        else:
            raise DataError(f"{display(str(item))}: no such file or folder")
    if not found:
        raise DataError("no images found in " + ", ".join(display(str(i)) for i in inputs))
    return [p.absolute() for p in found]


def is_cache(path: str | os.PathLike) -> bool:
    return Path(path).suffix == CACHE_SUFFIX and Path(path).is_file()


def matching_backbone(saved: SavedHead, offline: bool | None = None) -> BackboneSpec:
    """Rebuild the backbone the head was trained on, and refuse one that gives other features."""
    request = dict(saved.meta["request"])
    spec = resolve_backbone(request.pop("backbone"), **request, offline=offline)
    # Compare as stored: the key went through JSON, where tuples become lists.
    _check_features(saved, json.loads(json.dumps(spec.key())), "the backbone here gives")
    return spec


def _check_features(saved: SavedHead, here: dict, where: str) -> None:
    trained = saved.meta["spec"]
    for name in _FEATURE_FIELDS:
        if trained.get(name) != here.get(name):
            raise ModelFileError(
                f"this head was trained on features with {name}={trained.get(name)!r}, but "
                f"{where} {name}={here.get(name)!r}; extract and fit it again")


def predict_images(
    model: str | os.PathLike,
    inputs: Sequence[str | os.PathLike],
    top_k: int = 5,
    device: str = "auto",
    batch_size: int | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    offline: bool | None = None,
) -> list[dict]:
    """Classify images with a saved head and its matching backbone.

    ``inputs`` are image files, folders (searched recursively) and feature caches (``.h5``,
    labelled or not): a head classifies a cache's stored features without running the
    backbone; a fine-tuned network reads the cache's images. Images come first, in the order
    given, then the caches' rows.

    Returns one dict per image: ``path``, ``prediction``, ``probability`` and ``top_k`` (a list
    of ``(class, probability)``), or ``error`` for an image that could not be read.
    """
    saved = load_head(model)
    caches = [Path(i) for i in inputs if is_cache(i)]
    files = [i for i in inputs if not is_cache(i)]
    if _is_finetuned(saved):  # the network needs pixels: read the cached images again
        files += [p for c in caches for p in _cache_images(c)]
        caches = []
    rows = (_image_rows(saved, files, top_k, device, batch_size, workers, progress, offline)
            if files else [])
    for path in caches:
        rows += _cached_rows(saved, path, top_k)
    return rows


def _image_rows(saved: SavedHead, inputs, top_k: int, device: str, batch_size, workers,
                progress, offline) -> list[dict]:
    spec = matching_backbone(saved, offline)
    paths = collect_images(inputs)
    classes = saved.meta["classes"]
    # Absolute paths under "/" reuse the robust loader of stage 1 unchanged.
    images = ImageSet(Path("/"), [p.as_posix() for p in paths], np.zeros(len(paths), np.int64),
                      classes, np.full(len(paths), "test"), {})
    run_on = resolve_device(device)
    net = _network(saved, spec, run_on)
    rows = []
    for batch in feature_batches(net, spec, images, run_on, None, batch_size, workers, progress,
                                 desc="predict"):
        rows += _batch_rows(saved, batch, paths, classes, top_k)
    return rows


def _cache_images(cache: Path) -> list[Path]:
    with open_cache(cache) as f:
        return _cached_paths(f)


def _cached_paths(f) -> list[Path]:
    root = Path(f.attrs["data_root"])
    return [root / p for p in read_strings(f["paths"])]


def _cached_rows(saved: SavedHead, cache: Path, top_k: int) -> list[dict]:
    """Predictions from a cache's stored features: no image is decoded, no network runs."""
    with open_cache(cache) as f:
        _check_features(saved, json.loads(f.attrs["spec"]),
                        f"the cache {display(str(cache))} holds")
        paths = _cached_paths(f)
        failed = dict(zip(f["failed_index"][:].tolist(), read_strings(f["failed_reason"])))
        features, valid = f["features"], f["valid"]
        block = max(1, features.chunks[0])
        rows = []
        for lo in range(0, len(paths), block):
            hi = min(len(paths), lo + block)
            batch = FeatureBatch(np.arange(lo, hi), features[lo:hi].astype(np.float32),
                                 valid[lo:hi], [(i, r) for i, r in failed.items() if lo <= i < hi],
                                 0.0, np.zeros(hi - lo, "S64"))
            rows += _batch_rows(saved, batch, paths, saved.meta["classes"], top_k)
    return rows


def _is_finetuned(saved: SavedHead) -> bool:
    return saved.meta.get("kind") == "finetuned"


def _network(saved: SavedHead, spec: BackboneSpec, device: torch.device) -> nn.Module:
    """The feature model for a head; for a fine-tuned model, the whole network and softmax."""
    if not _is_finetuned(saved):
        return prepare_model(spec, device)
    model = spec.build_classifier()
    replace_classifier(spec, model, len(saved.meta["classes"]))
    model.load_state_dict(saved.estimator)
    if device.type == "cpu":
        keep_freed_memory()
    return nn.Sequential(model, nn.Softmax(dim=1)).eval().to(
        device, memory_format=torch.channels_last)


def _batch_rows(saved: SavedHead, batch, paths, classes, top_k: int) -> list[dict]:
    if batch.features.shape[1] != saved.meta["dim"]:
        raise ModelFileError(f"the head expects {saved.meta['dim']} features, the backbone "
                             f"gives {batch.features.shape[1]}")
    rows = {i: {"path": str(paths[i]), "error": reason} for i, reason in batch.failures}
    ok = np.flatnonzero(batch.valid)
    if len(ok):
        proba = _class_proba(saved, batch.features[ok], len(classes))
        for i, p in zip(ok + batch.start, proba):
            order = np.argsort(-p, kind="stable")[:top_k]
            rows[i] = {"path": str(paths[i]), "prediction": classes[order[0]],
                       "probability": float(p[order[0]]),
                       "top_k": [(classes[j], float(p[j])) for j in order]}
    return [rows[i] for i in sorted(rows)]  # in the order the images were given


def _class_proba(saved: SavedHead, X: np.ndarray, n_classes: int) -> np.ndarray:
    if _is_finetuned(saved):  # the network's own softmax
        return X.astype(np.float64)
    estimator = saved.estimator
    full = np.zeros((len(X), n_classes))
    if hasattr(estimator, "predict_proba"):
        full[:, estimator.classes_.astype(int)] = estimator.predict_proba(X)
    else:  # a head without probabilities: its decision, with probability 1
        full[np.arange(len(X)), estimator.predict(X).astype(int)] = 1.0
    return full


def write_predictions(rows: list[dict], stream: TextIO, top_k: int) -> None:
    """CSV: path, prediction, probability, top-k classes and probabilities, error."""
    ranks = [f"{kind}{r}" for r in range(1, top_k + 1) for kind in ("class", "p")]
    writer = csv.writer(stream)
    writer.writerow(["path", "prediction", "probability", *ranks, "error"])
    for row in rows:
        pairs = [v for c, p in row.get("top_k", [])[:top_k] for v in (display(c), f"{p:.6f}")]
        pairs += [""] * (len(ranks) - len(pairs))
        probability = f"{row['probability']:.6f}" if "probability" in row else ""
        writer.writerow([display(row["path"]), display(row.get("prediction", "")), probability,
                         *pairs, row.get("error", "")])

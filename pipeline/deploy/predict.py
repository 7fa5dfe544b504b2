"""Predictions on new images with a saved model of either kind.

A head (``.head``) classifies bottleneck features: images run through the head's own backbone
first, and a feature cache of that backbone gives its stored features without running it. A
fine-tuned network (``.net``) classifies images end to end, through its own logits and a
softmax; a cache gives it the paths of its images, which are read again.

:func:`predict_images` computes; ``result.write(path)`` writes the predictions as a CSV file
through :mod:`pipeline.core.atomic`.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import numpy as np

from pipeline.core.atomic import write_text
from pipeline.core.contract import Result
from pipeline.core.errors import DataError
from pipeline.core.options import ExtractOptions, PredictOptions, default
from pipeline.core.progress import Progress
from pipeline.data.images import ImageSet
from pipeline.data.layouts import display, find_images
from pipeline.data.shards import read_shards, shard_files, split_address
from pipeline.finetuning.tta import (
    TTAError,
    ViewFeatures,
    average,
    input_size,
    mean_over_views,
    transform,
    view_count,
)
from pipeline.metrics.scoring import class_probabilities
from pipeline.models.backbone_spec import BackboneSpec
from pipeline.models.backbones import resolve_backbone
from pipeline.store.cache import open_cache, read_strings
from pipeline.store.paths import SUFFIX as CACHE_SUFFIX
from pipeline.store.persistence import ModelFileError, SavedHead, SavedNetwork, load_model

if TYPE_CHECKING:
    from pipeline.finetuning.network import FinetunedNetwork

__all__ = ["PredictOptions", "PredictResult", "collect_images", "is_cache", "matching_backbone",
           "predict_images", "write_predictions"]

# Key fields that decide the features a head was trained on; all must match at prediction.
_FEATURE_FIELDS = ("backbone", "weights", "weights_sha256", "layer", "pool", "preprocessing")


def collect_images(inputs: Sequence[str | os.PathLike]) -> list[Path]:
    """Image files given directly or found (recursively, sorted, each once) in given folders,
    and the images of shard files (Parquet, Arrow, tar; a folder of them, a brace pattern),
    as addresses (:mod:`pipeline.data.shards`).

    A dangling link is kept: it gets an error row like any unreadable image.
    """
    found: list[Path] = []
    for given in inputs:
        item = Path(given)
        if item.is_dir():
            found += [item / p for p in find_images(item).paths] or _shard_images(given) or []
        elif (inside := _shard_images(given)) is not None:
            found += inside
        elif item.is_file() or item.is_symlink() or split_address(item):
            found.append(item)
        else:
            raise DataError(f"{display(str(item))}: no such file or folder")
    if not found:
        raise DataError("no images found in " + ", ".join(display(str(i)) for i in inputs))
    return [p.absolute() for p in found]


def _shard_images(source: str | os.PathLike) -> list[Path] | None:
    """The addresses of the images in shard files, or None if ``source`` names none."""
    files = shard_files(source)
    if files is None:
        return None
    listing, root = read_shards(*files, root=Path(source) if Path(source).is_dir() else None)
    return [root / p for p in listing.paths]


def is_cache(path: str | os.PathLike) -> bool:
    return Path(path).suffix == CACHE_SUFFIX and Path(path).is_file()


def matching_backbone(saved: SavedHead, offline: bool | None = None) -> BackboneSpec:
    """Rebuild the backbone the head was trained on, and refuse one that gives other features."""
    request = dict(saved.meta["request"])
    spec = resolve_backbone(request.pop("backbone"), **request, offline=offline)
    # Compare as stored: the key went through JSON, where tuples become lists.
    _check_features(saved, json.loads(json.dumps(spec.key())), "the backbone here gives")
    return spec


def decode_mode(saved: SavedHead) -> str:
    """How the head's features decoded a JPEG (:mod:`pipeline.data.decode`), so that a photo
    is read here as it was for the comparison. A key without it is of data without JPEGs,
    which both modes decode alike: new images are then read as extraction reads them now."""
    return saved.meta["spec"].get("decode", default(ExtractOptions, "decode"))


def _check_features(saved: SavedHead, here: dict, where: str) -> None:
    trained = saved.meta["spec"]
    for name in _FEATURE_FIELDS:
        if trained.get(name) != here.get(name):
            raise ModelFileError(
                f"this head was trained on features with {name}={trained.get(name)!r}, but "
                f"{where} {name}={here.get(name)!r}; extract and fit it again")


@dataclass
class PredictResult(Result):
    """One row per image, in the order read (see :func:`predict_images`)."""

    rows: list[dict]
    model: str = ""  # the model file ("" for a model given in memory)
    top_k: int = 5  # the classes the CSV lists per image

    def to_json(self) -> dict:
        return {"model": self.model, "predictions": self.rows}

    def to_csv(self, stream: TextIO) -> None:
        """The CSV of :func:`write_predictions` into ``stream`` (a terminal, a pipe)."""
        write_predictions(self.rows, stream, self.top_k)

    def write(self, out: str | os.PathLike) -> list[Path]:
        """The predictions as the CSV file ``out`` (its folder made if needed), all at once."""
        text = io.StringIO(newline="")
        self.to_csv(text)
        return [write_text(out, text.getvalue())]


def predict_images(
    model: str | os.PathLike | SavedHead | SavedNetwork | FinetunedNetwork,
    inputs: Sequence[str | os.PathLike],
    *,
    options: PredictOptions = PredictOptions(),
    progress: bool | str | None = None,
) -> PredictResult:
    """Classify images with a saved head and its backbone, or with a fine-tuned network.

    Computes and writes nothing: ``result.write(path)`` writes the CSV.

    Parameters
    ----------
    model
        A ``.head`` or ``.net`` file (:func:`pipeline.store.persistence.load_model`), or a model in
        memory: a loaded head or network, or the ``model`` of a :func:`pipeline.finetune`
        result (left on its device, in its train/eval mode).
    inputs
        Image files, folders (searched recursively) and feature caches (``.h5``, labelled or
        not). A head classifies a cache's stored features without running the backbone; a
        network reads the cache's images. Images come first, in the order given, then the
        caches' rows.
    options
        :class:`~pipeline.core.options.PredictOptions`: ``top_k``, ``device``, ``batch_size``,
        ``workers``, ``offline`` (never download the backbone's weights) and ``tta``
        (``"flip"`` or ``"crops"``: average the probabilities over each image's views,
        :mod:`pipeline.finetuning.tta`; a head classifies each view's features. A head's cached
        features are of the plain image only, so a cache given to a head is refused).
    progress
        A bar where stderr is a terminal, elsewhere a line every 30 s and at the end
        (:mod:`pipeline.core.progress`); False: nothing.

    Returns
    -------
    PredictResult
        ``rows``: one per image: ``path``, ``prediction``, ``probability`` and ``top_k`` (a
        list of ``(class, probability)``), or ``path`` and ``error`` for an image that could
        not be read.
    """
    top_k, device, batch_size = options.top_k, options.device, options.batch_size
    workers, offline, tta = options.workers, options.offline, options.tta
    predictor = _predictor(model, offline)
    name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else ""
    caches = [Path(i) for i in inputs if is_cache(i)]
    files = [i for i in inputs if not is_cache(i)]
    if not isinstance(predictor, SavedHead):  # a network needs pixels: read the images again
        files += [p for c in caches for p in _cache_images(c)]
        rows = _network_rows(predictor, files, top_k, device, batch_size, workers, progress,
                             tta)
        return PredictResult(rows, name, top_k)
    if tta and caches:
        raise TTAError(f"test-time augmentation needs images: {display(str(caches[0]))} holds "
                       "the features of the plain images only; give the image files or folders "
                       "instead", path=caches[0], tta=tta, reason="tta-on-cache")
    rows = (_head_image_rows(predictor, files, top_k, device, batch_size, workers, progress,
                             offline, tta) if files else [])
    for path in caches:
        rows += _head_cached_rows(predictor, path, top_k)
    return PredictResult(rows, name, top_k)


def _predictor(model, offline: bool | None) -> SavedHead | FinetunedNetwork:
    if isinstance(model, (str, os.PathLike)):
        model = load_model(model)
    if isinstance(model, SavedNetwork):
        from pipeline.finetuning.network import FinetunedNetwork

        model = FinetunedNetwork.from_saved(model, offline)
    return model


def _image_set(paths: list[Path], classes: list[str]) -> ImageSet:
    # Absolute paths under "/" reuse the robust loader of stage 1 unchanged.
    return ImageSet(Path("/"), [p.as_posix() for p in paths], np.zeros(len(paths), np.int64),
                    classes, np.full(len(paths), "test"), {})


# --- a head: features, then the head --------------------------------------------------------------

def _head_image_rows(saved: SavedHead, inputs, top_k: int, device: str, batch_size, workers,
                     progress, offline, tta=None) -> list[dict]:
    from pipeline.core.devices import resolve_device
    from pipeline.data.images import ImageFiles
    from pipeline.extract.batches import feature_batches, prepare_model

    spec = matching_backbone(saved, offline)
    paths = collect_images(inputs)
    run_on = resolve_device(device)
    images = _image_set(paths, saved.meta["classes"])
    model, files, n_views = prepare_model(spec, run_on), None, 1
    if tta:  # each view's features side by side, classified view by view
        recipe = spec.preprocessing
        size = input_size(recipe, tta)
        model = ViewFeatures(model, tta, recipe.crop)
        files = ImageFiles(images, transform(recipe, tta), (3, size, size), recipe=recipe,
                           decode=decode_mode(saved))
        n_views = view_count(recipe, tta)
    rows = []
    for batch in feature_batches(model, spec, images, run_on, None, batch_size, workers,
                                 progress, desc="predict", files=files,
                                 decode=decode_mode(saved)):
        errors = dict(batch.failures)
        rows += _head_rows(saved, batch.features, batch.valid,
                           [errors.get(int(i), "") for i in batch.index],
                           [paths[i] for i in batch.index], top_k, n_views)
    return rows


def _cache_images(cache: Path) -> list[Path]:
    with open_cache(cache) as f:
        return _cached_paths(f)


def _cached_paths(f) -> list[Path]:
    root = Path(f.attrs["data_root"])
    return [root / p for p in read_strings(f["paths"])]


def _head_cached_rows(saved: SavedHead, cache: Path, top_k: int) -> list[dict]:
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
            rows += _head_rows(saved, features[lo:hi].astype(np.float32), valid[lo:hi],
                               [failed.get(i, "") for i in range(lo, hi)], paths[lo:hi],
                               top_k)
    return rows


def _head_rows(saved: SavedHead, features: np.ndarray, valid: np.ndarray, errors: list[str],
               paths: list[Path], top_k: int, n_views: int = 1) -> list[dict]:
    """``features``: ``n_views`` views' features side by side (:mod:`pipeline.finetuning.tta`)."""
    if features.shape[1] != saved.meta["dim"] * n_views:
        raise ModelFileError(f"the head expects {saved.meta['dim']} features, the backbone "
                             f"gives {features.shape[1] // n_views}")
    classes = saved.meta["classes"]
    proba = np.full((len(features), len(classes)), np.nan)
    ok = np.flatnonzero(valid)
    if len(ok):
        proba[ok] = mean_over_views(
            lambda X: _head_proba(saved.estimator, X, len(classes)), features[ok], n_views)
    return _rows(paths, proba, errors, classes, top_k)


def _head_proba(estimator, X: np.ndarray, n_classes: int) -> np.ndarray:
    proba = class_probabilities(estimator, X, n_classes)
    if proba is None:  # a head without probabilities: its decision, with probability 1
        proba = np.eye(n_classes)[estimator.predict(X).astype(int)]
    return proba


# --- a network: images end to end -----------------------------------------------------------------

def _network_rows(net: FinetunedNetwork, inputs, top_k: int, device: str, batch_size,
                  workers, progress, tta=None) -> list[dict]:
    """The network's own softmax over its logits, batch by batch: no feature model runs.
    With ``tta``, its mean over each image's views (:mod:`pipeline.finetuning.tta`)."""
    import torch

    from pipeline.core.devices import default_batch_size, default_workers, resolve_device
    from pipeline.data.images import ImageFiles

    paths = collect_images(inputs)
    run_on = resolve_device(device)
    recipe = net.spec.preprocessing
    size = input_size(recipe, tta) if tta else recipe.crop
    files = ImageFiles(_image_set(paths, net.classes),
                       transform(recipe, tta) if tta else recipe.transform(), (3, size, size))
    workers = default_workers() if workers is None else workers
    loader = torch.utils.data.DataLoader(
        files, batch_size=batch_size or default_batch_size(run_on), shuffle=False,
        num_workers=workers, pin_memory=run_on.type == "cuda")
    rows = []
    with net.placed(run_on), Progress(len(files), f"predict {net.spec.name}", "img",
                                      progress=progress) as bar:
        for x, index, errors, _digest in loader:
            proba = (average(net.predict_proba, x, tta, recipe.crop) if tta
                     else net.predict_proba(x))
            rows += _rows([paths[i] for i in index], proba, list(errors), net.classes, top_k)
            bar.update(len(index))
    return rows


# --- rows -----------------------------------------------------------------------------------------

def _rows(paths: Sequence[Path], proba: np.ndarray, errors: Sequence[str],
          classes: list[str], top_k: int) -> list[dict]:
    """One row per image, in the order given: its top classes, or why it could not be read."""
    rows = []
    for path, p, error in zip(paths, proba, errors):
        if error:
            rows.append({"path": str(path), "error": error})
            continue
        order = np.argsort(-p, kind="stable")[:top_k]
        rows.append({"path": str(path), "prediction": classes[order[0]],
                     "probability": float(p[order[0]]),
                     "top_k": [(classes[j], float(p[j])) for j in order]})
    return rows


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

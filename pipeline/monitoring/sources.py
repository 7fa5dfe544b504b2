"""What drift compares: the reference cache, the deployed model, and the new set's features.

The reference is a feature cache, or a results folder whose best row (the highest test
accuracy with a saved model) names the model and, through its run record, the cache. The new
set is extracted with the reference cache's exact backbone spec (backbone, weights, layer(s),
pooling, preprocessing) through :func:`pipeline.extract_features`, which finds it in the cache
when it is there; a new cache made with another spec is extracted again from its images.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.errors import CacheError, DataError
from pipeline.data.layouts import display
from pipeline.metrics.scoring import class_probabilities
from pipeline.models.backbones import BackboneSpec, resolve_backbone
from pipeline.store.cache import cache_layers_of, open_cache, read_strings
from pipeline.store.persistence import (
    HEAD_SUFFIX,
    NETWORK_SUFFIX,
    SavedHead,
    SavedNetwork,
    load_model,
)
from pipeline.store.run_record import RECORD, read_record

__all__ = ["FEATURE_FIELDS", "Model", "Rows", "find_reference", "load_deployed", "new_rows",
           "read_rows", "reference_spec"]

# The key fields that decide the features; a cache differing in one is extracted again.
FEATURE_FIELDS = ("backbone", "weights", "weights_sha256", "layer", "pool", "preprocessing")
# A head fitted on the reference when none is deployed: the project's default first head.
STAND_IN_HEAD = "logreg"


@dataclass
class Rows:
    """The readable rows of a cache: features, and what is known of each image."""

    path: Path
    X: np.ndarray
    paths: np.ndarray  # relative to root
    root: Path
    labels: np.ndarray | None  # into classes; None for an unlabelled set
    classes: list[str]
    split: np.ndarray | None
    hashes: np.ndarray
    spec: dict
    request: dict
    layers: list[tuple[str, int, int]]

    def take(self, mask: np.ndarray) -> Rows:
        return Rows(self.path, self.X[mask], self.paths[mask], self.root,
                    None if self.labels is None else self.labels[mask], self.classes,
                    None if self.split is None else self.split[mask], self.hashes[mask],
                    self.spec, self.request, self.layers)


def read_rows(path: str | os.PathLike) -> Rows:
    """Every readable row of a complete cache, labelled or not, as float32."""
    with open_cache(path) as f:
        valid = f["valid"][:]
        labelled = "labels" in f
        hashes = (f["content_sha256"][:] if "content_sha256" in f
                  else np.full(len(valid), b"", "S64"))
        return Rows(Path(path), np.asarray(f["features"][:][valid], np.float32),
                    read_strings(f["paths"])[valid], Path(f.attrs["data_root"]),
                    f["labels"][:][valid] if labelled else None,
                    read_strings(f["classes"]).tolist() if labelled else [],
                    read_strings(f["split"])[valid] if labelled else None, hashes[valid],
                    json.loads(f.attrs["spec"]), json.loads(f.attrs.get("request", "{}")),
                    cache_layers_of(f))


@dataclass
class Reference:
    """Where the reference is: its cache, the model to judge (None: fit one), and how it was
    found."""

    cache: Path
    model: Path | None
    notes: list[str] = field(default_factory=list)


def find_reference(against: str | os.PathLike, model: str | os.PathLike | None) -> Reference:
    """The reference cache and model of ``--against`` (a cache, or a results folder)."""
    against = Path(against)
    if against.is_file():
        return Reference(against, Path(model) if model else None)
    if not against.is_dir():
        raise DataError(f"--against {display(str(against))}: no such cache or results folder")
    rows = _model_rows(against)
    if model is not None:
        chosen = [r for r in rows if Path(r["model"]).resolve() == Path(model).resolve()]
        if not chosen:
            raise DataError(f"--model {display(str(model))} is not a model of a results row "
                            f"under {display(str(against))}; give --against its cache instead")
        row = chosen[0]
    elif not rows:
        raise DataError(f"{display(str(against))} holds no results row with a saved model "
                        f"({HEAD_SUFFIX} or {NETWORK_SUFFIX}); run `pipeline heads` there, or "
                        "give --against a feature cache")
    else:
        row = max(rows, key=lambda r: float(r.get("test_accuracy") or 0))
    cache = _row_cache(row)
    note = (f"the deployed model is the best row's, {row['head']} on {row['backbone']} (test "
            f"accuracy {float(row['test_accuracy']):.3f})" if model is None else "")
    return Reference(cache, Path(row["model"]), [note] if note else [])


def _model_rows(folder: Path) -> list[dict]:
    """Results rows under ``folder`` whose saved model exists, each with its run folder."""
    found = []
    for path in sorted(folder.rglob("results.json")):
        parts = path.relative_to(folder).parts
        if "report" in parts[:-1] or "mlruns" in parts or "repeats" in parts:
            continue
        try:
            rows = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        for row in rows if isinstance(rows, list) else []:
            model = _model_file(row, path.parent) if isinstance(row, dict) else None
            if model is not None:
                found.append({**row, "model": str(model), "run": str(path.parent)})
    return found


def _model_file(row: dict, run: Path) -> Path | None:
    """A row's saved model: its path as written (relative to where the stage ran), or the
    file of that name in the run folder's models/ (the folder may have moved)."""
    if not row.get("model"):
        return None
    written = Path(row["model"])
    for candidate in (written, run / written, run / "models" / written.name):
        if candidate.is_file():
            return candidate
    return None


def _row_cache(row: dict) -> Path:
    """The cache a results row was fitted on, from its run's record."""
    record_path = Path(row["run"]) / RECORD
    try:
        record = read_record(record_path)
    except (OSError, ValueError):
        record = {}
    for cache in record.get("caches") or []:
        if cache.get("cache_key") == row.get("cache_key") and Path(cache["cache"]).is_file():
            return Path(cache["cache"])
    raise CacheError(f"the cache of {display(row['model'])} (key {row.get('cache_key', '?')[:8]}) "
                     f"is not where {display(str(record_path))} says; give --against that cache "
                     "and --model the model")


def reference_spec(rows: Rows, offline: bool | None = None) -> BackboneSpec:
    """The backbone that made the reference cache, rebuilt from the request it recorded and
    checked to give the same features."""
    request = dict(rows.request)
    if "backbone" not in request:
        raise CacheError(f"{rows.path} does not record the backbone arguments that made it; "
                         "extract the reference again")
    spec = resolve_backbone(request.pop("backbone"), **request, offline=offline)
    differs = spec_difference(rows.spec, json.loads(json.dumps(spec.key())))
    if differs:
        raise CacheError(f"{rows.path}'s backbone cannot be rebuilt here: {differs}")
    return spec


def spec_difference(reference: dict, other: dict) -> str:
    """The first feature field in which two cache specs differ ("" if none)."""
    for name in FEATURE_FIELDS:
        if reference.get(name) != other.get(name):
            return f"{name}={other.get(name)!r} where the reference has {reference.get(name)!r}"
    return ""


def new_rows(new: str | os.PathLike, reference: Rows, cache_dir: str | os.PathLike,
             device: str, progress) -> tuple[Rows, list[str]]:
    """The features of ``new`` (a folder, manifest or cache) under the reference's spec, and
    what was done to get them (extracted, found, extracted again)."""
    new, notes = Path(new), []
    if new.suffix == ".h5" and new.is_file():
        rows = read_rows(new)
        differs = spec_difference(reference.spec, rows.spec)
        if not differs:
            return rows, [f"NEW's features from its cache {new.name}"]
        notes.append(f"NEW's cache {new.name} was made with {differs}: re-extracted from "
                     f"{display(str(rows.root))} with the reference's spec")
        new = rows.root
    elif not new.exists():
        raise DataError(f"{display(str(new))}: no such image folder, manifest or cache")
    from pipeline.core.options import ExtractOptions
    from pipeline.extract.features import extract_features

    spec = reference_spec(reference)
    result = extract_features(new, backbone=spec,
                              options=ExtractOptions(cache_dir=cache_dir, device=device),
                              progress=progress)
    notes.append(f"NEW's features {'found in' if result.hit else 'extracted into'} "
                 f"{result.cache_path.name}")
    return read_rows(result.cache_path), notes


@dataclass
class Model:
    """The model judged: a head on the features, or a fine-tuned network on the images."""

    name: str
    classes: list[str]
    head_spec: str  # the head a refit on old + new features uses
    estimator: object | None = None  # a head: predict_proba on feature rows
    network: Path | None = None  # a .net: run on image files
    note: str = ""

    def proba(self, rows: Rows, device: str = "auto") -> np.ndarray:
        """``(len(rows), classes)`` probabilities of each row's image."""
        if self.estimator is not None:
            return class_probabilities(self.estimator, rows.X, len(self.classes))
        from pipeline.core.options import PredictOptions
        from pipeline.deploy.predict import predict_images

        files = [rows.root / p for p in rows.paths]
        found = predict_images(self.network, files, progress=False, options=PredictOptions(
            top_k=len(self.classes), device=device)).rows
        index = {c: j for j, c in enumerate(self.classes)}
        proba = np.full((len(files), len(self.classes)), np.nan)
        for i, row in enumerate(found):
            for name, p in row.get("top_k", []):
                proba[i, index[name]] = p
        return proba


def load_deployed(path: Path | None, reference: Rows, train: Rows, val: Rows) -> Model:
    """The model at ``path`` (a .head or .net), or a stand-in head fitted on the reference's
    training split (chosen on validation) when there is none."""
    if path is None:
        from sklearn.utils.validation import has_fit_parameter

        from pipeline.heads import make_head

        head = make_head(STAND_IN_HEAD)
        if has_fit_parameter(head, "X_val") and len(val.labels):
            head.fit(train.X, train.labels, X_val=val.X, y_val=val.labels)
        else:
            head.fit(train.X, train.labels)
        return Model(f"{STAND_IN_HEAD} (fitted here)", reference.classes, STAND_IN_HEAD, head,
                     note=f"no deployed model given: a {STAND_IN_HEAD} head was fitted on the "
                          "reference's training split to stand in for it")
    saved = load_model(path)
    if saved.meta.get("classes") != reference.classes:
        raise DataError(f"{display(str(path))} classifies {len(saved.meta.get('classes', []))} "
                        f"classes, the reference cache {len(reference.classes)} other ones; "
                        "give the cache it was fitted on")
    if isinstance(saved, SavedHead):
        differs = spec_difference(reference.spec, saved.meta.get("spec", {}))
        if differs:
            raise DataError(f"{display(str(path))} was fitted on features with {differs}")
        return Model(path.name, reference.classes, saved.meta.get("head", STAND_IN_HEAD),
                     saved.estimator)
    assert isinstance(saved, SavedNetwork)
    return Model(path.name, reference.classes, STAND_IN_HEAD, network=path)

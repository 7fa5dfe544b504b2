"""Stage 2: fit heads on cached features, score them on the test split, compare in one table."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.utils.validation import has_fit_parameter

from pipeline.core.errors import DataError, PipelineError
from pipeline.core.options import DEFAULT_HEADS, HeadsOptions
from pipeline.core.progress import Progress
from pipeline.heads import HEADS, HeadError, head_name, make_head
from pipeline.heads.layers import probe_layers, write_layer_curve
from pipeline.heads.protocol import chosen_params, wants_layers
from pipeline.metrics.calibration import reliability_curve
from pipeline.metrics.scoring import (
    SCORE_COLUMNS,
    RowPredictions,
    class_probabilities,
    interval_columns,
    per_class_rows,
    positive_class,
    positive_scores,
    results_row,
    with_repeats,
)
from pipeline.metrics.significance import draws_interval
from pipeline.report import plots, tables
from pipeline.store import tracking
from pipeline.store.cache import FeatureSplit, cache_info, cache_kind, cache_spec, read_splits
from pipeline.store.leakage import leaked_test_images
from pipeline.store.persistence import HEAD_SUFFIX, save_head
from pipeline.store.run_record import RECORD, RunRecord, device_name

__all__ = ["DEFAULT_HEADS", "Comparison", "HeadsOptions", "fit_heads"]
# Added to the default heads when a cache holds several layers (pipeline extract --layer).
MULTI_LAYER_HEAD = "multilayer"


@dataclass
class CacheData:
    """The three splits of one feature cache, with what identifies it."""

    path: Path
    info: dict
    train: FeatureSplit
    val: FeatureSplit
    test: FeatureSplit
    # Per test image: an identical image is in train or val (None: the cache has no hashes).
    leaked: np.ndarray | None = None
    excluded: int = 0  # training and validation images left out (HeadsOptions.exclude)

    @property
    def backbone(self) -> str:
        return self.info["spec"]["backbone"]

    @property
    def classes(self) -> list[str]:
        return self.info["classes"]


@dataclass
class Comparison:
    """Rows of the results table, the k-shot table, and the files written."""

    rows: list[dict]
    shots: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # activation caches among the paths
    layers: list[dict] = field(default_factory=list)  # the layer-wise probe curve
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"results": self.rows, "shots": self.shots, "layers": self.layers,
                "files": self.files,
                "skipped_activation_caches": self.skipped}


def feature_caches(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[Path]]:
    """The feature caches among ``paths``, and the activation caches left out.

    Fine-tuning writes its activation caches (block inputs of augmented views) beside the
    feature caches, so ``cache/<backbone>-*.h5`` takes both; heads fitted on them would be
    rows of another experiment in the table.
    """
    kinds = {Path(p): cache_kind(cache_spec(p)) for p in paths}  # attributes only
    features = [p for p, kind in kinds.items() if kind == "features"]
    activations = [p for p, kind in kinds.items() if kind == "activations"]
    if not features:
        raise DataError(f"{activations[0]} is an activation cache written by fine-tuning (block "
                        "inputs of augmented views), not a feature cache", path=activations[0],
                        reason="activation-cache")
    return features, activations


def load_cache_data(path: str | os.PathLike) -> CacheData:
    """Read train/val/test of a cache and refuse splits that no head can be fitted on."""
    info = cache_info(path)
    splits = read_splits(path)
    for name, split in splits.items():
        if len(split.y) == 0:
            raise DataError(f"{path}: the {name} split has no (readable) examples; extract "
                            "again with --split fractions that give it some (such as "
                            "0.8,0.1,0.1)")
    missing = sorted(set(range(len(info["classes"]))) - set(splits["train"].y.tolist()))
    if missing:
        names = ", ".join(info["classes"][i] for i in missing)
        raise DataError(f"{path}: class(es) {names} have no training examples")
    _, leaked = leaked_test_images(path)
    return CacheData(Path(path), info, **splits, leaked=leaked)


def exclude_images(cache: CacheData, listing: str | os.PathLike) -> CacheData:
    """``cache`` without the training and validation images named in the ``path`` column of
    the CSV ``listing`` (such as ``pipeline audit``'s ``label_issues.csv``); test images stay,
    so scores before and after compare on the same test set."""
    import csv

    try:
        with open(listing, newline="") as fh:
            reader = csv.DictReader(fh)
            names = [r["path"] for r in reader] if "path" in (reader.fieldnames or []) else None
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"--exclude {listing}: cannot be read ({err})") from None
    if names is None:
        raise DataError(f"--exclude {listing}: no 'path' column (give a CSV of pipeline audit, "
                        "such as label_issues.csv)")
    names = set(names)
    unknown = names - {p for s in (cache.train, cache.val, cache.test) for p in s.paths}
    if unknown:
        raise DataError(f"--exclude {listing}: {len(unknown)} image(s) not in {cache.path.name}, "
                        f"such as {sorted(unknown)[0]!r}; audit this cache to list its images")

    def kept(split: FeatureSplit) -> FeatureSplit:
        keep = [i for i, p in enumerate(split.paths) if p not in names]
        return FeatureSplit(split.X[keep], split.y[keep], [split.paths[i] for i in keep])

    train, val = kept(cache.train), kept(cache.val)
    if len(val.y) == 0:
        raise DataError(f"--exclude {listing} leaves no validation image of {cache.path.name}")
    excluded = len(cache.train.y) - len(train.y) + len(cache.val.y) - len(val.y)
    return replace(cache, train=train, val=val, excluded=excluded)


def fit_heads(
    caches: Sequence[str | os.PathLike],
    heads: Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    shots: Sequence[int | str] | None = None,
    draws: int | None = None,
    seed: int | None = None,
    repeats: int | None = None,
    *,
    options: HeadsOptions | None = None,
    progress: bool | str | None = None,
    track: bool | tracking.Run | None = None,
) -> Comparison:
    """Fit each head on each cache with the same splits and seed; write tables and plots.

    The settings come from ``options`` (:class:`~pipeline.core.options.HeadsOptions`, whose defaults
    the CLI shows); any of ``heads`` .. ``repeats`` given overrides its field.

    Parameters
    ----------
    caches
        Feature caches (HDF5 files written by :func:`pipeline.extract_features`).
    heads
        Head specs for :func:`pipeline.heads.make_head`: ``logreg``, ``mlp``, ``linear``, or a
        classifier's import path with parameters (``sklearn.svm.LinearSVC:C=0.1``).
    out
        Folder of ``results.csv|md|json`` (each score with its 95% interval),
        ``per_class.csv``, ``confusion_matrix.png`` and ``reliability.png`` (best head),
        ``comparison.png``, ``models/*.head``, ``predictions/*.npz`` (each head's test
        predictions, :class:`~pipeline.metrics.scoring.RowPredictions`), with ``shots``,
        ``shots.csv|md|png``, and with ``repeats`` above 1, ``repeats.csv|md``.
    shots
        Training examples per class for the data-efficiency curve (``"all"`` for the full set).
    draws
        Random draws of the k-shot training set per k.
    seed
        Seed of every head and every draw: the same seed gives the same table.
    repeats
        Fits of each head with seeds ``seed``, ``seed + 1``, ... on the same splits; above 1,
        each row adds the mean, standard deviation and t-interval of its test accuracy over
        the seeds (its scores and predictions stay those of ``seed``).
    progress
        Fits done: a bar where stderr is a terminal, elsewhere a line every 30 s and at the
        end (:mod:`pipeline.core.progress`); False: nothing.
    track
        Log each head fit to MLflow (:mod:`pipeline.store.tracking`), nested under one run of the
        whole call; None: only when ``MLFLOW_TRACKING_URI`` is set.

    Notes
    -----
    ``out/run.json`` records the call (:mod:`pipeline.store.run_record`).
    """
    given = {"heads": heads, "out": out, "shots": shots, "draws": draws, "seed": seed,
             "repeats": repeats}
    opts = replace(options or HeadsOptions(), **{k: v for k, v in given.items() if v is not None})
    heads, shots, draws, seed, out = opts.heads, opts.shots, opts.draws, opts.seed, Path(opts.out)
    if opts.repeats < 1:
        raise PipelineError("repeats must be at least 1")
    caches, skipped = feature_caches(caches)
    data = [load_cache_data(path) for path in caches]
    if tuple(heads) == DEFAULT_HEADS and any(cache.info.get("layers") for cache in data):
        heads = [*heads, MULTI_LAYER_HEAD]
    estimators = [(spec, make_head(spec)) for spec in heads]  # bad specs fail before any fit
    if opts.exclude is not None:
        data = [exclude_images(cache, opts.exclude) for cache in data]
    for cache in data:  # a wrong --positive fails before any fit
        positive_class(cache.classes, opts.positive)
    record = RunRecord("heads", opts, seed).with_caches(caches)
    shot_fits = sum(1 if k == "all" else draws for k in shots)
    fits = len(data) * len(estimators) * (opts.repeats + shot_fits)
    parent = tracking.start(track, out.parent, out.name, "heads")
    with tracking.ending(parent), Progress(fits, "heads", "fit", progress=progress) as bar:
        result = _compare(data, estimators, opts, out, bar, parent)
        result.skipped = [str(p) for p in skipped]
        files = [*result.files.values(), out / "results.json", *(r["model"] for r in result.rows),
                 *(out / r["predictions"] for r in result.rows)]
        record.update(device=_device(), tracking=parent.describe() if parent else None)
        files.append(record.write(out / RECORD, files))
        tracking.log_heads(parent, opts, result.rows, files)
    return result


def _compare(data: list[CacheData], estimators: list, opts: HeadsOptions, out: Path,
             bar: Progress, parent: tracking.Run | None) -> Comparison:
    """Fit, score and save every head on every cache; the tables and plots."""
    seed, shots, draws = opts.seed, opts.shots, opts.draws
    rows, per_class, per_seed, best = [], [], [], None
    for cache in data:
        for spec, template in estimators:
            started = time.time()
            estimator, row, proba, y_pred = _fit_and_score(cache, spec, template, seed,
                                                           positive=opts.positive)
            bar.update(1)
            if opts.repeats > 1:
                seeds = [row] + [_fit_and_score(cache, spec, template, seed + r, False)[1]
                                 for r in range(1, opts.repeats)]
                bar.update(opts.repeats - 1)
                per_seed += [_seed_row(r, seed + i) for i, r in enumerate(seeds)]
                row = with_repeats(row, [r["test_accuracy"] for r in seeds])
            if opts.exclude is not None:
                row["excluded"] = cache.excluded
            row["model"] = str(_save(out, cache, spec, estimator))
            row["predictions"] = _save_predictions(out, cache, spec, proba, y_pred)
            rows.append(row)
            tracking.log_head_fit(parent, row, estimator, out, seed, started)
            per_class += per_class_rows(cache.test.y, y_pred, cache.classes,
                                        backbone=cache.backbone, head=row["head"])
            if best is None or row["test_accuracy"] > best[0]["test_accuracy"]:
                best = (row, cache, y_pred, proba)
    result = Comparison(rows)
    result.files = _write_results(out, rows, per_class, best)
    if per_seed:
        result.files.update(zip(("repeats_csv", "repeats_md"),
                                map(str, tables.write_table(per_seed, out / "repeats"))))
    if shots:
        result.shots = data_efficiency(data, estimators, shots, draws, seed, bar.update)
        result.files.update(_write_shots(out, result.shots))
    if any(cache.info.get("layers") for cache in data):
        result.layers = probe_layers(data, seed)
        result.files.update(write_layer_curve(result.layers, out))
    return result


def _device() -> str:
    """Where the heads ran: torch's device for the torch heads (MLP, linear probe), the CPU
    for scikit-learn's alone."""
    if "torch" not in sys.modules:
        return "cpu"
    from pipeline.core.devices import resolve_device

    return device_name(resolve_device("auto"))


def _fit_and_score(cache: CacheData, spec: str, template, seed: int, intervals: bool = True,
                   positive: str | None = None):
    """Fit one head, score it on the test split: the estimator, its row, probabilities and
    predictions."""
    estimator = clone(template)
    params = estimator.get_params()
    if "random_state" in params:
        estimator.set_params(random_state=seed)
    if wants_layers(estimator) and cache.info.get("layers"):
        estimator.set_params(layers=[tuple(span) for span in cache.info["layers"]])
    started = time.perf_counter()
    try:
        _fit(estimator, cache.train, cache.val)
    except (ValueError, TypeError) as err:
        if head_name(spec) in HEADS:  # ours: a bug, raised with its traceback
            raise
        # Another library's classifier that refuses its parameters together (each one passed
        # make_head's checks) or the data: the user's choice of head, said in one line.
        raise HeadError(f"head {spec!r} could not be fitted on {cache.path.name}: "
                        f"{' '.join(str(err).split())}") from err
    fit_s = time.perf_counter() - started
    started = time.perf_counter()
    proba = class_probabilities(estimator, cache.test.X, len(cache.classes))
    y_pred = proba.argmax(1) if proba is not None else estimator.predict(cache.test.X)
    predict_s = time.perf_counter() - started
    row = results_row(
        backbone=cache.backbone, head=head_name(spec), chosen=_chosen(estimator, spec),
        y_true=cache.test.y, y_pred=y_pred, proba=proba, n_classes=len(cache.classes),
        fit_s=fit_s, predict_s=predict_s, train_n=len(cache.train.y), test_n=len(cache.test.y),
        cache_key=cache.info["key"], method="transfer", intervals=intervals,
        **positive_scores(cache.test.y, y_pred, cache.classes, positive))
    return estimator, row, proba, y_pred


def _seed_row(row: dict, seed: int) -> dict:
    """One line of ``repeats.csv``: a head's scores with one seed."""
    return {"backbone": row["backbone"], "head": row["head"], "seed": seed,
            "chosen": row["chosen"], **{k: row[k] for k in SCORE_COLUMNS},
            "cache_key": row["cache_key"]}


def _fit(estimator, train: FeatureSplit, val: FeatureSplit) -> None:
    # Our heads choose hyperparameters on the cache's own validation split; any other
    # scikit-learn classifier is fitted on train with the parameters it was given.
    if has_fit_parameter(estimator, "X_val"):
        estimator.fit(train.X, train.y, X_val=val.X, y_val=val.y)
    else:
        estimator.fit(train.X, train.y)


def _chosen(estimator, spec: str) -> str:
    """What the head chose on validation data; for a head that does not say, its spec's
    parameters."""
    found = chosen_params(estimator)
    if not found:
        return spec.partition(":")[2]
    return ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in found.items())


def _save(out: Path, cache: CacheData, spec: str, estimator) -> Path:
    meta = {"head": spec, "backbone": cache.backbone, "classes": cache.classes,
            "dim": int(cache.train.X.shape[1]), "cache_key": cache.info["key"],
            "spec": cache.info["spec"], "request": cache.info["request"]}
    return save_head(out / "models" / f"{_name(cache, spec)}{HEAD_SUFFIX}", estimator, meta)


def _name(cache: CacheData, spec: str) -> str:
    # The key keeps apart heads of one backbone on different caches (image size, data, ...).
    return f"{cache.backbone}-{cache.info['key'][:8]}-{head_name(spec)}".replace("/", "_")


def _save_predictions(out: Path, cache: CacheData, spec: str, proba, y_pred) -> str:
    """Store a head's test predictions; the path returned is relative to ``out``."""
    relative = Path("predictions") / f"{_name(cache, spec)}.npz"
    RowPredictions(cache.test.paths, cache.test.y, y_pred, proba, cache.leaked,
                   cache.classes).save(out / relative)
    return relative.as_posix()


def _write_results(out: Path, rows: list[dict], per_class: list[dict], best) -> dict:
    csv, md = tables.write_table(rows, out / "results")
    files = {"results_csv": str(csv), "results_md": str(md)}
    files["per_class"] = str(tables.write_table(per_class, out / "per_class")[0])
    labels = [f"{r['backbone']} / {r['head']}" for r in rows]
    files["comparison_png"] = str(plots.interval_chart(
        labels, [r["test_accuracy"] for r in rows], out / "comparison.png",
        "Heads on frozen features: test accuracy (95% interval)",
        intervals=[[r[c] for c in interval_columns("test_accuracy")] for r in rows]))
    row, cache, y_pred, proba = best
    name = f"{row['backbone']} / {row['head']}"
    files["confusion_png"] = str(plots.confusion_matrix_plot(
        cache.test.y, y_pred, cache.classes, out / "confusion_matrix.png",
        f"Best head: {name} (accuracy {row['test_accuracy']:.3f})"))
    if proba is not None:
        files["reliability_png"] = str(plots.reliability_diagram(
            {name: reliability_curve(cache.test.y, proba)}, out / "reliability.png",
            "Calibration of the best head on the test split"))
    (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    return files


# --- data efficiency ---------------------------------------------------------------------------

def sample_shots(y: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``k`` training examples per class (all of a class that has fewer)."""
    picked = [rng.permutation(np.flatnonzero(y == c))[:k] for c in np.unique(y)]
    return np.sort(np.concatenate(picked))


def data_efficiency(data: Sequence[CacheData], estimators, shots: Sequence[int | str],
                    draws: int, seed: int, on_fits: Callable[[int], None] | None = None
                    ) -> list[dict]:
    """Test accuracy of each head refitted on k examples per class, over seeded draws.

    Only the training split is subsampled; validation and test stay whole and untouched.
    Each row gives the mean and standard deviation over draws and a 95% interval of the
    mean that holds both the draws' spread and the test images' sampling
    (:func:`pipeline.metrics.significance.draws_interval`). ``on_fits`` is called with the number
    of fits after each k's draws.
    """
    rows = []
    for cache in data:
        for spec, template in estimators:
            for k in shots:
                correct = _shot_correct(cache, spec, template, k, draws, seed)
                if on_fits is not None:
                    on_fits(len(correct))
                scores = correct.mean(1)
                low, high = draws_interval(correct)
                largest = int(np.bincount(cache.train.y).max())
                rows.append({"backbone": cache.backbone, "head": head_name(spec),
                             "shots": "all" if k == "all" else int(k),
                             "k": largest if k == "all" else min(int(k), largest),
                             "draws": len(scores),
                             "mean_accuracy": float(np.mean(scores)),
                             "std_accuracy": float(np.std(scores)),
                             "accuracy_ci_low": low, "accuracy_ci_high": high})
    return rows


def _shot_correct(cache: CacheData, spec: str, template, k, draws: int, seed: int
                  ) -> np.ndarray:
    """``(draws, test images)``: whether each draw's head got each test image right."""
    if k == "all":
        return _fit_and_score(cache, spec, template, seed, False)[3][None] == cache.test.y
    correct = []
    for draw in range(draws):
        rng = np.random.default_rng([seed, int(k), draw])
        keep = sample_shots(cache.train.y, int(k), rng)
        subset = FeatureSplit(cache.train.X[keep], cache.train.y[keep],
                              [cache.train.paths[i] for i in keep])
        shot_cache = CacheData(cache.path, cache.info, subset, cache.val, cache.test)
        y_pred = _fit_and_score(shot_cache, spec, template, seed + draw, False)[3]
        correct.append(y_pred == cache.test.y)
    return np.array(correct)


def _write_shots(out: Path, rows: list[dict]) -> dict:
    csv, md = tables.write_table(rows, out / "shots")
    series: dict[str, tuple[list, list, list, list]] = {}
    for r in rows:  # "all" is drawn at k = the largest class's training size
        xs, means, lows, highs = series.setdefault(f"{r['backbone']} / {r['head']}",
                                                   ([], [], [], []))
        xs.append(r["k"])
        means.append(r["mean_accuracy"])
        lows.append(r["accuracy_ci_low"])
        highs.append(r["accuracy_ci_high"])
    png = plots.curve_plot(series, out / "shots.png", "Data efficiency: accuracy against "
                            "training examples per class", "examples per class (k)",
                            "test accuracy (mean over draws, 95% interval)", log_x=True)
    return {"shots_csv": str(csv), "shots_md": str(md), "shots_png": str(png)}

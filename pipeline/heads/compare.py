"""Stage 2: fit heads on cached features, score them on the test split, compare in one table."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.utils.validation import has_fit_parameter

from pipeline.core.atomic import write_json
from pipeline.core.contract import Result, to_plain
from pipeline.core.errors import DataError
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

__all__ = ["DEFAULT_HEADS", "HeadFit", "HeadsOptions", "HeadsResult", "fit_heads"]
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
class HeadFit:
    """One fitted head of the table: what :meth:`HeadsResult.write` saves and logs of it."""

    estimator: object
    name: str  # file stem of its .head and .npz: backbone, cache key, head
    meta: dict  # the .head file's header (pipeline.store.persistence)
    predictions: RowPredictions  # on the test split
    started: float  # time.time() when its fit began (the MLflow run's start)


@dataclass
class HeadsResult(Result):
    """What :func:`fit_heads` fitted and scored; :meth:`write` puts the tables, plots, saved
    heads and test predictions in a folder."""

    rows: list[dict]  # the results table, one row per cache and head
    shots: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # activation caches among the paths
    layers: list[dict] = field(default_factory=list)  # the layer-wise probe curve
    # The files of the last write(out), by kind; empty until the result is written.
    files: dict[str, str] = field(default_factory=dict)
    # What the files hold beside the table (not in to_json): the options, each head fitted,
    # the per-class and per-seed rows, the best row's test predictions, the run record.
    options: HeadsOptions = field(default_factory=HeadsOptions, repr=False)
    fits: list[HeadFit] = field(default_factory=list, repr=False)
    per_class: list[dict] = field(default_factory=list, repr=False)
    per_seed: list[dict] = field(default_factory=list, repr=False)
    best: tuple | None = field(default=None, repr=False)  # (row, classes, y_true, y_pred, proba)
    record: RunRecord | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        """``results``, ``shots``, ``layers``, ``files``, ``skipped_activation_caches``."""
        return to_plain({"results": self.rows, "shots": self.shots, "layers": self.layers,
                         "files": self.files, "skipped_activation_caches": self.skipped})

    def write(self, out: str | os.PathLike, *,
              track: bool | tracking.Run | None = None) -> list[Path]:
        """Write the fitted heads and their comparison into the folder ``out``.

        ``results.csv|md|json`` (each score with its 95% interval), ``per_class.csv``,
        ``comparison.png``, ``confusion_matrix.png`` and ``reliability.png`` (best head),
        ``models/*.head``, ``predictions/*.npz`` (each head's test predictions,
        :class:`~pipeline.metrics.scoring.RowPredictions`), with repeats ``repeats.csv|md``,
        with shots ``shots.csv|md|png``, for a multi-layer cache ``layers.csv|md|png``, and
        ``run.json`` (:mod:`pipeline.store.run_record`). Each row's ``model`` becomes the path
        of its saved head under ``out``.

        ``track`` logs each head and the whole comparison to MLflow
        (:mod:`pipeline.store.tracking`); None: only when ``MLFLOW_TRACKING_URI`` is set.
        """
        out = Path(out)
        record = self.record or RunRecord("heads", self.options, self.options.seed)
        started = record.started
        parent = tracking.start(track, out.parent, out.name, "heads", start_time=started)
        with tracking.ending(parent):
            for row, fit in zip(self.rows, self.fits):
                row["model"] = str(save_head(out / _model_path(fit.name), fit.estimator,
                                             fit.meta))
            files = self._write_files(out)
            written = [*files.values(), out / "results.json", out / "per_class.md",
                       *(r["model"] for r in self.rows),
                       *(out / r["predictions"] for r in self.rows)]
            # The record says where the files went, as the settings did when they held --out.
            record.update(settings={**record.fields["settings"], "out": str(out)},
                          device=_device(), tracking=parent.describe() if parent else None)
            files["run_record"] = str(record.write(out / RECORD, written))
            for row, fit in zip(self.rows, self.fits):
                tracking.log_head_fit(parent, row, fit.estimator, out, self.options.seed,
                                      fit.started)
            tracking.log_heads(parent, self.options, self.rows, [*written, out / RECORD])
        self.files = {k: v for k, v in files.items() if k != "run_record"}
        return [Path(f) for f in [*written, out / RECORD]]

    def _write_files(self, out: Path) -> dict[str, str]:
        """The predictions, tables and plots; their paths by kind."""
        for row, fit in zip(self.rows, self.fits):
            fit.predictions.save(out / row["predictions"])
        files = _write_results(out, self.rows, self.per_class, self.best)
        if self.per_seed:
            files.update(zip(("repeats_csv", "repeats_md"),
                             map(str, tables.write_table(self.per_seed, out / "repeats"))))
        if self.shots:
            files.update(_write_shots(out, self.shots))
        if self.layers:
            files.update(write_layer_curve(self.layers, out))
        return files


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
                            "again with split fractions that give it some (such as "
                            "0.8,0.1,0.1)", path=path, split=name, reason="empty-split")
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
        raise DataError(f"exclude list {listing}: cannot be read ({err})",
                        path=listing) from None
    if names is None:
        raise DataError(f"exclude list {listing}: no 'path' column (give a CSV of pipeline "
                        "audit, such as label_issues.csv)", path=listing)
    names = set(names)
    unknown = names - {p for s in (cache.train, cache.val, cache.test) for p in s.paths}
    if unknown:
        raise DataError(f"exclude list {listing}: {len(unknown)} image(s) not in "
                        f"{cache.path.name}, such as {sorted(unknown)[0]!r}; audit this cache "
                        "to list its images", path=listing, unknown=len(unknown))

    def kept(split: FeatureSplit) -> FeatureSplit:
        keep = [i for i, p in enumerate(split.paths) if p not in names]
        return FeatureSplit(split.X[keep], split.y[keep], [split.paths[i] for i in keep])

    train, val = kept(cache.train), kept(cache.val)
    if len(val.y) == 0:
        raise DataError(f"exclude list {listing} leaves no validation image of "
                        f"{cache.path.name}", path=listing)
    excluded = len(cache.train.y) - len(train.y) + len(cache.val.y) - len(val.y)
    return replace(cache, train=train, val=val, excluded=excluded)


def fit_heads(
    caches: Sequence[str | os.PathLike],
    *,
    options: HeadsOptions = HeadsOptions(),
    progress: bool | str | None = None,
) -> HeadsResult:
    """Fit each head on each cache with the same splits and seed; score and compare them.

    Computes and writes nothing: ``result.write(out)`` writes the tables, plots, saved heads
    and test predictions (:meth:`HeadsResult.write`).

    Parameters
    ----------
    caches
        Feature caches (HDF5 files written by :func:`pipeline.extract_features`); activation
        caches among them are skipped and listed.
    options
        :class:`~pipeline.core.options.HeadsOptions` (whose defaults the CLI shows):
        ``heads``, specs for :func:`pipeline.heads.make_head` (``logreg``, ``mlp``,
        ``linear``, or a classifier's import path with parameters,
        ``sklearn.svm.LinearSVC:C=0.1``); ``shots``, training examples per class for the
        data-efficiency curve (``"all"`` for the full set) with ``draws`` random draws per
        k; ``seed`` of every head and draw (the same seed gives the same table);
        ``repeats``, fits of each head with seeds ``seed``, ``seed + 1``, ... on the same
        splits (above 1, each row adds the mean, standard deviation and t-interval of its
        test accuracy over the seeds; its scores and predictions stay those of ``seed``);
        ``positive``, a two-class problem's positive class; ``exclude``, a CSV of training
        and validation images to leave out.
    progress
        Fits done: a bar where stderr is a terminal, elsewhere a line every 30 s and at the
        end (:mod:`pipeline.core.progress`); False: nothing.

    Returns
    -------
    HeadsResult
        The results rows (``model`` and ``predictions`` relative to the folder the result is
        written to, until it is), the k-shot rows, the layer-wise probe curve of a
        multi-layer cache, and the fitted heads.
    """
    opts = options
    caches, skipped = feature_caches(caches)
    data = [load_cache_data(path) for path in caches]
    heads = opts.heads
    if tuple(heads) == DEFAULT_HEADS and any(cache.info.get("layers") for cache in data):
        heads = [*heads, MULTI_LAYER_HEAD]
    estimators = [(spec, make_head(spec)) for spec in heads]  # bad specs fail before any fit
    if opts.exclude is not None:
        data = [exclude_images(cache, opts.exclude) for cache in data]
    for cache in data:  # a wrong --positive fails before any fit
        positive_class(cache.classes, opts.positive)
    record = RunRecord("heads", opts, opts.seed).with_caches(caches)
    shot_fits = sum(1 if k == "all" else opts.draws for k in opts.shots)
    fits = len(data) * len(estimators) * (opts.repeats + shot_fits)
    with Progress(fits, "heads", "fit", progress=progress) as bar:
        result = _compare(data, estimators, opts, bar)
    result.skipped = [str(p) for p in skipped]
    result.record = record
    return result


def _compare(data: list[CacheData], estimators: list, opts: HeadsOptions,
             bar: Progress) -> HeadsResult:
    """Fit and score every head on every cache; the rows of every table."""
    seed, shots, draws = opts.seed, opts.shots, opts.draws
    result = HeadsResult([], options=opts)
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
                result.per_seed += [_seed_row(r, seed + i) for i, r in enumerate(seeds)]
                row = with_repeats(row, [r["test_accuracy"] for r in seeds])
            if opts.exclude is not None:
                row["excluded"] = cache.excluded
            name = _name(cache, spec)
            row["model"] = _model_path(name).as_posix()  # under the folder written to
            row["predictions"] = (Path("predictions") / f"{name}.npz").as_posix()
            result.rows.append(row)
            result.fits.append(HeadFit(
                estimator, name, _meta(cache, spec),
                RowPredictions(cache.test.paths, cache.test.y, y_pred, proba, cache.leaked,
                               cache.classes), started))
            result.per_class += per_class_rows(cache.test.y, y_pred, cache.classes,
                                               backbone=cache.backbone, head=row["head"])
            if result.best is None or row["test_accuracy"] > result.best[0]["test_accuracy"]:
                result.best = (row, cache.classes, cache.test.y, y_pred, proba)
    if shots:
        result.shots = data_efficiency(data, estimators, shots, draws, seed, bar.update)
    if any(cache.info.get("layers") for cache in data):
        result.layers = probe_layers(data, seed)
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


def _meta(cache: CacheData, spec: str) -> dict:
    """What a saved head records of where it came from (:mod:`pipeline.store.persistence`)."""
    return {"head": spec, "backbone": cache.backbone, "classes": cache.classes,
            "dim": int(cache.train.X.shape[1]), "cache_key": cache.info["key"],
            "spec": cache.info["spec"], "request": cache.info["request"]}


def _model_path(name: str) -> Path:
    """A saved head's path under the folder the result is written to."""
    return Path("models") / f"{name}{HEAD_SUFFIX}"


def _name(cache: CacheData, spec: str) -> str:
    # The key keeps apart heads of one backbone on different caches (image size, data, ...).
    return f"{cache.backbone}-{cache.info['key'][:8]}-{head_name(spec)}".replace("/", "_")


def _write_results(out: Path, rows: list[dict], per_class: list[dict], best) -> dict:
    csv, md = tables.write_table(rows, out / "results")
    files = {"results_csv": str(csv), "results_md": str(md)}
    files["per_class"] = str(tables.write_table(per_class, out / "per_class")[0])
    labels = [f"{r['backbone']} / {r['head']}" for r in rows]
    files["comparison_png"] = str(plots.interval_chart(
        labels, [r["test_accuracy"] for r in rows], out / "comparison.png",
        "Heads on frozen features: test accuracy (95% interval)",
        intervals=[[r[c] for c in interval_columns("test_accuracy")] for r in rows]))
    row, classes, y_true, y_pred, proba = best
    name = f"{row['backbone']} / {row['head']}"
    files["confusion_png"] = str(plots.confusion_matrix_plot(
        y_true, y_pred, classes, out / "confusion_matrix.png",
        f"Best head: {name} (accuracy {row['test_accuracy']:.3f})"))
    if proba is not None:
        files["reliability_png"] = str(plots.reliability_diagram(
            {name: reliability_curve(y_true, proba)}, out / "reliability.png",
            "Calibration of the best head on the test split"))
    write_json(out / "results.json", rows)
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

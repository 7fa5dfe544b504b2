"""Scores on the test split, the results row every stage writes, probabilities over all classes.

Heads (stage 2) and fine-tunes (stage 3) write rows of one table: ``pipeline report`` puts them
side by side, so both build their rows here, with the same columns in the same order, and both
store the row's test predictions here (:class:`RowPredictions`), so that the report can
compare rows image by image.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    classification_report,
    f1_score,
    log_loss,
)

from pipeline.core.atomic import atomic_write
from pipeline.core.errors import OptionError
from pipeline.metrics.calibration import expected_calibration_error
from pipeline.metrics.significance import score_intervals, seed_interval

SCORE_COLUMNS = ("test_accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece")
# Two-class data only: the positive class, its recall and its false-negative rate.
POSITIVE_COLUMNS = ("positive_class", "positive_recall", "false_negative_rate")
PREDICTIONS_FORMAT = "pipeline-predictions"
PREDICTIONS_VERSION = 1


def interval_columns(metric: str) -> tuple[str, str]:
    """The columns of ``metric``'s 95% interval: ``<metric>_ci_low``, ``<metric>_ci_high``."""
    return f"{metric}_ci_low", f"{metric}_ci_high"


def class_probabilities(estimator, X: np.ndarray, n_classes: int) -> np.ndarray | None:
    """``estimator.predict_proba(X)`` with one column per class of the data, by label.

    An estimator fitted on some of the classes only (a k-shot draw that missed one, say) has a
    column for each of its ``classes_``; each is put at its label's position, so column ``j``
    is always class ``j``, and a class the estimator never saw gets probability 0.

    Parameters
    ----------
    estimator
        A fitted classifier whose ``classes_`` are integer labels in ``range(n_classes)``.
    X
        Rows of features.
    n_classes
        Classes of the data set.

    Returns
    -------
    numpy.ndarray or None
        ``(len(X), n_classes)`` float64 probabilities, or None for an estimator without
        ``predict_proba``.
    """
    if not hasattr(estimator, "predict_proba"):
        return None
    full = np.zeros((len(X), n_classes))
    full[:, np.asarray(estimator.classes_).astype(int)] = estimator.predict_proba(X)
    return full


def score_predictions(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None,
                n_classes: int) -> dict:
    """Accuracy, balanced accuracy, macro F1, log loss and expected calibration error.

    The log loss and the calibration error (:mod:`pipeline.metrics.calibration`) are NaN without
    probabilities.

    Parameters
    ----------
    y_true, y_pred
        Integer labels of the test split and the predicted ones.
    proba
        ``(n, n_classes)`` class probabilities (rows are renormalised: a float32 softmax or
        head sums to 1 only within 1e-7, and ``log_loss`` checks the sums in float64), or None.
    n_classes
        Classes of the data set: the log loss counts every class, even one absent from
        ``y_true``.
    """
    if proba is None:
        loss = ece = float("nan")
    else:
        loss = log_loss(y_true, proba / proba.sum(1, keepdims=True), labels=np.arange(n_classes))
        ece = expected_calibration_error(y_true, proba)
    return {
        "test_accuracy": accuracy_score(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
        "macro_f1": f1_score(y_true, y_pred, average="macro"),
        "log_loss": loss,
        "ece": ece,
    }


def scores_with_intervals(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None,
                          n_classes: int) -> dict:
    """Each score of :func:`score_predictions` followed by its 95% interval.

    Accuracy gets the exact binomial interval, the others a bootstrap over the test images
    (:func:`pipeline.metrics.significance.score_intervals`, seeded: the same predictions always get
    the same interval).
    """
    scores = score_predictions(y_true, y_pred, proba, n_classes)
    intervals = score_intervals(y_true, y_pred, proba, n_classes)
    out = {}
    for name in SCORE_COLUMNS:
        out[name] = scores[name]
        out.update(zip(interval_columns(name), intervals[name]))
    return out


def results_row(*, backbone: str, head: str, chosen: str, y_true: np.ndarray,
                y_pred: np.ndarray, proba: np.ndarray | None, n_classes: int, fit_s: float,
                predict_s: float, cache_key: str, method: str, intervals: bool = True,
                **extra) -> dict:
    """One row of a results table: what was fitted, its test scores, timings, then ``extra``.

    Parameters
    ----------
    backbone, head, chosen
        The backbone's name, the head's (``logreg``, ``finetune-1``) and the hyperparameters it
        chose on the validation split.
    y_true, y_pred, proba, n_classes
        As for :func:`score_predictions`.
    fit_s, predict_s
        Seconds to fit, and to predict the test split (NaN where not measured).
    cache_key
        The feature cache whose test split was scored: rows of one key are comparable.
    method
        ``"transfer"`` (a head on frozen features) or ``"fine-tune"``.
    intervals
        Follow each score with its 95% interval (:func:`scores_with_intervals`); without,
        the scores alone (k-shot draws, which are summarised over draws instead).
    **extra
        Columns of the stage (sizes, epochs), placed after the timings in the order given.
    """
    return {
        "backbone": backbone,
        "head": head,
        "chosen": chosen,
        **(scores_with_intervals if intervals else score_predictions)(
            y_true, y_pred, proba, n_classes),
        "fit_s": fit_s,
        "predict_s": predict_s,
        **extra,
        "cache_key": cache_key,
        "method": method,
    }


def per_class_rows(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str],
                   **identity) -> list[dict]:
    """Precision, recall, F1 and support of each class on the test split, one row per class,
    each led by ``identity`` (backbone, head): the rows of ``per_class.csv``."""
    table = classification_report(y_true, y_pred, labels=np.arange(len(classes)),
                                  target_names=classes, output_dict=True, zero_division=0)
    return [{**identity, "class": name, "precision": table[name]["precision"],
             "recall": table[name]["recall"], "f1": table[name]["f1-score"],
             "support": int(table[name]["support"])} for name in classes]


def positive_class(classes: list[str], positive: str | None) -> int | None:
    """The label of a two-class problem's positive class: ``positive``, by default the second
    class (as scikit-learn's ``pos_label=1``); None for more classes and no ``positive``."""
    if positive is None:
        return 1 if len(classes) == 2 else None
    # The option as the stages take it (HeadsOptions, FinetuneOptions): its range is the
    # data's classes, known only here.
    if len(classes) != 2:
        raise OptionError("positive", positive, f"unset for data of {len(classes)} classes (a "
                                                "positive class is for two-class data)")
    if positive not in classes:
        raise OptionError("positive", positive,
                          f"one of the classes, {', '.join(map(repr, classes))}")
    return classes.index(positive)


def positive_scores(y_true: np.ndarray, y_pred: np.ndarray, classes: list[str],
                    positive: str | None = None) -> dict:
    """A two-class problem's positive class, its recall (sensitivity) and false-negative rate
    (the positives called negative, 1 - recall); empty for more classes. A screening task
    reads these first: a missed positive usually costs more than a false alarm."""
    label = positive_class(classes, positive)
    if label is None:
        return {}
    positives = np.asarray(y_true) == label
    recall = float(np.mean(np.asarray(y_pred)[positives] == label)) if positives.any() else np.nan
    return {"positive_class": classes[label], "positive_recall": recall,
            "false_negative_rate": 1.0 - recall}


def with_repeats(row: dict, accuracies) -> dict:
    """``row`` with the test accuracy of every seed summarised beside its single-run interval.

    Adds ``repeats``, ``test_accuracy_seeds_mean``, ``_seeds_std``, ``_seeds_ci_low`` and
    ``_seeds_ci_high`` (:func:`pipeline.metrics.significance.seed_interval`) right after
    ``test_accuracy_ci_high``. The row's own scores stay those of its first seed.

    Parameters
    ----------
    row
        A row of :func:`results_row` (with intervals).
    accuracies
        Test accuracy of each seed, the row's own first.
    """
    summary = seed_interval(accuracies)
    added = {"repeats": len(accuracies),
             **{f"test_accuracy_seeds_{k}": v for k, v in summary.items()}}
    out = {}
    for key, value in row.items():
        out[key] = value
        if key == interval_columns("test_accuracy")[1]:
            out.update(added)
    return out


@dataclass
class RowPredictions:
    """A results row's predictions for its test images, stored beside its ``results.json``.

    Rows of one cache key are scored on the same test images in the same order (the cache's
    readable test rows), so ``pipeline report`` pairs them image by image from these files.
    """

    paths: np.ndarray  # (n,) str: each test image, relative to the data root
    y_true: np.ndarray  # (n,) int64 label
    y_pred: np.ndarray  # (n,) int64 prediction
    proba: np.ndarray | None  # (n, classes) float32, None for a head without predict_proba
    # (n,) bool: an identical image (same bytes) is in train or val; None: not recorded
    leaked: np.ndarray | None
    classes: list[str]

    def save(self, path: str | os.PathLike) -> Path:
        """Write a compressed ``.npz`` (:func:`numpy.load` reads it), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = {"format": np.array(PREDICTIONS_FORMAT),
                  "format_version": np.array(PREDICTIONS_VERSION),
                  "path": np.asarray(self.paths, dtype=str),
                  "label": np.asarray(self.y_true, np.int64),
                  "prediction": np.asarray(self.y_pred, np.int64),
                  "classes": np.asarray(self.classes, dtype=str)}
        if self.proba is not None:
            arrays["proba"] = np.asarray(self.proba, np.float32)
        if self.leaked is not None:
            arrays["leaked"] = np.asarray(self.leaked, bool)
        sizes = {len(arrays[k]) for k in ("path", "label", "prediction", "proba", "leaked")
                 if k in arrays}
        if len(sizes) != 1:  # a bug: these are paired by position
            raise ValueError(f"predictions of unequal lengths {sorted(sizes)}")
        with atomic_write(path) as fh:  # a file object: savez would append .npz to the name
            np.savez_compressed(fh, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> RowPredictions:
        """Read a file :meth:`save` wrote (no pickles: plain arrays only)."""
        with np.load(path, allow_pickle=False) as f:
            if "format" not in f or str(f["format"]) != PREDICTIONS_FORMAT:
                raise ValueError(f"{path} is not a {PREDICTIONS_FORMAT} file")
            return cls(f["path"], f["label"], f["prediction"], f.get("proba"), f.get("leaked"),
                       f["classes"].tolist())

"""Scores on the test split, the results row every stage writes, probabilities over all classes.

Heads (stage 2) and fine-tunes (stage 3) write rows of one table: ``pipeline report`` puts them
side by side, so both build their rows here, with the same columns in the same order.
"""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss

SCORE_COLUMNS = ("test_accuracy", "balanced_accuracy", "macro_f1", "log_loss")


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
    """Accuracy, balanced accuracy, macro F1 and log loss (NaN without probabilities).

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
        loss = float("nan")
    else:
        loss = log_loss(y_true, proba / proba.sum(1, keepdims=True), labels=np.arange(n_classes))
    return {
        "test_accuracy": accuracy_score(y_true, y_pred),
        "balanced_accuracy": balanced_accuracy_score(y_true, y_pred),
        "macro_f1": f1_score(y_true, y_pred, average="macro"),
        "log_loss": loss,
    }


def results_row(*, backbone: str, head: str, chosen: str, y_true: np.ndarray,
                y_pred: np.ndarray, proba: np.ndarray | None, n_classes: int, fit_s: float,
                predict_s: float, cache_key: str, method: str, **extra) -> dict:
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
    **extra
        Columns of the stage (sizes, epochs), placed after the timings in the order given.
    """
    return {
        "backbone": backbone,
        "head": head,
        "chosen": chosen,
        **score_predictions(y_true, y_pred, proba, n_classes),
        "fit_s": fit_s,
        "predict_s": predict_s,
        **extra,
        "cache_key": cache_key,
        "method": method,
    }

"""Label issues: out-of-fold probabilities of a fast head, ranked by cleanlab.

Every labelled image is scored by a head that never saw it: standardised features and a
multinomial logistic regression, fitted K times (stratified folds, fixed seed) on the other
folds (:func:`out_of_fold_probabilities`), without a copy of the features per fold.
Confident learning (cleanlab's ``find_label_issues``) then estimates how often each class is
labelled as each other one and flags the images whose given label is least likely against
those rates, ranked by self-confidence (the out-of-fold probability of the given label),
lowest first.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.core.extras import require, require_all

__all__ = ["LabelIssue", "fold_count", "label_issues", "out_of_fold_probabilities",
           "standardised"]

PURPOSE = "the label audit"  # what the one line of a missing cleanlab says needs it
# Iterations of lbfgs per fold: the fit is a screen, not the reported model; 200 converges on
# bottleneck features to within a few 1e-3 of the probabilities of a full fit.
_MAX_ITER = 200
_BLOCK_ROWS = 8192  # rows standardised at a time: float64 temporaries of one block only


@dataclass(frozen=True)
class LabelIssue:
    """An image whose given label the out-of-fold head doubts."""

    rank: int  # 1: the most doubtful
    index: int  # its row in the audited rows
    path: str
    split: str
    given: str
    suggested: str  # the class the head gives the highest probability
    confidence: float  # that probability
    label_quality: float  # the probability of the given label (self-confidence)


def fold_count(y: np.ndarray, folds: int) -> int:
    """The folds that stratification allows: at most the smallest class's size (0: < 2)."""
    smallest = int(np.bincount(y).min()) if len(y) else 0
    k = min(folds, smallest)
    return k if k >= 2 else 0


def standardised(X: np.ndarray) -> np.ndarray:
    """A float32 copy of ``X`` with every column at mean 0 and variance 1 (a constant column
    at 0), in blocks of rows so that no float64 copy of ``X`` is ever made."""
    X = np.asarray(X, np.float32)
    mean = X.mean(0, dtype=np.float64)
    var = np.zeros(X.shape[1])
    for lo in range(0, len(X), _BLOCK_ROWS):
        var += np.square(X[lo:lo + _BLOCK_ROWS] - mean).sum(0)
    scale = np.sqrt(var / max(1, len(X)))
    scale[scale == 0] = 1.0
    out = np.empty_like(X)
    for lo in range(0, len(X), _BLOCK_ROWS):
        out[lo:lo + _BLOCK_ROWS] = (X[lo:lo + _BLOCK_ROWS] - mean) / scale
    return out


def out_of_fold_probabilities(X: np.ndarray, y: np.ndarray, n_classes: int, folds: int = 5,
                              seed: int = 0, C: float = 1.0) -> np.ndarray:
    """``(n, n_classes)`` probabilities, each row from the fold model that did not see it.

    Parameters
    ----------
    X, y
        Features and label indices; every class of ``range(n_classes)`` present in ``y`` must
        have at least ``folds`` images (:func:`fold_count`).
    n_classes
        Columns of the result; a class absent from ``y`` gets probability 0.
    folds
        K of the stratified K-fold.
    seed
        Shuffles the folds.
    C
        Inverse regularisation of the logistic regression.

    Notes
    -----
    Memory holds ``X`` and one standardised copy, never a copy per fold: each fold's model is
    fitted on all rows with weight 0 on its held-out fold, which is the same objective as
    fitting on the other folds alone (scikit-learn scales the penalty by the sum of the
    weights), at about 1/(K-1) more arithmetic. The standardisation's means and variances are
    those of all rows: they use no label, so no label leaks into a held-out fold.
    """
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    # cleanlab ranks these next (label_issues): missing, it is said now, not after the folds.
    require_all(["cleanlab"], PURPOSE)
    present = np.unique(y)
    remap = np.searchsorted(present, y)
    Xs = standardised(X)
    out = np.zeros((len(y), n_classes), np.float64)
    cv = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
    for train, held_out in cv.split(np.zeros(len(y)), remap):
        weight = np.zeros(len(y))
        weight[train] = 1.0
        head = LogisticRegression(C=C, max_iter=_MAX_ITER)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            head.fit(Xs, remap, sample_weight=weight)
        out[np.ix_(held_out, present)] = head.predict_proba(Xs[held_out])
    return out


def label_issues(y: np.ndarray, proba: np.ndarray, classes: list[str], paths: list[str],
                 split: np.ndarray) -> list[LabelIssue]:
    """The images cleanlab flags, most doubtful first.

    Parameters
    ----------
    y
        Given label indices.
    proba
        Out-of-fold probabilities (:func:`out_of_fold_probabilities`).
    classes, paths, split
        Names for the rows of the result.
    """
    find_label_issues = require("cleanlab.filter", PURPOSE).find_label_issues
    present = np.unique(y)  # cleanlab wants every column to be a class that occurs
    sub = proba[:, present]
    sub = sub / np.clip(sub.sum(1, keepdims=True), 1e-12, None)
    ranked = find_label_issues(np.searchsorted(present, y), sub,
                               return_indices_ranked_by="self_confidence", n_jobs=1)
    suggested = proba.argmax(1)
    return [LabelIssue(rank + 1, int(i), paths[i], str(split[i]), classes[y[i]],
                       classes[suggested[i]], float(proba[i, suggested[i]]),
                       float(proba[i, y[i]]))
            for rank, i in enumerate(ranked)]

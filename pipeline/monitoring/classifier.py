"""The domain classifier: how well a classifier tells new rows from reference rows.

A logistic regression on standardised features is fitted to predict "new" against
"reference", cross-fitted (each row scored by the model of the folds it was not in), so its
ROC AUC measures what it learned, not what it memorised: 0.5 when the two sets cannot be told
apart, 1 when they never overlap (Lopez-Paz & Oquab 2017, classifier two-sample tests; the
domain classifier of Rabanser et al. 2019, "Failing loudly").

- **AUC** with DeLong's 95% interval (DeLong et al. 1988, the structural components computed
  from ranks), and a one-sided Mann-Whitney p-value of the new rows' scores exceeding the
  reference rows'. Cross-fitted scores under the null sit slightly below 0.5 on average
  (a known bias of cross-validated classifiers), which makes the test conservative rather
  than liberal; the unit tests count its false alarms.
- **Proxy A-distance** ``2(1 - 2 err)`` (Ben-David et al. 2007), with ``err`` the balanced
  error of the classifier at its 0.5 threshold (balanced, so that unequal set sizes do not
  make chance look like skill): 0 at chance, 2 when the sets separate perfectly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

__all__ = ["ClassifierTest", "delong_interval", "domain_classifier"]

Z_95 = 1.959963984540054
# The regularisation of the domain classifier: features are standardised, and with a few
# hundred rows of ~1,000 dimensions an unregularised fit separates any two samples.
C = 0.05
FOLDS = 5


@dataclass(frozen=True)
class ClassifierTest:
    """The cross-fitted domain classifier's findings."""

    auc: float  # ROC AUC of new against reference (0.5: indistinguishable)
    ci_low: float  # DeLong's 95% interval
    ci_high: float
    p_value: float  # one-sided Mann-Whitney: new rows score higher
    proxy_a_distance: float  # 2(1 - 2 err), err the balanced error at 0.5
    pad_ci_low: float
    pad_ci_high: float
    folds: int
    n_reference: int
    n_new: int


def delong_interval(scores: np.ndarray, positive: np.ndarray) -> tuple[float, float, float]:
    """ROC AUC of ``scores`` for the 0/1 labels ``positive``, with DeLong's 95% interval
    (clipped to [0, 1])."""
    scores, positive = np.asarray(scores, np.float64), np.asarray(positive, bool)
    pos, neg = scores[positive], scores[~positive]
    m, n = len(pos), len(neg)
    ranks = stats.rankdata(np.concatenate([pos, neg]))  # midranks: ties count a half
    v10 = (ranks[:m] - stats.rankdata(pos)) / n  # per positive: share of negatives below it
    v01 = 1.0 - (ranks[m:] - stats.rankdata(neg)) / m  # per negative: share of positives above
    auc = float(v10.mean())
    variance = v10.var(ddof=1) / m + v01.var(ddof=1) / n if m > 1 and n > 1 else 0.0
    half = Z_95 * float(np.sqrt(max(variance, 0.0)))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


def domain_classifier(X: np.ndarray, Y: np.ndarray, *, folds: int = FOLDS, seed: int = 0
                      ) -> tuple[ClassifierTest, np.ndarray]:
    """Cross-fit a classifier of reference rows ``X`` against new rows ``Y``.

    Parameters
    ----------
    X, Y
        Feature rows of the reference and the new set (at least ``folds`` each).
    folds
        Stratified folds of the cross-fit.
    seed
        Seeds the folds.

    Returns
    -------
    ClassifierTest, numpy.ndarray
        The findings, and each new row's out-of-fold probability of being new (the gallery
        shows the highest).
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    Z = np.concatenate([np.asarray(X, np.float32), np.asarray(Y, np.float32)])
    label = np.r_[np.zeros(len(X), int), np.ones(len(Y), int)]
    folds = min(folds, len(X), len(Y))
    model = make_pipeline(StandardScaler(),
                          LogisticRegression(C=C, class_weight="balanced", max_iter=1000))
    split = StratifiedKFold(folds, shuffle=True, random_state=seed)
    scores = cross_val_predict(model, Z, label, cv=split, method="predict_proba")[:, 1]
    auc, low, high = delong_interval(scores, label == 1)
    p = float(stats.mannwhitneyu(scores[label == 1], scores[label == 0],
                                 alternative="greater").pvalue)
    said_new = scores >= 0.5
    errors = np.array([said_new[label == 0].mean(), (~said_new[label == 1]).mean()])
    err = float(errors.mean())
    # Balanced error: the mean of two independent proportions' errors, its normal interval.
    se = 0.5 * float(np.sqrt(errors[0] * (1 - errors[0]) / len(X)
                             + errors[1] * (1 - errors[1]) / len(Y)))
    pad = 2.0 * (1.0 - 2.0 * err)
    half = 4.0 * Z_95 * se  # the PAD is 2 - 4 err: its interval is four times err's
    test = ClassifierTest(auc, low, high, p, pad, max(-2.0, pad - half), min(2.0, pad + half),
                          folds, len(X), len(Y))
    return test, scores[label == 1]

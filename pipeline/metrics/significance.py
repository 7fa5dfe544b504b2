"""How sure a score is: intervals over test images and seeds, and paired tests between rows.

A test split of a few hundred images measures accuracy to a few points: 500 images at 85%
have a standard error of 1.6 points. Every test score the stages write therefore carries a
95% interval, and rows scored on the same test images are compared image by image, which is
much sharper than comparing two intervals (most images are right, or wrong, for both rows).

- Accuracy: the exact Clopper-Pearson interval of a binomial proportion (never narrower than
  95% coverage asks, whatever the size of the test split).
- Balanced accuracy, macro F1, log loss and calibration error: a percentile bootstrap over test
  images, ``BOOTSTRAP_SAMPLES`` resamples drawn from a numpy Generator seeded with
  ``BOOTSTRAP_SEED``; the resamples depend only on the number of test images and the seed, so
  two rows of the same test images are resampled identically (a paired bootstrap), and the
  same predictions always get the same interval.
- Two rows on the same images: McNemar's exact test on the images one gets right and the other
  wrong, and the paired bootstrap interval of their difference.
- Seeds: the mean over repeated fits and its t-interval (training noise; the test images are
  the same for every seed).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from scipy import stats

from pipeline.metrics.calibration import N_BINS, confidence_bins

CONFIDENCE = 0.95
# A difference is called significant below this p-value (one comparison; the report does not
# correct for comparing many rows with the best one).
SIGNIFICANCE_LEVEL = 0.05
# Percentile intervals at 95% rest on the 2.5% tails: 2,000 resamples put 50 in each, which
# keeps the Monte Carlo error of an end point well under the interval's own width.
BOOTSTRAP_SAMPLES = 2000
BOOTSTRAP_SEED = 0
# The test scores given an interval, as the results rows name them.
INTERVAL_METRICS = ("test_accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece")
# Resampled indices held at once (rows x images): bounds memory for large test splits.
_BLOCK_ELEMENTS = 1 << 20


def accuracy_interval(correct, n, confidence: float = CONFIDENCE):
    """Exact (Clopper-Pearson) interval of an accuracy of ``correct`` out of ``n``.

    The same interval as ``scipy.stats.binomtest(correct, n).proportion_ci(confidence,
    "exact")``, written with the beta quantiles so that arrays of counts work at once.

    Parameters
    ----------
    correct, n
        Right predictions and test images (integers or arrays of them).
    confidence
        Coverage of the interval.

    Returns
    -------
    low, high
        Floats, or arrays of the broadcast shape of ``correct`` and ``n``.
    """
    k, n = np.asarray(correct, dtype=np.float64), np.asarray(n, dtype=np.float64)
    tail = (1.0 - confidence) / 2
    with np.errstate(invalid="ignore"):  # beta(0, .) is undefined where the bound is 0 or 1
        low = np.where(k > 0, stats.beta.ppf(tail, k, n - k + 1), 0.0)
        high = np.where(k < n, stats.beta.ppf(1 - tail, k + 1, n - k), 1.0)
    if low.ndim == 0:
        return float(low), float(high)
    return low, high


def resample_indices(n: int, n_boot: int = BOOTSTRAP_SAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> Iterator[np.ndarray]:
    """Bootstrap resamples of ``n`` test images, in blocks of rows of ``n`` indices each.

    The blocks depend only on ``n``, ``n_boot`` and ``seed``: rows of the same test images get
    the same resamples, which pairs their bootstraps.
    """
    rng = np.random.default_rng(seed)
    block = max(1, _BLOCK_ELEMENTS // max(n, 1))
    for start in range(0, n_boot, block):
        yield rng.integers(0, n, size=(min(block, n_boot - start), n))


def bootstrap_scores(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None,
                     n_classes: int, *, n_boot: int = BOOTSTRAP_SAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict[str, np.ndarray]:
    """Each test score on ``n_boot`` bootstrap resamples of the test images.

    The scores are those of :func:`pipeline.metrics.scoring.score_predictions` (the same definitions
    as scikit-learn's, computed for all resamples at once from per-class counts): on the
    resample that takes every image once they equal it.

    Parameters
    ----------
    y_true, y_pred
        ``(n,)`` integer labels and predictions.
    proba
        ``(n, n_classes)`` class probabilities, or None (log loss and calibration error NaN).
    n_classes
        Classes of the data set.
    n_boot, seed
        Resamples and their seed (see :func:`resample_indices`).

    Returns
    -------
    dict
        ``(n_boot,)`` array per name of :data:`INTERVAL_METRICS`.
    """
    y_true, y_pred = np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)
    n = len(y_true)
    correct = (y_true == y_pred).astype(np.float64)
    nll = top_right = confidence = bins = None
    if proba is not None:
        nll = _log_losses(y_true, proba)
        confidence, top, bins = confidence_bins(proba)
        top_right = (top == y_true).astype(np.float64)
    out = {name: np.full(n_boot, np.nan) for name in INTERVAL_METRICS}
    done = 0
    for idx in resample_indices(n, n_boot, seed):
        rows = slice(done, done + len(idx))
        done += len(idx)
        truth = _cells(y_true[idx], n_classes)
        support = _count(truth, len(idx), n_classes)
        predicted = _count(_cells(y_pred[idx], n_classes), len(idx), n_classes)
        hits = _count(truth, len(idx), n_classes, correct[idx])
        out["test_accuracy"][rows] = hits.sum(1) / n
        # scikit-learn averages over the classes present: recall over classes in y_true, F1
        # over classes in y_true or y_pred (a class never predicted nor present is left out).
        out["balanced_accuracy"][rows] = _mean_where(hits, support, support > 0)
        out["macro_f1"][rows] = _mean_where(2 * hits, support + predicted,
                                            support + predicted > 0)
        if proba is not None:
            out["log_loss"][rows] = nll[idx].mean(1)
            in_bin = _cells(bins[idx], N_BINS)
            gap = (_count(in_bin, len(idx), N_BINS, top_right[idx])
                   - _count(in_bin, len(idx), N_BINS, confidence[idx]))
            out["ece"][rows] = np.abs(gap).sum(1) / n
    return out


def _log_losses(y_true: np.ndarray, proba: np.ndarray) -> np.ndarray:
    # As scikit-learn's log_loss: rows renormalised, clipped to the dtype's eps.
    p = proba / proba.sum(1, keepdims=True)
    eps = np.finfo(p.dtype).eps
    return -np.log(np.clip(p[np.arange(len(y_true)), y_true], eps, 1 - eps)).astype(np.float64)


def _cells(values: np.ndarray, width: int) -> np.ndarray:
    """Row r's value v as cell r * width + v: one bincount counts every resample at once."""
    return (values + width * np.arange(len(values))[:, None]).ravel()


def _count(cells: np.ndarray, rows: int, width: int, weights=None) -> np.ndarray:
    weights = None if weights is None else weights.ravel()
    return np.bincount(cells, weights, rows * width).reshape(rows, width)


def _mean_where(numerator, denominator, mask) -> np.ndarray:
    with np.errstate(invalid="ignore", divide="ignore"):
        ratio = np.where(mask, numerator / np.where(mask, denominator, 1), 0.0)
        return ratio.sum(1) / mask.sum(1)


def percentile_interval(samples: np.ndarray, confidence: float = CONFIDENCE
                        ) -> tuple[float, float]:
    """The central ``confidence`` share of bootstrap samples (NaN where the score is NaN)."""
    if np.isnan(samples).any():
        return float("nan"), float("nan")
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(samples, [tail, 1 - tail])
    return float(low), float(high)


def score_intervals(y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray | None,
                    n_classes: int, *, confidence: float = CONFIDENCE,
                    n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED
                    ) -> dict[str, tuple[float, float]]:
    """A ``confidence`` interval for each test score: exact for accuracy, bootstrap for the rest.

    Parameters
    ----------
    y_true, y_pred, proba, n_classes, n_boot, seed
        As for :func:`bootstrap_scores`.
    confidence
        Coverage of each interval.

    Returns
    -------
    dict
        ``(low, high)`` per name of :data:`INTERVAL_METRICS`.
    """
    samples = bootstrap_scores(y_true, y_pred, proba, n_classes, n_boot=n_boot, seed=seed)
    out = {name: percentile_interval(samples[name], confidence) for name in INTERVAL_METRICS}
    right = int(np.sum(np.asarray(y_true) == np.asarray(y_pred)))
    out["test_accuracy"] = accuracy_interval(right, len(y_true), confidence)
    return out


def mcnemar_test(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Two-sided p-value of McNemar's exact test: do two classifiers err equally often?

    Only the images one gets right and the other wrong carry information; under the null
    hypothesis each of them is equally likely to favour either classifier, so their split is
    Binomial(discordant, 1/2).

    Parameters
    ----------
    correct_a, correct_b
        ``(n,)`` booleans: whether each classifier got each test image right.
    """
    correct_a, correct_b = np.asarray(correct_a, bool), np.asarray(correct_b, bool)
    a_only = int(np.sum(correct_a & ~correct_b))
    discordant = a_only + int(np.sum(correct_b & ~correct_a))
    if discordant == 0:
        return 1.0
    return float(stats.binomtest(a_only, discordant, 0.5).pvalue)


@dataclass
class PairedDifference:
    """Accuracy of A minus accuracy of B on the same images, its interval and McNemar's p."""

    difference: float
    ci_low: float
    ci_high: float
    p_value: float
    a_only: int  # images A gets right and B wrong
    b_only: int


def paired_difference(y_true: np.ndarray, pred_a: np.ndarray, pred_b: np.ndarray, *,
                      confidence: float = CONFIDENCE, n_boot: int = BOOTSTRAP_SAMPLES,
                      seed: int = BOOTSTRAP_SEED) -> PairedDifference:
    """Compare two classifiers' accuracy image by image on the same test images.

    The interval resamples images, each with both predictions (a paired bootstrap), so what
    the two rows share cancels; the p-value is :func:`mcnemar_test`'s.

    Parameters
    ----------
    y_true
        ``(n,)`` labels of the test images.
    pred_a, pred_b
        ``(n,)`` predictions of the two classifiers for the same images, in the same order.
    confidence, n_boot, seed
        As for :func:`score_intervals`.
    """
    y_true = np.asarray(y_true)
    right_a, right_b = np.asarray(pred_a) == y_true, np.asarray(pred_b) == y_true
    delta = right_a.astype(np.float64) - right_b
    samples = np.concatenate([delta[idx].mean(1) for idx in
                              resample_indices(len(delta), n_boot, seed)])
    low, high = percentile_interval(samples, confidence)
    return PairedDifference(float(delta.mean()), low, high, mcnemar_test(right_a, right_b),
                            int(np.sum(right_a & ~right_b)), int(np.sum(right_b & ~right_a)))


def seed_interval(values, confidence: float = CONFIDENCE) -> dict[str, float]:
    """Mean, standard deviation and t-interval of the mean of one score over seeds.

    The spread is training noise alone (initialisation, minibatch order, augmentation): every
    seed is scored on the same test images. One seed gives NaN spread and interval.

    Parameters
    ----------
    values
        The score of each seed.
    confidence
        Coverage of the interval.

    Returns
    -------
    dict
        ``mean``, ``std`` (with one degree of freedom removed), ``ci_low``, ``ci_high``.
    """
    values = np.asarray(values, dtype=np.float64)
    mean = float(values.mean())
    if len(values) < 2:
        return {"mean": mean, "std": float("nan"), "ci_low": float("nan"),
                "ci_high": float("nan")}
    std = float(values.std(ddof=1))
    half = stats.t.ppf(0.5 + confidence / 2, len(values) - 1) * std / np.sqrt(len(values))
    return {"mean": mean, "std": std, "ci_low": float(mean - half),
            "ci_high": float(mean + half)}


def draws_interval(correct: np.ndarray, *, confidence: float = CONFIDENCE,
                   n_boot: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED
                   ) -> tuple[float, float]:
    """Interval of a mean accuracy over random training draws, all scored on one test split.

    Two sources of noise: which training examples were drawn, and which test images were
    sampled. The bootstrap resamples both at once (test images, then draws with
    replacement); a single draw gets the exact interval of its accuracy instead.

    Parameters
    ----------
    correct
        ``(draws, n)`` booleans: whether each draw's classifier got each test image right.
    confidence, n_boot, seed
        As for :func:`score_intervals`.
    """
    correct = np.asarray(correct, dtype=np.float64)
    draws, n = correct.shape
    if draws == 1:
        return accuracy_interval(int(correct.sum()), n, confidence)
    picker = np.random.default_rng([seed, draws])
    samples = []
    for idx in resample_indices(n, n_boot, seed):
        times = _count(_cells(idx, n), len(idx), n)  # how often each image is drawn
        per_draw = times @ correct.T / n  # (resamples, draws)
        picks = picker.integers(0, draws, size=per_draw.shape)
        samples.append(np.take_along_axis(per_draw, picks, 1).mean(1))
    return percentile_interval(np.concatenate(samples), confidence)

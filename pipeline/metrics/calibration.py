"""Calibration: whether a classifier's top-class probability is the accuracy it delivers.

A head or network that says 0.9 should be right nine times in ten among the images it says
0.9 for. The top-label form used here (Guo et al., 2017, https://arxiv.org/abs/1706.04599)
bins the test images by their largest probability into equal-width bins over [0, 1] and
compares each bin's mean confidence with its accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# 15 equal-width bins, as in Guo et al.: fine enough to show the shape of a reliability
# diagram, coarse enough that a few hundred test images fill the occupied bins.
N_BINS = 15


def confidence_bins(proba: np.ndarray, n_bins: int = N_BINS
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each row's top-class probability, predicted class and bin.

    Parameters
    ----------
    proba
        ``(n, n_classes)`` class probabilities (rows are renormalised, as for the log loss).
    n_bins
        Equal-width bins over [0, 1]; bin ``b`` holds confidences in ``(b/n_bins,
        (b+1)/n_bins]``, and a confidence of exactly 0 goes to bin 0.

    Returns
    -------
    confidence : numpy.ndarray
        ``(n,)`` largest probability of each row.
    predicted : numpy.ndarray
        ``(n,)`` its class (``proba.argmax(1)``).
    bins : numpy.ndarray
        ``(n,)`` int64 bin of each row, in ``range(n_bins)``.
    """
    proba = np.asarray(proba, dtype=np.float64)
    proba = proba / proba.sum(1, keepdims=True)
    predicted = proba.argmax(1)
    confidence = proba[np.arange(len(proba)), predicted]
    bins = np.clip(np.ceil(confidence * n_bins).astype(np.int64) - 1, 0, n_bins - 1)
    return confidence, predicted, bins


def expected_calibration_error(y_true: np.ndarray, proba: np.ndarray,
                               n_bins: int = N_BINS) -> float:
    """Top-label expected calibration error: mean |accuracy - confidence| over bins.

    Each bin weighs by its share of the images, so the error is ``sum_b |correct_b -
    confidence_b| / n`` with ``correct_b`` and ``confidence_b`` summed over bin ``b``: 0 for a
    perfectly calibrated classifier (up to sampling noise), up to 1.

    Parameters
    ----------
    y_true
        ``(n,)`` integer labels.
    proba
        ``(n, n_classes)`` class probabilities.
    n_bins
        Equal-width confidence bins over [0, 1].
    """
    confidence, predicted, bins = confidence_bins(proba, n_bins)
    correct = (predicted == np.asarray(y_true)).astype(np.float64)
    gap = (np.bincount(bins, correct, n_bins) - np.bincount(bins, confidence, n_bins))
    return float(np.abs(gap).sum() / len(bins))


@dataclass
class ReliabilityCurve:
    """Per bin: images, mean confidence and accuracy (NaN where a bin is empty), and the ECE."""

    edges: np.ndarray  # n_bins + 1 bin edges over [0, 1]
    count: np.ndarray
    confidence: np.ndarray
    accuracy: np.ndarray
    ece: float


def reliability_curve(y_true: np.ndarray, proba: np.ndarray,
                      n_bins: int = N_BINS) -> ReliabilityCurve:
    """What a reliability diagram draws: accuracy against confidence, bin by bin.

    Parameters
    ----------
    y_true, proba, n_bins
        As for :func:`expected_calibration_error`.
    """
    confidence, predicted, bins = confidence_bins(proba, n_bins)
    correct = (predicted == np.asarray(y_true)).astype(np.float64)
    count = np.bincount(bins, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):  # empty bins are NaN, not drawn
        mean_confidence = np.bincount(bins, confidence, n_bins) / count
        accuracy = np.bincount(bins, correct, n_bins) / count
    return ReliabilityCurve(np.linspace(0.0, 1.0, n_bins + 1), count, mean_confidence,
                            accuracy, expected_calibration_error(y_true, proba, n_bins))

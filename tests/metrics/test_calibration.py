"""Expected calibration error and reliability curves on classifiers of known calibration."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.metrics.calibration import (
    confidence_bins,
    expected_calibration_error,
    reliability_curve,
)


def _calibrated(rng, n: int, classes: int, sharpen: float = 1.0):
    """Probabilities from a Dirichlet, labels drawn from them: calibrated by construction.

    ``sharpen`` > 1 then raises the probabilities to that power (renormalised), which makes
    the same classifier over-confident.
    """
    proba = rng.dirichlet(np.full(classes, 0.5), n)
    y = (rng.random((n, 1)) > proba.cumsum(1)).sum(1)
    sharp = proba ** sharpen
    return y, sharp / sharp.sum(1, keepdims=True)


def test_a_perfectly_calibrated_classifier_has_an_error_near_zero():
    y, proba = _calibrated(np.random.default_rng(0), 20_000, 5)
    # Not exactly 0: each bin's accuracy is itself a sample (about 0.01 here, 2026-11-23).
    assert expected_calibration_error(y, proba) < 0.02


def test_an_over_confident_classifier_does_not():
    y, proba = _calibrated(np.random.default_rng(0), 20_000, 5, sharpen=3.0)
    assert expected_calibration_error(y, proba) > 0.05


def test_known_errors():
    # Confidence 0.9 everywhere, accuracy 0.6: the error is 0.3.
    proba = np.tile([0.9, 0.1], (10, 1))
    y = np.array([0] * 6 + [1] * 4)
    assert expected_calibration_error(y, proba) == pytest.approx(0.3)
    # Half at 0.95 and all right, half at 0.55 and half right: 0.5 * 0.05 + 0.5 * 0.05.
    proba = np.array([[0.95, 0.05]] * 4 + [[0.55, 0.45]] * 4)
    y = np.array([0, 0, 0, 0, 0, 0, 1, 1])
    assert expected_calibration_error(y, proba) == pytest.approx(0.05)


def test_bins_are_right_closed_and_cover_zero_to_one():
    proba = np.array([[1.0, 0.0], [0.5, 0.5], [1 / 15 + 1e-9, 1.0 - 1 / 15 - 1e-9]])
    confidence, predicted, bins = confidence_bins(proba, 15)
    assert bins.tolist() == [14, 7, 13]  # 1.0 in the last bin; 0.5 = 7.5/15 in bin 7
    assert predicted.tolist() == [0, 0, 1]
    assert confidence_bins(np.array([[0.5, 0.5]]), 2)[2].tolist() == [0]  # (0, 0.5] is bin 0


def test_reliability_curve_matches_its_bins():
    y, proba = _calibrated(np.random.default_rng(1), 3000, 4)
    curve = reliability_curve(y, proba, n_bins=10)
    assert curve.count.sum() == 3000 and len(curve.edges) == 11
    filled = curve.count > 0
    assert np.isnan(curve.accuracy[~filled]).all()
    confidence, predicted, bins = confidence_bins(proba, 10)
    b = int(np.argmax(curve.count))
    assert curve.accuracy[b] == pytest.approx(np.mean(predicted[bins == b] == y[bins == b]))
    assert curve.confidence[b] == pytest.approx(confidence[bins == b].mean())
    weighted = np.nansum(curve.count * np.abs(curve.accuracy - curve.confidence)) / 3000
    assert curve.ece == pytest.approx(weighted) == expected_calibration_error(y, proba, 10)

"""Probabilities over all classes, the test scores and the results row of both stages."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from pipeline.report import REPORT_COLUMNS
from pipeline.scoring import class_probabilities, results_row, score_predictions


def _two_of_four_classes():
    X = np.array([[-2.0], [-1.0], [1.0], [2.0]])
    return LogisticRegression().fit(X, np.array([1, 1, 3, 3])), X


def test_a_head_fitted_on_some_classes_gets_a_column_per_class_by_label():
    estimator, X = _two_of_four_classes()
    full = class_probabilities(estimator, X, 4)
    assert full.shape == (4, 4) and full.dtype == np.float64
    np.testing.assert_array_equal(full[:, [0, 2]], 0.0)  # never seen: probability 0
    np.testing.assert_array_equal(full[:, [1, 3]], estimator.predict_proba(X))
    assert full.argmax(1).tolist() == [1, 1, 3, 3]


def test_a_head_without_probabilities_gets_none():
    X = np.array([[-1.0], [1.0], [-2.0], [2.0]])
    assert class_probabilities(LinearSVC().fit(X, [0, 1, 0, 1]), X, 2) is None


def test_scores_on_a_small_example():
    y = np.array([0, 0, 1, 2])
    proba = np.array([[0.8, 0.1, 0.1], [0.2, 0.6, 0.2], [0.1, 0.7, 0.2], [0.3, 0.3, 0.4]])
    scores = score_predictions(y, proba.argmax(1), proba, 3)
    assert scores["test_accuracy"] == 0.75
    assert scores["balanced_accuracy"] == pytest.approx((0.5 + 1 + 1) / 3)
    assert scores["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    expected = -np.mean(np.log([0.8, 0.2, 0.7, 0.4]))
    assert scores["log_loss"] == pytest.approx(expected)


def test_log_loss_renormalises_rows_and_counts_absent_classes():
    y = np.array([0, 1])
    float32_like = np.array([[0.5, 0.5, 0.0], [0.25, 0.75, 0.0]]) * (1 + 1e-7)
    scores = score_predictions(y, np.array([0, 1]), float32_like, 3)
    assert scores["log_loss"] == pytest.approx(-np.mean(np.log([0.5, 0.75])))
    assert math.isnan(score_predictions(y, np.array([0, 1]), None, 3)["log_loss"])


def test_the_row_has_the_columns_of_both_stages_in_order():
    y = np.array([0, 1, 1])
    row = results_row(backbone="resnet18", head="finetune-1", chosen="unfreeze=1",
                      y_true=y, y_pred=np.array([0, 1, 0]), proba=None, n_classes=2,
                      fit_s=1.5, predict_s=float("nan"), blocks_unfrozen=1, best_epoch=2,
                      cache_key="abc", method="fine-tune")
    assert list(row) == ["backbone", "head", "chosen", "test_accuracy", "balanced_accuracy",
                         "macro_f1", "log_loss", "fit_s", "predict_s", "blocks_unfrozen",
                         "best_epoch", "cache_key", "method"]
    assert set(REPORT_COLUMNS) <= set(row)
    assert row["test_accuracy"] == pytest.approx(2 / 3) and row["blocks_unfrozen"] == 1

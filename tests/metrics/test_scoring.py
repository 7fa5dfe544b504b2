"""Probabilities over all classes, the test scores and the results row of both stages."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.svm import LinearSVC

from pipeline.metrics.calibration import expected_calibration_error
from pipeline.metrics.scoring import (
    POSITIVE_COLUMNS,
    RowPredictions,
    class_probabilities,
    results_row,
    score_predictions,
    scores_with_intervals,
    with_repeats,
)
from pipeline.metrics.significance import accuracy_interval
from pipeline.report.summary import BASE_COLUMNS, REPORT_COLUMNS, SEED_COLUMNS


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
    assert scores["ece"] == pytest.approx(expected_calibration_error(y, proba))


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
    scores = [c for m in ("test_accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece")
              for c in (m, f"{m}_ci_low", f"{m}_ci_high")]
    assert list(row) == ["backbone", "head", "chosen", *scores, "fit_s", "predict_s",
                         "blocks_unfrozen", "best_epoch", "cache_key", "method"]
    # seeds: rows with --repeats; the positive class: stages add it for two-class data
    # Seed, two-class and --exclude columns are in a row only when their option was used.
    # a derived row's comparison with its base row (self-trained, distilled) is optional too
    optional = {*SEED_COLUMNS, *POSITIVE_COLUMNS, *BASE_COLUMNS, "excluded"}
    assert set(REPORT_COLUMNS) - optional <= set(row)
    assert row["test_accuracy"] == pytest.approx(2 / 3) and row["blocks_unfrozen"] == 1
    assert (row["test_accuracy_ci_low"], row["test_accuracy_ci_high"]) == accuracy_interval(2, 3)
    assert math.isnan(row["log_loss_ci_low"])  # no probabilities, no log loss to bound


def test_every_score_sits_inside_its_interval_and_the_same_input_gives_the_same_one():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 300)
    proba = rng.dirichlet(np.ones(4), 300)
    proba[np.arange(300), y] += 0.3
    proba /= proba.sum(1, keepdims=True)
    first = scores_with_intervals(y, proba.argmax(1), proba, 4)
    for name in ("test_accuracy", "balanced_accuracy", "macro_f1", "log_loss", "ece"):
        assert first[f"{name}_ci_low"] < first[name] < first[f"{name}_ci_high"], name
    assert scores_with_intervals(y, proba.argmax(1), proba, 4) == first


def test_repeats_sit_beside_the_single_run_interval():
    row = results_row(backbone="b", head="mlp", chosen="", y_true=np.array([0, 1]),
                      y_pred=np.array([0, 1]), proba=None, n_classes=2, fit_s=1.0,
                      predict_s=0.1, cache_key="k", method="transfer")
    repeated = with_repeats(row, [1.0, 0.9, 0.8])
    columns = list(repeated)
    at = columns.index("test_accuracy_ci_high")
    assert columns[at + 1:at + 6] == list(SEED_COLUMNS)
    assert repeated["repeats"] == 3 and repeated["test_accuracy_seeds_mean"] == pytest.approx(0.9)
    assert repeated["test_accuracy_seeds_std"] == pytest.approx(0.1)
    assert repeated["test_accuracy"] == 1.0  # the row's own scores stay the first seed's


def test_stored_predictions_read_back_as_written(tmp_path):
    stored = RowPredictions(np.array(["a/1.png", "b/\udcff.png"]), np.array([0, 1]),
                            np.array([0, 0]), np.array([[0.9, 0.1], [0.6, 0.4]], np.float32),
                            np.array([False, True]), ["a", "b"])
    path = stored.save(tmp_path / "p" / "x.npz")
    back = RowPredictions.load(path)
    assert back.paths.tolist() == ["a/1.png", "b/\udcff.png"] and back.classes == ["a", "b"]
    for name in ("y_true", "y_pred", "proba", "leaked"):
        np.testing.assert_array_equal(getattr(back, name), getattr(stored, name))
    bare = RowPredictions(stored.paths, stored.y_true, stored.y_pred, None, None, ["a", "b"])
    back = RowPredictions.load(bare.save(tmp_path / "bare.npz"))
    assert back.proba is None and back.leaked is None
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["bare.npz", "p", "x.npz"]  # no .partial
    with pytest.raises(ValueError, match="unequal lengths"):
        RowPredictions(stored.paths[:1], stored.y_true, stored.y_pred, None, None,
                       ["a", "b"]).save(tmp_path / "short.npz")
    np.savez(tmp_path / "other.npz", a=np.zeros(2))
    with pytest.raises(ValueError, match="not a pipeline-predictions"):
        RowPredictions.load(tmp_path / "other.npz")


def test_positive_class_scores_match_scikit_learn():
    from sklearn.metrics import recall_score

    from pipeline.metrics.scoring import positive_scores

    rng = np.random.default_rng(1)
    y, pred = rng.integers(0, 2, 60), rng.integers(0, 2, 60)
    default = positive_scores(y, pred, ["healthy", "sick"])
    assert default["positive_class"] == "sick"
    assert default["positive_recall"] == pytest.approx(recall_score(y, pred, pos_label=1))
    assert default["false_negative_rate"] == pytest.approx(
        np.sum((y == 1) & (pred == 0)) / np.sum(y == 1))
    chosen = positive_scores(y, pred, ["healthy", "sick"], "healthy")
    assert chosen["positive_recall"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert positive_scores(y % 3, pred, ["a", "b", "c"]) == {}


@pytest.mark.parametrize(("classes", "positive", "message"), [
    (["a", "b"], "c", "^positive must be one of the classes, 'a', 'b', not 'c'$"),
    (["a", "b", "c"], "a", "^positive must be unset for data of 3 classes \\(a positive class is "
                           "for two-class data\\), not 'a'$"),
])
def test_a_wrong_positive_class_is_one_clear_error(classes, positive, message):
    from pipeline.core.errors import OptionError
    from pipeline.metrics.scoring import positive_class

    with pytest.raises(OptionError, match=message) as err:
        positive_class(classes, positive)
    assert err.value.option == "positive" and err.value.value == positive


def test_per_class_rows_match_precision_recall_f1():
    from sklearn.metrics import precision_recall_fscore_support

    from pipeline.metrics.scoring import per_class_rows

    y, pred = np.array([0, 0, 1, 1, 2, 2, 2]), np.array([0, 1, 1, 1, 2, 0, 1])
    rows = per_class_rows(y, pred, ["a", "b", "c"], head="h")
    p, r, f, n = precision_recall_fscore_support(y, pred, zero_division=0)
    assert [row["class"] for row in rows] == ["a", "b", "c"] and rows[0]["head"] == "h"
    np.testing.assert_allclose([row["precision"] for row in rows], p)
    np.testing.assert_allclose([row["recall"] for row in rows], r)
    np.testing.assert_allclose([row["f1"] for row in rows], f)
    assert [row["support"] for row in rows] == list(n)

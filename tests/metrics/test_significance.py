"""Intervals that cover what they claim, paired tests with known answers, seeds and draws."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, log_loss

import pipeline.metrics.significance as significance
from pipeline.metrics.calibration import expected_calibration_error
from pipeline.metrics.significance import (
    accuracy_interval,
    bootstrap_scores,
    draws_interval,
    mcnemar_test,
    paired_difference,
    resample_indices,
    score_intervals,
    seed_interval,
)


def _simulated(rng, n: int, classes: int, accuracy: float):
    """Labels, and predictions right with probability ``accuracy`` whatever the class."""
    y = rng.integers(0, classes, n)
    wrong = (y + rng.integers(1, classes, n)) % classes
    return y, np.where(rng.random(n) < accuracy, y, wrong)


def test_the_exact_interval_is_scipys_clopper_pearson():
    for k, n in [(0, 10), (3, 10), (10, 10), (425, 500), (1, 1)]:
        expected = stats.binomtest(k, n).proportion_ci(0.95, "exact")
        assert accuracy_interval(k, n) == pytest.approx((expected.low, expected.high))
    low, high = accuracy_interval(np.array([0, 5]), np.array([10, 10]))
    assert low.shape == (2,) and low[0] == 0 and high[1] < 1


def test_the_exact_interval_covers_a_known_accuracy_95_percent_of_the_time():
    # 20,000 simulated test splits of 500 images scored by a classifier of accuracy 0.85.
    rng = np.random.default_rng(0)
    right = rng.binomial(500, 0.85, size=20_000)
    low, high = accuracy_interval(right, 500)
    coverage = np.mean((low <= 0.85) & (high >= 0.85))
    assert 0.945 <= coverage <= 0.975  # exact: never below 95%, a little above (conservative)
    # About two standard errors on each side (1.6 points at 500 images and 85%).
    assert np.median(high - low) == pytest.approx(2 * 1.96 * np.sqrt(0.85 * 0.15 / 500),
                                                  rel=0.1)


def test_bootstrap_intervals_cover_a_known_balanced_accuracy():
    # Right with probability 0.8 in every class: accuracy and balanced accuracy are both 0.8.
    rng = np.random.default_rng(1)
    hits = {"test_accuracy": 0, "balanced_accuracy": 0}
    runs = 300
    for _ in range(runs):
        y, pred = _simulated(rng, 200, 4, 0.8)
        intervals = score_intervals(y, pred, None, 4, n_boot=400, seed=int(rng.integers(1e9)))
        for name in hits:
            low, high = intervals[name]
            hits[name] += low <= 0.8 <= high
    for name, count in hits.items():  # 300 runs: one standard error of coverage is 1.3 points
        assert 0.90 <= count / runs <= 0.99, (name, count / runs)


def test_bootstrap_scores_are_scikit_learns_on_each_resample(monkeypatch):
    rng = np.random.default_rng(2)
    n, classes = 60, 5
    y, pred = _simulated(rng, n, classes, 0.6)
    pred[pred == 4] = 3  # class 4 is never predicted: F1 and recall average as sklearn's do
    proba = rng.dirichlet(np.ones(classes), n).astype(np.float32)
    resamples = np.stack([np.arange(n), rng.integers(0, n, n), rng.integers(0, n // 2, n)])
    monkeypatch.setattr(significance, "resample_indices", lambda *a, **k: iter([resamples]))
    scores = bootstrap_scores(y, pred, proba, classes, n_boot=3)
    for b, idx in enumerate(resamples):
        t, p, q = y[idx], pred[idx], proba[idx]
        assert scores["test_accuracy"][b] == pytest.approx(accuracy_score(t, p))
        assert scores["balanced_accuracy"][b] == pytest.approx(balanced_accuracy_score(t, p))
        assert scores["macro_f1"][b] == pytest.approx(f1_score(t, p, average="macro"))
        assert scores["log_loss"][b] == pytest.approx(
            log_loss(t, q / q.sum(1, keepdims=True), labels=np.arange(classes)), rel=1e-6)
        assert scores["ece"][b] == pytest.approx(expected_calibration_error(t, q))


def test_resamples_depend_only_on_size_and_seed():
    first = np.concatenate(list(resample_indices(50, 300, seed=4)))
    again = np.concatenate(list(resample_indices(50, 300, seed=4)))
    other = np.concatenate(list(resample_indices(50, 300, seed=5)))
    assert first.shape == (300, 50) and (first == again).all() and (first != other).any()
    # Blocks are cut for memory; their concatenation is the same stream.
    monkey_block = significance._BLOCK_ELEMENTS
    try:
        significance._BLOCK_ELEMENTS = 50 * 7
        assert (np.concatenate(list(resample_indices(50, 300, seed=4))) == first).all()
    finally:
        significance._BLOCK_ELEMENTS = monkey_block


def test_intervals_without_probabilities_are_nan_for_log_loss_and_calibration():
    rng = np.random.default_rng(3)
    y, pred = _simulated(rng, 100, 3, 0.7)
    intervals = score_intervals(y, pred, None, 3, n_boot=200)
    assert np.isnan(intervals["log_loss"]).all() and np.isnan(intervals["ece"]).all()
    low, high = intervals["macro_f1"]
    assert low < f1_score(y, pred, average="macro") < high


def test_mcnemar_on_known_counts():
    def pair(a_only, b_only, both=30, neither=10):
        a = np.r_[np.ones(a_only), np.zeros(b_only), np.ones(both), np.zeros(neither)]
        b = np.r_[np.zeros(a_only), np.ones(b_only), np.ones(both), np.zeros(neither)]
        return a.astype(bool), b.astype(bool)

    assert mcnemar_test(*pair(10, 0)) == pytest.approx(2 * 0.5 ** 10)
    assert mcnemar_test(*pair(7, 1)) == pytest.approx(2 * (1 + 8) / 2 ** 8)  # 0.0703
    assert mcnemar_test(*pair(1, 7)) == mcnemar_test(*pair(7, 1))
    assert mcnemar_test(*pair(5, 5)) == 1.0
    assert mcnemar_test(*pair(0, 0)) == 1.0  # never disagree: nothing tells them apart


def test_paired_difference_on_constructed_predictions():
    # 200 images: B is right on the first 150, A on those and 20 more.
    y = np.zeros(200, dtype=int)
    pred_b = np.where(np.arange(200) < 150, 0, 1)
    pred_a = np.where(np.arange(200) < 170, 0, 1)
    d = paired_difference(y, pred_a, pred_b, n_boot=1000)
    assert d.difference == pytest.approx(0.1) and (d.a_only, d.b_only) == (20, 0)
    assert d.p_value == pytest.approx(2 * 0.5 ** 20)
    # Per image the difference is 1 on 20 images, else 0: its standard error is
    # sqrt(0.1 * 0.9 / 200) = 0.021, so the interval is about 0.1 +- 0.042.
    assert d.ci_low == pytest.approx(0.1 - 0.042, abs=0.012)
    assert d.ci_high == pytest.approx(0.1 + 0.042, abs=0.012)
    same = paired_difference(y, pred_a, pred_a, n_boot=200)
    assert (same.difference, same.ci_low, same.ci_high, same.p_value) == (0, 0, 0, 1)


def test_pairing_is_sharper_than_two_separate_intervals():
    # Two classifiers that agree on 95% of 500 images and differ by 2 points: the paired
    # interval is far narrower than either accuracy's own interval.
    rng = np.random.default_rng(5)
    y, pred_b = _simulated(rng, 500, 10, 0.84)
    flip = rng.permutation(np.flatnonzero(pred_b != y))[:10]
    pred_a = pred_b.copy()
    pred_a[flip] = y[flip]
    d = paired_difference(y, pred_a, pred_b, n_boot=1000)
    low, high = accuracy_interval(int((pred_a == y).sum()), 500)
    assert d.difference == pytest.approx(0.02) and d.ci_low > 0
    assert (d.ci_high - d.ci_low) < (high - low) / 2


def test_seed_interval_is_the_t_interval_of_the_mean():
    summary = seed_interval([0.80, 0.82, 0.84])
    assert summary["mean"] == pytest.approx(0.82) and summary["std"] == pytest.approx(0.02)
    half = stats.t.ppf(0.975, 2) * 0.02 / np.sqrt(3)  # 4.303 * 0.02 / 1.732 = 0.0497
    assert summary["ci_low"] == pytest.approx(0.82 - half)
    assert summary["ci_high"] == pytest.approx(0.82 + half)
    one = seed_interval([0.8])
    assert one["mean"] == 0.8 and np.isnan(one["std"]) and np.isnan(one["ci_low"])


def test_draws_interval_holds_the_spread_of_draws_and_of_test_images():
    rng = np.random.default_rng(6)
    y, pred = _simulated(rng, 300, 5, 0.7)
    single = (pred == y)[None]
    assert draws_interval(single) == accuracy_interval(int(single.sum()), 300)
    agreeing = np.repeat(single, 4, axis=0)
    spread = np.stack([rng.random(300) < p for p in (0.5, 0.6, 0.8, 0.9)])
    low, high = draws_interval(agreeing, n_boot=500)
    assert low < single.mean() < high
    wide_low, wide_high = draws_interval(spread, n_boot=500)
    assert wide_high - wide_low > 2 * (high - low)
    assert draws_interval(spread, n_boot=500) == (wide_low, wide_high)  # seeded

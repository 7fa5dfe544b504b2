"""Label and softmax shift: Holm's adjustment, the interval formulas, and planted changes."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from pipeline.monitoring.outputs import (
    holm,
    label_shift,
    newcombe_interval,
    softmax_shift,
    wilson_interval,
)

CLASSES = ["a", "b", "c", "d"]


def test_holm_matches_the_step_down_by_hand():
    # Sorted 0.01, 0.02, 0.03, 0.5 -> x4, x3, x2, x1, running maximum, capped at 1.
    np.testing.assert_allclose(holm([0.03, 0.01, 0.5, 0.02]), [0.06, 0.04, 0.5, 0.06])
    assert holm([]).size == 0


def test_wilson_interval_equals_scipy():
    low, high = wilson_interval(np.array([3, 40]), np.array([20, 50]))
    for k, n, lo, hi in zip([3, 40], [20, 50], low, high):
        ci = stats.binomtest(k, n).proportion_ci(method="wilson")
        assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_newcombe_interval_brackets_the_difference():
    low, high = newcombe_interval(30, 100, 50, 100)
    assert low < 0.2 < high and low > 0  # 0.30 against 0.50 in 100 each is clearly different


def test_a_changed_class_balance_is_found_and_named():
    rng = np.random.default_rng(0)
    reference = rng.integers(0, 4, 600)
    new = rng.choice(4, 300, p=[0.55, 0.15, 0.15, 0.15])
    result = label_shift(reference, new, CLASSES)
    assert result.p_value < 1e-6 and result.dof == 3
    assert result.ci_low < result.total_variation < result.ci_high
    first = result.per_class[0]
    assert first["difference"] > 0.2 and first["ci_low"] > 0


def test_the_same_balance_is_not_flagged_often():
    alarms = 0
    for seed in range(20):
        rng = np.random.default_rng(seed)
        alarms += label_shift(rng.integers(0, 4, 400), rng.integers(0, 4, 300),
                              CLASSES).p_value < 0.05
    assert alarms <= 2


def test_one_predicted_class_everywhere_is_no_shift():
    result = label_shift(np.zeros(10, int), np.zeros(5, int), CLASSES)
    assert result.p_value == 1.0 and result.g == 0.0


def test_softmax_shift_sees_lower_confidence():
    rng = np.random.default_rng(1)
    reference = rng.dirichlet([8, 1, 1, 1], 300)
    new = rng.dirichlet([2, 1, 1, 1], 200)
    result = softmax_shift(reference, new, CLASSES)
    assert result.confidence_change < 0 and result.ci_high < 0
    assert result.p_value < 1e-3 and result.per_class[0]["p_holm"] >= result.per_class[0][
        "p_value"]
    same = softmax_shift(reference[:150], reference[150:], CLASSES)
    assert same.p_value > 0.05

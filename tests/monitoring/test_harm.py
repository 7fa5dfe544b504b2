"""ATC's threshold and estimate, and the accuracy comparison."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.monitoring.harm import accuracy_change, atc_estimate, atc_threshold


def test_the_threshold_reproduces_the_validation_accuracy():
    rng = np.random.default_rng(0)
    confidence = rng.random(1000)
    correct = rng.random(1000) < confidence  # confident answers are more often right
    t = atc_threshold(confidence, correct)
    estimate, low, high = atc_estimate(confidence, t)
    assert estimate == pytest.approx(correct.mean(), abs=0.002)
    assert low < estimate < high


def test_atc_follows_a_harder_set_where_confidence_still_ranks_correctness():
    """Right answers' confidence ~ U(0.7, 1), wrong ones' ~ U(0.2, 0.7); the reference is 90%
    right, the new set 60%: ATC expects 0.60 (the threshold falls at 0.7), where the
    reference accuracy says 0.90."""
    rng = np.random.default_rng(1)

    def draw(n, accuracy):
        right = rng.random(n) < accuracy
        return np.where(right, rng.uniform(0.7, 1, n), rng.uniform(0.2, 0.7, n)), right

    t = atc_threshold(*draw(4000, 0.9))
    confidence, right = draw(4000, 0.6)
    assert t == pytest.approx(0.7, abs=0.02)
    assert atc_estimate(confidence, t)[0] == pytest.approx(right.mean(), abs=0.02)


def test_accuracy_change_finds_a_drop_and_not_a_tie():
    drop = accuracy_change(300, 500, 420, 500)
    assert drop.difference == pytest.approx(-0.24) and drop.ci_high < 0 and drop.p_drop < 1e-6
    same = accuracy_change(420, 500, 421, 500)
    assert same.ci_low < 0 < same.ci_high and same.p_drop > 0.3
    perfect = accuracy_change(10, 10, 20, 20)
    assert perfect.p_drop == 1.0

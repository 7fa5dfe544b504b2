"""The novelty test against its definition: exact k-NN novelty, its level under no shift
(counted over seeded draws), and a small far-away minority found and sized."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import pairwise_distances

from pipeline.monitoring.novelty import novelty_scores, novelty_test


def _cloud(rng, n, d=16, shift=0.0):
    return rng.normal(shift, 1.0, (n, d)) + 3.0  # off the origin: cosine distances vary


def test_the_scores_are_the_mean_distance_to_the_nearest_reference_rows():
    rng = np.random.default_rng(0)
    Z = _cloud(rng, 40)
    is_new = np.zeros((1, 40), bool)
    is_new[0, 25:] = True
    D = pairwise_distances(Z, metric="cosine")
    np.fill_diagonal(D, np.inf)
    index = np.argsort(D, axis=1)[:, :39]
    distance = np.take_along_axis(D, index, axis=1)
    got = novelty_scores(is_new, distance, index, 3)[0]
    to_reference = D[:, :25]
    want = np.sort(to_reference, axis=1)[:, :3].mean(1)
    np.testing.assert_allclose(got, want, rtol=1e-12)


def test_a_window_without_enough_reference_rows_counts_its_last_distance():
    distance = np.array([[0.1, 0.2, 0.3]])
    index = np.array([[1, 2, 3]])
    is_new = np.array([[False, True, False, True]])  # one reference row in the window
    got = novelty_scores(is_new, distance, index, 3)
    assert got[0, 0] == pytest.approx((0.2 + 0.3 + 0.3) / 3)


def test_same_distribution_draws_alarm_at_most_at_the_level():
    """200 seeded draws of one distribution: the alarms at 0.05 stay within the binomial's
    reach of 10 (measured 2026-12-07: 1; the count is discrete, so the test is conservative)."""
    alarms = 0
    for seed in range(200):
        rng = np.random.default_rng(seed)
        test, _ = novelty_test(_cloud(rng, 60), _cloud(rng, 40), permutations=99, seed=seed)
        alarms += test.p_value < 0.05
    assert alarms <= 18  # P(Binomial(200, 0.05) > 18) < 0.003


def test_a_far_minority_is_found_and_sized():
    rng = np.random.default_rng(1)
    reference = _cloud(rng, 150)
    novel = _cloud(rng, 12, shift=-5.0)  # another direction: far in cosine
    new = np.concatenate([_cloud(rng, 108), novel])
    test, scores = novelty_test(reference, new, permutations=199)
    assert test.p_value == pytest.approx(1 / 200)
    assert test.ci_low < test.excess < test.ci_high
    assert test.ci_low > 0 and test.ci_low < 0.1 < test.ci_high  # 12 of 120 are novel
    assert test.outliers >= 12 and test.expected_share == pytest.approx(0.05, abs=0.02)
    assert set(np.argsort(-scores)[:12]) == set(range(108, 120))
    low, high = stats.binomtest(test.outliers, 120).proportion_ci(method="exact")
    assert test.ci_low == pytest.approx(low - test.expected_share)


def test_a_novel_cluster_larger_than_the_window_is_still_found():
    rng = np.random.default_rng(2)
    novel = _cloud(rng, 60, shift=-5.0)  # more novel rows than the window holds
    test, scores = novelty_test(_cloud(rng, 100), np.concatenate([_cloud(rng, 40), novel]),
                                permutations=99, window=16)
    assert test.p_value < 0.05 and test.outliers >= 55
    assert scores[40:].min() > scores[:40].max()


def test_too_few_rows_are_refused():
    with pytest.raises(ValueError, match="2 reference rows"):
        novelty_test(np.ones((1, 3)), np.ones((5, 3)))

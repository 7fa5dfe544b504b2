"""The domain classifier: DeLong's AUC equals scikit-learn's, its interval covers, the test
holds its level on one distribution and finds a planted shift."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline.monitoring.classifier import delong_interval, domain_classifier


def test_delong_auc_equals_scikit_learn_and_brackets_it():
    rng = np.random.default_rng(0)
    labels = rng.random(300) < 0.4
    scores = rng.normal(size=300) + labels * 0.8
    scores[:20] = 0.5  # ties count a half
    auc, low, high = delong_interval(scores, labels)
    assert auc == pytest.approx(roc_auc_score(labels, scores))
    assert low < auc < high and high - low < 0.2


def test_delong_interval_covers_the_true_auc_most_of_the_time():
    # Normal scores shifted by d: the true AUC is Phi(d / sqrt(2)).
    from scipy.stats import norm

    truth, covered = norm.cdf(1 / np.sqrt(2)), 0
    for seed in range(60):
        rng = np.random.default_rng(seed)
        scores = np.r_[rng.normal(1, 1, 80), rng.normal(0, 1, 120)]
        _, low, high = delong_interval(scores, np.r_[np.ones(80), np.zeros(120)] > 0)
        covered += low <= truth <= high
    assert covered >= 53  # 95% of 60 is 57; a wrong variance misses far more often


def test_one_distribution_rarely_alarms():
    alarms = 0
    for seed in range(10):
        rng = np.random.default_rng(100 + seed)
        test, _ = domain_classifier(rng.normal(size=(120, 20)), rng.normal(size=(80, 20)),
                                    seed=seed)
        alarms += test.p_value < 0.05
        assert 0.3 < test.auc < 0.7
    assert alarms <= 1


def test_a_planted_shift_is_found_with_its_scores():
    rng = np.random.default_rng(5)
    X = rng.normal(size=(150, 30))
    Y = rng.normal(size=(100, 30))
    Y[:, :3] += 1.0  # three of thirty features move
    test, scores = domain_classifier(X, Y)
    assert test.p_value < 1e-6 and test.auc > 0.7 and test.ci_low > 0.6
    assert test.proxy_a_distance > 0.5
    assert scores.shape == (100,) and np.all((scores >= 0) & (scores <= 1))
    # The new rows that moved most score highest.
    top = np.argsort(-scores)[:10]
    assert Y[top, :3].sum(1).mean() > Y[:, :3].sum(1).mean()

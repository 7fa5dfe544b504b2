"""LogME is the maximised log evidence of a Bayesian linear model, per image, over classes."""

from __future__ import annotations

import numpy as np
from scipy.stats import multivariate_normal

from pipeline.advice.logme import logme


def _evidence(F, target, alpha, beta):
    """log p(target) under target ~ N(0, F F^T / alpha + I / beta), per sample."""
    n = len(F)
    cov = F @ F.T / alpha + np.eye(n) / beta
    return multivariate_normal(np.zeros(n), cov).logpdf(target) / n


def test_logme_is_the_maximum_of_the_evidence_over_its_precisions():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    F = rng.normal(size=(60, 5)) + y[:, None] * 0.8
    grid = np.logspace(-3, 3, 61)
    best = np.mean([max(_evidence(F, (y == c).astype(float), a, b) for a in grid for b in grid)
                    for c in (0, 1)])
    # the fixed point reaches the grid's best (to the grid's resolution), never beyond the max
    assert abs(logme(F, y) - best) < 0.01


def test_informative_features_score_higher_than_noise():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 400)
    noise = rng.normal(size=(400, 32))
    signal = noise + 2 * rng.normal(size=(4, 32))[y]
    assert logme(signal, y) > logme(noise, y) + 0.1

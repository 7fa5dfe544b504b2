"""The MMD test: chunked kernel sums equal the dense matrix's, the p-value's formula, its
calibration under the null and its power against a planted shift."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.monitoring.kernel import (
    kernel_sums,
    median_bandwidth,
    mmd2_unbiased,
    mmd_test,
    permutation_p_value,
)


def dense_mmd2(X, Y, sigma):
    """The unbiased MMD² written out with the whole kernel matrix."""
    Z = np.concatenate([X, Y]).astype(np.float64)
    K = np.exp(-((Z[:, None] - Z[None]) ** 2).sum(-1) / (2 * sigma ** 2))
    m, n = len(X), len(Y)
    kxx, kyy, kxy = K[:m, :m], K[m:, m:], K[:m, m:]
    return ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy))
            / (n * (n - 1)) - 2 * kxy.mean())


def test_chunked_sums_equal_the_dense_matrix_for_any_block():
    rng = np.random.default_rng(0)
    Z = rng.normal(size=(53, 6))
    A = (rng.random((53, 4)) < 0.4).astype(np.float32)
    K = np.exp(-((Z[:, None] - Z[None]) ** 2).sum(-1) / (2 * 1.7 ** 2))
    for block in (7, 16, 53, 1000):
        quadratic, rows, first = kernel_sums(Z, A, 1.7, block)
        np.testing.assert_allclose(quadratic, np.einsum("ip,ij,jp->p", A, K, A), rtol=1e-5)
        np.testing.assert_allclose(rows, K.sum(1), rtol=1e-5)
        np.testing.assert_allclose(first, K @ A[:, 0], rtol=1e-5)


def test_the_statistic_equals_the_dense_unbiased_mmd():
    rng = np.random.default_rng(1)
    X, Y = rng.normal(size=(30, 5)), rng.normal(0.5, 1, size=(20, 5))
    result = mmd_test(X, Y, permutations=20, bandwidth=2.0, block=8)
    assert result.mmd2 == pytest.approx(dense_mmd2(X, Y, 2.0), rel=1e-4)
    assert result.ci_low < result.mmd2 < result.ci_high


def test_mmd2_from_sums_is_the_formula():
    # Two rows each, kernel values written by hand: k(x1,x2)=.5, k(y1,y2)=.25, k(x,y)=.1.
    K = np.array([[1, .5, .1, .1], [.5, 1, .1, .1], [.1, .1, 1, .25], [.1, .1, .25, 1]])
    a = np.array([1.0, 1, 0, 0])
    value = mmd2_unbiased(a @ K @ a, a @ K.sum(1), K.sum(), 2, 2)
    assert value == pytest.approx(.5 + .25 - 2 * .1)


def test_permutation_p_value_is_k_plus_one_over_n_plus_one():
    null = np.array([0.1, 0.2, 0.3, 0.4])
    assert permutation_p_value(0.5, null) == pytest.approx(1 / 5)
    assert permutation_p_value(0.25, null) == pytest.approx(3 / 5)
    assert permutation_p_value(0.0, null) == pytest.approx(1.0)
    assert permutation_p_value(0.3, null) == pytest.approx(3 / 5)  # a tie counts


def test_median_bandwidth_is_the_median_distance():
    Z = np.array([[0.0], [1.0], [3.0]])  # distances 1, 2, 3
    assert median_bandwidth(Z) == pytest.approx(2.0)
    assert median_bandwidth(np.zeros((4, 2))) == 1.0


def test_null_calibration_false_alarms_stay_near_five_percent():
    """40 seeded draws of two samples of one distribution: about 2 p-values below 0.05 are
    expected; a test that counted wrong (no +1, a biased statistic) would give many more."""
    alarms = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        X, Y = rng.normal(size=(60, 8)), rng.normal(size=(40, 8))
        alarms.append(mmd_test(X, Y, permutations=99, seed=seed).p_value < 0.05)
    assert sum(alarms) <= 5


def test_a_mean_shift_is_found():
    rng = np.random.default_rng(3)
    X, Y = rng.normal(size=(100, 16)), rng.normal(0.4, 1, size=(80, 16))
    result = mmd_test(X, Y, permutations=99)
    assert result.p_value == pytest.approx(1 / 100)
    assert result.ci_low > 0


def test_too_few_rows_are_refused():
    with pytest.raises(ValueError, match="at least 2"):
        mmd_test(np.zeros((1, 3)), np.zeros((5, 3)))

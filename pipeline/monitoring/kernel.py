"""The kernel two-sample test: unbiased MMD² with an RBF kernel, and its permutation p-value.

The maximum mean discrepancy (Gretton et al. 2012, JMLR 13) is the distance between the two
samples' mean embeddings in the kernel's feature space; its unbiased estimate is

    MMD²_u = S_XX / m(m-1) + S_YY / n(n-1) - 2 S_XY / mn,

where ``S_AB`` sums the kernel over pairs of rows from A and B (a row never with itself). The
kernel is ``exp(-|x - y|² / 2σ²)`` with σ the median distance between pooled rows (the median
heuristic, on a seeded sample). Its null distribution is found by permuting which rows are
"reference" and which are "new"; the p-value counts the permutations at least as large as the
observed statistic, ``(k + 1) / (P + 1)``, so it is never 0 and is exact at that resolution
(Phipson & Smyth 2010).

Every permutation's statistic comes from one pass over the kernel matrix in blocks: with ``a``
the indicator of the first sample and ``r = K 1``, ``S_XX = aᵀKa - m``, ``S_XY = aᵀr - aᵀKa``
and ``S_YY = 1ᵀK1 - 2aᵀr + aᵀKa - n`` (the RBF kernel is 1 on its diagonal), so the blocks
need only be multiplied by the matrix of indicator columns. The full ``N x N`` matrix never
exists: 50,000 against 50,000 rows is 10^10 kernel values, read ``block x block`` at a time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["MMDTest", "kernel_sums", "median_bandwidth", "mmd_test", "mmd2_unbiased",
           "permutation_p_value"]

# Rows per side of one kernel block: 2,048 x 2,048 float32 is 16 MiB, with its distance matrix
# and the indicator products a few times that; small enough for any machine, large enough that
# the matrix products dominate the Python loop.
BLOCK = 2048
# Rows sampled for the median distance: its median is stable to a percent or so from 1,000
# rows (500,000 pairs), and it costs nothing against the test itself.
MEDIAN_ROWS = 1000
Z_95 = 1.959963984540054


@dataclass(frozen=True)
class MMDTest:
    """The kernel two-sample test of two sets of feature rows."""

    mmd2: float  # unbiased MMD² (kernel units: 0 when the distributions are equal)
    ci_low: float  # 95% normal interval from the statistic's first-order variance
    ci_high: float
    p_value: float  # (k + 1) / (P + 1) over P permutations of the rows' sample labels
    bandwidth: float  # σ of the RBF kernel (median heuristic)
    permutations: int
    n_reference: int
    n_new: int


def median_bandwidth(Z: np.ndarray, seed: int = 0, rows: int = MEDIAN_ROWS) -> float:
    """σ of the RBF kernel: the median Euclidean distance between distinct pooled rows of
    ``Z`` (at most ``rows`` of them, drawn with ``seed``); 1.0 when every row is the same."""
    import torch

    rng = np.random.default_rng(seed)
    pick = rng.choice(len(Z), min(rows, len(Z)), replace=False) if len(Z) > rows else slice(None)
    sample = torch.as_tensor(np.asarray(Z[pick], dtype=np.float64))
    distances = torch.nn.functional.pdist(sample)
    positive = distances[distances > 0]
    return float(positive.median()) if len(positive) else 1.0


def kernel_sums(Z: np.ndarray, indicators: np.ndarray, bandwidth: float, block: int = BLOCK
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The RBF kernel's sums that the MMD needs, block by block.

    Parameters
    ----------
    Z
        ``(N, D)`` rows of both samples.
    indicators
        ``(N, P)`` 0/1 columns, each marking one assignment's first sample.
    bandwidth
        σ of the kernel.
    block
        Rows per side of a kernel block.

    Returns
    -------
    quadratic
        ``(P,)`` float64: ``aᵀKa`` for each column ``a``.
    rows
        ``(N,)`` float64: ``K 1``, each row's kernel sum.
    first
        ``(N,)`` float64: ``K a`` of the first column (the observed assignment).
    """
    import torch

    Zt = torch.as_tensor(np.ascontiguousarray(Z, dtype=np.float32))
    A = torch.as_tensor(np.ascontiguousarray(indicators, dtype=np.float32))
    norms = (Zt * Zt).sum(1)
    scale = -1.0 / (2.0 * bandwidth * bandwidth)
    n, p = A.shape
    quadratic = torch.zeros(p, dtype=torch.float64)
    rows = torch.zeros(n, dtype=torch.float64)
    first = torch.zeros(n, dtype=torch.float64)
    with torch.inference_mode():
        for lo in range(0, n, block):
            hi = min(n, lo + block)
            product = torch.zeros(hi - lo, p, dtype=torch.float64)
            for lo2 in range(0, n, block):
                hi2 = min(n, lo2 + block)
                # |x|² + |y|² - 2xy, clamped: rounding can make a tiny distance negative.
                d2 = (norms[lo:hi, None] + norms[None, lo2:hi2]
                      - 2.0 * Zt[lo:hi] @ Zt[lo2:hi2].T).clamp_(min=0.0)
                K = torch.exp(d2.mul_(scale))
                if lo == lo2:  # a row's distance to itself is 0 exactly, whatever rounding says
                    K.fill_diagonal_(1.0)
                rows[lo:hi] += K.sum(1, dtype=torch.float64)
                # float32 products of one block, summed across blocks in float64: the MMD is a
                # small difference of large sums.
                product += (K @ A[lo2:hi2]).double()
            quadratic += (product * A[lo:hi].double()).sum(0)
            first[lo:hi] = product[:, 0]
    return quadratic.numpy(), rows.numpy(), first.numpy()


def mmd2_unbiased(quadratic, first_rows, total: float, m: int, n: int):
    """MMD²_u from the kernel sums of an assignment: ``quadratic`` = aᵀKa, ``first_rows`` =
    aᵀ(K1), ``total`` = 1ᵀK1, with ``m`` rows in the first sample and ``n`` in the second
    (arrays broadcast: one value per assignment)."""
    s_xx = quadratic - m
    s_xy = first_rows - quadratic
    s_yy = total - 2.0 * first_rows + quadratic - n
    return s_xx / (m * (m - 1)) + s_yy / (n * (n - 1)) - 2.0 * s_xy / (m * n)


def permutation_p_value(observed: float, null: np.ndarray) -> float:
    """``(k + 1) / (P + 1)``: ``k`` of the ``P`` permutation statistics reach ``observed``.

    The observed assignment counts as one of the permutations, so the p-value is at least
    ``1 / (P + 1)`` and a test at level α rejects with probability at most α under the null.
    A relative tolerance keeps ties in exact arithmetic tied after rounding.
    """
    null = np.asarray(null, dtype=np.float64)
    tolerance = 1e-9 * max(1.0, abs(observed))
    k = int(np.sum(null >= observed - tolerance))
    return (k + 1) / (len(null) + 1)


def mmd_test(X: np.ndarray, Y: np.ndarray, *, permutations: int = 200, seed: int = 0,
             bandwidth: float | None = None, block: int = BLOCK) -> MMDTest:
    """Whether rows ``X`` (reference) and ``Y`` (new) come from one distribution.

    Parameters
    ----------
    X, Y
        Feature rows, at least 2 each.
    permutations
        Random relabellings of the pooled rows for the null distribution.
    seed
        Seeds the permutations and the median heuristic's sample.
    bandwidth
        σ of the RBF kernel; None: the median heuristic.
    block
        Rows per side of a kernel block (memory is ``O(block² + N x permutations)``).

    Returns
    -------
    MMDTest
        MMD²_u with a 95% interval from its first-order (Hoeffding) variance,
        ``4 Var(h_X)/m + 4 Var(h_Y)/n``, and the permutation p-value. Under the null the
        first-order variance vanishes, so the interval is then narrow around 0: it sizes an
        effect, the p-value tests for one.
    """
    m, n = len(X), len(Y)
    if m < 2 or n < 2:
        raise ValueError(f"the MMD needs at least 2 rows on each side, not {m} and {n}")
    Z = np.concatenate([np.asarray(X, np.float32), np.asarray(Y, np.float32)])
    sigma = median_bandwidth(Z, seed) if bandwidth is None else float(bandwidth)
    rng = np.random.default_rng(seed)
    indicators = np.zeros((m + n, permutations + 1), np.float32)
    indicators[:m, 0] = 1.0
    for j in range(1, permutations + 1):
        indicators[rng.permutation(m + n)[:m], j] = 1.0
    quadratic, rows, first = kernel_sums(Z, indicators, sigma, block)
    total = float(rows.sum())
    stats = mmd2_unbiased(quadratic, indicators.T.astype(np.float64) @ rows, total, m, n)
    observed = float(stats[0])
    # First-order projections of the U-statistic: each row's mean kernel to its own sample
    # (itself left out) less its mean kernel to the other sample.
    to_x, to_y = first, rows - first
    h_x = (to_x[:m] - 1.0) / (m - 1) - to_y[:m] / n
    h_y = (to_y[m:] - 1.0) / (n - 1) - to_x[m:] / m
    se = float(np.sqrt(4.0 * h_x.var(ddof=1) / m + 4.0 * h_y.var(ddof=1) / n))
    return MMDTest(observed, observed - Z_95 * se, observed + Z_95 * se,
                   permutation_p_value(observed, stats[1:]), sigma, permutations, m, n)

"""The novelty test: a minority of new images unlike anything in the reference.

The domain classifier and the MMD compare two distributions; a tenth of new images of a class
never seen moves a distribution by a tenth, and at a few hundred images that is lost in the
noise. This test looks at images instead. Each image's **novelty** is its mean cosine distance
to its ``k`` nearest reference images (Sun et al. 2022, "Out-of-distribution detection with
deep nearest neighbors"; a reference image's own distance leaves itself out). An image is an
**outlier** when its novelty exceeds the reference images' ``1 - tail`` quantile (the
conformal threshold, Vovk et al. 2005); the statistic is the share of new images that are
outliers, and the effect size its excess over the share expected without a shift.

The p-value is a permutation test (Phipson & Smyth 2010, ``(k + 1) / (P + 1)``): the pooled
images' reference/new labels are shuffled and the whole statistic, threshold included,
recomputed. Under no shift the pooled images are exchangeable, so the test holds its level
whatever the finite reference does to the threshold (a binomial test of the outlier count
holds it only approximately: every new image meets the same threshold, so their outcomes are
dependent). The count is discrete, so the test is conservative. Each relabelling needs only
every image's nearest pooled neighbours: those are found once (scikit-learn, brute force in
chunks), and an image's ``k`` nearest reference images are read from its :data:`WINDOW`
nearest pooled ones (an image with fewer than ``k`` reference images among them counts the
window's last distance for the missing ones: a lower bound, the same rule for every
relabelling).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from pipeline.monitoring.kernel import permutation_p_value

__all__ = ["NEIGHBOURS", "TAIL", "WINDOW", "NoveltyTest", "novelty_scores", "novelty_test"]

NEIGHBOURS = 3  # k: one neighbour is noisy, many blur a small new class into its neighbours
TAIL = 0.05  # an outlier is beyond the reference's 95th percentile of novelty
# Pooled neighbours kept per image: with a reference of at least a fifth of the pool, 32 hold
# 3 reference images except with probability below 1%; with half, below 1e-6.
WINDOW = 32
# Entries of one chunk of relabellings (relabellings x images x window): 4 Mi, about 60 MB with
# the running counts (int32) and the products (float64).
CHUNK = 1 << 22


@dataclass(frozen=True)
class NoveltyTest:
    """The share of new images farther from the reference than the reference from itself."""

    outlier_share: float  # new images beyond the reference's threshold, out of all new images
    expected_share: float  # its mean over the relabellings (no shift)
    excess: float  # outlier_share - expected_share: the share of new images that are novel
    ci_low: float  # Clopper-Pearson 95% interval of the outlier share, less expected_share
    ci_high: float
    p_value: float  # permutation: (k + 1) / (P + 1)
    threshold: float  # the reference's 1 - tail quantile of novelty (cosine distance)
    outliers: int
    neighbours: int
    tail: float
    permutations: int
    n_reference: int
    n_new: int


def _neighbours(Z: np.ndarray, window: int) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``window`` nearest other rows by cosine distance: distances and indices."""
    from sklearn.neighbors import NearestNeighbors

    found = NearestNeighbors(n_neighbors=window, metric="cosine", algorithm="brute").fit(Z)
    distance, index = found.kneighbors()  # no X: a row is not its own neighbour
    return distance.astype(np.float64), index


def novelty_scores(is_new: np.ndarray, distance: np.ndarray, index: np.ndarray,
                   neighbours: int) -> np.ndarray:
    """Each row's mean distance to its ``neighbours`` nearest rows labelled reference.

    Parameters
    ----------
    is_new
        ``(B, N)`` booleans: one labelling of the ``N`` pooled rows per line.
    distance, index
        ``(N, W)`` each row's nearest pooled rows, nearest first.
    neighbours
        ``k``.

    Returns
    -------
    numpy.ndarray
        ``(B, N)`` novelty; a row with fewer than ``k`` reference rows in its window counts the
        window's last distance for each missing one.
    """
    reference = ~is_new[:, index]  # (B, N, W)
    first = reference & (np.cumsum(reference, axis=2, dtype=np.int32) <= neighbours)
    missing = neighbours - first.sum(2)
    return (np.einsum("bnw,nw->bn", first, distance)
            + missing * distance[:, -1]) / neighbours


def _outliers(is_new: np.ndarray, novelty: np.ndarray, rank: int) -> tuple[np.ndarray,
                                                                           np.ndarray]:
    """Per labelling: the threshold (the ``rank``-th smallest reference novelty) and the count
    of new rows beyond it."""
    masked = np.where(is_new, np.inf, novelty)
    threshold = np.partition(masked, rank - 1, axis=1)[:, rank - 1]
    return threshold, (is_new & (novelty > threshold[:, None])).sum(1)


def novelty_test(X: np.ndarray, Y: np.ndarray, *, neighbours: int = NEIGHBOURS,
                 tail: float = TAIL, permutations: int = 200, seed: int = 0,
                 window: int = WINDOW) -> tuple[NoveltyTest, np.ndarray]:
    """Whether some of the new rows ``Y`` lie farther from the reference rows ``X`` than the
    reference rows lie from each other.

    Parameters
    ----------
    X, Y
        Feature rows of the reference and the new set (at least 2 and 1).
    neighbours
        ``k``: novelty is the mean distance to the ``k`` nearest reference rows.
    tail
        The outlier threshold is the reference novelty's ``1 - tail`` quantile.
    permutations
        Relabellings of the pooled rows for the null distribution.
    seed
        Seeds the relabellings.
    window
        Pooled neighbours kept per row (see the module's note).

    Returns
    -------
    NoveltyTest, numpy.ndarray
        The findings, and each new row's novelty (the gallery shows the highest).
    """
    m, n = len(Y), len(X)
    if n < 2 or m < 1:
        raise ValueError(f"the novelty test needs 2 reference rows and 1 new, not {n} and {m}")
    Z = np.concatenate([np.asarray(X, np.float32), np.asarray(Y, np.float32)])
    total = n + m
    neighbours = min(neighbours, n - 1)  # a reference row's own neighbours leave it out
    distance, index = _neighbours(Z, min(total - 1, max(window, neighbours)))
    # The conformal order statistic: the new rows beyond it are those whose novelty a
    # reference row reaches less than ``tail`` of the time (at least the largest, for a small
    # reference; the permutations keep the test exact either way).
    rank = min(n, math.ceil((n + 1) * (1.0 - tail)))
    rng = np.random.default_rng(seed)
    labels = np.zeros((permutations + 1, total), bool)
    labels[0, n:] = True
    for j in range(1, permutations + 1):
        labels[j, rng.permutation(total)[:m]] = True
    counts = np.empty(permutations + 1, np.int64)
    step = max(1, CHUNK // (total * distance.shape[1]))
    for lo in range(0, permutations + 1, step):
        block = labels[lo:lo + step]
        novelty = novelty_scores(block, distance, index, neighbours)
        threshold, counts[lo:lo + step] = _outliers(block, novelty, rank)
        if lo == 0:
            observed_threshold, scores = float(threshold[0]), novelty[0, n:]
    outliers = int(counts[0])
    expected = float(counts[1:].mean()) / m if permutations else tail
    low, high = stats.binomtest(outliers, m).proportion_ci(0.95, method="exact")
    share = outliers / m
    test = NoveltyTest(share, expected, share - expected, float(low) - expected,
                       float(high) - expected,
                       permutation_p_value(outliers, counts[1:]), observed_threshold, outliers,
                       neighbours, tail, permutations, n, m)
    return test, scores

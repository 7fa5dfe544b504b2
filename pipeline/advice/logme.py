"""LogME (You et al., ICML 2021, https://arxiv.org/abs/2102.11005): how well features transfer
to labels, from the evidence of a Bayesian linear model, without training a head.

For each class, the one-hot target column is regressed on the features with a Gaussian prior
(precision ``alpha``) and Gaussian noise (precision ``beta``); both are set by maximising the
marginal likelihood (MacKay's fixed point), and the log evidence per image is averaged over the
classes. Higher is better; the score compares features for one labelled set (layers of one
network, or backbones), not across data sets.
"""

from __future__ import annotations

import numpy as np

__all__ = ["logme"]

_ITERATIONS = 11  # the fixed point settles within ~10 steps (the paper's own bound)


def logme(F: np.ndarray, y: np.ndarray) -> float:
    """The LogME score of features ``F`` (``(n, d)``) for label indices ``y``.

    One eigendecomposition of ``F^T F`` (``d x d``) serves every class, so the cost is one
    ``n x d x d`` product and ``d x d`` eigenvectors, whatever the number of classes.
    """
    F = np.asarray(F, np.float64)
    n, d = F.shape
    s2, V = np.linalg.eigh(F.T @ F)
    s2 = np.clip(s2, 0, None)
    rank = s2 > s2.max() * 1e-10
    scores = []
    for c in np.unique(y):
        target = (y == c).astype(np.float64)
        # z: the target's coordinates on the features' left singular vectors
        z = (V[:, rank].T @ (F.T @ target)) / np.sqrt(s2[rank])
        outside = max(float(target @ target - z @ z), 0.0)  # the part no weight can reach
        scores.append(_evidence(s2, rank, z, outside, n, d))
    return float(np.mean(scores))


def _evidence(s2: np.ndarray, rank: np.ndarray, z: np.ndarray, outside: float, n: int,
              d: int) -> float:
    """The maximised log evidence per sample of one target column."""
    sigma2, z2 = s2[rank], z**2
    alpha, beta = 1.0, 1.0
    for _ in range(_ITERATIONS):
        gamma = float(np.sum(beta * sigma2 / (alpha + beta * sigma2)))
        weight2 = float(np.sum(beta**2 * sigma2 * z2 / (alpha + beta * sigma2) ** 2))
        residual = float(np.sum(alpha**2 * z2 / (alpha + beta * sigma2) ** 2)) + outside
        alpha = gamma / max(weight2, 1e-12)
        beta = (n - gamma) / max(residual, 1e-12)
    weight2 = float(np.sum(beta**2 * sigma2 * z2 / (alpha + beta * sigma2) ** 2))
    residual = float(np.sum(alpha**2 * z2 / (alpha + beta * sigma2) ** 2)) + outside
    log_det = float(np.sum(np.log(alpha + beta * s2)))  # every eigenvalue, the zeros included
    evidence = (n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
                - beta / 2 * residual - alpha / 2 * weight2 - log_det / 2)
    return evidence / n

"""Outliers: images far from every other image, by their distance to their nearest neighbours.

An image's score is its mean cosine distance (1 - similarity) to its ``k`` nearest rows
(:mod:`pipeline.auditing.neighbours`), whatever their class: an image that no class has anything
like (a blank scan, a picture from another data set) scores high, while a mislabelled image,
close to the images of its true class, does not; the label audit finds those.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import median_abs_deviation

from pipeline.auditing.neighbours import Neighbours

__all__ = ["Outlier", "outlier_scores", "top_outliers"]


@dataclass(frozen=True)
class Outlier:
    """An image far from its nearest neighbours."""

    rank: int  # 1: the farthest
    index: int
    path: str
    score: float  # mean cosine distance to the k nearest rows
    robust_z: float  # (score - median) / MAD over all rows, the MAD scaled to a normal sigma


def outlier_scores(neighbours: Neighbours) -> np.ndarray:
    """``(n,)`` mean cosine distance of each row to its ``k`` nearest rows."""
    if neighbours.similarity.shape[1] == 0:
        return np.zeros(len(neighbours.similarity))
    return (1.0 - neighbours.similarity.astype(np.float64)).mean(1)


def top_outliers(scores: np.ndarray, paths: list[str], top: int) -> list[Outlier]:
    """The ``top`` highest scores, highest first, each with its robust z-score."""
    median = float(np.median(scores)) if len(scores) else 0.0
    # scale="normal": the MAD times 1.4826, the standard deviation's estimate under normality.
    mad = float(median_abs_deviation(scores, scale="normal")) if len(scores) else 0.0
    order = np.argsort(-scores, kind="stable")[:top]
    return [Outlier(rank + 1, int(i), paths[i], float(scores[i]),
                    float((scores[i] - median) / mad) if mad > 0 else 0.0)
            for rank, i in enumerate(order)]

"""Does a shift hurt: the accuracy expected without labels, and the accuracy measured with them.

- **ATC**, average thresholded confidence (Garg et al. 2022, "Leveraging unlabeled data to
  predict out-of-distribution performance"): on the reference validation split, find the
  confidence threshold ``t`` above which the share of images equals the head's accuracy there;
  the share of new images above ``t`` is the accuracy expected on them. It needs no label of
  the new set, and is exact when the shift leaves the link between confidence and correctness
  as it was; a new class, which the model confidently gets wrong, is where it is weakest.
- **Measured accuracy** where the new set has labels: right answers out of images, with the
  exact interval, against the reference test accuracy; the difference has Newcombe's interval
  and a one-sided two-proportion z-test for a drop.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import stats

from pipeline.metrics.significance import accuracy_interval
from pipeline.monitoring.outputs import newcombe_interval

__all__ = ["AccuracyChange", "accuracy_change", "atc_estimate", "atc_threshold"]


def atc_threshold(confidence: np.ndarray, correct: np.ndarray) -> float:
    """The threshold ``t`` with ``mean(confidence > t) == mean(correct)`` on a labelled split
    (the ``1 - accuracy`` quantile of the confidences)."""
    accuracy = float(np.mean(correct))
    return float(np.quantile(np.asarray(confidence, np.float64), 1.0 - accuracy,
                             method="lower"))


def atc_estimate(confidence: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """The accuracy ATC expects: the share of ``confidence`` above ``threshold``, with the
    exact 95% interval of that share (the threshold's own uncertainty not included)."""
    above = int(np.sum(np.asarray(confidence) > threshold))
    low, high = accuracy_interval(above, len(confidence))
    return above / len(confidence), low, high


@dataclass(frozen=True)
class AccuracyChange:
    """An accuracy against a reference accuracy: new minus reference."""

    new: float
    new_ci_low: float
    new_ci_high: float
    reference: float
    difference: float
    ci_low: float  # Newcombe's 95% interval of the difference
    ci_high: float
    p_drop: float  # one-sided: the new accuracy is lower
    n_new: int
    n_reference: int


def accuracy_change(right_new: int, n_new: int, right_ref: int, n_ref: int) -> AccuracyChange:
    """Compare ``right_new / n_new`` with ``right_ref / n_ref``."""
    new, ref = right_new / n_new, right_ref / n_ref
    low_new, high_new = accuracy_interval(right_new, n_new)
    low, high = newcombe_interval(right_ref, n_ref, right_new, n_new)
    pooled = (right_new + right_ref) / (n_new + n_ref)
    se = np.sqrt(pooled * (1 - pooled) * (1 / n_new + 1 / n_ref))
    # se is 0 only when both are all right or all wrong: then nothing dropped.
    p = float(stats.norm.cdf((new - ref) / se)) if se > 0 else 1.0
    return AccuracyChange(new, low_new, high_new, ref, new - ref, float(low), float(high), p,
                          n_new, n_ref)

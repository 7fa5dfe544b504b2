"""Shift in what the deployed model says: its predicted classes and its softmax outputs.

- **Predicted label shift**: the counts of each predicted class on the reference and on the
  new set, tested with the G-test of independence (the log-likelihood ratio form of the
  chi-square test, ``scipy.stats.chi2_contingency(lambda_="log-likelihood")``). Its effect
  size is the total variation distance between the two predicted-class distributions, with a
  bootstrap interval; each class's share on either side is compared with Newcombe's hybrid
  score interval of a difference of proportions (Newcombe 1998, method 10). This is black-box
  shift detection (Lipton et al. 2018): a change of the class balance shows here first.
- **Softmax shift**: each class's probability, new against reference, by a two-sample
  Kolmogorov-Smirnov test (``scipy.stats.ks_2samp``), the p-values corrected for testing every
  class with Holm's step-down method; beside it the change of the mean confidence (the top
  probability), with Welch's interval.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

__all__ = ["LabelShiftTest", "SoftmaxShift", "holm", "label_shift", "newcombe_interval",
           "softmax_shift", "wilson_interval"]

Z_95 = 1.959963984540054
BOOTSTRAP = 2000  # resamples of the total variation distance's percentile interval


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error, any dependence between tests)."""
    p = np.asarray(p_values, np.float64)
    if p.size == 0:
        return p
    order = np.argsort(p, kind="stable")
    scaled = p[order] * (len(p) - np.arange(len(p)))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return adjusted


def wilson_interval(k, n) -> tuple[np.ndarray, np.ndarray]:
    """Wilson's 95% score interval of the proportions ``k / n`` (arrays)."""
    k, n = np.asarray(k, np.float64), np.asarray(n, np.float64)
    p = np.divide(k, n, out=np.zeros_like(k), where=n > 0)
    z2 = Z_95 * Z_95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return np.clip(centre - half, 0, 1), np.clip(centre + half, 0, 1)


def newcombe_interval(k1, n1, k2, n2) -> tuple[np.ndarray, np.ndarray]:
    """Newcombe's 95% interval of ``k2/n2 - k1/n1`` from the two Wilson intervals."""
    p1, p2 = np.asarray(k1, np.float64) / n1, np.asarray(k2, np.float64) / n2
    l1, u1 = wilson_interval(k1, n1)
    l2, u2 = wilson_interval(k2, n2)
    d = p2 - p1
    return d - np.sqrt((p2 - l2) ** 2 + (u1 - p1) ** 2), d + np.sqrt((u2 - p2) ** 2
                                                                      + (p1 - l1) ** 2)


@dataclass(frozen=True)
class LabelShiftTest:
    """The predicted-class counts of two sets, and whether they differ."""

    g: float  # the G statistic
    dof: int
    p_value: float
    total_variation: float  # half the summed absolute share differences (0 to 1)
    ci_low: float  # its 95% bootstrap interval
    ci_high: float
    per_class: list[dict] = field(default_factory=list)


def label_shift(reference: np.ndarray, new: np.ndarray, classes: Sequence[str], *,
                seed: int = 0) -> LabelShiftTest:
    """Compare the predicted classes (integer labels into ``classes``) of two sets."""
    c = len(classes)
    counts = np.stack([np.bincount(reference, minlength=c), np.bincount(new, minlength=c)])
    n_ref, n_new = counts.sum(1)
    seen = counts.sum(0) > 0
    if seen.sum() < 2:  # one class predicted everywhere: nothing can differ
        g, p, dof = 0.0, 1.0, 0
    else:
        g, p, dof, _ = stats.chi2_contingency(counts[:, seen], correction=False,
                                              lambda_="log-likelihood")
    share_ref, share_new = counts[0] / n_ref, counts[1] / n_new
    tv = 0.5 * float(np.abs(share_new - share_ref).sum())
    rng = np.random.default_rng(seed)
    draws_ref = rng.multinomial(n_ref, share_ref, BOOTSTRAP) / n_ref
    draws_new = rng.multinomial(n_new, share_new, BOOTSTRAP) / n_new
    tv_draws = 0.5 * np.abs(draws_new - draws_ref).sum(1)
    low, high = np.percentile(tv_draws, [2.5, 97.5])
    d_low, d_high = newcombe_interval(counts[0], n_ref, counts[1], n_new)
    per_class = [{"class": name, "reference": int(counts[0, j]), "new": int(counts[1, j]),
                  "reference_share": float(share_ref[j]), "new_share": float(share_new[j]),
                  "difference": float(share_new[j] - share_ref[j]),
                  "ci_low": float(d_low[j]), "ci_high": float(d_high[j])}
                 for j, name in enumerate(classes)]
    return LabelShiftTest(float(g), int(dof), float(p), tv, float(low), float(high), per_class)


@dataclass(frozen=True)
class SoftmaxShift:
    """Each class's probability compared between two sets, and the mean confidence."""

    confidence_change: float  # mean top probability, new minus reference
    ci_low: float  # Welch's 95% interval
    ci_high: float
    p_value: float  # the smallest Holm-adjusted KS p-value over classes
    largest_ks: float  # the largest KS statistic over classes
    per_class: list[dict] = field(default_factory=list)


def softmax_shift(reference: np.ndarray, new: np.ndarray, classes: Sequence[str]
                  ) -> SoftmaxShift:
    """KS test of each class's probability (``(n, C)`` arrays), Holm-corrected over classes,
    and the change of the mean confidence with Welch's interval."""
    tests = [stats.ks_2samp(reference[:, j], new[:, j]) for j in range(len(classes))]
    adjusted = holm([t.pvalue for t in tests])
    per_class = [{"class": name, "ks": float(t.statistic), "p_value": float(t.pvalue),
                  "p_holm": float(a), "reference_mean": float(reference[:, j].mean()),
                  "new_mean": float(new[:, j].mean())}
                 for j, (name, t, a) in enumerate(zip(classes, tests, adjusted))]
    conf_ref, conf_new = reference.max(1), new.max(1)
    change = float(conf_new.mean() - conf_ref.mean())
    var_ref, var_new = conf_ref.var(ddof=1) / len(conf_ref), conf_new.var(ddof=1) / len(conf_new)
    se = float(np.sqrt(var_ref + var_new))
    dof = (var_ref + var_new) ** 2 / (var_ref ** 2 / (len(conf_ref) - 1)
                                      + var_new ** 2 / (len(conf_new) - 1)) if se > 0 else 1.0
    half = float(stats.t.ppf(0.975, dof)) * se
    return SoftmaxShift(change, change - half, change + half, float(adjusted.min()),
                        float(max(t.statistic for t in tests)), per_class)

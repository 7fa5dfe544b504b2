"""MultiLayerHead: a linear head on features chosen from several layers by a group-sparse probe.

In the spirit of Head2Toe (Evci et al., ICML 2022, https://arxiv.org/abs/2201.03529): the pooled
features of every layer of a multi-layer cache (``pipeline extract --layer blocks``) are
concatenated and standardised; a multinomial logistic regression with a group-lasso penalty
(each feature's weights over the classes one group, or each layer one group) ranks them by
the norm of their weights; a logistic regression is then refitted on the top fraction, and the
fraction and its C are chosen on validation data. Where the bottleneck alone transfers best the
chosen features come from it; where the data is far from the pretraining task, earlier layers
take a share, and :attr:`MultiLayerHead.layer_counts_` says how much.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import numpy as np
from scipy.special import softmax
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.heads._base import (
    COMMON_CONSTRAINTS,
    SELECT_ON,
    BaseHead,
    FeatureScaler,
    encode_targets,
    seed_from,
    selection_split,
)
from pipeline.heads.logreg import LogRegHead
from pipeline.heads.protocol import LinearForm

__all__ = ["DEFAULT_FRACTIONS", "MultiLayerHead", "group_lasso_relevance"]

DEFAULT_FRACTIONS = (0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
# C of each refit: fewer than LogRegHead's 13, since every fraction refits the whole grid.
REFIT_CS = tuple(float(c) for c in np.logspace(-4, 2, 7))
GROUPS = ("feature", "layer")


def group_lasso_relevance(Z: np.ndarray, y: np.ndarray, n_classes: int, starts: np.ndarray,
                          alpha: float = 0.05, max_iter: int = 300, tol: float = 1e-5
                          ) -> tuple[np.ndarray, np.ndarray, int]:
    """Each group's weight norm and gradient norm at the group-lasso solution.

    Minimises the mean cross-entropy of ``softmax(Z W + b)`` plus
    ``lam * sum_g sqrt(|g|) * ||W_g||`` (``W_g``: the rows of group ``g``, over all classes) by
    FISTA with a fixed step (the loss's Lipschitz bound), where ``lam = alpha * lam_max`` and
    ``lam_max`` is the smallest penalty at which every group is zero.

    Parameters
    ----------
    Z
        ``(n, d)`` standardised features.
    y
        ``(n,)`` label indices into ``range(n_classes)``.
    starts
        First column of each group, ascending from 0: a group is the columns up to the next.
    alpha
        Penalty as a fraction of ``lam_max``: small keeps most groups, near 1 keeps one.

    Returns
    -------
    norm, gradient, n_iter
        Per group: ``||W_g|| / sqrt(|g|)`` at the solution (0 for a group the penalty removed),
        and the norm of the loss's gradient on the group over ``sqrt(|g|)`` (how close a
        removed group is to entering: the tie-break among zeros); the iterations run.
    """
    Z = np.asarray(Z, np.float32)
    n, d = Z.shape
    starts = np.asarray(starts, np.int64)
    counts = np.diff(np.r_[starts, d])
    sizes = np.sqrt(counts)
    Y = np.eye(n_classes, dtype=np.float32)[y]
    W = np.zeros((d, n_classes), np.float32)
    b = np.log(np.clip(Y.mean(0), 1e-12, None)).astype(np.float32)

    def gradient(W, b):
        residual = (softmax(Z @ W + b, axis=1) - Y) / n
        return Z.T @ residual, residual.sum(0)

    def group_norms(M):  # ||M_g|| / sqrt(|g|), every group at once
        return np.sqrt(np.add.reduceat(np.square(M).sum(1), starts)) / sizes

    lam = alpha * float(group_norms(gradient(W, b)[0]).max())
    step = 1.0 / _lipschitz(Z)
    V, c, momentum, n_iter = W.copy(), b.copy(), 1.0, 0
    while n_iter < max_iter:
        n_iter += 1
        gW, gb = gradient(V, c)
        W_next, b_next = V - step * gW, c - step * gb
        # The group lasso's proximal step: each group shrunk towards 0 by step * lam * sqrt(|g|).
        shrink = np.clip(1 - step * lam / np.maximum(group_norms(W_next), 1e-30), 0, None)
        W_next *= np.repeat(shrink, counts)[:, None].astype(np.float32)
        change = np.linalg.norm(W_next - W) / max(np.linalg.norm(W_next), 1e-12)
        following = (1 + math.sqrt(1 + 4 * momentum**2)) / 2
        V = W_next + (momentum - 1) / following * (W_next - W)
        c = b_next + (momentum - 1) / following * (b_next - b)
        W, b, momentum = W_next, b_next, following
        if change < tol:
            break
    return group_norms(W), group_norms(gradient(W, b)[0]), n_iter


def _lipschitz(Z: np.ndarray) -> float:
    """A bound on the curvature of the mean softmax cross-entropy in (W, b): half the largest
    eigenvalue of ``[Z 1]^T [Z 1] / n`` (the softmax's Hessian is at most 1/2), by power
    iteration with a 10% margin."""
    n = len(Z)
    v = np.random.default_rng(0).normal(size=Z.shape[1]).astype(np.float32)
    top = 0.0
    for _ in range(30):
        w = Z.T @ (Z @ v)
        top = float(np.linalg.norm(w))
        v = w / max(top, 1e-30)
    return 0.5 * 1.1 * (top + n) / n


class MultiLayerHead(BaseHead):
    """Standardised features of several layers, ranked by a group-lasso probe; logistic
    regression on the top fraction, the fraction and C chosen on validation data.

    Parameters
    ----------
    layers : list of (name, start, stop) or None, default=None
        The columns of each layer (a multi-layer cache's ``layers``, which ``pipeline heads``
        passes itself); None: all columns are one layer.
    group : {"feature", "layer"}, default="feature"
        The penalty's groups: each feature (its weights over the classes, as Head2Toe), or each
        layer (whole layers kept or dropped; the fractions then count layers).
    fractions : tuple of float, default=(0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
        Shares of the features (``group="layer"``: of the layers, at least one) to refit on;
        1.0 includes the plain logistic regression on every layer.
    alpha : float, default=0.05
        Group-lasso penalty as a fraction of the smallest one that removes every group.
    Cs : tuple of float, default=7 values from 1e-4 to 1e2, evenly spaced in log
        C of each refit (:class:`~pipeline.heads.logreg.LogRegHead`).
    max_iter : int, default=300
        FISTA iterations of the group-lasso probe.
    select_on : {"log_loss", "accuracy"}, default="log_loss"
        What validation data chooses the fraction and C by; ties go to fewer features.
    validation_fraction : float, default=0.1
        Share of the training data held out to choose by when ``fit`` is given no ``X_val``.
    random_state : int, RandomState instance or None, default=0
        Seeds the holdout split and the refits.

    Attributes
    ----------
    support_ : ndarray of int
        The columns the final model uses, ascending.
    fraction_ : float
        Their share of all columns.
    C_ : float
        The refit's chosen C.
    layer_counts_ : dict of str to int
        Chosen columns per layer, in layer order.
    layers_ : str
        The same as ``name:count`` joined by ``+`` (the results table's ``chosen``), or
        ``all`` when every column is kept.
    relevance_ : ndarray of shape (n_features_in_,)
        Each column's (or its layer's) group-lasso weight norm.
    n_iter_ : int
        FISTA iterations of the probe.
    val_scores_, val_losses_ : dict of float to float
        Validation accuracy and log loss per fraction, each at its best C.
    head_ : LogRegHead
        The refit on the ``support_`` columns.
    coef_ : ndarray of shape (n_classes, n_features_in_)
    intercept_ : ndarray of shape (n_classes,)
        The final model as logits of the raw features (standardisation folded in, zeros
        outside ``support_``): ``predict_proba`` is their softmax.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    """

    _parameter_constraints = {
        "layers": ["array-like", None],
        "group": [StrOptions(set(GROUPS))],
        "fractions": ["array-like"],
        "alpha": [Interval(Real, 0, 1, closed="neither")],
        "Cs": ["array-like"],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "select_on": [StrOptions(set(SELECT_ON))],
        **COMMON_CONSTRAINTS,
    }

    def __init__(self, layers=None, group="feature", fractions=DEFAULT_FRACTIONS, alpha=0.05,
                 Cs=REFIT_CS, max_iter=300, select_on="log_loss", validation_fraction=0.1,
                 random_state=0):
        self.layers = layers
        self.group = group
        self.fractions = fractions
        self.alpha = alpha
        self.Cs = Cs
        self.max_iter = max_iter
        self.select_on = select_on
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def fit(self, X, y, X_val=None, y_val=None):
        """Rank the columns, refit on each fraction, keep the one validation data prefers.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        X_val, y_val : array-like, optional
            Validation data; by default a holdout of ``X, y``.

        Returns
        -------
        self : MultiLayerHead
        """
        self._validate_params()
        X, y = validate_data(self, X, y, reset=True, dtype=(np.float64, np.float32))
        self.classes_, y = encode_targets(y)
        seed = seed_from(self.random_state)
        X_fit, y_fit, X_sel, y_sel, _ = selection_split(
            self, X, y, X_val, y_val, self.validation_fraction, seed)
        layers = self._layer_spans(X.shape[1])
        Z = FeatureScaler().fit_transform(X_fit).astype(np.float32)
        candidates = self._candidates(Z, y_fit, layers)
        fits = {}
        for fraction, columns in candidates.items():
            head = LogRegHead(Cs=self.Cs, select_on=self.select_on, random_state=seed)
            head.fit(X_fit[:, columns], y_fit, X_val=X_sel[:, columns], y_val=y_sel)
            fits[fraction] = (columns, head)
        self.val_scores_ = {f: h.val_scores_[h.C_] for f, (_, h) in fits.items()}
        self.val_losses_ = {f: h.val_losses_[h.C_] for f, (_, h) in fits.items()}
        accuracy, loss = self.val_scores_, self.val_losses_
        chosen = min(fits, key=(lambda f: (loss[f], -accuracy[f], f)) if
                     self.select_on == "log_loss" else (lambda f: (-accuracy[f], loss[f], f)))
        self.support_, head = fits[chosen]
        self.fraction_ = len(self.support_) / X.shape[1]
        self.C_, self.head_ = head.C_, head
        self.layer_counts_ = {name: int(np.sum((self.support_ >= start) & (self.support_ < stop)))
                              for name, start, stop in layers}
        self.layers_ = ("all" if len(self.support_) == X.shape[1] else
                        "+".join(f"{name}:{k}" for name, k in self.layer_counts_.items() if k))
        self.coef_, self.intercept_ = self._logits_of(head, X.shape[1])
        return self

    def _layer_spans(self, width: int) -> list[tuple[str, int, int]]:
        if self.layers is None:
            return [("features", 0, width)]
        spans = [(str(name), int(start), int(stop)) for name, start, stop in self.layers]
        edges = [start for _, start, _ in spans] + [spans[-1][2]] if spans else []
        if not spans or edges[0] != 0 or edges[-1] != width or any(
                stop != following for (_, _, stop), following in zip(spans, edges[1:])):
            raise ValueError(f"layers must cover the {width} columns in order, without gaps: "
                             f"{spans}")
        return spans

    def _candidates(self, Z, y, layers) -> dict[float, np.ndarray]:
        """Columns of each fraction, the most relevant first kept; equal sets once."""
        width = Z.shape[1]
        starts = (np.arange(width) if self.group == "feature"
                  else np.array([start for _, start, _ in layers]))
        norm, grad, self.n_iter_ = group_lasso_relevance(Z, y, len(self.classes_), starts,
                                                         self.alpha, self.max_iter)
        order = np.lexsort((np.arange(len(starts)), -grad, -norm))  # ties: closer to entering
        counts = np.diff(np.r_[starts, width])
        self.relevance_ = np.repeat(norm, counts)
        groups = [np.arange(start, start + k) for start, k in zip(starts, counts)]
        candidates, seen = {}, set()
        for fraction in sorted({float(f) for f in self.fractions}):
            if not 0 < fraction <= 1:
                raise ValueError(f"fractions must lie in (0, 1], not {fraction}")
            kept = max(1, math.ceil(fraction * len(groups)))
            columns = np.sort(np.concatenate([groups[i] for i in order[:kept]]))
            if columns.tobytes() not in seen:
                seen.add(columns.tobytes())
                candidates[fraction] = columns
        return candidates

    def _logits_of(self, head: LogRegHead, width: int) -> LinearForm:
        """The refit's linear form on its ``support_`` columns as one on all ``width`` raw
        columns (zeros elsewhere)."""
        weight, bias = head.linear_form()
        coef = np.zeros((len(weight), width))
        coef[:, self.support_] = weight
        return LinearForm(coef, bias)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=(np.float64, np.float32))
        return softmax(X @ self.coef_.T + self.intercept_, axis=1)

    def linear_form(self) -> LinearForm:
        """``coef_`` and ``intercept_``: ``predict_proba`` is the softmax of that map."""
        check_is_fitted(self)
        return LinearForm(self.coef_, self.intercept_)

    def chosen_params(self) -> dict[str, object]:
        """The share of columns kept, the refit's C and the kept columns per layer."""
        check_is_fitted(self)
        return {"fraction": self.fraction_, "C": self.C_, "layers": self.layers_}

    def wants_layers(self) -> bool:
        """True until ``layers`` is set: a multi-layer cache's spans are then passed in."""
        return self.layers is None

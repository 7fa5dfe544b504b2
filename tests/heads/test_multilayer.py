"""The multi-layer head: the group-lasso probe's optimality, the columns and layers it keeps."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from pipeline.heads import MultiLayerHead, make_head
from pipeline.heads.multilayer import group_lasso_relevance

# Three "layers" of 30 columns; only 6 columns of the middle one carry the class.
LAYERS = [("low", 0, 30), ("middle", 30, 60), ("top", 60, 90)]
SIGNAL = np.arange(30, 36)


def _layered(n=600, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, classes, n)
    X = rng.normal(size=(n, 90))
    centres = rng.normal(0, 1.5, size=(classes, len(SIGNAL)))
    X[:, SIGNAL] += centres[y]
    X *= rng.uniform(0.5, 20, size=90)  # columns of very different scales, as pooled layers
    return X, y


def _split(X, y):
    return X[:400], y[:400], X[400:], y[400:]


def test_the_group_lasso_solution_satisfies_its_optimality_conditions():
    # KKT of min loss + lam * sum_g sqrt|g| ||W_g||: a kept group's gradient norm is lam
    # (per sqrt|g|), a removed one's at most lam. A wrong prox or step breaks both.
    X, y = _layered()
    Z = (X - X.mean(0)) / X.std(0)
    starts = np.array([0, 30, 60])
    Y = np.eye(3)[y]
    at_zero = Z.T @ (Y.mean(0) - Y) / len(y)  # the gradient at W = 0, best intercept
    lam_max = max(np.linalg.norm(at_zero[s:s + 30]) / np.sqrt(30) for s in starts)
    for alpha, kept_groups in ((0.2, None), (0.7, 1)):
        norm, grad, _ = group_lasso_relevance(Z, y, 3, starts, alpha, max_iter=5000,
                                              tol=1e-10)
        kept = norm > 0
        assert kept[1]  # the informative layer
        if kept_groups is not None:
            assert kept.sum() == kept_groups
        np.testing.assert_allclose(grad[kept], alpha * lam_max, rtol=0.02)
        assert np.all(grad[~kept] <= alpha * lam_max * 1.02)


def test_the_probe_ranks_the_informative_columns_first():
    X, y = _layered()
    Z = (X - X.mean(0)) / X.std(0)
    norm, grad, _ = group_lasso_relevance(Z, y, 3, np.arange(90), alpha=0.3)
    top = np.lexsort((-grad, -norm))[:len(SIGNAL)]
    assert set(top) == set(SIGNAL.tolist())


def test_the_head_keeps_the_informative_layer_and_says_so():
    X, y = _layered()
    X_fit, y_fit, X_val, y_val = _split(X, y)
    head = MultiLayerHead(layers=LAYERS).fit(X_fit, y_fit, X_val=X_val, y_val=y_val)
    assert head.fraction_ <= 0.1  # the 84 noise columns left out on validation's word
    kept_signal = len(set(SIGNAL.tolist()) & set(head.support_.tolist()))
    assert kept_signal >= len(SIGNAL) - 1 and kept_signal >= 0.8 * len(head.support_)
    assert head.layers_.startswith("middle:") and head.layer_counts_["middle"] >= kept_signal
    assert head.val_losses_[1.0] > min(head.val_losses_.values())


def test_whole_layers_are_kept_or_dropped_with_layer_groups():
    X, y = _layered()
    X_fit, y_fit, X_val, y_val = _split(X, y)
    head = MultiLayerHead(layers=LAYERS, group="layer", fractions=(0.3,)).fit(
        X_fit, y_fit, X_val=X_val, y_val=y_val)
    assert head.support_.tolist() == list(range(30, 60))
    assert head.layer_counts_ == {"low": 0, "middle": 30, "top": 0}


@pytest.mark.parametrize("classes", [2, 4])
def test_probabilities_are_the_refit_on_the_kept_columns(classes):
    # coef_ folds the refit's standardisation and, for two classes, its one logit: the tensor
    # form that export writes must give exactly the refit's probabilities.
    X, y = _layered(classes=classes)
    X_fit, y_fit, X_val, y_val = _split(X, y)
    head = MultiLayerHead(layers=LAYERS).fit(X_fit, y_fit, X_val=X_val, y_val=y_val)
    expected = head.head_.predict_proba(X_val[:, head.support_])
    np.testing.assert_allclose(head.predict_proba(X_val), expected, atol=1e-10)
    np.testing.assert_allclose(softmax(X_val @ head.coef_.T + head.intercept_, axis=1), expected,
                               atol=1e-10)
    assert head.coef_.shape == (classes, 90)
    assert np.all(head.coef_[:, np.setdiff1d(np.arange(90), head.support_)] == 0)


def test_layers_that_do_not_tile_the_columns_are_refused():
    X, y = _layered()
    with pytest.raises(ValueError, match="cover the 90 columns"):
        MultiLayerHead(layers=[("a", 0, 30), ("b", 40, 90)]).fit(X, y)
    with pytest.raises(ValueError, match="cover the 90 columns"):
        MultiLayerHead(layers=[("a", 0, 30)]).fit(X, y)


def test_the_registry_builds_it():
    head = make_head("multilayer:group=layer,fractions=(0.5,1.0)")
    assert isinstance(head, MultiLayerHead) and head.group == "layer"

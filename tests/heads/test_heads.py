"""Heads: scikit-learn's estimator checks, selection on validation data, the grid, make_head."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs, make_classification
from sklearn.metrics import log_loss
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler
from sklearn.utils.estimator_checks import parametrize_with_checks
from sklearn.utils.validation import has_fit_parameter

from pipeline.core.errors import PipelineError
from pipeline.heads import (
    HEADS,
    HeadError,
    LinearProbe,
    LogRegHead,
    MLPHead,
    MultiLayerHead,
    head_name,
    make_head,
)
from pipeline.heads._base import SCALE_FLOOR, FeatureScaler
from pipeline.heads.linear_probe import GridAdamW

# Small enough for the many fits of the estimator checks, large enough to pass their accuracy
# bar (check_classifiers_train wants > 0.83 on blobs). device="cpu" keeps the checks that need
# bitwise reproducibility (check_fit_idempotent) on a machine with a GPU too.
CHECKED = [
    LogRegHead(Cs=(0.1, 1.0, 10.0)),
    MLPHead(hidden_sizes=(16,), lr=1e-2, batch_size=32, max_epochs=20, patience=5, device="cpu"),
    LinearProbe(
        weight_decays=(1e-4, 1e-2),
        lrs=(1e-2, 1e-1),
        batch_size=32,
        max_epochs=20,
        patience=5,
        device="cpu",
    ),
    MultiLayerHead(fractions=(0.5, 1.0), Cs=(0.1, 1.0, 10.0), max_iter=50),
]
# Every check holds for every head; a check that cannot hold goes here, with its reason.
EXPECTED_FAILED_CHECKS: dict[type, dict[str, str]] = {LogRegHead: {}, MLPHead: {}, LinearProbe: {},
                                                      MultiLayerHead: {}}


def _expected_failed_checks(estimator) -> dict[str, str]:
    return EXPECTED_FAILED_CHECKS[type(estimator)]


@parametrize_with_checks(CHECKED, expected_failed_checks=_expected_failed_checks)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@parametrize_with_checks([FeatureScaler()])
def test_feature_scaler_is_a_scikit_learn_transformer(estimator, check):
    check(estimator)


def test_a_barely_varying_feature_is_scaled_by_a_tenth_of_the_typical_scale():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 5)) * [1.0, 2.0, 0.5, 0.0, 0.0]
    X[7, 4] = 1e-3  # a unit that fires once, barely
    mine, plain = FeatureScaler().fit(X), StandardScaler().fit(X)
    typical = np.sqrt(plain.var_.mean())
    np.testing.assert_allclose(mine.scale_[:3], plain.scale_[:3])  # ordinary spread: as is
    assert plain.scale_[4] < 1e-4 and mine.scale_[4] == pytest.approx(SCALE_FLOOR * typical)
    np.testing.assert_allclose(mine.mean_, plain.mean_)
    assert np.all(mine.transform(X)[:, 3] == 0)  # a constant feature centres to zero
    batched = FeatureScaler().partial_fit(X[:100]).partial_fit(X[100:])
    np.testing.assert_allclose(batched.scale_, mine.scale_)


def _rare_unit(n, seed, fire):
    """Two classes apart on five features; with ``fire``, a class-0 image lies among class 1
    and is the one image that fires a sixth unit, barely (a memorised outlier)."""
    rng = np.random.default_rng(seed)
    y = np.repeat([0, 1], n // 2)
    X = np.zeros((n, 6))
    X[:, :5] = rng.normal(size=(n, 5)) * 0.5 + 2.0 * y[:, None]
    if fire:
        X[0, :5] = 2.0 + rng.normal(size=5) * 0.5
        X[0, 5] = 1e-3
    return X, y


@pytest.mark.parametrize("head", [LinearProbe(device="cpu"), LogRegHead(), MLPHead(device="cpu")],
                         ids=lambda h: type(h).__name__)
def test_heads_do_not_lean_on_a_unit_that_barely_fired_in_training(head):
    # Standardised by its own scale the unit became a huge value for the outlier, and a class-1
    # image that fires it a little (an augmented view, a test image) became class 0 at p ~ 1.
    X, y = _rare_unit(60, seed=0, fire=True)
    head.fit(X, y, *_rare_unit(20, seed=1, fire=False))
    silent, fired = np.full((1, 6), 2.0), np.full((1, 6), 2.0)
    silent[0, 5], fired[0, 5] = 0.0, 0.05
    assert abs(head.predict_proba(fired)[0, 1] - head.predict_proba(silent)[0, 1]) < 0.05


def _easy(n_samples=600, random_state=0):
    X, y = make_classification(
        n_samples=n_samples,
        n_features=20,
        n_informative=8,
        n_classes=3,
        n_clusters_per_class=1,
        class_sep=2.0,
        random_state=random_state,
    )
    return train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)


def _imbalanced(sizes=(140, 60), random_state=0):
    """Two blobs, class 0 the majority: a tiny C predicts 0 everywhere, a large C separates."""
    return make_blobs(n_samples=list(sizes), centers=[[0, 0], [3, 3]], random_state=random_state)


# --- every head ---------------------------------------------------------------------------------


@pytest.mark.parametrize("head", CHECKED, ids=lambda h: type(h).__name__)
def test_fit_takes_validation_data(head):
    assert has_fit_parameter(head, "X_val") and has_fit_parameter(head, "y_val")


@pytest.mark.parametrize("head", CHECKED, ids=lambda h: type(h).__name__)
def test_bad_validation_data_is_refused(head):
    X, y = _imbalanced()
    with pytest.raises(ValueError, match="both X_val and y_val"):
        head.fit(X, y, X_val=X)
    with pytest.raises(ValueError, match="features"):
        head.fit(X, y, X_val=np.ones((5, 3)), y_val=np.zeros(5, int))
    with pytest.raises(ValueError, match=r"labels that y does not have: \[7\]"):
        head.fit(X, y, X_val=X[:3], y_val=[0, 1, 7])


@pytest.mark.parametrize("head", CHECKED, ids=lambda h: type(h).__name__)
def test_a_class_too_small_to_stratify_still_fits(head):
    X, y = _imbalanced(sizes=(40, 1))
    assert set(head.fit(X, y).classes_) == {0, 1}


# --- LogRegHead ---------------------------------------------------------------------------------


def test_logreg_chooses_the_c_its_validation_data_favours():
    X, y = _imbalanced()
    # Majority-class labels on minority-class points: only the near-constant model (tiny C) is
    # right, so X_val decides.
    mislabelled = LogRegHead(Cs=(1e-4, 1.0)).fit(X, y, X_val=X[y == 1][:30], y_val=np.zeros(30))
    assert mislabelled.C_ == 1e-4
    assert mislabelled.val_scores_ == {1e-4: 1.0, 1.0: pytest.approx(1 / 30)}
    X_val, y_val = _imbalanced(sizes=(70, 30), random_state=1)
    honest = LogRegHead(Cs=(1e-4, 1.0)).fit(X, y, X_val=X_val, y_val=y_val)
    assert honest.C_ == 1.0
    assert honest.val_scores_[1.0] > 0.95 > honest.val_scores_[1e-4]


def test_logreg_chooses_the_lowest_validation_loss_or_the_best_accuracy():
    X_train, X_test, y_train, y_test = _easy()
    head = LogRegHead().fit(X_train, y_train)
    assert len(head.val_losses_) == 13
    assert head.val_losses_[head.C_] == min(head.val_losses_.values())
    assert head.pipeline_[-1].C == head.C_
    assert head.score(X_test, y_test) > 0.9
    by_accuracy = LogRegHead(select_on="accuracy").fit(X_train, y_train)
    scores, losses = by_accuracy.val_scores_, by_accuracy.val_losses_
    assert scores[by_accuracy.C_] == max(scores.values())
    ties = [c for c, score in scores.items() if score == scores[by_accuracy.C_]]
    assert losses[by_accuracy.C_] == min(losses[c] for c in ties)
    with pytest.raises(ValueError, match="select_on"):
        LogRegHead(select_on="f1").fit(X_train, y_train)


def _noisy(random_state=0):
    """Few noisy samples in many dimensions: large C fits the noise with confidence."""
    X, y = make_classification(n_samples=400, n_features=60, n_informative=5, flip_y=0.2,
                               random_state=random_state)
    return X[:60], y[:60], X[60:160], y[60:160], X[160:], y[160:]


def test_logreg_chosen_on_validation_loss_gives_better_test_probabilities():
    X, y, X_val, y_val, X_test, y_test = _noisy()
    by_loss = LogRegHead().fit(X, y, X_val=X_val, y_val=y_val)
    by_accuracy = LogRegHead(select_on="accuracy").fit(X, y, X_val=X_val, y_val=y_val)
    assert by_loss.C_ < by_accuracy.C_  # accuracy takes a C that fits the noise
    loss, accuracy = (log_loss(y_test, h.predict_proba(X_test)) for h in (by_loss, by_accuracy))
    assert loss < accuracy - 0.05
    assert by_loss.score(X_test, y_test) > by_accuracy.score(X_test, y_test) - 0.05


def test_logreg_refit_on_train_and_validation():
    X, y = _imbalanced()
    X_val, y_val = _imbalanced(sizes=(70, 30), random_state=1)
    on_train = LogRegHead(Cs=(1e-4, 1.0)).fit(X, y, X_val=X_val, y_val=y_val)
    on_both = LogRegHead(Cs=(1e-4, 1.0), refit_on="train+val").fit(X, y, X_val=X_val, y_val=y_val)
    assert on_both.C_ == on_train.C_
    assert on_train.pipeline_[0].n_samples_seen_ == len(X)
    assert on_both.pipeline_[0].n_samples_seen_ == len(X) + len(X_val)
    assert not np.allclose(on_both.pipeline_[-1].coef_, on_train.pipeline_[-1].coef_)


def test_logreg_refuses_an_unknown_refit_on():
    X, y = _imbalanced()
    with pytest.raises(ValueError, match="refit_on"):
        LogRegHead(refit_on="everything").fit(X, y)


# --- MLPHead ------------------------------------------------------------------------------------


def _overfitting_mlp(**params):
    """Noisy labels and a wide unregularised MLP: the validation loss turns up after a few
    epochs, so early stopping has something to undo."""
    X, y = make_classification(
        n_samples=200, n_features=20, n_informative=5, flip_y=0.3, random_state=0
    )
    settings = dict(hidden_sizes=(64,), dropout=0.0, lr=1e-2, batch_size=32, max_epochs=60)
    head = MLPHead(**{**settings, "patience": 8, "device": "cpu", **params})
    return head.fit(X[:120], y[:120], X_val=X[120:], y_val=y[120:]), X[120:], y[120:]


def test_mlp_early_stopping_restores_the_best_epoch():
    head, X_val, y_val = _overfitting_mlp()
    curve = head.validation_loss_curve_
    assert head.n_epochs_ == len(curve) == len(head.loss_curve_) == head.best_epoch_ + 9 < 60
    assert curve[head.best_epoch_] == min(curve) < curve[-1] - 0.05
    restored = log_loss(y_val, head.predict_proba(X_val))
    assert restored == pytest.approx(curve[head.best_epoch_], rel=1e-5)
    assert not head.module_.training
    assert next(head.module_.parameters()).device.type == "cpu"


def test_mlp_is_deterministic_and_leaves_global_random_state_alone():
    torch_state, numpy_state = torch.random.get_rng_state(), np.random.get_state()[1].copy()
    first, X_val, _ = _overfitting_mlp(max_epochs=3, dropout=0.5)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    assert np.array_equal(np.random.get_state()[1], numpy_state)
    again, _, _ = _overfitting_mlp(max_epochs=3, dropout=0.5)
    other, _, _ = _overfitting_mlp(max_epochs=3, dropout=0.5, random_state=1)
    assert np.array_equal(first.predict_proba(X_val), again.predict_proba(X_val))
    assert not np.allclose(first.predict_proba(X_val), other.predict_proba(X_val))


def test_mlp_probabilities_are_float64_and_sum_to_one():
    X_train, X_test, y_train, y_test = _easy()
    head = MLPHead(hidden_sizes=(32, 16), max_epochs=30, batch_size=64, device="cpu")
    proba = head.fit(X_train.astype(np.float32), y_train).predict_proba(X_test)
    assert proba.dtype == np.float64 and proba.shape == (len(X_test), 3)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0)
    assert [m.out_features for m in head.module_ if isinstance(m, torch.nn.Linear)] == [32, 16, 3]
    assert head.score(X_test, y_test) > 0.9


# --- LinearProbe --------------------------------------------------------------------------------

GRID = dict(weight_decays=(1e-6, 1e-1, 10.0), lrs=(1e-5, 1e-2))
# patience = max_epochs: every head trains for the same epochs, alone or in the grid
FIXED_EPOCHS = dict(batch_size=64, max_epochs=15, patience=15, device="cpu")


def test_linear_probe_trains_the_whole_grid_at_once():
    X_train, X_test, y_train, y_test = _easy()
    probe = LinearProbe(**GRID, **FIXED_EPOCHS).fit(X_train, y_train)
    rows = probe.val_scores_
    assert [(r["weight_decay"], r["lr"]) for r in rows] == [
        (wd, lr) for wd in GRID["weight_decays"] for lr in GRID["lrs"]
    ]
    best = min(rows, key=lambda r: (r["val_loss"], -r["val_accuracy"]))
    assert (probe.weight_decay_, probe.lr_) == (best["weight_decay"], best["lr"])
    norm = {(r["weight_decay"], r["lr"]): r["weight_norm"] for r in rows}
    # Its own weight decay per head: a huge one shrinks the weights, a tiny one does not ...
    assert norm[10.0, 1e-2] < 0.3 * norm[1e-6, 1e-2]
    # ... and its own learning rate: 15 epochs of steps of 1e-5 leave the weights near zero.
    assert norm[1e-6, 1e-5] < 0.01 * norm[1e-6, 1e-2]
    # Heads share batches but nothing else: each matches the same head trained alone.
    for wd, lr in [(1e-6, 1e-2), (10.0, 1e-2), (1e-1, 1e-5)]:
        alone = LinearProbe(weight_decays=(wd,), lrs=(lr,), **FIXED_EPOCHS).fit(X_train, y_train)
        in_grid = rows[[(r["weight_decay"], r["lr"]) for r in rows].index((wd, lr))]
        assert alone.val_scores_[0] == pytest.approx(in_grid, rel=1e-4)


def test_linear_probe_learns_an_easy_problem_with_raw_space_coefficients():
    X_train, X_test, y_train, y_test = _easy()
    probe = LinearProbe(lrs=(1e-2,), batch_size=64, device="cpu").fit(X_train, y_train)
    assert probe.score(X_test, y_test) > 0.9
    assert probe.coef_.shape == (3, 20) and probe.intercept_.shape == (3,)
    # coef_ applies to raw features: shifting and scaling the inputs must not be undone by it
    logits = X_test @ probe.coef_.T + probe.intercept_
    np.testing.assert_array_equal(probe.predict(X_test), probe.classes_[logits.argmax(axis=1)])
    assert not np.allclose(probe.predict_proba(X_test * 3 + 1), probe.predict_proba(X_test))


def test_linear_probe_stops_early_and_is_deterministic():
    X_train, X_test, y_train, _ = _easy()
    params = dict(lrs=(1e-1,), batch_size=64, max_epochs=200, patience=2, device="cpu")
    first = LinearProbe(**params).fit(X_train, y_train)
    again = LinearProbe(**params).fit(X_train, y_train)
    assert first.n_epochs_ < 200
    np.testing.assert_array_equal(first.coef_, again.coef_)
    np.testing.assert_array_equal(first.predict_proba(X_test), again.predict_proba(X_test))


def test_grid_adamw_is_torch_adamw_head_by_head():
    # G heads, each with its own learning rate and weight decay, against G torch.optim.AdamW
    # (its default betas and eps), each on its own head's slice, fed the same gradients. The
    # weights start away from zero and the decays are large, so decay of the intercept or
    # decay through the gradient (Adam's L2) shows; gradients from 1e-9 to 1e2 make a wrong
    # bias correction or a misplaced eps show.
    g = torch.Generator().manual_seed(0)
    n_heads, n_features, n_classes, n_steps = 4, 5, 3, 6
    lr = torch.tensor([1e-3, 1e-2, 1e-1, 5e-2], dtype=torch.float64)
    weight_decay = torch.tensor([0.0, 1e-2, 1.0, 5.0], dtype=torch.float64)
    W0 = torch.randn(n_heads, n_features, n_classes, generator=g, dtype=torch.float64)
    b0 = torch.randn(n_heads, n_classes, generator=g, dtype=torch.float64)

    def gradient(shape):
        scale = 10 ** (torch.rand(shape, generator=g, dtype=torch.float64) * 11 - 9)
        return torch.randn(shape, generator=g, dtype=torch.float64) * scale

    grads = [(gradient(W0.shape), gradient(b0.shape)) for _ in range(n_steps)]
    W, b = W0.clone().requires_grad_(), b0.clone().requires_grad_()
    grid = GridAdamW([W, b], [True, False], lr, weight_decay)
    alone = [(W0[h].clone().requires_grad_(), b0[h].clone().requires_grad_())
             for h in range(n_heads)]
    optimizers = [
        torch.optim.AdamW([{"params": [w]}, {"params": [c], "weight_decay": 0.0}],
                          lr=float(lr[h]), weight_decay=float(weight_decay[h]))
        for h, (w, c) in enumerate(alone)
    ]
    for grad_W, grad_b in grads:
        grid.zero_grad()
        W.grad, b.grad = grad_W.clone(), grad_b.clone()
        grid.step()
        for h, ((w, c), optimizer) in enumerate(zip(alone, optimizers)):
            optimizer.zero_grad()
            w.grad, c.grad = grad_W[h].clone(), grad_b[h].clone()
            optimizer.step()
    for h, (w, c) in enumerate(alone):
        torch.testing.assert_close(W[h], w, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(b[h], c, rtol=1e-10, atol=1e-12)
    # the steps moved every head's weights well past the tolerance
    assert (W - W0).abs().amin(dim=(1, 2)).min() > 1e-6 and (b - b0).abs().min() > 1e-6


# --- make_head ----------------------------------------------------------------------------------


def test_make_head_builds_registry_heads_with_parameters():
    head = make_head("mlp:hidden_sizes=(8,4),dropout=0.5, device = cpu")
    assert isinstance(head, MLPHead)
    assert (head.hidden_sizes, head.dropout, head.device) == ((8, 4), 0.5, "cpu")
    probe = make_head("linear:weight_decays=[1e-3, 1e-2],lrs=(0.1,),random_state=None")
    assert (probe.weight_decays, probe.lrs, probe.random_state) == ([1e-3, 1e-2], (0.1,), None)
    assert all(isinstance(make_head(name), cls) for name, cls in HEADS.items())
    assert make_head("logreg:refit_on='train+val'").refit_on == "train+val"


def test_make_head_imports_any_classifier():
    knn = make_head("sklearn.neighbors.KNeighborsClassifier:n_neighbors=3")
    assert isinstance(knn, KNeighborsClassifier) and knn.n_neighbors == 3
    assert make_head("sklearn.linear_model.LogisticRegression:solver=saga,C=0.5").solver == "saga"
    assert make_head("pipeline.heads.LinearProbe:max_epochs=3").max_epochs == 3


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("nope", "unknown head 'nope'; use one of logreg, mlp, linear"),
        ("mlp:nonsense=1", "Invalid parameter 'nonsense'.*Valid parameters are"),
        ("sklearn.linear_model.LinearRegression", "not a scikit-learn classifier"),
        ("collections.OrderedDict", "not a scikit-learn classifier"),
        ("no_such_module.Thing", "cannot import 'no_such_module'"),
        ("sklearn.svm.NoSuchSVC", "has no class 'NoSuchSVC'"),
        ("mlp:hidden_sizes=(8,", "cannot read the value '\\(8,'"),
        ("mlp:dropout", "write param=value"),
        ("mlp:dropout=0.1,dropout=0.2", "given twice"),
        # values the heads' declared constraints refuse: before any fit, not in the middle
        ("logreg:select_on=f1", "bad parameter for head 'logreg'.*'select_on'.*Got 'f1'"),
        ("logreg:refit_on=all", "'refit_on' parameter of LogRegHead"),
        ("mlp:hidden_sizes=-3", "'hidden_sizes' parameter of MLPHead"),
        ("mlp:dropout=1.5", "'dropout' parameter of MLPHead"),
        ("linear:batch_size=0", "'batch_size' parameter of LinearProbe"),
        ("linear:validation_fraction=1.0", "'validation_fraction' parameter"),
        ("sklearn.svm.SVC:kernel=foo", "bad parameter for head 'sklearn.svm.SVC'.*'kernel'"),
    ],
)
def test_make_head_refuses_what_it_cannot_build(spec, message):
    with pytest.raises(HeadError, match=message):
        make_head(spec)


def test_head_error_is_a_pipeline_error():
    assert issubclass(HeadError, PipelineError)


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("mlp:hidden_sizes=(8,4)", "mlp"),
        ("linear", "linear"),
        ("sklearn.svm.LinearSVC:C=0.1", "LinearSVC"),
    ],
)
def test_head_name(spec, name):
    assert head_name(spec) == name


def test_linear_probe_keeps_each_heads_best_weights():
    # More features than training samples and noisy labels: every head overfits, so the last
    # epoch's weights are worse on validation than the kept ones.
    X, y = make_classification(
        n_samples=150, n_features=100, n_informative=3, flip_y=0.3, random_state=0
    )
    X_train, y_train, X_val, y_val = X[:80], y[:80], X[80:], y[80:]
    probe = LinearProbe(
        weight_decays=(1e-6, 1e-3),
        lrs=(1e-1,),
        batch_size=16,
        max_epochs=30,
        patience=30,
        device="cpu",
    ).fit(X_train, y_train, X_val=X_val, y_val=y_val)
    chosen = next(r for r in probe.val_scores_ if r["weight_decay"] == probe.weight_decay_)
    assert log_loss(y_val, probe.predict_proba(X_val)) == pytest.approx(
        chosen["val_loss"], rel=1e-5
    )


@pytest.mark.parametrize("classes", [2, 3])
def test_logreg_linear_form_is_its_prediction_also_for_two_classes(classes):
    from scipy.special import softmax

    X, y = make_classification(n_samples=120, n_features=6, n_informative=4,
                               n_classes=classes, random_state=0)
    head = LogRegHead(Cs=(0.1, 1.0)).fit(X * 10 + 3, y)  # far from standardised
    coef, intercept = head.linear_form()
    assert coef.shape == (classes, 6) and intercept.shape == (classes,)
    np.testing.assert_allclose(softmax((X * 10 + 3) @ coef.T + intercept, axis=1),
                               head.predict_proba(X * 10 + 3), atol=1e-12)
    assert head.chosen_params() == {"C": head.C_}


def test_logreg_c_path_is_logistic_regression_cv_on_a_predefined_split():
    # The head fits its own warm-started path (BENCHMARKS.md: faster here than
    # LogisticRegressionCV); scikit-learn's cross-validated path on the same train/validation
    # split must choose the same C with the same validation losses.
    import warnings

    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import PredefinedSplit

    X, y = make_classification(n_samples=300, n_features=40, n_informative=12, n_classes=4,
                               n_clusters_per_class=1, random_state=3)
    X_fit, X_val, y_fit, y_val = train_test_split(X, y, test_size=0.3, random_state=0,
                                                  stratify=y)
    head = LogRegHead().fit(X_fit, y_fit, X_val=X_val, y_val=y_val)
    scaler = FeatureScaler().fit(X_fit)
    Z = np.concatenate([scaler.transform(X_fit), scaler.transform(X_val)])
    split = PredefinedSplit(np.r_[np.full(len(y_fit), -1), np.zeros(len(y_val), int)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # l1_ratios=None: deprecated default
        cv = LogisticRegressionCV(Cs=sorted(head.Cs), cv=split, scoring="neg_log_loss",
                                  refit=False, max_iter=head.max_iter, l1_ratios=None,
                                  use_legacy_attributes=False).fit(Z, np.r_[y_fit, y_val])
    assert cv.C_ == head.C_
    np.testing.assert_allclose(-cv.scores_[0, 0], [head.val_losses_[c] for c in sorted(head.Cs)],
                               rtol=1e-4)

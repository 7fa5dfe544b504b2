"""Out-of-fold probabilities and cleanlab find planted label flips, and few on a clean set."""

from __future__ import annotations

import numpy as np

from pipeline.auditing.labels import (
    fold_count,
    label_issues,
    out_of_fold_probabilities,
    standardised,
)
from pipeline.auditing.rows import read_rows
from tests.auditing.conftest import planted_cache


def _issues(tmp_path, **planted):
    p = planted_cache(tmp_path / "c.h5", **planted)
    rows = read_rows(p.path)
    proba = out_of_fold_probabilities(rows.X, rows.labels, len(rows.classes), 5, 0)
    return p, rows, proba, label_issues(rows.labels, proba, rows.classes, rows.paths, rows.split)


def test_flipped_labels_are_found_with_the_true_class_suggested(tmp_path):
    p, rows, proba, issues = _issues(tmp_path)
    found = {i.index for i in issues}
    recall = len(found & set(p.flipped)) / len(p.flipped)
    precision = len(found & set(p.flipped)) / len(found)
    print(f"flipped labels: recall {recall:.3f}, precision {precision:.3f} "
          f"({len(p.flipped)} planted, {len(found)} flagged)")
    assert recall >= 0.8 and precision >= 0.8
    # the out-of-fold head never saw the row: it suggests the class the row was drawn from
    by_row = {i.index: i for i in issues}
    hits = found & set(p.flipped)
    right = np.mean([by_row[i].suggested == f"c{p.true[i]}" for i in hits])
    print(f"suggested label is the planted true class for {right:.3f} of them")
    assert right >= 0.9
    ranks = [i.rank for i in issues]
    assert ranks == list(range(1, len(issues) + 1))
    qualities = [i.label_quality for i in issues]
    assert qualities == sorted(qualities)  # most doubtful first


def test_a_clean_set_gives_few_false_alarms(tmp_path):
    _, rows, _, issues = _issues(tmp_path, flip=0, copies=0, near=0, noise=False, seed=1)
    print(f"clean set: {len(issues)} of {len(rows.labels)} flagged")
    assert len(issues) <= 0.005 * len(rows.labels)  # at most 0.5%


def test_every_probability_is_out_of_fold():
    # Labels that are pure noise: a head that saw a row would score it far above chance.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 50))
    y = rng.integers(0, 2, 400)
    proba = out_of_fold_probabilities(X, y, 2, 5, 0)
    assert proba.shape == (400, 2) and np.allclose(proba.sum(1), 1)
    assert abs(np.mean(proba.argmax(1) == y) - 0.5) < 0.1


def test_fold_count_follows_the_smallest_class():
    assert fold_count(np.array([0, 0, 0, 1, 1]), 5) == 2
    assert fold_count(np.array([0, 0, 1]), 5) == 0
    assert fold_count(np.array([0] * 10 + [1] * 10), 5) == 5


def test_zero_weight_on_the_held_out_fold_equals_fitting_without_it():
    # The audit fits each fold on all rows with weight 0 on the held-out fold (no copy per
    # fold); its probabilities must be those of a model fitted on the other folds alone.
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    X = (rng.normal(size=(300, 20)) + y[:, None] * 0.4).astype(np.float32)
    proba = out_of_fold_probabilities(X, y, 3, 5, seed=7)
    expected = cross_val_predict(LogisticRegression(max_iter=1000, tol=1e-10), standardised(X),
                                 y, cv=StratifiedKFold(5, shuffle=True, random_state=7),
                                 method="predict_proba")
    # L-BFGS stops at its tolerance in float32: a few 1e-3; a model that saw the held-out
    # rows is off by tenths (0.46 here).
    assert np.abs(proba - expected).max() < 1e-2
    seen = LogisticRegression(max_iter=1000).fit(standardised(X), y).predict_proba(standardised(X))
    assert np.abs(seen - expected).max() > 0.1


def test_standardised_matches_scikit_learn_in_float32():
    from sklearn.preprocessing import StandardScaler

    rng = np.random.default_rng(4)
    X = (rng.normal(5, 3, size=(20_000, 7)) * np.arange(7)).astype(np.float32)  # a 0 column
    Xs = standardised(X)
    assert Xs.dtype == np.float32
    np.testing.assert_allclose(Xs, StandardScaler().fit_transform(X.astype(np.float64)),
                               atol=1e-5)

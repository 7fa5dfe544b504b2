"""StudentHead: scikit-learn's estimator checks, and what the teacher's soft targets change."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.utils.estimator_checks import parametrize_with_checks

from pipeline.heads.student import StudentHead, distillation_loss
from tests.heads.unlabelled_data import one_torch_thread

# As tests/heads/test_heads.py sizes MLPHead for the many fits of the checks.
CHECKED = StudentHead(hidden_sizes=(16,), lr=1e-2, batch_size=32, max_epochs=20, patience=5,
                      device="cpu")
EXPECTED_FAILED_CHECKS = {
    "check_sample_weight_equivalence_on_dense_data":
        "a row of weight 2 and the same row twice differ under minibatches and a holdout",
}

one_thread = pytest.fixture(autouse=True)(one_torch_thread)


@parametrize_with_checks([CHECKED], expected_failed_checks=lambda _: EXPECTED_FAILED_CHECKS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def test_the_loss_is_hintons_mix_and_unlabelled_rows_only_learn_from_the_teacher():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    teacher = torch.tensor([[0.0, 3.0], [1.0, 0.0]])
    y = torch.tensor([0, -1])
    weight = torch.ones(2)
    T, alpha = 2.0, 0.25
    got = distillation_loss(logits, y, teacher, weight, T, alpha)
    p_t = torch.softmax(teacher / T, 1)
    kl = (p_t * (p_t.log() - torch.log_softmax(logits / T, 1))).sum(1)
    ce0 = torch.nn.functional.cross_entropy(logits[:1], y[:1])
    want = (alpha * T**2 * kl.sum() + (1 - alpha) * ce0) / 2
    torch.testing.assert_close(got, want)
    # Without a teacher an unlabelled row adds nothing.
    plain = distillation_loss(logits, y, None, weight, T, alpha)
    torch.testing.assert_close(plain, ce0 / 2)


def test_a_pool_taught_by_the_teacher_beats_the_labels_alone():
    rng = np.random.default_rng(0)
    means = rng.normal(0, 1.5, size=(4, 16))

    def draw(n):
        y = rng.integers(0, 4, n)
        return means[y] + rng.normal(0, 1.8, size=(n, 16)), y

    X_lab, y_lab = draw(12)
    X_pool, y_pool = draw(1500)
    X_val, y_val = draw(200)
    X_test, y_test = draw(1000)
    # The teacher knows the clusters: its logits are the (scaled) true log-likelihoods.
    def teacher(X):
        return -((X[:, None, :] - means[None]) ** 2).sum(2) / (2 * 1.8**2)

    head = dict(hidden_sizes=(), lr=1e-2, max_epochs=60, patience=10, device="cpu")
    alone = StudentHead(**head).fit(X_lab, y_lab, X_val, y_val)
    X = np.concatenate([X_lab, X_pool])
    y = np.concatenate([y_lab, np.full(len(X_pool), -1)])
    taught = StudentHead(**head, temperature=2.0, alpha=0.9).fit(
        X, y, X_val, y_val, teacher_logits=teacher(X))
    assert taught.score(X_test, y_test) > alone.score(X_test, y_test) + 0.05
    agreement = np.mean(taught.predict(X_test) == teacher(X_test).argmax(1))
    assert agreement > 0.9


def test_teacher_logits_of_the_wrong_shape_or_labels_out_of_range_are_refused():
    X, y = np.zeros((4, 3)), np.array([0, 1, 0, 1])
    with pytest.raises(ValueError, match="n_samples, n_classes"):
        StudentHead(max_epochs=1).fit(X, y, teacher_logits=np.zeros((3, 2)))
    with pytest.raises(ValueError, match="class indices or -1"):
        StudentHead(max_epochs=1).fit(X, np.array([0, 5, 0, 1]), teacher_logits=np.zeros((4, 2)))

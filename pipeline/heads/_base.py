"""What every head shares: base estimators, targets, the selection split, standardisation, torch.

A head subclasses :class:`BaseHead` (its prediction is the most probable class of
``predict_proba``), or :class:`TorchHead` when torch trains it on standardised features with
early stopping on a selection split.
"""

from __future__ import annotations

import contextlib
from numbers import Integral, Real

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils._param_validation import Interval
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from pipeline.core.devices import resolve_device

# Below this many samples a holdout leaves too little to fit on or to judge by; the training
# data itself then selects (sklearn's estimator checks fit on a single sample).
MIN_HOLDOUT_SAMPLES = 10
ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW defaults, so both torch heads behave alike
ADAM_EPS = 1e-8
# Torch features: float32 stays float32 (cached features are often large), anything else float64.
FLOATS = (np.float64, np.float32)


# --- fitting data: targets, the selection split, standardisation -----------------------------


def encode_targets(y) -> tuple[np.ndarray, np.ndarray]:
    """``classes_`` and ``y`` as indices into it."""
    check_classification_targets(y)
    classes, encoded = np.unique(y, return_inverse=True)
    return classes, encoded


def _encode_like(classes: np.ndarray, y) -> np.ndarray:
    unseen = ~np.isin(y, classes)
    if unseen.any():
        raise ValueError(
            f"y_val has labels that y does not have: {np.unique(y[unseen]).tolist()}; "
            f"the labels of y are {classes.tolist()}"
        )
    return np.searchsorted(classes, y)


def seed_from(random_state) -> int:
    """An int seed for torch and train_test_split, following sklearn's ``random_state`` rules."""
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def _holdout(X, y, fraction, seed):
    """A seeded stratified holdout, or the training data itself where no holdout can work."""
    n_classes = len(np.unique(y))
    if not fraction or len(y) < MIN_HOLDOUT_SAMPLES:
        return X, y, X, y, False
    try:
        X_fit, X_sel, y_fit, y_sel = train_test_split(
            X, y, test_size=fraction, random_state=seed, stratify=y
        )
    except ValueError:  # a class too small to be in both parts: split without stratifying
        X_fit, X_sel, y_fit, y_sel = train_test_split(X, y, test_size=fraction, random_state=seed)
    if len(np.unique(y_fit)) < n_classes:  # a class vanished from training
        return X, y, X, y, False
    return X_fit, y_fit, X_sel, y_sel, True


def selection_split(estimator, X, y, X_val, y_val, fraction, seed):
    """``X_fit, y_fit, X_sel, y_sel, separate``: fit on the first pair, select on the second.

    ``separate`` is False when the selection data is the training data itself.
    """
    if X_val is None and y_val is None:
        return _holdout(X, y, fraction, seed)
    if X_val is None or y_val is None:
        raise ValueError("pass both X_val and y_val, or neither")
    X_val, y_val = validate_data(estimator, X_val, y_val, reset=False, dtype=FLOATS)
    return X, y, X_val, _encode_like(estimator.classes_, y_val), True


# What a head's validation data chooses its hyperparameters by (LogRegHead, LinearProbe).
SELECT_ON = ("log_loss", "accuracy")

# Parameter constraints in scikit-learn's own form (``_parameter_constraints``, checked by
# ``_validate_params`` at fit, as scikit-learn's estimators do): make_head checks a head's
# values when it is built, so a bad one stops the command before anything is fitted.
# sklearn.utils._param_validation is private, but it is how every estimator of scikit-learn
# >= 1.2 declares its parameters, and check_param_validation tests ours against it.
COMMON_CONSTRAINTS = {
    "validation_fraction": [Interval(Real, 0, 1, closed="neither")],
    "random_state": ["random_state"],
}
TORCH_CONSTRAINTS = {
    **COMMON_CONSTRAINTS,
    "batch_size": [Interval(Integral, 1, None, closed="left")],
    "max_epochs": [Interval(Integral, 0, None, closed="left")],
    "patience": [Interval(Integral, 1, None, closed="left")],
    "device": [str],
}

# A feature's scale is at least this fraction of the features' typical one (FeatureScaler).
SCALE_FLOOR = 0.1


class FeatureScaler(StandardScaler):
    """StandardScaler whose per-feature scale is at least ``floor`` times the features' typical
    scale (the root of their mean variance).

    A CNN's pooled ReLU features include units that barely fire on a small training set. With
    Lite0 on 82 Fashion-MNIST images one unit had a standard deviation of 2e-5 where the
    typical one is 0.3: divided by its own, it became a huge value for the one image that fired
    it, the head leaned on it (a raw weight of 1,284), and an augmented view or a test image
    that fired it got logits off by tens. Plain standardisation gave fine-tuning's first
    epoch a train loss of 2.86 at 83% accuracy, and on the demo's features with 10 images a
    class a test log loss of 1.12 (floored: 0.66) for a linear probe. Features of an ordinary
    spread are scaled as StandardScaler scales them.
    """

    def __init__(self, *, floor: float = SCALE_FLOOR, copy: bool = True, with_mean: bool = True,
                 with_std: bool = True):
        super().__init__(copy=copy, with_mean=with_mean, with_std=with_std)
        self.floor = floor

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.array_api_support = False  # the floor is taken in numpy
        return tags

    def partial_fit(self, X, y=None, sample_weight=None):
        super().partial_fit(X, y, sample_weight)  # fit calls this too
        if self.with_std:
            typical = np.sqrt(np.mean(self.var_))
            self.scale_ = np.maximum(self.scale_, self.floor * typical) if typical > 0 \
                else self.scale_
        return self


def _standardisation(X) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale as :class:`FeatureScaler` computes them."""
    scaler = FeatureScaler().fit(X)
    return scaler.mean_, scaler.scale_


def standardise(X, mean, scale, dtype=np.float32) -> np.ndarray:
    return np.ascontiguousarray((X - mean) / scale, dtype=dtype)


def _to_torch(X, y, device):
    return torch.from_numpy(X).to(device), torch.from_numpy(np.asarray(y, np.int64)).to(device)


# --- torch: devices, random state ------------------------------------------------------------


def _on_accelerator(device) -> bool:
    """Whether ``device`` resolves to a GPU; a value torch cannot read counts as no (fit says)."""
    try:
        return resolve_device(device).type != "cpu"
    except (RuntimeError, TypeError, ValueError):
        return False


@contextlib.contextmanager
def seeded_torch(seed: int, device: torch.device):
    """Seed torch's global generators (weight init, dropout) inside a fork of them, so a fit is
    reproducible and leaves the caller's random state as it found it."""
    if device.type == "cpu":
        forked = {"devices": []}
    else:
        count = torch.get_device_module(device.type).device_count()
        forked = {"devices": range(count), "device_type": device.type}
    with torch.random.fork_rng(**forked):
        torch.manual_seed(seed)
        yield


# --- the base estimators ---------------------------------------------------------------------


class BaseHead(ClassifierMixin, BaseEstimator):
    """What every head shares: its prediction is the most probable class of predict_proba."""

    def predict(self, X) -> np.ndarray:
        """The most probable class of each sample."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class TorchHead(BaseHead):
    """Heads trained by torch on standardised features, early-stopped on a selection split."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        # GPU kernels are not bitwise reproducible without torch.use_deterministic_algorithms
        # (https://pytorch.org/docs/stable/notes/randomness.html); the CPU is.
        tags.non_deterministic = _on_accelerator(self.device)
        return tags

    def _standardised_splits(self, X, y, X_val, y_val, fraction):
        """Validate, encode and standardise; the train and selection tensors on the device.

        Sets ``classes_``, ``n_features_in_``, ``mean_`` and ``scale_``; returns
        ``(train, val, seed, device)``.
        """
        self._validate_params()
        X, y = validate_data(self, X, y, reset=True, dtype=FLOATS)
        self.classes_, y = encode_targets(y)
        seed = seed_from(self.random_state)
        X_fit, y_fit, X_sel, y_sel, _ = selection_split(self, X, y, X_val, y_val, fraction, seed)
        self.mean_, self.scale_ = _standardisation(X_fit)
        device = resolve_device(self.device)
        # Cached features fit in memory; moving them to the device once saves a copy per batch.
        train = _to_torch(standardise(X_fit, self.mean_, self.scale_), y_fit, device)
        val = _to_torch(standardise(X_sel, self.mean_, self.scale_), y_sel, device)
        return train, val, seed, device

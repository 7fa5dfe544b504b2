"""Lightweight heads on cached bottleneck features, as scikit-learn classifiers."""

from __future__ import annotations

import ast
import contextlib
import copy
import importlib
import inspect
import itertools
import re

import numpy as np
import torch
from scipy.special import softmax
from sklearn.base import BaseEstimator, ClassifierMixin, is_classifier
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, log_loss
from sklearn.model_selection import train_test_split
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn
from torch.nn import functional as F

from pipeline.devices import resolve_device
from pipeline.errors import PipelineError

DEFAULT_CS = tuple(float(c) for c in np.logspace(-4, 2, 13))
DEFAULT_WEIGHT_DECAYS = tuple(float(w) for w in np.logspace(-6, -1, 8))
REFIT_ON = ("train", "train+val")
# Below this many samples a holdout leaves too little to fit on or to judge by; the training
# data itself then selects (sklearn's estimator checks fit on a single sample).
_MIN_HOLDOUT_SAMPLES = 10
_PREDICT_ROWS = 8192  # rows per forward pass at predict time: bounded memory on large test sets
_ADAM_BETAS = (0.9, 0.999)  # torch.optim.AdamW defaults, so both torch heads behave alike
_ADAM_EPS = 1e-8
# A parameter value that is not a Python literal is taken as a string if it looks like one word:
# solver=saga, device=cuda:1.
_BARE_WORD = re.compile(r"[A-Za-z_][\w.:/+-]*\Z")
# Torch features: float32 stays float32 (cached features are often large), anything else float64.
_FLOATS = (np.float64, np.float32)


class HeadError(PipelineError):
    """Unknown head, a class that is not a classifier, or a bad head parameter."""


# --- fitting data: targets, the selection split, standardisation -----------------------------


def _encode_targets(y) -> tuple[np.ndarray, np.ndarray]:
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


def _seed(random_state) -> int:
    """An int seed for torch and train_test_split, following sklearn's ``random_state`` rules."""
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


def _holdout(X, y, fraction, seed):
    """A seeded stratified holdout, or the training data itself where no holdout can work."""
    n_classes = len(np.unique(y))
    if not fraction or len(y) < _MIN_HOLDOUT_SAMPLES:
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


def _selection_split(estimator, X, y, X_val, y_val, fraction, seed):
    """``X_fit, y_fit, X_sel, y_sel, separate``: fit on the first pair, select on the second.

    ``separate`` is False when the selection data is the training data itself.
    """
    if X_val is None and y_val is None:
        return _holdout(X, y, fraction, seed)
    if X_val is None or y_val is None:
        raise ValueError("pass both X_val and y_val, or neither")
    X_val, y_val = validate_data(estimator, X_val, y_val, reset=False, dtype=_FLOATS)
    return X, y, X_val, _encode_like(estimator.classes_, y_val), True


def _standardisation(X) -> tuple[np.ndarray, np.ndarray]:
    """Mean and scale as StandardScaler computes them (constant features keep a scale of 1)."""
    scaler = StandardScaler().fit(X)
    return scaler.mean_, scaler.scale_


def _standardise(X, mean, scale, dtype=np.float32) -> np.ndarray:
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
def _seeded_torch(seed: int, device: torch.device):
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


# --- MLPHead's network and its training loop -------------------------------------------------


def _mlp(n_features: int, hidden_sizes, dropout: float, n_classes: int) -> nn.Sequential:
    if isinstance(hidden_sizes, int):  # "mlp:hidden_sizes=(256)" parses to an int, not a tuple
        hidden_sizes = (hidden_sizes,)
    layers, width = [], n_features
    for size in hidden_sizes:
        layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(dropout)]
        width = size
    layers.append(nn.Linear(width, n_classes))
    return nn.Sequential(*layers)


def _train_one_epoch(module, optimizer, X, y, batch_size, generator) -> float:
    """One pass over shuffled minibatches; the mean training loss."""
    module.train()
    total = torch.zeros((), device=X.device)
    for idx in torch.randperm(len(y), generator=generator).to(X.device).split(batch_size):
        loss = F.cross_entropy(module(X[idx]), y[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.detach() * len(idx)
    return float(total) / len(y)


def _evaluate(module, X, y, batch_size) -> float:
    """The mean cross-entropy of ``module`` on ``X, y``."""
    module.eval()
    with torch.inference_mode():
        total = sum(
            F.cross_entropy(module(X[i : i + batch_size]), y[i : i + batch_size], reduction="sum")
            for i in range(0, len(y), batch_size)
        )
    return float(total) / len(y)


# --- LinearProbe: a grid of linear heads trained as one batched model ------------------------


def _grid_logits(X, W, b):
    """(B, D) features through G heads (G, D, C) + (G, C): logits (G, B, C) in one product."""
    return torch.einsum("bd,gdc->gbc", X, W) + b[:, None, :]


def _grid_losses(logits, y):
    """Each head's mean cross-entropy over the batch: (G,)."""
    # cross_entropy wants classes on dim 1: (G, C, B) against targets (G, B)
    targets = y.expand(len(logits), -1)
    return F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=1)


def _grid_scores(W, b, X, y, batch_size):
    """Every head's mean validation loss and count of correct predictions, (G,) each."""
    loss_sum = torch.zeros(len(W), device=W.device)
    correct = torch.zeros(len(W), dtype=torch.int64, device=W.device)
    # no_grad rather than inference_mode: the scores feed in-place bookkeeping after this block,
    # which inference tensors do not allow
    with torch.no_grad():
        for i in range(0, len(y), batch_size):
            logits, target = _grid_logits(X[i : i + batch_size], W, b), y[i : i + batch_size]
            loss_sum += _grid_losses(logits, target) * len(target)
            correct += (logits.argmax(dim=2) == target).sum(dim=1)
    return loss_sum / len(y), correct


class _GridAdamW:
    """AdamW over parameters whose first dimension is the head: one learning rate and one
    decoupled weight decay per head (torch's AdamW takes one of each per parameter group).

    The update is torch.optim.AdamW's (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101).
    """

    def __init__(self, params, decayed, lr, weight_decay):
        self.params, self.decayed = params, decayed
        self.lr, self.weight_decay = lr, weight_decay  # (G,) each
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self):
        self.steps += 1
        beta1, beta2 = _ADAM_BETAS
        for p, decayed, (m, v) in zip(self.params, self.decayed, self.moments):
            per_head = (-1,) + (1,) * (p.dim() - 1)  # (G, 1, 1) for W, (G, 1) for b
            lr = self.lr.view(per_head)
            if decayed:
                p.mul_(1 - lr * self.weight_decay.view(per_head))
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v / (1 - beta2**self.steps)).sqrt_().add_(_ADAM_EPS)
            p.sub_(lr / (1 - beta1**self.steps) * m / denom)

    def zero_grad(self):
        for p in self.params:
            p.grad = None


def _train_grid_epoch(W, b, optimizer, X, y, batch_size, generator):
    for idx in torch.randperm(len(y), generator=generator).to(X.device).split(batch_size):
        # The sum of the heads' losses: each head's parameters get exactly its own gradient.
        loss = _grid_losses(_grid_logits(X[idx], W, b), y[idx]).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def _best_head(val_accuracy: np.ndarray, val_loss: np.ndarray) -> int:
    """Best validation accuracy; ties go to the lower validation loss, then the first head."""
    return int(np.lexsort((val_loss, -val_accuracy))[0])


# --- make_head: spec parsing -----------------------------------------------------------------


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets and quotes: ``a=(1,2),b=x`` -> ``a=(1,2)``, ``b=x``."""
    parts, depth, quote, start = [], 0, None, 0
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    parts.append(text[start:])
    return [part.strip() for part in parts if part.strip()]


def _parse_value(key: str, text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        if _BARE_WORD.match(text):
            return text
        raise HeadError(
            f"cannot read the value {text!r} of {key!r}; write a Python literal "
            "such as 0.1, (256, 128), None or 'text'"
        ) from None


def _parse_spec(spec: str) -> tuple[str, dict]:
    """``NAME[:param=value[,param=value...]]`` -> name, parameters."""
    name, _, text = spec.partition(":")
    params = {}
    for item in _split_top_level(text):
        key, equals, value = (part.strip() for part in item.partition("="))
        if not equals or not key.isidentifier():
            raise HeadError(f"cannot read {item!r} in head {spec!r}; write param=value")
        if key in params:
            raise HeadError(f"parameter {key!r} is given twice in head {spec!r}")
        params[key] = _parse_value(key, value)
    return name.strip(), params


def _head_class(name: str) -> type:
    if name in HEADS:
        return HEADS[name]
    module_name, _, class_name = name.rpartition(".")
    if not module_name:
        raise HeadError(
            f"unknown head {name!r}; use one of {', '.join(HEADS)} "
            "or the import path of a classifier, such as sklearn.svm.LinearSVC"
        )
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise HeadError(f"cannot import {module_name!r} for head {name!r}: {err}") from err
    cls = getattr(module, class_name, None)
    if not inspect.isclass(cls):
        raise HeadError(f"{module_name!r} has no class {class_name!r}")
    return cls


def _is_classifier(estimator) -> bool:
    try:
        return is_classifier(estimator)
    except AttributeError:  # not a scikit-learn estimator at all: it has no tags
        return False


# --- the heads --------------------------------------------------------------------------------


class _Head(ClassifierMixin, BaseEstimator):
    """What every head shares: its prediction is the most probable class of predict_proba."""

    def predict(self, X) -> np.ndarray:
        """The most probable class of each sample."""
        check_is_fitted(self)
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


class _TorchHead(_Head):
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
        X, y = validate_data(self, X, y, reset=True, dtype=_FLOATS)
        self.classes_, y = _encode_targets(y)
        seed = _seed(self.random_state)
        X_fit, y_fit, X_sel, y_sel, _ = _selection_split(self, X, y, X_val, y_val, fraction, seed)
        self.mean_, self.scale_ = _standardisation(X_fit)
        device = resolve_device(self.device)
        # Cached features fit in memory; moving them to the device once saves a copy per batch.
        train = _to_torch(_standardise(X_fit, self.mean_, self.scale_), y_fit, device)
        val = _to_torch(_standardise(X_sel, self.mean_, self.scale_), y_sel, device)
        return train, val, seed, device


class LogRegHead(_Head):
    """Standardisation and multinomial logistic regression, with C chosen on validation data.

    One model is fitted per C on the training data (each warm-started from the previous, smaller
    C); the C with the best validation accuracy wins, ties going to the lower validation log loss
    and then to the smaller C.

    Parameters
    ----------
    Cs : tuple of float, default=13 values from 1e-4 to 1e2, evenly spaced in log
        Inverse regularisation strengths to choose from.
    max_iter : int, default=1000
        L-BFGS iterations per fit.
    refit_on : {"train", "train+val"}, default="train"
        The final model is the one fitted on the training data, or a refit with the chosen C on
        training and validation data together.
    validation_fraction : float, default=0.1
        Share of the training data held out (stratified) to choose C when ``fit`` is given no
        ``X_val``. Data too small to split selects on the training data itself.
    random_state : int, RandomState instance or None, default=0
        Seeds the holdout split.

    Attributes
    ----------
    C_ : float
        The chosen C.
    val_scores_ : dict of float to float
        Validation accuracy per C.
    val_losses_ : dict of float to float
        Validation log loss per C.
    pipeline_ : sklearn.pipeline.Pipeline
        The fitted scaler and logistic regression.
    n_iter_ : ndarray of shape (1,)
        L-BFGS iterations of the final model (of its last fit, when warm-started).
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    """

    def __init__(
        self,
        Cs=DEFAULT_CS,
        max_iter=1000,
        refit_on="train",
        validation_fraction=0.1,
        random_state=0,
    ):
        self.Cs = Cs
        self.max_iter = max_iter
        self.refit_on = refit_on
        self.validation_fraction = validation_fraction
        self.random_state = random_state

    def fit(self, X, y, X_val=None, y_val=None):
        """Fit one model per C, choose C on ``X_val, y_val`` (or a holdout), keep one model.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        X_val, y_val : array-like, optional
            Validation data to choose C by; by default a holdout of ``X, y``.

        Returns
        -------
        self : LogRegHead
        """
        X, y = validate_data(self, X, y, reset=True)
        self.classes_, y = _encode_targets(y)
        if self.refit_on not in REFIT_ON:
            raise ValueError(f"refit_on must be one of {REFIT_ON}, not {self.refit_on!r}")
        seed = _seed(self.random_state)
        X_fit, y_fit, X_sel, y_sel, separate = _selection_split(
            self, X, y, X_val, y_val, self.validation_fraction, seed
        )
        scaler = StandardScaler().fit(X_fit)
        models = self._fit_path(scaler.transform(X_fit), y_fit, seed)
        self._score_path(models, scaler.transform(X_sel), y_sel)
        self.C_ = min(models, key=lambda c: (-self.val_scores_[c], self.val_losses_[c], c))
        if self.refit_on == "train+val" and separate:
            scaler = StandardScaler()
            model = self._logistic_regression(self.C_, seed)
            self.pipeline_ = Pipeline([("scale", scaler), ("logreg", model)])
            self.pipeline_.fit(np.concatenate([X_fit, X_sel]), np.concatenate([y_fit, y_sel]))
        else:
            self.pipeline_ = Pipeline([("scale", scaler), ("logreg", models[self.C_])])
        self.n_iter_ = self.pipeline_[-1].n_iter_
        return self

    def _logistic_regression(self, C, seed, warm_start=False) -> LogisticRegression:
        return LogisticRegression(
            C=C, max_iter=self.max_iter, random_state=seed, warm_start=warm_start
        )

    def _fit_path(self, X, y, seed) -> dict[float, LogisticRegression]:
        """One model per C, from the strongest regularisation up: each fit starts from the
        previous solution, which is close, so L-BFGS needs fewer iterations."""
        Cs = sorted({float(c) for c in self.Cs})
        if not Cs:
            raise ValueError("Cs must hold at least one C")
        model, models = self._logistic_regression(Cs[0], seed, warm_start=True), {}
        for C in Cs:
            models[C] = copy.deepcopy(model.set_params(C=C).fit(X, y))
        return models

    def _score_path(self, models, X, y):
        labels = np.arange(len(self.classes_))
        self.val_scores_, self.val_losses_ = {}, {}
        for C, model in models.items():
            proba = model.predict_proba(X)
            self.val_scores_[C] = accuracy_score(y, labels[proba.argmax(axis=1)])
            self.val_losses_[C] = log_loss(y, proba, labels=labels)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities, columns in the order of ``classes_``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False)
        return self.pipeline_.predict_proba(X)



class MLPHead(_TorchHead):
    """A small PyTorch MLP on standardised features, early-stopped on validation loss.

    Each hidden layer is Linear, ReLU, Dropout; a Linear layer gives the class logits. Training
    uses AdamW, cross-entropy and minibatches shuffled by a generator seeded from
    ``random_state``; it stops when the validation loss has not improved for ``patience``
    epochs and restores the weights of the best epoch. On the CPU the same ``random_state``
    gives the same model.

    Parameters
    ----------
    hidden_sizes : tuple of int, default=(512,)
        Widths of the hidden layers; () gives a linear model.
    dropout : float, default=0.2
    lr : float, default=1e-3
    weight_decay : float, default=1e-4
        AdamW's decoupled weight decay.
    batch_size : int, default=256
    max_epochs : int, default=100
    patience : int, default=10
        Epochs without a better validation loss before training stops.
    validation_fraction : float, default=0.1
        Share of the training data held out (stratified) for early stopping when ``fit`` is
        given no ``X_val``.
    device : str, default="auto"
        Where to train: "auto" (a GPU if there is one), "cuda", "mps" or "cpu".
    random_state : int, RandomState instance or None, default=0
        Seeds the holdout, the initial weights, dropout and the shuffling.

    Attributes
    ----------
    module_ : torch.nn.Sequential
        The network with the best epoch's weights, on the CPU, in eval mode.
    mean_, scale_ : ndarray of shape (n_features,)
        Standardisation learned on the training part.
    loss_curve_ : list of float
        Mean training loss per epoch.
    validation_loss_curve_ : list of float
        Validation loss after each epoch.
    best_epoch_ : int
        Index into the curves of the epoch whose weights were kept.
    n_epochs_ : int
        Epochs run.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    """

    def __init__(
        self,
        hidden_sizes=(512,),
        dropout=0.2,
        lr=1e-3,
        weight_decay=1e-4,
        batch_size=256,
        max_epochs=100,
        patience=10,
        validation_fraction=0.1,
        device="auto",
        random_state=0,
    ):
        self.hidden_sizes = hidden_sizes
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.device = device
        self.random_state = random_state

    def fit(self, X, y, X_val=None, y_val=None):
        """Train with early stopping on ``X_val, y_val`` (or a holdout of ``X, y``).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        X_val, y_val : array-like, optional
            Validation data for early stopping; by default a holdout of ``X, y``.

        Returns
        -------
        self : MLPHead
        """
        train, val, seed, device = self._standardised_splits(
            X, y, X_val, y_val, self.validation_fraction)
        with _seeded_torch(seed, device):
            module = _mlp(self.n_features_in_, self.hidden_sizes, self.dropout,
                          len(self.classes_))
            self._train(module.to(device), train, val, seed)
        return self

    def _train(self, module, train, val, seed):
        optimizer = torch.optim.AdamW(
            module.parameters(), lr=self.lr, weight_decay=self.weight_decay, betas=_ADAM_BETAS
        )
        generator = torch.Generator().manual_seed(seed)
        self.loss_curve_, self.validation_loss_curve_ = [], []
        best_loss, best_state, self.best_epoch_ = float("inf"), None, 0
        for epoch in range(self.max_epochs):
            self.loss_curve_.append(
                _train_one_epoch(module, optimizer, *train, self.batch_size, generator)
            )
            val_loss = _evaluate(module, *val, self.batch_size)
            self.validation_loss_curve_.append(val_loss)
            if val_loss < best_loss:
                best_loss, self.best_epoch_ = val_loss, epoch
                best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
            elif epoch - self.best_epoch_ >= self.patience:
                break
        if best_state is not None:  # None only when no epoch ran or every loss was NaN
            module.load_state_dict(best_state)
        self.n_epochs_ = len(self.loss_curve_)
        self.module_ = module.cpu().eval()

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (float64, rows sum to 1), columns in the order of ``classes_``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=_FLOATS)
        # In float64 so a row's result does not depend on which rows share its batch: float32
        # matrix kernels vary with the batch size by more than sklearn's invariance checks allow.
        Z = torch.from_numpy(_standardise(X, self.mean_, self.scale_, np.float64))
        module = copy.deepcopy(self.module_).double()
        with torch.inference_mode():
            logits = torch.cat([module(rows) for rows in Z.split(_PREDICT_ROWS)])
            return torch.softmax(logits, dim=1).numpy()



class LinearProbe(_TorchHead):
    """A grid of softmax linear probes trained at once by minibatch AdamW; the best is kept.

    All ``G = len(weight_decays) * len(lrs)`` heads share every feature batch: their weights
    form one (G, D, C) tensor, the logits of a batch are one batched product (G, B, C), and the
    loss is the sum of the heads' mean cross-entropies, so each head gets its own gradient, its
    own learning rate and its own decoupled weight decay (the intercept is not decayed, as in
    LogisticRegression). After every epoch all heads are scored on validation data; each keeps
    the weights of its lowest validation loss, and training stops once no head has improved for
    ``patience`` epochs. The head with the best validation accuracy (ties: lower loss) wins.

    Parameters
    ----------
    weight_decays : tuple of float, default=8 values from 1e-6 to 1e-1, evenly spaced in log
    lrs : tuple of float, default=(1e-3,)
    batch_size : int, default=512
    max_epochs : int, default=50
    patience : int, default=5
    validation_fraction : float, default=0.1
        Share of the training data held out (stratified) for selection when ``fit`` is given
        no ``X_val``.
    device : str, default="auto"
        Where to train: "auto" (a GPU if there is one), "cuda", "mps" or "cpu".
    random_state : int, RandomState instance or None, default=0
        Seeds the holdout and the shuffling (weights start at zero).

    Attributes
    ----------
    coef_ : ndarray of shape (n_classes, n_features)
        The chosen head's weights with the standardisation folded in, so they apply to raw
        features: ``logits = X @ coef_.T + intercept_`` (one row per class, also for 2 classes).
    intercept_ : ndarray of shape (n_classes,)
    weight_decay_, lr_ : float
        The chosen head's hyperparameters.
    val_scores_ : list of dict
        Per head, in the order of ``itertools.product(weight_decays, lrs)``: ``weight_decay``,
        ``lr``, ``val_accuracy`` and ``val_loss`` of its kept weights, and ``weight_norm``, the
        Frobenius norm of those weights in the standardised space.
    n_epochs_ : int
        Epochs run.
    mean_, scale_ : ndarray of shape (n_features,)
        Standardisation learned on the training part.
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    """

    def __init__(
        self,
        weight_decays=DEFAULT_WEIGHT_DECAYS,
        lrs=(1e-3,),
        batch_size=512,
        max_epochs=50,
        patience=5,
        validation_fraction=0.1,
        device="auto",
        random_state=0,
    ):
        self.weight_decays = weight_decays
        self.lrs = lrs
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.device = device
        self.random_state = random_state

    def fit(self, X, y, X_val=None, y_val=None):
        """Train every head of the grid at once and keep the best on ``X_val, y_val``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
        X_val, y_val : array-like, optional
            Validation data for early stopping and selection; by default a holdout of ``X, y``.

        Returns
        -------
        self : LinearProbe
        """
        grid = list(itertools.product(self.weight_decays, self.lrs))
        if not grid:
            raise ValueError("weight_decays and lrs must each hold at least one value")
        train, val, seed, device = self._standardised_splits(
            X, y, X_val, y_val, self.validation_fraction)
        W, b, loss, accuracy = self._train_grid(grid, train, val, seed, device)
        self._keep_best(grid, W, b, loss, accuracy)
        return self

    def _train_grid(self, grid, train, val, seed, device):
        """Train all heads; per head, the weights and scores of its best validation loss."""
        n_features, n_classes = train[0].shape[1], len(self.classes_)
        W = torch.zeros(len(grid), n_features, n_classes, device=device, requires_grad=True)
        b = torch.zeros(len(grid), n_classes, device=device, requires_grad=True)
        weight_decay, lr = (torch.tensor(v, dtype=torch.float32, device=device) for v in zip(*grid))
        optimizer = _GridAdamW([W, b], [True, False], lr, weight_decay)
        generator = torch.Generator().manual_seed(seed)
        best_W, best_b = W.detach().clone(), b.detach().clone()
        best_loss = torch.full((len(grid),), float("inf"), device=device)
        best_correct = torch.zeros(len(grid), dtype=torch.int64, device=device)
        stalled, self.n_epochs_ = 0, 0
        while self.n_epochs_ < self.max_epochs and stalled < self.patience:
            _train_grid_epoch(W, b, optimizer, *train, self.batch_size, generator)
            self.n_epochs_ += 1
            loss, correct = _grid_scores(W, b, *val, self.batch_size)
            improved = loss < best_loss
            best_W[improved], best_b[improved] = W.detach()[improved], b.detach()[improved]
            best_loss = torch.where(improved, loss, best_loss)
            best_correct = torch.where(improved, correct, best_correct)
            stalled = 0 if improved.any() else stalled + 1
        accuracy = best_correct.cpu().numpy() / len(val[1])
        return best_W, best_b, best_loss.cpu().numpy(), accuracy

    def _keep_best(self, grid, W, b, loss, accuracy):
        """Record every head's scores; fold the winner's standardisation into coef_/intercept_."""
        norms = torch.linalg.vector_norm(W, dim=(1, 2)).cpu().numpy()
        self.val_scores_ = [
            {
                "weight_decay": float(wd),
                "lr": float(lr),
                "val_accuracy": float(acc),
                "val_loss": float(lo),
                "weight_norm": float(norm),
            }
            for (wd, lr), acc, lo, norm in zip(grid, accuracy, loss, norms)
        ]
        best = _best_head(accuracy, loss)
        self.weight_decay_, self.lr_ = (float(v) for v in grid[best])
        weights = W[best].cpu().double().numpy()  # (D, C) in the standardised space
        self.coef_ = (weights / self.scale_[:, None]).T
        self.intercept_ = b[best].cpu().double().numpy() - (self.mean_ / self.scale_) @ weights

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (float64, rows sum to 1), columns in the order of ``classes_``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=_FLOATS)
        return softmax(X @ self.coef_.T + self.intercept_, axis=1)



HEADS = {"logreg": LogRegHead, "mlp": MLPHead, "linear": LinearProbe}


def make_head(spec: str) -> BaseEstimator:
    """Build a classifier from ``NAME[:param=value[,param=value...]]``.

    ``NAME`` is a key of ``HEADS`` or the import path of any scikit-learn classifier; values are
    Python literals, or strings when they are one bare word.

    Examples
    --------
    >>> make_head("mlp:hidden_sizes=(256,),dropout=0.5")
    MLPHead(dropout=0.5, hidden_sizes=(256,))
    >>> make_head("sklearn.svm.LinearSVC:C=0.1")
    LinearSVC(C=0.1)

    Raises
    ------
    HeadError
        Unknown name, a module that cannot be imported, a class that is not a classifier, an
        unknown parameter or an unreadable value.
    """
    name, params = _parse_spec(spec)
    cls = _head_class(name)
    try:
        estimator = cls()
    except TypeError as err:
        raise HeadError(f"{name!r} cannot be built without arguments: {err}") from err
    if not _is_classifier(estimator):
        raise HeadError(
            f"{name!r} is not a scikit-learn classifier; use one of {', '.join(HEADS)} "
            "or a classifier such as sklearn.svm.LinearSVC"
        )
    try:
        return estimator.set_params(**params)
    except ValueError as err:
        raise HeadError(f"bad parameter for head {name!r}: {err}") from err


def head_name(spec: str) -> str:
    """A short name for tables: the registry name, or the class name of an import path."""
    name = spec.partition(":")[0].strip()
    return name if name in HEADS else name.rpartition(".")[2]

"""MLPHead: a small PyTorch MLP on standardised features, early-stopped on validation loss."""

from __future__ import annotations

import copy
from numbers import Real

import numpy as np
import torch
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import check_is_fitted, validate_data
from torch import nn
from torch.nn import functional as F

from pipeline.core.early_stopping import EarlyStopping
from pipeline.heads._base import (
    ADAM_BETAS,
    FLOATS,
    TORCH_CONSTRAINTS,
    TorchHead,
    seeded_torch,
    standardise,
)
from pipeline.heads.protocol import folded_module

_PREDICT_ROWS = 8192  # rows per forward pass at predict time: bounded memory on large test sets


def mlp_module(n_features: int, hidden_sizes, dropout: float, n_classes: int) -> nn.Sequential:
    """Linear, ReLU and dropout per hidden size, then a linear layer to the class logits."""
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


class MLPOutputs:
    """What a head trained as an :func:`mlp_module` answers once fitted (MLPHead and the
    distilled StudentHead alike): the epoch it kept, its probabilities, its logit module.
    Expects ``module_``, ``mean_``, ``scale_`` and ``best_epoch_``."""

    def _keep_best(self, module: nn.Sequential, stopping: EarlyStopping) -> None:
        """``module_``: ``module`` with the weights of the best validation epoch."""
        self.n_epochs_ = len(self.loss_curve_)
        if stopping.best_state is None:  # no epoch ran or every loss was NaN: keep the last
            self.best_epoch_ = self.n_epochs_ - 1
        else:
            module.load_state_dict(stopping.best_state)
            self.best_epoch_ = int(stopping.best_epoch)
        self.module_ = module.cpu().eval()

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (float64, rows sum to 1), columns in the order of ``classes_``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=FLOATS)
        # In float64 so a row's result does not depend on which rows share its batch: float32
        # matrix kernels vary with the batch size by more than sklearn's invariance checks allow.
        Z = torch.from_numpy(standardise(X, self.mean_, self.scale_, np.float64))
        module = copy.deepcopy(self.module_).double()
        with torch.inference_mode():
            logits = torch.cat([module(rows) for rows in Z.split(_PREDICT_ROWS)])
            return torch.softmax(logits, dim=1).numpy()

    def logit_module(self) -> nn.Sequential:
        """A float32 copy of ``module_`` that takes raw features: the standardisation folded
        into its first linear layer, so logits are ``logit_module()(X)`` (and export writes
        every such head alike)."""
        check_is_fitted(self)
        return folded_module(self.module_, self.mean_, self.scale_)

    def chosen_params(self) -> dict[str, object]:
        """The epoch whose weights were kept (early stopping on validation loss)."""
        check_is_fitted(self)
        return {"best_epoch": self.best_epoch_}


class MLPHead(MLPOutputs, TorchHead):
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
        Standardisation learned on the training part (:class:`~pipeline.heads._base.FeatureScaler`:
        a barely varying feature is scaled by a tenth of the typical scale, not its own).
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

    _parameter_constraints = {
        "hidden_sizes": ["array-like"],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        **TORCH_CONSTRAINTS,
    }

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
        with seeded_torch(seed, device):
            module = mlp_module(self.n_features_in_, self.hidden_sizes, self.dropout,
                          len(self.classes_))
            self._train(module.to(device), train, val, seed)
        return self

    def _train(self, module, train, val, seed):
        optimizer = torch.optim.AdamW(
            module.parameters(), lr=self.lr, weight_decay=self.weight_decay, betas=ADAM_BETAS
        )
        generator = torch.Generator().manual_seed(seed)
        stopping = EarlyStopping(self.patience)
        self.loss_curve_, self.validation_loss_curve_ = [], []
        while len(self.loss_curve_) < self.max_epochs and not stopping.should_stop:
            self.loss_curve_.append(
                _train_one_epoch(module, optimizer, *train, self.batch_size, generator)
            )
            val_loss = _evaluate(module, *val, self.batch_size)
            self.validation_loss_curve_.append(val_loss)
            stopping.step(val_loss, module.state_dict())
        self._keep_best(module, stopping)

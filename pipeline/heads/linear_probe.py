"""LinearProbe: a grid of linear heads trained as one batched model, the best kept.

The grid maths (logits, losses and scores of G heads at once) and the grid optimizer
(:class:`GridAdamW`: AdamW with one learning rate and one weight decay per head) live here
too, since only the probe uses them.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch
from scipy.special import softmax
from sklearn.utils._param_validation import StrOptions
from sklearn.utils.validation import check_is_fitted, validate_data
from torch.nn import functional as F

from pipeline.core.early_stopping import EarlyStopping
from pipeline.heads._base import (
    ADAM_BETAS,
    ADAM_EPS,
    FLOATS,
    SELECT_ON,
    TORCH_CONSTRAINTS,
    TorchHead,
)
from pipeline.heads.protocol import LinearForm, fold_standardisation

DEFAULT_WEIGHT_DECAYS = tuple(float(w) for w in np.logspace(-6, -1, 8))


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


class GridAdamW:
    """AdamW over parameters whose first dimension is the head: one learning rate and one
    decoupled weight decay per head (torch's AdamW takes one of each per parameter group).

    The update is torch.optim.AdamW's (Loshchilov & Hutter, https://arxiv.org/abs/1711.05101);
    tests/test_heads.py checks it head by head against torch.optim.AdamW.

    Parameters
    ----------
    params : list of torch.Tensor
        Leaf tensors of shape (G, ...), one row per head.
    decayed : list of bool
        Per tensor: whether weight decay applies (not to intercepts, as in LogisticRegression).
    lr, weight_decay : torch.Tensor of shape (G,)
        Each head's learning rate and decoupled weight decay.
    """

    def __init__(self, params, decayed, lr, weight_decay):
        self.params, self.decayed = params, decayed
        self.lr, self.weight_decay = lr, weight_decay  # (G,) each
        self.moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self):
        self.steps += 1
        beta1, beta2 = ADAM_BETAS
        for p, decayed, (m, v) in zip(self.params, self.decayed, self.moments):
            per_head = (-1,) + (1,) * (p.dim() - 1)  # (G, 1, 1) for W, (G, 1) for b
            lr = self.lr.view(per_head)
            if decayed:
                p.mul_(1 - lr * self.weight_decay.view(per_head))
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v / (1 - beta2**self.steps)).sqrt_().add_(ADAM_EPS)
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


def _best_head(val_accuracy: np.ndarray, val_loss: np.ndarray, select_on: str) -> int:
    """Lowest validation loss, ties to the higher accuracy (``select_on="accuracy"``: the best
    accuracy, ties to the lower loss); then the first head."""
    keys = (-val_accuracy, val_loss) if select_on == "log_loss" else (val_loss, -val_accuracy)
    return int(np.lexsort(keys)[0])


class LinearProbe(TorchHead):
    """A grid of softmax linear probes trained at once by minibatch AdamW; the best is kept.

    All ``G = len(weight_decays) * len(lrs)`` heads share every feature batch: their weights
    form one (G, D, C) tensor, the logits of a batch are one batched product (G, B, C), and the
    loss is the sum of the heads' mean cross-entropies, so each head gets its own gradient, its
    own learning rate and its own decoupled weight decay (the intercept is not decayed, as in
    LogisticRegression). After every epoch all heads are scored on validation data; each keeps
    the weights of its lowest validation loss, and training stops once no head has improved for
    ``patience`` epochs. The head with the lowest validation loss wins (``select_on``).

    Parameters
    ----------
    weight_decays : tuple of float, default=8 values from 1e-6 to 1e-1, evenly spaced in log
    lrs : tuple of float, default=(1e-3,)
    batch_size : int, default=512
    max_epochs : int, default=50
    patience : int, default=5
    select_on : {"log_loss", "accuracy"}, default="log_loss"
        What chooses the head: its lowest validation loss (ties: higher accuracy), or its best
        validation accuracy (ties: lower loss), as :class:`~pipeline.heads.LogRegHead` chooses C.
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
        Standardisation learned on the training part (:class:`~pipeline.heads._base.FeatureScaler`:
        a barely varying feature is scaled by a tenth of the typical scale, not its own).
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    """

    _parameter_constraints = {
        "weight_decays": ["array-like"],
        "lrs": ["array-like"],
        "select_on": [StrOptions(set(SELECT_ON))],
        **TORCH_CONSTRAINTS,
    }

    def __init__(
        self,
        weight_decays=DEFAULT_WEIGHT_DECAYS,
        lrs=(1e-3,),
        batch_size=512,
        max_epochs=50,
        patience=5,
        select_on="log_loss",
        validation_fraction=0.1,
        device="auto",
        random_state=0,
    ):
        self.weight_decays = weight_decays
        self.lrs = lrs
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.select_on = select_on
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
        optimizer = GridAdamW([W, b], [True, False], lr, weight_decay)
        generator = torch.Generator().manual_seed(seed)
        # One tracker per head: each keeps its own best weights; training stops once no head
        # has improved for `patience` epochs.
        stopping = EarlyStopping(self.patience)
        self.n_epochs_ = 0
        while self.n_epochs_ < self.max_epochs and not stopping.should_stop:
            _train_grid_epoch(W, b, optimizer, *train, self.batch_size, generator)
            self.n_epochs_ += 1
            loss, correct = _grid_scores(W, b, *val, self.batch_size)
            stopping.step(loss, {"W": W, "b": b, "correct": correct})
        # A head that never improved keeps the zero start, no correct answer and an inf loss
        # (EarlyStopping keeps zero rows for it), so it is chosen only if no head improved.
        if stopping.best_state is None:  # no epoch ran, or no head ever had a finite loss
            nothing = np.zeros(len(grid))
            return torch.zeros_like(W), torch.zeros_like(b), nothing + np.inf, nothing
        best = stopping.best_state
        accuracy = best["correct"].cpu().numpy() / len(val[1])
        return best["W"], best["b"], stopping.best_loss.cpu().numpy(), accuracy

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
        best = _best_head(accuracy, loss, self.select_on)
        self.weight_decay_, self.lr_ = (float(v) for v in grid[best])
        weights = W[best].cpu().double().numpy()  # (D, C) in the standardised space
        self.coef_, self.intercept_ = fold_standardisation(
            weights.T, b[best].cpu().double().numpy(), self.mean_, self.scale_)

    def predict_proba(self, X) -> np.ndarray:
        """Class probabilities (float64, rows sum to 1), columns in the order of ``classes_``."""
        check_is_fitted(self)
        X = validate_data(self, X, reset=False, dtype=FLOATS)
        return softmax(X @ self.coef_.T + self.intercept_, axis=1)

    def linear_form(self) -> LinearForm:
        """``coef_`` and ``intercept_``: ``predict_proba`` is the softmax of that map."""
        check_is_fitted(self)
        return LinearForm(self.coef_, self.intercept_)

    def chosen_params(self) -> dict[str, object]:
        """The chosen head's weight decay and learning rate."""
        check_is_fitted(self)
        return {"weight_decay": self.weight_decay_, "lr": self.lr_}

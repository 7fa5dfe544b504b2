"""StudentHead: a linear or MLP head trained on a teacher's soft predictions and the true labels.

Knowledge distillation (Hinton, Vinyals & Dean 2015, https://arxiv.org/abs/1503.02531): the
student matches the teacher's class probabilities softened by a temperature ``T``, the
Kullback-Leibler divergence scaled by ``T**2`` (so its gradients keep their size as ``T``
changes), mixed with the cross-entropy of the true labels by ``alpha``::

    loss_i = alpha * T**2 * KL(softmax(t_i / T) || softmax(s_i / T))
             + (1 - alpha) * CE(s_i, y_i)        (labelled rows only)

Rows labelled ``-1`` are unlabelled (scikit-learn's convention for semi-supervised data): they
bring only the first term, so a pool of unlabelled images teaches through the teacher alone.
Without teacher logits it is a plain MLP (``hidden_sizes=()``: a softmax linear model) on
standardised features, early-stopped on the validation loss, like :class:`~pipeline.heads.MLPHead`,
and it takes ``sample_weight`` (self-training's confidence weights).
"""

from __future__ import annotations

from numbers import Real

import numpy as np
import torch
from sklearn.model_selection import train_test_split
from sklearn.utils._param_validation import Interval
from sklearn.utils.validation import _check_sample_weight, validate_data
from torch.nn import functional as F

from pipeline.core.devices import resolve_device
from pipeline.core.early_stopping import EarlyStopping
from pipeline.heads._base import (
    ADAM_BETAS,
    FLOATS,
    MIN_HOLDOUT_SAMPLES,
    TORCH_CONSTRAINTS,
    FeatureScaler,
    TorchHead,
    encode_targets,
    seed_from,
    seeded_torch,
    selection_split,
    standardise,
)
from pipeline.heads.mlp import MLPOutputs, mlp_module

__all__ = ["UNLABELLED", "StudentHead"]

UNLABELLED = -1  # the label of a row that only the teacher teaches


def distillation_loss(logits, y, teacher, weight, temperature: float, alpha: float):
    """The mean over the batch of each row's weighted loss (see the module's docstring).

    ``y`` holds -1 for unlabelled rows; ``teacher`` is None (plain cross-entropy) or the
    teacher's logits at temperature 1.
    """
    labelled = y != UNLABELLED
    ce = F.cross_entropy(logits, y.clamp(min=0), reduction="none") * labelled
    if teacher is None:
        per_row = ce
    else:
        soft = F.log_softmax(teacher / temperature, dim=1)
        kl = F.kl_div(F.log_softmax(logits / temperature, dim=1), soft, reduction="none",
                      log_target=True).sum(1)
        per_row = alpha * temperature**2 * kl + (1 - alpha) * ce
    return (per_row * weight).sum() / weight.sum()


class StudentHead(MLPOutputs, TorchHead):
    """An MLP (or, with ``hidden_sizes=()``, a linear model) on standardised features, trained
    on true labels, a teacher's soft predictions, or both.

    Parameters
    ----------
    hidden_sizes : tuple of int, default=(512,)
        Widths of the hidden layers; () gives a softmax linear model.
    temperature : float, default=2.0
        Softens teacher and student alike in the distillation term.
    alpha : float, default=0.9
        Weight of the distillation term; ``1 - alpha`` weighs the true labels' cross-entropy.
        Without teacher logits only the cross-entropy is used.
    dropout : float, default=0.2
    lr : float, default=1e-2
        Ten times MLPHead's: a student often learns from a few dozen labelled images, one
        minibatch an epoch, and at 1e-3 a linear student on 20 images of 4 planted clusters
        was still far from fitted after 100 epochs (test accuracy 0.49, against 0.75 at 1e-2).
    weight_decay : float, default=1e-4
    batch_size : int, default=256
    max_epochs : int, default=200
    patience : int, default=20
        Epochs without a better validation loss (cross-entropy of the true labels) before
        training stops; the best epoch's weights are kept.
    validation_fraction : float, default=0.1
        Share of the labelled rows held out for early stopping when ``fit`` is given no
        ``X_val``.
    device : str, default="auto"
    random_state : int, RandomState instance or None, default=0

    Attributes
    ----------
    module_ : torch.nn.Sequential
        The network with the best epoch's weights, on the CPU, in eval mode.
    mean_, scale_ : ndarray of shape (n_features,)
        Standardisation learned on the training rows.
    loss_curve_, validation_loss_curve_ : list of float
    best_epoch_, n_epochs_ : int
    classes_ : ndarray of shape (n_classes,)
    n_features_in_ : int
    """

    _parameter_constraints = {
        "hidden_sizes": ["array-like"],
        "temperature": [Interval(Real, 0, None, closed="neither")],
        "alpha": [Interval(Real, 0, 1, closed="both")],
        "dropout": [Interval(Real, 0, 1, closed="left")],
        "lr": [Interval(Real, 0, None, closed="neither")],
        "weight_decay": [Interval(Real, 0, None, closed="left")],
        **TORCH_CONSTRAINTS,
    }

    def __init__(self, hidden_sizes=(512,), temperature=2.0, alpha=0.9, dropout=0.2, lr=1e-2,
                 weight_decay=1e-4, batch_size=256, max_epochs=200, patience=20,
                 validation_fraction=0.1, device="auto", random_state=0):
        self.hidden_sizes = hidden_sizes
        self.temperature = temperature
        self.alpha = alpha
        self.dropout = dropout
        self.lr = lr
        self.weight_decay = weight_decay
        self.batch_size = batch_size
        self.max_epochs = max_epochs
        self.patience = patience
        self.validation_fraction = validation_fraction
        self.device = device
        self.random_state = random_state

    def fit(self, X, y, X_val=None, y_val=None, *, teacher_logits=None, sample_weight=None):
        """Train with early stopping on ``X_val, y_val`` (or a holdout of the labelled rows).

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
        y : array-like of shape (n_samples,)
            Class labels; with ``teacher_logits``, indices into its columns, -1 for a row only
            the teacher labels.
        X_val, y_val : array-like, optional
            Validation data for early stopping (true labels).
        teacher_logits : array-like of shape (n_samples, n_classes), optional
            The teacher's logits (or log-probabilities) at temperature 1 for every row.
        sample_weight : array-like of shape (n_samples,), optional
            Each row's weight in the loss.

        Returns
        -------
        self : StudentHead
        """
        self._validate_params()
        X, y = validate_data(self, X, y, reset=True, dtype=FLOATS)
        seed = seed_from(self.random_state)
        weight = _check_sample_weight(sample_weight, X, dtype=np.float64,
                                      ensure_non_negative=True)
        if not weight.sum() > 0:
            raise ValueError("sample_weight is zero for every sample: nothing to fit")
        if teacher_logits is None:
            self.classes_, y = encode_targets(y)
            teacher = None
        else:
            teacher = np.asarray(teacher_logits, np.float32)
            if teacher.shape != (len(y), teacher.shape[1]) or teacher.shape[1] < 2:
                raise ValueError(f"teacher_logits must be (n_samples, n_classes), not "
                                 f"{teacher.shape}")
            y = np.asarray(y, np.int64)
            if ((y < UNLABELLED) | (y >= teacher.shape[1])).any():
                raise ValueError("with teacher_logits, y holds class indices or -1")
            self.classes_ = np.arange(teacher.shape[1])
        if X_val is None:  # hold out labelled rows only: the holdout is scored on true labels
            held = _holdout_rows(y, self.validation_fraction, seed)
            labelled = np.flatnonzero(y != UNLABELLED)
            X_sel, y_sel = (X[held], y[held]) if len(held) else (X[labelled], y[labelled])
            kept = np.setdiff1d(np.arange(len(y)), held)
            X_train, y_train, weight = X[kept], y[kept], weight[kept]
            teacher = None if teacher is None else teacher[kept]
        else:
            X_train, y_train = X, y
            _, _, X_sel, y_sel, _ = selection_split(self, X, y, X_val, y_val,
                                                    self.validation_fraction, seed)
        scaler = FeatureScaler().fit(X_train)
        self.mean_, self.scale_ = scaler.mean_, scaler.scale_
        device = resolve_device(self.device)
        tensors = [torch.from_numpy(standardise(X_train, self.mean_, self.scale_)).to(device),
                   torch.from_numpy(np.asarray(y_train, np.int64)).to(device),
                   None if teacher is None else torch.from_numpy(teacher).to(device),
                   torch.from_numpy(weight.astype(np.float32)).to(device)]
        val = (torch.from_numpy(standardise(X_sel, self.mean_, self.scale_)).to(device),
               torch.from_numpy(np.asarray(y_sel, np.int64)).to(device))
        with seeded_torch(seed, device):
            module = mlp_module(self.n_features_in_, self.hidden_sizes, self.dropout,
                              len(self.classes_)).to(device)
            self._train(module, tensors, val, seed)
        return self

    def _train(self, module, train, val, seed):
        X, y, teacher, weight = train
        optimizer = torch.optim.AdamW(module.parameters(), lr=self.lr,
                                      weight_decay=self.weight_decay, betas=ADAM_BETAS)
        generator = torch.Generator().manual_seed(seed)
        stopping = EarlyStopping(self.patience)
        self.loss_curve_, self.validation_loss_curve_ = [], []
        while len(self.loss_curve_) < self.max_epochs and not stopping.should_stop:
            module.train()
            total = torch.zeros((), device=X.device)
            for idx in torch.randperm(len(y), generator=generator).to(X.device).split(
                    self.batch_size):
                loss = distillation_loss(module(X[idx]), y[idx],
                                         None if teacher is None else teacher[idx],
                                         weight[idx], self.temperature, self.alpha)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.detach() * len(idx)
            self.loss_curve_.append(float(total) / len(y))
            module.eval()
            with torch.inference_mode():
                val_loss = float(F.cross_entropy(module(val[0]), val[1]))
            self.validation_loss_curve_.append(val_loss)
            stopping.step(val_loss, module.state_dict())
        self._keep_best(module, stopping)


def _holdout_rows(y: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Labelled rows held out for early stopping (stratified where every class can give one);
    none where too few are labelled to spare any (they then select on themselves)."""
    rows = np.flatnonzero(y != UNLABELLED)
    if len(rows) < MIN_HOLDOUT_SAMPLES:  # fewer labelled rows select on themselves
        return np.zeros(0, np.int64)
    try:
        _, held = train_test_split(rows, test_size=fraction, random_state=seed,
                                   stratify=y[rows])
    except ValueError:  # a class too small to be in both parts
        _, held = train_test_split(rows, test_size=fraction, random_state=seed)
    return np.sort(held)

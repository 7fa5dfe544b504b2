"""Early stopping on a validation loss: the best epoch, its weights, and when to stop.

One :class:`EarlyStopping` serves every training loop of the project: MLPHead's epochs, the
fine-tune loop (whose checkpoint carries the tracker's state, so a resumed run stops at the
same epoch as an uninterrupted one) and LinearProbe's grid, where each head of the grid has
its own loss, its own best epoch and its own kept weights. A scalar loss tracks one model; a
vector of G losses tracks G independent models and stops when none of them improves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch


class EarlyStopping:
    """Track the lowest validation loss, keep a copy of the state it was reached with, and say
    when ``patience`` epochs in a row have brought no lower loss.

    Each call of :meth:`step` is one epoch. A loss is better only when it is strictly lower,
    so a NaN loss never is. Training stops after the first ``patience`` epochs in a row
    without a better loss; with a vector of losses, once every model of the vector has gone
    that long (the epochs since *any* of them last improved). ``patience=0`` stops at the
    first epoch that brings nothing better, as ``patience=1`` does.

    Parameters
    ----------
    patience : int
        Epochs in a row without a better loss before :attr:`should_stop` turns true.
    keep_on : str or torch.device, optional
        Where the copy of the best state is kept, such as ``"cpu"`` to spare GPU memory;
        by default where the state's tensors are.

    Attributes
    ----------
    epochs : int
        Epochs recorded (calls of :meth:`step`).
    best_loss : torch.Tensor or None
        The lowest loss so far, shaped like the losses given (0-d for a scalar; ``inf`` for a
        model that has not improved yet); None before the first epoch.
    best_epoch : torch.Tensor or None
        Index (from 0) of the epoch of ``best_loss``, -1 for a model that has not improved yet;
        None before the first epoch.
    best_state : dict of str to torch.Tensor or None
        A copy of the state passed with each model's best loss; None until one improves. With a
        vector of G losses every tensor of the state has G rows, one per model, and a model
        that has not improved yet has a row of zeros.

    Examples
    --------
    >>> stopping = EarlyStopping(patience=2)
    >>> for loss in [3.0, 2.0, 2.5, 2.0, 1.0]:
    ...     _ = stopping.step(loss)
    ...     if stopping.should_stop:
    ...         break
    >>> stopping.epochs, int(stopping.best_epoch), float(stopping.best_loss)
    (4, 1, 2.0)
    """

    def __init__(self, patience: int, keep_on: str | torch.device | None = None):
        self.patience = patience
        self.keep_on = keep_on
        self.epochs = 0
        self.best_loss: torch.Tensor | None = None
        self.best_epoch: torch.Tensor | None = None
        self.best_state: dict[str, torch.Tensor] | None = None

    def step(self, loss, state: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Record one epoch's loss (a float, or a tensor of one loss per model).

        Parameters
        ----------
        loss : float or torch.Tensor
            The epoch's validation loss; a tensor of shape (G,) for G models.
        state : mapping of str to torch.Tensor, optional
            What to keep when the loss improves, such as ``module.state_dict()``; with G
            losses every tensor's first dimension is the model. Copied only where it improved.

        Returns
        -------
        improved : torch.Tensor of bool
            Shaped like ``loss``: which losses were better than their best so far.
        """
        if not isinstance(loss, torch.Tensor):
            # float64: a Python float keeps its digits in best_loss and in the checkpoint
            loss = torch.tensor(loss, dtype=torch.float64)
        loss = loss.detach()
        if self.best_loss is None:
            self.best_loss = torch.full_like(loss, math.inf)
            self.best_epoch = torch.full(loss.shape, -1, dtype=torch.int64, device=loss.device)
        improved = loss < self.best_loss
        self.best_loss = torch.where(improved, loss, self.best_loss)
        self.best_epoch = torch.where(improved, self.epochs, self.best_epoch)
        self.epochs += 1
        if state is not None:
            self._keep(state, improved)
        return improved

    def _keep(self, state: Mapping[str, torch.Tensor], improved: torch.Tensor) -> None:
        if improved.dim() == 0:
            if improved:
                self.best_state = {k: self._copy(v) for k, v in state.items()}
            return
        if not improved.any():
            return
        if self.best_state is None:
            self.best_state = {k: torch.zeros_like(v.detach(), device=self.keep_on or v.device)
                               for k, v in state.items()}
        for key, value in state.items():
            kept = self.best_state[key]
            rows = improved.to(value.device)
            kept[rows.to(kept.device)] = value.detach()[rows].to(kept.device)

    def _copy(self, tensor: torch.Tensor) -> torch.Tensor:
        # The caller goes on training the same tensors in place: keep a copy, not a view.
        return tensor.detach().to(self.keep_on or tensor.device, copy=True)

    @property
    def should_stop(self) -> bool:
        """Whether the last ``patience`` epochs (at least one) brought no better loss."""
        if self.best_epoch is None:
            return False
        # Epochs since each model's best, and -1 as "before the first epoch" for a model that
        # never improved; the vector stops only when its most recent improvement is that old.
        stalled = self.epochs - 1 - int(self.best_epoch.max())
        return stalled >= max(self.patience, 1)

    def state_dict(self) -> dict:
        """The tracker's state, for a checkpoint (loadable with ``torch.load(weights_only=True)``).

        ``patience`` and ``keep_on`` are settings, not state: they are not included.
        """
        return {"epochs": self.epochs, "loss": self.best_loss, "epoch": self.best_epoch,
                "state": self.best_state}

    def load_state_dict(self, state: Mapping) -> None:
        """Continue from :meth:`state_dict`'s output: the next :meth:`step` is the next epoch."""
        self.epochs = int(state["epochs"])
        self.best_loss, self.best_epoch = state["loss"], state["epoch"]
        self.best_state = state["state"]

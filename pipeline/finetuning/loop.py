"""The training loop: one epoch, one step, evaluation, the optimizer, checkpoints.

Shaped like torchvision's classification reference: :func:`train_one_epoch`, :func:`evaluate`,
and a trainer that checkpoints each epoch (``model``, ``optimizer``, ``lr_scheduler``,
``epoch``, ``args``) and stops early on validation loss. BatchNorm statistics stay frozen
unless asked (:func:`set_train_mode`).

The checkpoint is the one file written while training (as the reference script's
``save_on_master``), each epoch through :func:`pipeline.core.atomic.atomic_write`: it is what a
killed run resumes from. A checkpoint written before the options were split by concern (a flat
``config``) is read as its nested equivalent (:func:`pipeline.core.options.nested_config`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.core import distributed
from pipeline.core.atomic import atomic_write
from pipeline.core.devices import autocast, autocast_dtype
from pipeline.core.early_stopping import EarlyStopping
from pipeline.core.options import FinetuneOptions, OptimizerOptions, nested_config
from pipeline.finetuning.loaders import Loaders
from pipeline.finetuning.setup import FinetuneError
from pipeline.models.blocks import STEM, parse_layers

__all__ = ["CHECKPOINT", "Trainer", "evaluate", "make_optimizer", "set_train_mode", "to_device",
           "train_one_epoch", "train_step"]


CHECKPOINT = "checkpoint.pt"


def set_train_mode(model: nn.Module, trainable: Sequence[nn.Module], bn_train: bool) -> None:
    """Train mode only where weights are trained; BatchNorm statistics frozen unless asked.

    The frozen trunk stays in eval mode, so its dropout and stochastic depth are off and its
    features are the cached ones.
    """
    model.eval()
    for module in trainable:
        module.train()
        if not bn_train:
            for m in module.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()


def train_one_epoch(model, trainable, loader, optimizer, scaler, device, *, bn_train: bool,
                    clip_grad: float) -> tuple[float, float]:
    """One pass over ``loader``: its mean training loss and accuracy (over every rank)."""
    set_train_mode(model, trainable, bn_train)
    total_loss, correct, seen = 0.0, 0, 0
    for x, _index, _errors, _digest, y in loader:
        x, y = to_device(x, device), y.to(device)
        loss, logits = train_step(model, x, y, optimizer, scaler, device, clip_grad)
        total_loss += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    total_loss, correct, seen = distributed.sum_across([total_loss, correct, seen], device)
    return total_loss / seen, correct / seen


def train_step(model, x, y, optimizer, scaler, device, clip_grad: float
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch (mixed precision, gradient norm clipped): its loss and
    logits."""
    with autocast(device):
        logits = model(x)
        loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(
        [p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss, logits


@torch.inference_mode()
def evaluate(model, loader, device) -> tuple[float, float, np.ndarray]:
    """Mean loss, accuracy and class probabilities over a loader, in eval mode.

    Under torchrun each rank evaluates its share and every rank returns the whole split's
    figures, with the probabilities in the split's order.
    """
    was_training = model.training
    model.eval()
    loss, probs, labels, index = 0.0, [], [], []
    for x, i, _errors, _digest, y in loader:
        with autocast(device):
            logits = model(to_device(x, device)).float()
        loss += F.cross_entropy(logits, y.to(device), reduction="sum").item()
        probs.append(logits.softmax(1).cpu().numpy())
        labels.append(y.numpy())
        index.append(i.numpy())
    model.train(was_training)
    shares = distributed.all_gather((loss, probs, labels, index))
    order = np.argsort(np.concatenate([i for s in shares for i in s[3]]), kind="stable")
    proba = np.concatenate([p for s in shares for p in s[1]])[order]
    y = np.concatenate([y for s in shares for y in s[2]])[order]
    return sum(s[0] for s in shares) / len(y), float((proba.argmax(1) == y).mean()), proba


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and x.ndim == 4:  # cached activations may be feature vectors
        return x.contiguous(memory_format=torch.channels_last)
    return x


class Trainer:
    """Optimizer, schedule, early stopping and per-epoch checkpoints of one run
    (``checkpoint`` None: none, and nothing to resume from)."""

    def __init__(self, model, head, unfrozen, options: FinetuneOptions, device, args,
                 checkpoint: Path | None, ctx: distributed.Context | None = None,
                 compile: bool = False, forward: nn.Module | None = None):
        self.model, self.head, self.device = model, head, device
        self.optim, self.network, self.training = options.optim, options.network, options.training
        # What the steps run: the model, or its part above cached activations (same modules).
        self.forward = model if forward is None else forward
        self.args, self.checkpoint = args, checkpoint
        self.ctx = ctx or distributed.Context()
        self.trainable = [model.get_submodule(n) for b in unfrozen for n in b.modules] + [head]
        # What the rows call the trained part: a number of blocks, or of layers ("15L").
        unfreeze = self.network.unfreeze
        self.unfrozen_blocks = (unfreeze if parse_layers(unfreeze)
                                else sum(block.name != STEM for block in unfrozen))
        model.to(device, memory_format=torch.channels_last)
        self.net = self._wrap(compile)
        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()
        amp = autocast_dtype(device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        self.history: list[dict] = []
        # The best weights wait on the CPU: GPU memory is for training.
        self.stopping = EarlyStopping(self.training.patience, keep_on="cpu")
        self.start_epoch = 0

    def _wrap(self, compile: bool) -> nn.Module:
        """What the training steps call: the model, under DDP across ranks, maybe compiled."""
        net = self.forward
        if self.ctx.distributed:
            # DDP averages only gradients of parameters that require them: the frozen trunk
            # is not synced. It also starts every rank from rank 0's weights. Frozen BatchNorm
            # statistics are equal everywhere; trained ones follow rank 0's.
            net = DistributedDataParallel(
                net, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                forward_sync_buffers=self.network.bn_train)
        return torch.compile(net) if compile else net

    @property
    def best(self) -> dict:
        """The best epoch so far (counted from 1 as in the history; -1 for none) and its
        validation loss."""
        epoch = self.stopping.best_epoch
        if epoch is None or epoch < 0:
            return {"epoch": -1, "val_loss": float("inf")}
        return {"epoch": int(epoch) + 1, "val_loss": float(self.stopping.best_loss)}

    @property
    def trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)

    def _optimizer(self) -> torch.optim.Optimizer:
        return make_optimizer(self.model, self.head, self.optim)

    def _scheduler(self):
        if self.optim.schedule == "step":
            return torch.optim.lr_scheduler.StepLR(self.optimizer, self.optim.step_size, 0.1)
        return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer,
                                                          max(1, self.training.epochs))

    def fit(self, loaders: Loaders, on_epoch) -> list[dict]:
        self._resume()
        for epoch in range(self.start_epoch, self.training.epochs):
            if self.stopping.should_stop:
                break
            started = time.perf_counter()
            # Dropout and augmentation: seeded per epoch, and per rank so ranks differ.
            torch.manual_seed(self.training.seed * 100_003 + epoch + 7919 * self.ctx.rank)
            train_loss, train_acc = train_one_epoch(
                self.net, self.trainable, loaders.train(epoch), self.optimizer, self.scaler,
                self.device, bn_train=self.network.bn_train, clip_grad=self.optim.clip_grad)
            val_loss, val_acc, _ = evaluate(self.forward, loaders.eval("val"), self.device)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            row = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc,
                   "val_loss": val_loss, "val_accuracy": val_acc, "lr": lr,
                   "seconds": time.perf_counter() - started}
            self.history.append(row)
            self.stopping.step(val_loss, self.model.state_dict())
            if self.ctx.is_main and self.checkpoint is not None:  # one file for every rank
                self._save(epoch + 1)
            if on_epoch is not None:
                on_epoch(epoch + 1, row)
        if self.stopping.best_state is not None:  # early stopping restores the best weights
            self.model.load_state_dict(self.stopping.best_state)
        return self.history

    def _save(self, epoch: int) -> None:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "lr_scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "epoch": epoch, "args": json.dumps(self.args, sort_keys=True),
                 "history": json.dumps(self.history), "best": self.stopping.state_dict()}
        self.checkpoint.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(self.checkpoint) as fh:  # a kill mid-save leaves the previous one
            torch.save(state, fh)

    def _resume(self) -> None:
        if self.checkpoint is None or not self.checkpoint.exists():
            return
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a damaged file
            raise FinetuneError(f"cannot read checkpoint {self.checkpoint}: "
                                f"{str(err).splitlines()[0]}; remove it to start over") from None
        if _nested_args(json.loads(state["args"])) != json.loads(json.dumps(self.args)):
            raise FinetuneError(f"{self.checkpoint} is from another run (other backbone, data "
                                "or settings); remove it to start over", path=self.checkpoint,
                                reason="another-run")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = json.loads(state["history"])
        self.stopping.load_state_dict(_early_stopping_state(state["best"], len(self.history)))
        self.start_epoch = state["epoch"]


def make_optimizer(model: nn.Module, head: nn.Module, cfg: OptimizerOptions
                   ) -> torch.optim.Optimizer:
    """AdamW or SGD over two groups: the head at ``cfg.lr``, the trained backbone layers at
    ``cfg.lr * cfg.backbone_lr_ratio``."""
    head_ids = {id(p) for p in head.parameters()}
    backbone = [p for p in model.parameters() if p.requires_grad and id(p) not in head_ids]
    groups = [{"params": list(head.parameters()), "lr": cfg.lr}]
    if backbone:
        groups.append({"params": backbone, "lr": cfg.lr * cfg.backbone_lr_ratio})
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, momentum=0.9, nesterov=True,
                               weight_decay=cfg.weight_decay)
    return torch.optim.AdamW(groups, weight_decay=cfg.weight_decay)


def _nested_args(args: dict) -> dict:
    """A checkpoint's arguments with its ``config`` by concern, whichever way it was saved."""
    return {**args, "config": nested_config(args["config"])} if "config" in args else args


def _early_stopping_state(best: dict, epochs: int) -> dict:
    """The checkpoint's ``best`` as EarlyStopping.load_state_dict reads it."""
    if "val_loss" not in best:
        return best
    # A checkpoint from before EarlyStopping: its own record, epochs counted from 1.
    epoch = best["epoch"] - 1 if best["epoch"] > 0 else -1
    return {"epochs": epochs, "loss": torch.tensor(best["val_loss"], dtype=torch.float64),
            "epoch": torch.tensor(epoch), "state": best["state"]}

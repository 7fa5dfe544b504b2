"""The learning-rate range test: a short run whose rate grows each step, to pick the rate.

Leslie Smith's test (https://arxiv.org/abs/1506.01186, section 3.3) as fastai's ``lr_find``
runs it (https://docs.fast.ai/callback.schedule.html#lrfinder): the network a fine-tune would
train (head warm-started alike, the same two parameter groups and optimizer) takes at most a
few hundred steps with the learning rate growing exponentially from ``start_lr`` to
``end_lr``; the training loss, smoothed, falls while the rate is useful and blows up past it.
The test stops once the smoothed loss exceeds 4x its best. It is a probe: the network's
weights are put back afterwards and only the curve is kept.

:func:`find_lr` computes and writes nothing; ``result.write(out)`` writes the curve's files.
A fine-tune asked for ``lr="auto"`` (:func:`with_found_lr`) writes them as it goes into its
working folder, where a resumed run reads the rate back.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from pipeline.core import distributed
from pipeline.core.atomic import save_figure, write_json, write_text
from pipeline.core.contract import Result
from pipeline.core.devices import autocast_dtype
from pipeline.core.errors import LRFindError
from pipeline.core.options import (
    DEFAULT_BACKBONE,
    LR_FIND_END_LR,
    LR_FIND_START_LR,
    LR_FIND_STEPS,
    FinetuneOptions,
    nested_config,
)
from pipeline.core.progress import Progress
from pipeline.finetuning.loop import make_optimizer, set_train_mode, to_device, train_step
from pipeline.finetuning.setup import Setup, prepare
from pipeline.models.backbone_spec import BackboneSpec

__all__ = ["LRFindError", "LRFindResult", "figure", "find_lr", "lr_schedule", "smooth",
           "suggest_lr", "with_found_lr"]

STEPS, START_LR, END_LR = LR_FIND_STEPS, LR_FIND_START_LR, LR_FIND_END_LR
# Weight of the past in the smoothed loss: about the last 10 steps count. fastai's 0.98
# averages about 50, half of a 100-step test, so its curve lags the rate by ~3 decades.
SMOOTHING = 0.9
# Diverged: the smoothed loss above this multiple of its best so far (fastai's stop).
DIVERGED = 4.0
# The smoothed loss must fall by this fraction before its minimum for its steepest descent to
# be the suggestion; a flatter curve gets the minimum's rate / 10.
MIN_FALL = 0.05
# The finder's files in a fine-tune's folder (--lr auto), where a resumed run finds them.
FOLDER = "lr-find"
RULE = "steepest descent of the smoothed loss against log10(lr), before its minimum"
# Settings that do not change the test (how long the real run trains, and its own rate),
# by concern.
_NOT_PROBED = {"optim": ("lr", "schedule", "step_size"), "training": ("epochs", "patience")}



@dataclass
class LRFindResult(Result):
    """The curve of one range test, the suggested learning rate and the files written."""

    lrs: list[float]  # the head's rate at each step (the backbone's: x backbone_lr_ratio)
    losses: list[float]  # each step's training loss, before its update
    smoothed: list[float]  # exponentially weighted, bias-corrected (:func:`smooth`)
    suggested_lr: float
    diverged: bool  # stopped early: the smoothed loss went above DIVERGED x its best
    trained_from: str  # "cached activations", or "images (why)", as a fine-tune's row says
    seconds: float
    backbone: str = ""  # the backbone's name, for the plot's title
    # What decided the curve (the run's arguments but how long it trains, and the test's
    # own): a fine-tune with lr="auto" reuses a test whose key is its own.
    key: dict = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # set by write()

    def to_json(self) -> dict:
        """``lr_find.json``: the suggestion, the rule, how the test went, its files and key."""
        return {"suggested_lr": self.suggested_lr, "rule": RULE, "steps_run": len(self.lrs),
                "diverged": self.diverged, "trained_from": self.trained_from,
                "seconds": self.seconds,
                "files": {k.removeprefix("lr_find_"): v for k, v in self.files.items()},
                "key": self.key}

    def write(self, out: str | os.PathLike) -> list[Path]:
        """``lr_find.csv`` (step, lr, loss, smoothed loss), ``lr_find.png`` (the smoothed loss
        against the rate, the suggestion marked) and ``lr_find.json`` (:meth:`to_json`, last:
        a test is found only once complete) in ``out``, on rank 0; ``files`` names them."""
        out = Path(out)
        paths = {"csv": out / "lr_find.csv", "png": out / "lr_find.png",
                 "json": out / "lr_find.json"}
        if distributed.context().is_main:
            self.files = {f"lr_find_{k}": str(v) for k, v in paths.items()}
            text = io.StringIO(newline="")
            writer = csv.DictWriter(text, ["step", "lr", "loss", "smoothed_loss"])
            writer.writeheader()
            writer.writerows(self.rows)
            write_text(paths["csv"], text.getvalue())
            save_figure(figure(self, f"{self.backbone}: learning-rate range test"),
                        paths["png"], dpi=110)
            write_json(paths["json"], self.to_json())
        distributed.barrier()
        return list(paths.values())

    @property
    def rows(self) -> list[dict]:
        """One ``lr_find.csv`` row per step."""
        return [{"step": i + 1, "lr": lr, "loss": loss, "smoothed_loss": s}
                for i, (lr, loss, s) in enumerate(zip(self.lrs, self.losses, self.smoothed))]


def lr_schedule(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    """``steps`` learning rates from ``start_lr`` to ``end_lr``, each a constant factor above
    the previous one (evenly spaced on a log axis)."""
    return start_lr * (end_lr / start_lr) ** (np.arange(steps) / max(1, steps - 1))


def smooth(losses: Sequence[float], beta: float = SMOOTHING) -> np.ndarray:
    """Exponentially weighted mean of ``losses`` up to each step, bias-corrected (divided by
    ``1 - beta**n``, as Adam's moments are) so the first steps are not pulled towards 0."""
    out, mean = np.empty(len(losses)), 0.0
    for i, loss in enumerate(losses):
        mean = beta * mean + (1 - beta) * loss
        out[i] = mean / (1 - beta ** (i + 1))
    return out


def suggest_lr(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """The learning rate at which the (smoothed) loss falls fastest against ``log10(lr)``.

    The rule (fastai's "steep", Smith's choice): where the loss falls fastest, a step of that
    size makes the most progress while training is still stable. The rate at the minimum
    itself is already at the edge of divergence, which is why the other common rule divides
    it by 10; the steepest point needs no such constant. Only the points up to the minimum
    count (past it the loss climbs, and any fall there is divergence noise), and each slope
    is a central difference over ``k = len // 20`` points (at least 1) each side, so one
    noisy step does not decide. The minimum and the slopes are looked for after the first
    ``k`` points, whose smoothed loss rests on a batch or two. A curve that does not fall (its
    minimum at the first point looked at, a fall of less than :data:`MIN_FALL` of its loss
    there, or no negative slope) gets that minimum's rate / 10.

    Parameters
    ----------
    lrs
        Increasing learning rates, one per step.
    losses
        The loss at each (smoothed, as :func:`smooth` gives it); non-finite ones, such as
        the step that diverged, are left out.
    """
    lrs, losses = np.asarray(lrs, dtype=float), np.asarray(losses, dtype=float)
    if lrs.ndim != 1 or lrs.shape != losses.shape:
        raise ValueError("lrs and losses must be two sequences of the same length")
    if np.any(lrs <= 0) or np.any(np.diff(lrs) <= 0):
        raise ValueError("lrs must be positive and increasing")
    finite = np.isfinite(losses)
    lrs, losses = lrs[finite], losses[finite]
    if len(lrs) == 0:
        raise ValueError("no finite loss to suggest a learning rate from")
    k = max(1, len(losses) // 20)
    low = k + int(np.argmin(losses[k:])) if len(losses) > k else 0
    # A fall smaller than this is noise on a flat curve (a warm-started head often gives one),
    # whose "steepest" point would be anywhere, the first rate tried as likely as any.
    if low <= k or losses[k] - losses[low] < MIN_FALL * abs(losses[k]):
        return float(lrs[low] / 10)
    x, y = np.log10(lrs[:low + 1]), losses[:low + 1]
    i = np.arange(len(y))
    before, after = np.maximum(i - k, 0), np.minimum(i + k, len(y) - 1)
    slope = (y[after] - y[before]) / (x[after] - x[before])
    slope[:k] = np.inf  # as for the minimum: the first points' smoothing rests on a batch or two
    if slope.min() >= 0:
        return float(lrs[low] / 10)
    return float(lrs[int(np.argmin(slope))])


def find_lr(
    data: str | os.PathLike,
    *,
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    options: FinetuneOptions = FinetuneOptions(),
    steps: int = STEPS,
    start_lr: float = START_LR,
    end_lr: float = END_LR,
    progress: bool | None = None,
    split_seed: int | None = None,
) -> LRFindResult:
    """Run the learning-rate range test on the network :func:`~pipeline.finetuning.run.finetune`
    would train, and suggest the head's learning rate.

    Computes and writes nothing: ``result.write(out)`` writes ``lr_find.csv|png|json``.

    Parameters
    ----------
    data, backbone, options, split_seed
        As for :func:`~pipeline.finetuning.run.finetune` (``options.optim.lr`` and
        ``options.training.epochs`` are not used). The same features warm-start the head, and
        the test trains from the trunk's cached activations where a fine-tune would (the same
        caches).
    steps, start_lr, end_lr
        One optimizer step per rate of :func:`lr_schedule` (cycling through the training
        images as often as needed), fewer if the loss diverges.
    progress
        A bar where stderr is a terminal, elsewhere a line every 30 s and at the end; False:
        nothing.

    Returns
    -------
    LRFindResult
        The curve and :func:`suggest_lr`'s rate for the smoothed loss.

    Under ``torchrun`` every rank steps on its share of each batch without syncing gradients
    (the weights are put back anyway) and the ranks' losses are averaged at each step, so
    every rank sees the same curve and stops at the same step; rank 0 writes the files.
    """
    _check(steps, start_lr, end_lr)
    options = options.replace(optim=options.optim.replace(lr=start_lr))
    setup = prepare(data, backbone, options, split_seed=split_seed, progress=progress)
    return _range_test(setup, steps, start_lr, end_lr, progress, "lr-find")


def with_found_lr(setup: Setup, workdir: Path | None, progress: bool | None = None) -> Setup:
    """``setup`` (a fine-tune's, asked for ``lr="auto"``) with the suggested learning rate.

    The test runs on the setup's own network, whose weights are put back, and writes its
    files in ``workdir/lr-find/`` (the fine-tune's working folder; None: nowhere). A test of
    the same settings found there is read back instead of run again, so a resumed run trains
    with the rate it started with; the rate is in the checkpoint's arguments too, so a run
    whose test gave another rate is not resumed.
    """
    folder = None if workdir is None else Path(workdir) / FOLDER
    key = _probe_key(setup.args, STEPS, START_LR, END_LR)
    lr = None if folder is None else _found(folder, key)
    if lr is None:
        name = "lr-find" if workdir is None else f"lr-find {Path(workdir).name}"
        result = _range_test(setup, STEPS, START_LR, END_LR, progress, name)
        if folder is not None:  # read back by a resumed run: written as it goes
            result.write(folder)
        lr = result.suggested_lr
    config = setup.args["config"]
    args = {**setup.args, "config": {**config, "optim": {**config["optim"], "lr": lr}}}
    options = setup.options.replace(optim=setup.options.optim.replace(lr=lr))
    return replace(setup, options=options, args=args, lr_found_by="lr-find")


def _check(steps: int, start_lr: float, end_lr: float) -> None:
    if steps < 2:
        raise LRFindError("steps must be at least 2")
    if not 0 < start_lr < end_lr:
        raise LRFindError("the learning rates must grow: 0 < start_lr < end_lr")


def _probe_key(args: dict, steps: int, start_lr: float, end_lr: float) -> dict:
    """What decides a test's curve: the run's arguments but for how long it would train."""
    config = {concern: {k: v for k, v in values.items()
                        if k not in _NOT_PROBED.get(concern, ())}
              for concern, values in args["config"].items()}
    return json.loads(json.dumps({**args, "config": config, "steps": steps,
                                  "start_lr": start_lr, "end_lr": end_lr}))


def _found(folder: Path, key: dict) -> float | None:
    """The suggested rate of the test of ``key`` written in ``folder``, or None."""
    try:
        saved = json.loads((folder / "lr_find.json").read_text())
    except (OSError, ValueError):
        return None
    found = saved.get("key")
    if isinstance(found, dict) and isinstance(found.get("config"), dict):
        # A test written before the options were split by concern keyed a flat config.
        found = {**found, "config": nested_config(found["config"])}
    return saved["suggested_lr"] if found == key else None


def _range_test(setup: Setup, steps: int, start_lr: float, end_lr: float,
                progress: bool | None, desc: str) -> LRFindResult:
    """``steps`` optimizer steps at growing rates on the setup's network, then its weights
    (and its modules' train/eval modes) put back."""
    started = time.perf_counter()
    options, model, device, ctx = setup.options, setup.model, setup.device, setup.ctx
    schedule = lr_schedule(start_lr, end_lr, steps)
    saved = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    modes = {m: m.training for m in (*model.modules(), *setup.forward.modules())}
    model.to(device, memory_format=torch.channels_last)
    trainable = ([model.get_submodule(n) for b in setup.unfrozen for n in b.modules]
                 + [setup.head])
    # Built as the fine-tune builds its own; at lr 1 each group's lr is its factor of the head's.
    optimizer = make_optimizer(model, setup.head, options.optim.replace(lr=1.0))
    factors = [group["lr"] for group in optimizer.param_groups]
    scaler = torch.amp.GradScaler(device.type, enabled=autocast_dtype(device) == torch.float16)
    # dropout, as a fine-tune's epoch
    torch.manual_seed(options.training.seed * 100_003 + 7919 * ctx.rank)
    lrs, losses, smoothed, mean, best, diverged = [], [], [], 0.0, math.inf, False
    try:
        set_train_mode(setup.forward, trainable, options.network.bn_train)
        with Progress(steps, desc, "step", progress=progress if ctx.is_main else False) as bar:
            epoch = 0
            while len(lrs) < steps and not diverged:
                batches = 0
                for x, _index, _errors, _digest, y in setup.loaders.train(epoch):
                    batches += 1
                    for group, factor in zip(optimizer.param_groups, factors):
                        group["lr"] = schedule[len(lrs)] * factor
                    lrs.append(optimizer.param_groups[0]["lr"])
                    loss, _ = train_step(setup.forward, to_device(x, device), y.to(device),
                                         optimizer, scaler, device, options.optim.clip_grad)
                    loss, n = distributed.sum_across([loss.item(), 1.0], device)
                    losses.append(loss / n)
                    mean = SMOOTHING * mean + (1 - SMOOTHING) * losses[-1]
                    smoothed.append(mean / (1 - SMOOTHING ** len(losses)))
                    bar.update(1)
                    if not math.isfinite(smoothed[-1]) or smoothed[-1] > DIVERGED * best:
                        diverged = True
                        break
                    best = min(best, smoothed[-1])
                    if len(lrs) == steps:
                        break
                if batches == 0:
                    raise LRFindError("no training images to run the range test on")
                epoch += 1
    finally:
        model.load_state_dict(saved)
        for module, training in modes.items():
            module.train(training)
    return LRFindResult(lrs, losses, smoothed, suggest_lr(lrs, smoothed), diverged,
                        setup.trained_from, time.perf_counter() - started,
                        backbone=setup.spec.name,
                        key=_probe_key(setup.args, steps, start_lr, end_lr))


def figure(result: LRFindResult, title: str):
    """The smoothed loss against the learning rate (log axis), the suggestion marked: a
    matplotlib ``Figure`` (no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    smoothed = np.asarray(result.smoothed)
    finite = np.isfinite(smoothed)
    ax.plot(np.asarray(result.lrs)[finite], smoothed[finite], label="smoothed training loss")
    at = result.lrs.index(result.suggested_lr) if result.suggested_lr in result.lrs else None
    if at is not None and finite[at]:
        ax.scatter([result.suggested_lr], [smoothed[at]], color="red", zorder=3)
    ax.axvline(result.suggested_lr, color="red", linestyle=":",
               label=f"suggested lr {result.suggested_lr:.2g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (head; backbone x backbone_lr_ratio)")
    ax.set_ylabel("loss")
    if finite.any():
        curve = smoothed[finite]
        fall = curve[:int(np.argmin(curve)) + 1].max()
        if curve.max() > 1.5 * fall > 0:  # the blow-up would flatten the fall, which matters
            ax.set_ylim(top=1.5 * fall)
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    ax.set_title(title + (" (stopped: diverged)" if result.diverged else ""))
    fig.tight_layout()
    return fig

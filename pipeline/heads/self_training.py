"""Self-training: a stage-2 head refitted on its own confident predictions for an unlabelled pool.

Each round the current head scores the whole pool (block by block, :mod:`pipeline.heads.pool`),
every pseudo-label is decided again from scratch, and a fresh head is fitted on the labelled
images plus the chosen pool images. Where scikit-learn's ``SelfTrainingClassifier`` takes every
prediction above one global threshold, keeps a label once given and weighs it like a real one,
here:

- **quotas per class**: round ``r`` of ``R`` takes, for class ``c``, at most
  ``ceil(r / R * len(pool) * prior_c)`` images predicted as ``c`` (``prior_c``: the class's share
  of the labelled training images), the most confident first, so a head leaning to one class
  cannot fill the pool with it (the collapse onto majority classes), and the pool enters as a
  curriculum, most confident first (Cascante-Bonilla et al., Curriculum Labeling, AAAI 2021,
  https://arxiv.org/abs/2001.06001);
- **a confidence floor** ``threshold`` under which no image is taken, whatever the quota;
- **pseudo-labels re-decided every round**: an image taken in one round can change class or
  drop out in the next, and each round's head starts from scratch (no confirmation of its own
  earlier errors through warm starts);
- **weights from confidence**: a pool image weighs its predicted probability, a labelled image
  1. A head whose ``fit`` takes ``sample_weight`` gets them as weights; a head without it gets
  each pool image with probability equal to its weight (a seeded draw), so its expected share
  of the loss is the same;
- **the threshold and the number of rounds chosen on validation**: every threshold of
  ``thresholds`` is run for ``rounds`` rounds, and the (threshold, round) whose head has the
  best validation accuracy (ties: lower validation log loss, then fewer rounds) is kept. Round 0
  is the supervised head itself, so a pool that does not help on validation is refused. The test
  split is never looked at until the chosen head is scored.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.metrics import log_loss
from sklearn.utils.validation import has_fit_parameter

from pipeline.core.contract import Result
from pipeline.core.options import SelfTrainOptions
from pipeline.core.progress import Progress
from pipeline.heads.compare import CacheData, load_cache_data
from pipeline.heads.derived import base_columns, write_derived
from pipeline.heads.pool import Pool, open_pool
from pipeline.heads.spec import HeadError, head_name, make_head
from pipeline.metrics.scoring import RowPredictions, class_probabilities, results_row
from pipeline.store import tracking

__all__ = ["SUFFIX", "SelfTrainResult", "fit_prepared", "select_pseudo_labels", "self_train",
           "thinned"]

SUFFIX = "+self-train"  # the self-trained row's head: "<head>+self-train"


@dataclass
class _Fitted:
    """One candidate: a head after some rounds at one threshold, with its validation scores."""

    estimator: object
    threshold: float | None
    round: int
    val_accuracy: float
    val_loss: float
    used: int


@dataclass
class SelfTrainResult(Result):
    """What self-training found for each head.

    Attributes
    ----------
    rows
        Per head, the self-trained head's results row (``<head>+self-train``) on the cache's
        test images, with its paired comparison against the supervised head on the same images
        (:func:`base_columns`), the threshold and rounds chosen, and the pool images used.
    rounds
        Per head, threshold and round: validation accuracy and log loss, pool images used,
        how many pseudo-labels changed since the round before, their accuracy where the pool's
        labels are known, and the images used per class.
    options
        The settings of the run.
    """

    rows: list[dict]
    rounds: list[dict]
    options: SelfTrainOptions
    pool: dict = field(default_factory=dict)  # path, key, size, left out as duplicates
    cache: dict = field(default_factory=dict)  # path, key, backbone, classes, spec, request
    estimators: dict = field(default_factory=dict, repr=False)  # head -> fitted estimator
    # head -> RowPredictions: each self-trained row's, and its supervised base head's
    predictions: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        return {"results": self.rows, "rounds": self.rounds, "pool": self.pool,
                "options": self.options.to_json()}

    def write(self, out: str | os.PathLike, *, track: bool | tracking.Run | None = None
              ) -> list[Path]:
        """``results.csv|md|json`` (the ``+self-train`` rows), ``rounds.csv|md``,
        ``models/*.head``, ``predictions/*.npz`` and ``run.json`` in ``out``; with ``track``,
        an MLflow run with a nested run per head (:mod:`pipeline.store.tracking`)."""
        return write_derived(Path(out), "self-train", self.rows, self.estimators,
                             self.predictions, self.cache, self.options,
                             {"rounds": self.rounds}, {"pool": self.pool}, track)


def fit_prepared(template, cache: CacheData, seed: int, X: np.ndarray, y: np.ndarray,
                 sample_weight: np.ndarray | None = None):
    """A fresh clone of ``template`` seeded with ``seed``, fitted on ``X, y`` (and the cache's
    validation split, for heads that choose on it). ``sample_weight`` goes to a head that takes
    it; for one that does not, call :func:`thinned` first."""
    estimator = clone(template)
    params = estimator.get_params()
    if "random_state" in params:
        estimator.set_params(random_state=seed)
    if params.get("layers", False) is None and cache.info.get("layers"):  # MultiLayerHead
        estimator.set_params(layers=[tuple(span) for span in cache.info["layers"]])
    kwargs = {}
    if has_fit_parameter(estimator, "X_val"):
        kwargs.update(X_val=cache.val.X, y_val=cache.val.y)
    if sample_weight is not None:
        kwargs["sample_weight"] = sample_weight
    return estimator.fit(X, y, **kwargs)


def self_train(cache: str | os.PathLike | CacheData, *, pool: str | os.PathLike | Pool,
               options: SelfTrainOptions | None = None,
               progress: bool | str | None = None) -> SelfTrainResult:
    """Self-train each head of ``options.heads`` on ``cache`` with the unlabelled ``pool``.

    Parameters
    ----------
    cache
        A labelled feature cache (or its data, :class:`pipeline.heads.compare.CacheData`):
        its training split is the labelled set, its validation split chooses, its test split
        scores.
    pool
        The cache of unlabelled images (:func:`pipeline.heads.pool.open_pool` checks it
        against ``cache``), or a :class:`~pipeline.heads.pool.Pool`.
    options
        :class:`~pipeline.core.options.SelfTrainOptions`.
    progress
        Fits done, as :class:`pipeline.core.progress.Progress` shows them.

    Returns
    -------
    SelfTrainResult
        Computed, nothing written: ``result.write(out)`` writes it.

    Raises
    ------
    HeadError
        A head without ``predict_proba`` (self-training ranks its confidences).
    PoolError
        A pool that is empty, of another feature space, or the labelled cache itself.
    """
    options = options or SelfTrainOptions()
    data = cache if isinstance(cache, CacheData) else load_cache_data(cache)
    if not isinstance(pool, Pool):
        pool = open_pool(pool, data.path, data.info)
    templates = [(spec, make_head(spec)) for spec in options.heads]
    fits = len(templates) * (1 + len(options.thresholds) * options.rounds)
    rows, rounds, estimators, predictions = [], [], {}, {}
    with Progress(fits, "self-train", "fit", progress=progress) as bar:
        for spec, template in templates:
            if not hasattr(template, "predict_proba"):
                raise HeadError(f"head {spec!r} gives no probabilities (predict_proba), which "
                                "self-training ranks pool images by; choose another head")
            row, history, estimator, stored, base = _self_train_head(data, pool, spec,
                                                                     template, options, bar)
            rows.append(row)
            rounds += history
            estimators[row["head"]], predictions[row["head"]] = estimator, stored
            predictions[row["base_head"]] = base
    return SelfTrainResult(
        rows, rounds, options,
        pool={"pool_path": str(pool.path or ""), "pool_key": pool.key or "",
              "pool_size": len(pool), "pool_duplicates_left_out": pool.dropped},
        cache={"path": str(data.path) if data.path else "", "key": data.info["key"],
               "backbone": data.backbone, "classes": data.classes,
               "dim": int(data.train.X.shape[1]), "spec": data.info["spec"],
               "request": data.info.get("request", {})},
        estimators=estimators, predictions=predictions)


def _self_train_head(data: CacheData, pool: Pool, spec: str, template, opts: SelfTrainOptions,
                     bar: Progress):
    """Run every threshold for ``opts.rounds`` rounds; keep the best (threshold, round) on
    validation; score it and the supervised head on the test split."""
    n_classes, name = len(data.classes), head_name(spec)
    weighted = has_fit_parameter(template, "sample_weight")
    started = time.perf_counter()
    supervised = fit_prepared(template, data, opts.seed, data.train.X, data.train.y)
    bar.update(1)
    best = _candidate(supervised, data, None, 0, 0)
    prior = np.bincount(data.train.y, minlength=n_classes) / len(data.train.y)
    history = [_round_row(name, best, np.zeros(0, np.int64), np.zeros(0, np.int64), None,
                          pool, data.classes)]
    for threshold in opts.thresholds:
        model, previous = supervised, None
        for round_ in range(1, opts.rounds + 1):
            confidence, predicted = _score_pool(model, pool, n_classes)
            taken = select_pseudo_labels(confidence, predicted, prior, threshold,
                                         round_ / opts.rounds, opts.max_per_class)
            model = _refit(template, data, pool, taken, predicted, confidence, weighted,
                           opts.seed, round_)
            bar.update(1)
            found = _candidate(model, data, threshold, round_, len(taken))
            history.append(_round_row(name, found, taken, predicted, previous, pool,
                                      data.classes))
            if (found.val_accuracy, -found.val_loss, -found.round) > \
                    (best.val_accuracy, -best.val_loss, -best.round):
                best = found
            if previous is not None and np.array_equal(previous[0], taken) and \
                    np.array_equal(previous[1], predicted[taken]):
                bar.update(opts.rounds - round_)  # the same pseudo-labels again: converged
                break
            previous = (taken, predicted[taken])
    fit_s = time.perf_counter() - started
    for row in history:
        row["chosen"] = row["threshold"] == best.threshold and row["round"] == best.round
    row, stored = _scored(data, name, best, supervised, fit_s, len(pool), weighted, history)
    proba = class_probabilities(supervised, data.test.X, len(data.classes))
    base = RowPredictions(data.test.paths, data.test.y, proba.argmax(1), proba, data.leaked,
                          data.classes)
    return row, history, best.estimator, stored, base


def _scored(data: CacheData, name: str, best: _Fitted, supervised, fit_s: float,
            pool_size: int, weighted: bool, history: list[dict]) -> tuple[dict, RowPredictions]:
    """The self-trained head's results row on the test split, and its stored predictions."""
    n_classes = len(data.classes)
    started = time.perf_counter()
    proba = class_probabilities(best.estimator, data.test.X, n_classes)
    y_pred = proba.argmax(1)
    predict_s = time.perf_counter() - started
    base_pred = class_probabilities(supervised, data.test.X, n_classes).argmax(1)
    chosen_row = next((r for r in history if r["chosen"]), {})
    threshold = "none" if best.threshold is None else f"{best.threshold:g}"
    row = results_row(
        backbone=data.backbone, head=f"{name}{SUFFIX}",
        chosen=f"threshold={threshold},rounds={best.round},pool={best.used}/{pool_size}",
        y_true=data.test.y, y_pred=y_pred, proba=proba, n_classes=n_classes, fit_s=fit_s,
        predict_s=predict_s, train_n=len(data.train.y) + best.used, test_n=len(data.test.y),
        cache_key=data.info["key"], method="transfer",
        **base_columns(data.test.y, y_pred, base_pred, name,
                       float(np.mean(base_pred == data.test.y))),
        threshold=threshold, rounds=best.round, pool_used=best.used, pool_size=pool_size,
        pseudo_accuracy=chosen_row.get("pseudo_accuracy", ""),
        pool_weights="sample_weight" if weighted else "drawn by weight")
    stored = RowPredictions(data.test.paths, data.test.y, y_pred, proba, data.leaked,
                            data.classes)
    return row, stored


def _candidate(estimator, data: CacheData, threshold, round_: int, used: int) -> _Fitted:
    proba = class_probabilities(estimator, data.val.X, len(data.classes))
    accuracy = float(np.mean(proba.argmax(1) == data.val.y))
    # rows renormalised: a head's float rounding is no reason for log_loss to warn
    loss = float(log_loss(data.val.y, proba / proba.sum(1, keepdims=True),
                          labels=np.arange(len(data.classes))))
    return _Fitted(estimator, threshold, round_, accuracy, loss, used)


def _score_pool(estimator, pool: Pool, n_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Each pool image's top probability and predicted class, scored block by block."""
    confidence = np.empty(len(pool), np.float32)
    predicted = np.empty(len(pool), np.int64)
    for start, block in pool.blocks():
        proba = class_probabilities(estimator, block, n_classes)
        predicted[start:start + len(block)] = proba.argmax(1)
        confidence[start:start + len(block)] = proba.max(1)
    return confidence, predicted


def select_pseudo_labels(confidence: np.ndarray, predicted: np.ndarray, prior: np.ndarray,
                         threshold: float, share: float, max_per_class: int) -> np.ndarray:
    """Positions of the pool images taken this round, ascending.

    Per class ``c``: the images predicted as ``c`` with a confidence of at least ``threshold``,
    the most confident first, at most ``ceil(share * len(pool) * prior[c])`` of them (and at
    most ``max_per_class``).
    """
    taken = []
    for c, p in enumerate(prior):
        quota = min(max_per_class, math.ceil(share * len(confidence) * p))
        mine = np.flatnonzero((predicted == c) & (confidence >= threshold))
        if quota and len(mine):
            # ties broken by position, so a run gives the same selection each time
            order = np.lexsort((mine, -confidence[mine]))
            taken.append(mine[order[:quota]])
    return np.sort(np.concatenate(taken)) if taken else np.zeros(0, np.int64)



def thinned(weights: np.ndarray, seed) -> np.ndarray:
    """Which weighted rows to keep for a head without ``sample_weight``: each with probability
    equal to its weight (a seeded Bernoulli draw), so its expected share of the loss is its
    weight."""
    return np.random.default_rng(seed).random(len(weights)) < weights


def _refit(template, data: CacheData, pool: Pool, taken: np.ndarray, predicted: np.ndarray,
           confidence: np.ndarray, weighted: bool, seed: int, round_: int):
    """A fresh head on the labelled images and the pool images ``taken`` with their
    pseudo-labels, weighted by confidence."""
    weights = confidence[taken].astype(np.float64)
    if not weighted:
        keep = thinned(weights, [seed, round_, len(taken)])
        taken, weights = taken[keep], None
    X = np.concatenate([data.train.X, pool.take(taken)])
    y = np.concatenate([data.train.y, predicted[taken]])
    sample_weight = None if weights is None else np.concatenate(
        [np.ones(len(data.train.y)), weights])
    return fit_prepared(template, data, seed, X, y, sample_weight)


def _round_row(name: str, found: _Fitted, taken: np.ndarray, predicted: np.ndarray,
               previous, pool: Pool, classes: list[str]) -> dict:
    """One line of ``rounds.csv``: a round's validation scores and what it took from the pool."""
    labels = predicted[taken]
    # Since the round before: images taken anew, left out again, and given another class.
    before = {} if previous is None else dict(zip(previous[0].tolist(), previous[1].tolist()))
    now = dict(zip(taken.tolist(), labels.tolist()))
    relabelled = sum(i in before and before[i] != c for i, c in now.items())
    row = {"head": name, "threshold": found.threshold, "round": found.round,
           "val_accuracy": found.val_accuracy, "val_log_loss": found.val_loss,
           "used": len(taken), "added": len(now.keys() - before.keys()),
           "dropped": len(before.keys() - now.keys()), "relabelled": relabelled,
           "pseudo_accuracy": ""}
    if pool.labels is not None and len(taken):
        known = pool.labels[taken] >= 0
        if known.any():
            row["pseudo_accuracy"] = float(np.mean(labels[known] == pool.labels[taken][known]))
    counts = np.bincount(labels, minlength=len(classes))
    row.update({f"used_{c}": int(n) for c, n in zip(classes, counts)})
    return row

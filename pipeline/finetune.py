"""Stage 3: fine-tune the top blocks of a backbone end to end, warm-started from a linear probe.

Transfer learning trains a new head on frozen features (stage 2); fine-tuning also updates the
top K blocks of the pretrained network, with a lower learning rate than the head's, BatchNorm
statistics frozen, and the head warm-started from a linear probe on the cached features so the
pretrained blocks are not hit by the gradients of a random head.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torchvision.transforms import InterpolationMode, v2

from pipeline import distributed, report, tracking
from pipeline.activations import (
    ActivationError,
    ActivationPlan,
    CachedActivations,
    activation_file,
    activation_key_spec,
    cut_network,
    lowest_trained,
    prepare_trunk,
    write_activations,
)
from pipeline.atomic import atomic_write
from pipeline.backbones import BackboneSpec, as_spec, replace_classifier
from pipeline.blocks import STEM, freeze_below, parse_layers, stem, unfreeze_depth
from pipeline.cache import cache_key, cache_spec, read_splits
from pipeline.calibration import reliability_curve
from pipeline.data import ImageFiles, ImageSet, load_image_set
from pipeline.devices import autocast, autocast_dtype, default_batch_size, default_workers
from pipeline.early_stopping import EarlyStopping
from pipeline.errors import DataError, PipelineError
from pipeline.extract import extract_features
from pipeline.heads import LinearProbe
from pipeline.layouts import display
from pipeline.leakage import leaked_test_images
from pipeline.network import FinetunedNetwork
from pipeline.options import (
    ACTIVATION_DTYPES,
    ACTIVATION_FIELDS,
    AUGMENTS,
    AUTO_LR,
    DEFAULT_BACKBONE,
    DEFAULT_CACHE_DIR,
    HEAD_INITS,
    OPTIMIZERS,
    SCHEDULES,
    ExtractOptions,
    FinetuneConfig,
    split_settings,
)
from pipeline.persistence import NETWORK_SUFFIX
from pipeline.progress import EpochLines
from pipeline.run_record import RECORD, RunRecord, device_name, shared_fields
from pipeline.scoring import (
    POSITIVE_COLUMNS,
    SCORE_COLUMNS,
    RowPredictions,
    per_class_rows,
    positive_class,
    positive_scores,
    results_row,
    with_repeats,
)
from pipeline.tta import check_mode as check_tta
from pipeline.tta import score_finetune

__all__ = ["AUGMENTS", "HEAD_INITS", "OPTIMIZERS", "SCHEDULES", "FinetuneConfig",
           "FinetuneError", "FinetuneResult", "finetune", "repeat_seeds", "sweep_depths"]

CHECKPOINT = "checkpoint.pt"
# The method of a run with random weights and every block trained, beside transfer and fine-tune.
FROM_SCRATCH = "from scratch"
# The resolve_backbone arguments finetune also takes, when given a backbone name.
_BACKBONE_ARGS = ("weights", "image_size", "offline")


class FinetuneError(PipelineError):
    """A fine-tuning run that cannot start or resume as asked."""


@dataclass
class FinetuneResult:
    """The results row, the per-epoch history, the trained network and the files written."""

    row: dict
    history: list[dict]
    test_pred: np.ndarray
    # The best epoch's weights, in eval mode on the CPU: predict_images(result.model, ...).
    model: FinetunedNetwork | None = None
    files: dict[str, str] = field(default_factory=dict)
    # Labels and class probabilities of the test images, in the order of test_pred.
    test_labels: np.ndarray | None = None
    test_proba: np.ndarray | None = None
    # With test-time augmentation (pipeline.tta): its results row and probabilities.
    tta_row: dict | None = None
    tta_proba: np.ndarray | None = None

    @property
    def rows(self) -> list[dict]:
        """The results rows of the run: its row, and its test-time augmented row if any."""
        return [self.row] + ([self.tta_row] if self.tta_row is not None else [])


def finetune(
    data: str | os.PathLike,
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    config: FinetuneConfig | None = None,
    *,
    out: str | os.PathLike = "results/finetune",
    options: ExtractOptions | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    activation_depths: Sequence[int] = (),
    split_seed: int | None = None,
    positive: str | None = None,
    track: bool | tracking.Run | None = None,
    tta: str | None = None,
    **settings,
) -> FinetuneResult:
    """Fine-tune the top ``unfreeze`` blocks of ``backbone`` on ``data``; resume if stopped.

    Parameters
    ----------
    data
        As for :func:`pipeline.extract_features`; the features of these settings (cached, or
        extracted now) warm-start the head, and their splits are the ones trained on.
    backbone
        A :class:`~pipeline.backbones.BackboneSpec`, or a name resolved here with the
        ``weights``, ``image_size`` and ``offline`` given in ``settings`` (random init seeded
        by ``config.seed``).
    config
        How the blocks are trained (:class:`~pipeline.options.FinetuneConfig`); its fields,
        recorded in the checkpoint, decide whether a run resumes.
    out
        Folder of ``checkpoint.pt`` (each epoch), ``history.csv|png``, ``results.csv|md|json``
        and the saved model. A run whose checkpoint is there resumes from it.
    options
        Where the features are cached and how images are read
        (:class:`~pipeline.options.ExtractOptions`: ``cache_dir``, ``device``, ``workers``,
        ``split_fractions``; ``compile`` compiles the training steps). Its ``seed`` is
        ``config.seed``, so the splits are those of the same seed's extraction.
    progress
        Extraction and activation passes: a bar where stderr is a terminal, elsewhere a line
        every 30 s and at the end; and one line per epoch either way (train and validation
        loss and accuracy, learning rate, seconds; :mod:`pipeline.progress`). False: nothing.
    on_epoch
        Called with ``(epoch, history_row)`` after each epoch's checkpoint is written.
    activation_depths
        Other ``unfreeze`` depths whose activation caches the same trunk pass should write
        (a sweep's), so that the trunk runs once for all of them.
    split_seed
        Seed of the carved splits and of a random backbone init instead of ``config.seed``,
        which then seeds training alone (head, minibatch order, augmentation): the repeats of
        :func:`sweep_depths` train with other seeds on the same splits and features.
    positive
        Two-class data: the positive class (default the second), whose recall and
        false-negative rate the results row adds.
    track
        Log the run to MLflow (:mod:`pipeline.tracking`): parameters, each epoch's metrics as
        it ends, the results row, plots and the saved network. None: only when
        ``MLFLOW_TRACKING_URI`` is set; a :class:`pipeline.tracking.Run`: nested under it.
    tta
        ``"flip"`` or ``"crops"``: also score the test images with test-time augmentation
        (:mod:`pipeline.tta`), as a second results row ``finetune-K+tta`` with its own
        predictions (``result.tta_row``); None: not.
    **settings
        Fields of ``FinetuneConfig`` (``unfreeze`` may be ``"all"``) and of ``ExtractOptions``
        overriding ``config``'s and ``options``'s, and the backbone arguments above.
        ``lr="auto"``: the learning-rate range test (:mod:`pipeline.lr_find`) runs first on
        the same network (its weights put back) and its suggestion is the head's rate,
        recorded in the row (``lr``, ``lr_found_by``); its files in ``out/lr-find/`` are read
        back by a resumed run.

    Under ``torchrun`` the ranks train one model with DistributedDataParallel: each takes its
    share of every epoch's shuffled training images (``batch_size`` per rank), gradients of
    the trained blocks are averaged (the frozen trunk has none to sync), validation and test
    images are split between the ranks and their metrics gathered, and rank 0 alone writes
    checkpoints and results. A restarted job resumes from rank 0's checkpoint.

    ``out/run.json`` records the run (:mod:`pipeline.run_record`).
    """
    started = time.perf_counter()
    record = RunRecord("finetune")
    check_tta(tta)
    # Asked here, before any extraction: a missing MLflow stops the run at once.
    track = track if isinstance(track, tracking.Run) else tracking.check(track)
    out = Path(out)
    setup = _prepare(data, backbone, config, options, settings, split_seed=split_seed,
                     positive=positive, activation_depths=activation_depths, progress=progress)
    if setup.cfg.lr == AUTO_LR:  # the range test on this network first (weights put back)
        from pipeline.lr_find import with_found_lr  # it builds on this module

        setup = with_found_lr(setup, out, progress)
    (cfg, opts, ctx, run_on, data_seed, images, spec, cache, model, head, unfrozen, args,
     loaders, forward, trained_from, lr_found_by) = setup
    trainer = _Trainer(model, head, unfrozen, cfg, run_on, args, out / CHECKPOINT, ctx,
                       opts.compile, forward=forward)
    record.update(settings={"data": str(data), "backbone": spec.request, "config": cfg,
                            "options": opts, "positive": positive, "out": str(out)},
                  seed=cfg.seed, split_seed=data_seed, device=device_name(run_on),
                  world_size=ctx.world_size, trained_from=trained_from)
    record.with_caches([cache.cache_path])
    run = (tracking.start(track, out.absolute().parent, f"{spec.name} {out.name}", "finetune",
                          tags={"pipeline.cache_key": cache.key,
                                "pipeline.out": str(out.absolute())})
           if ctx.is_main else None)
    with tracking.ending(run):
        tracking.log_finetune_start(run, cfg, {
            "backbone": spec.name, "weights": spec.weights.identity, "cache_key": cache.key,
            "data": str(data), "trained_from": trained_from, "device": str(run_on),
            "world_size": ctx.world_size, "split_seed": data_seed, "positive": positive})
        epochs = tracking.EpochLogger(run)
        lines = EpochLines(f"finetune {out.name}", cfg.epochs,
                           progress if ctx.is_main else False)
        history = trainer.fit(loaders, _each(lines, epochs, on_epoch))
        _, _, proba = evaluate(forward, loaders.eval("test"), run_on)
        y_test = loaders.labels("test")
        result = _result(spec, cfg, cache, images.classes, trainer, history, y_test, proba,
                         started)
        result.row["trained_from"] = trained_from
        result.row.update(lr=cfg.lr, lr_found_by=lr_found_by)
        result.row.update(positive_scores(y_test, result.test_pred, images.classes, positive))
        if tta:
            score_finetune(result, images, loaders.rows["test"], tta, run_on, cfg.batch_size,
                           opts.workers, positive)
        if ctx.is_main:
            result.files = _write(out, spec, images.classes, cache, args, model, result)
            epochs.finish(history)  # a resumed run's earlier epochs
            # trainer.start_epoch: the epochs of an interrupted run's checkpoint, resumed.
            record.update(resumed_from_epoch=trainer.start_epoch,
                          tracking=run.describe() if run else None)
            written = record.write(out / RECORD, result.files.values())
            tracking.log_finetune_end(run, result.row, result.files, written)
    distributed.barrier()  # no rank returns before the results are on disk
    return result


def _each(*callbacks: Callable | None) -> Callable[[int, dict], None]:
    """One ``on_epoch`` that calls each of ``callbacks`` (None skipped) in turn."""
    def call(epoch: int, row: dict) -> None:
        for callback in callbacks:
            if callback is not None:
                callback(epoch, row)
    return call


def sweep_depths(data: str | os.PathLike, depths: Sequence[int | str],
                 out: str | os.PathLike = "results/finetune", repeats: int = 1, *,
                 track: bool | tracking.Run | None = None, **kwargs) -> list[dict]:
    """One fine-tune per number of unfrozen blocks, everything else equal, and one table.

    Depth 0 trains only the new head by the same loop: the linear probe baseline. Writes
    ``freeze_depth.csv|md`` and each run's files under ``unfreeze-<K>/``. With ``repeats``
    above 1, each depth is trained again with seeds ``seed + 1`` .. ``seed + repeats - 1``
    on the same splits (:func:`repeat_seeds`), and its row adds the spread over seeds.
    With ``track`` every run is logged to MLflow nested under one run of the experiment;
    ``out/run.json`` records the whole call, each run's folder its own run.
    """
    if repeats < 1:
        raise FinetuneError("repeats must be at least 1")
    out = Path(out)
    config = kwargs.get("config") or FinetuneConfig()
    record = RunRecord("freeze-depth", {"data": str(data), "depths": list(depths),
                                        "repeats": repeats, **kwargs},
                       seed=kwargs.get("seed", config.seed))
    is_main = distributed.context().is_main
    parent = (tracking.start(track, out.absolute().parent, out.name, "freeze-depth")
              if is_main else None)
    # One trunk pass writes the activation caches of every depth (all: no cache, images).
    counts = [k for k in depths if k != "all"]
    rows = []
    with tracking.ending(parent):
        for k in depths:
            run = finetune(data, out=out / f"unfreeze-{k}", unfreeze=k,
                           activation_depths=counts, track=parent or track, **kwargs)
            if repeats > 1:
                repeat_seeds(data, run, out / f"unfreeze-{k}", repeats, unfreeze=k,
                             activation_depths=counts, track=parent or track, **kwargs)
            rows.append(run.row)
        table = [{"blocks_unfrozen": r["blocks_unfrozen"],
                  "trainable_parameters": r["trainable_parameters"],
                  "best_epoch": r["best_epoch"],
                  **{c: r[c] for c in r if c.startswith("test_accuracy") or c == "repeats"},
                  "macro_f1": r["macro_f1"],
                  **{c: r[c] for c in POSITIVE_COLUMNS if c in r},
                  "seconds": r["fit_s"]} for r in rows]
        if is_main:
            files = list(report.write_table(table, out / "freeze_depth"))
            # Every depth reads the same cache on the same device: the first run's record says.
            record.update(**shared_fields(out / f"unfreeze-{depths[0]}" / RECORD),
                          tracking=parent.describe() if parent else None)
            files.append(record.write(out / RECORD, [*files, *(out / f"unfreeze-{k}" / RECORD
                                                             for k in depths)]))
            tracking.log_runs(parent, {"depths": list(depths), "repeats": repeats}, {}, files)
    return table


def repeat_seeds(data: str | os.PathLike, first: FinetuneResult, out: str | os.PathLike,
                 repeats: int, **kwargs) -> list[dict]:
    """Train ``first``'s run again with the next ``repeats - 1`` seeds; summarise the seeds.

    Only training is reseeded (head init, minibatch order, augmentation): the splits and the
    features stay those of ``first``'s seed, so every seed is scored on the same test images.
    Each repeat writes its own run under ``out/repeats/seed-<S>/`` (``pipeline report`` does
    not take those as rows); ``first.row`` gains the mean, standard deviation and t-interval
    of the test accuracy over the seeds
    (:func:`pipeline.scoring.with_repeats`), written again into ``out/results.*``, and
    ``out/repeats.csv|md`` lists every seed's scores.

    Parameters
    ----------
    data, kwargs
        As given to :func:`finetune` for ``first`` (``seed`` and ``config`` included).
    first
        The run of the first seed.
    out
        ``first``'s folder.
    repeats
        Seeds in all, ``first``'s included.

    Returns
    -------
    list of dict
        One row of ``repeats.csv`` per seed.
    """
    out = Path(out)
    config = kwargs.get("config") or FinetuneConfig()
    seed = kwargs.pop("seed", config.seed)
    runs = [first] + [finetune(data, out=out / "repeats" / f"seed-{seed + r}", seed=seed + r,
                               split_seed=seed, **kwargs) for r in range(1, repeats)]
    per_seed = [{"seed": seed + r, "best_epoch": run.row["best_epoch"],
                 **{c: run.row[c] for c in SCORE_COLUMNS}, "seconds": run.row["fit_s"]}
                for r, run in enumerate(runs)]
    first.row = with_repeats(first.row, [run.row["test_accuracy"] for run in runs])
    if distributed.context().is_main:
        first.files.update(_write_row(out, *first.rows))
        first.files.update(zip(("repeats_csv", "repeats_md"),
                               map(str, report.write_table(per_seed, out / "repeats"))))
    return per_seed


class _Setup(NamedTuple):
    """What a run trains and reads, built alike for a fine-tune and the lr finder."""

    cfg: FinetuneConfig
    opts: ExtractOptions
    ctx: distributed.Context
    device: torch.device
    data_seed: int
    images: ImageSet
    spec: BackboneSpec
    cache: object  # the feature cache's ExtractResult
    model: nn.Module
    head: nn.Linear
    unfrozen: list
    args: dict  # what a checkpoint must match (_run_args)
    loaders: _Loaders
    forward: nn.Module  # what the steps run: the model, or its top above cached activations
    trained_from: str
    lr_found_by: str = "given"  # or "lr-find" (--lr auto)


def _prepare(data, backbone, config, options, settings, *, split_seed=None, positive=None,
             activation_depths=(), progress=None) -> _Setup:
    """Everything before the first step of :func:`finetune` (its arguments): the splits, the
    features, the network with its head warm-started, and what each step reads, cached
    activations where exact."""
    cfg_settings, extract_settings, rest = split_settings(settings, FinetuneConfig,
                                                          ExtractOptions)
    cfg = _config(replace(config or FinetuneConfig(), **cfg_settings))
    data_seed = cfg.seed if split_seed is None else split_seed
    opts = replace(options or ExtractOptions(), **extract_settings, seed=data_seed)
    ctx, run_on = distributed.setup(opts.device)
    images = load_image_set(data, opts.split_fractions, data_seed)
    if not images.labelled:
        raise FinetuneError(f"{display(str(data))}: unlabelled images (no class folders or "
                            "label column); fine-tuning needs labels")
    positive_class(images.classes, positive)  # a wrong class fails before any training
    spec = as_spec(backbone, data_seed, _BACKBONE_ARGS, rest)
    if from_scratch(spec, cfg):
        # Nothing pretrained to keep: BatchNorm statistics are learnt, every layer at one rate.
        cfg = replace(cfg, bn_train=True, backbone_lr_ratio=1.0)
    # The features are extracted as plain float32 (compile is for the training steps).
    cache = extract_features(images, spec, replace(opts, compile=False), progress=progress)
    splits = read_splits(cache.cache_path)
    _check_splits(splits, images)
    model, head, unfrozen = build_model(spec, images.classes, cfg, splits)
    args = _run_args(spec, cfg, cache.key, images)
    n_blocks = len(spec.adapter.blocks(model))
    # The top blocks that hold every trained layer (the blocks themselves, for a block count).
    depth = unfreeze_depth(model, spec.family, cfg.unfreeze, head)
    why_images = _needs_images(cfg, depth, n_blocks)
    rows = split_rows(images, splits)
    if why_images is None:  # exact: train the top blocks from the trunk's cached activations
        others = {unfreeze_depth(model, spec.family, d, head) for d in activation_depths}
        depths = {depth} | {d for d in others if 0 <= d < n_blocks}
        cut, path, plan = _activations(spec, model, images, rows["train"], cache, cfg, opts,
                                       run_on, ctx, progress, depth, sorted(depths))
        args["activations"] = path.name
        loaders = _CachedLoaders(path, plan, images.labels, rows, cfg, run_on, opts.workers,
                                 ctx)
        forward, trained_from = cut.upper, "cached activations"
    else:
        loaders = _ImageLoaders(images, spec, rows, cfg, run_on, opts.workers, ctx)
        forward, trained_from = model, f"images ({why_images})"
        if cfg.from_images and not cfg.bn_train and depth < n_blocks:
            forward = _below_prepared(spec, model, images, depth, run_on, cache.engine,
                                      opts.cache_dir) or model
    return _Setup(cfg, opts, ctx, run_on, data_seed, images, spec, cache, model, head, unfrozen,
                  args, loaders, forward, trained_from)


def _config(cfg: FinetuneConfig) -> FinetuneConfig:
    for name, allowed in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES),
                          ("augment", AUGMENTS), ("head_init", HEAD_INITS),
                          ("activation_dtype", ACTIVATION_DTYPES)):
        if getattr(cfg, name) not in allowed:
            raise FinetuneError(f"{name} must be one of {', '.join(allowed)}")
    lr_ok = cfg.lr == AUTO_LR or (isinstance(cfg.lr, (int, float)) and cfg.lr > 0)
    if cfg.epochs < 0 or not lr_ok or cfg.batch_size < 1 or cfg.views < 1:
        raise FinetuneError(f"epochs must be >= 0, lr > 0 or {AUTO_LR!r}, batch size and "
                            "views >= 1")
    # A negative ratio would climb the loss in the backbone while the head descends it.
    for name, low, strict in (("backbone_lr_ratio", 0, True), ("weight_decay", 0, False),
                              ("clip_grad", 0, True), ("patience", 1, False),
                              ("step_size", 1, False)):
        value = getattr(cfg, name)
        if value < low or (strict and value == low):
            raise FinetuneError(f"{name} must be {'>' if strict else '>='} {low}, not {value}")
    return cfg


def _check_splits(splits, images: ImageSet) -> None:
    for name in ("train", "val", "test"):
        if len(splits[name].y) == 0:
            what = "no validation split" if name == "val" else f"no {name} split"
            raise DataError(f"{images.root}: {what}; fine-tuning needs train, val and test "
                            "images (early stopping and model choice use val)")


def build_model(spec: BackboneSpec, classes: Sequence[str], cfg: FinetuneConfig, splits
                ) -> tuple[nn.Module, nn.Linear, list]:
    """The pretrained network with a new head, top blocks trainable, the rest frozen."""
    model = spec.build_classifier()
    head = replace_classifier(spec, model, len(classes))
    if cfg.head_init == "linear":
        warm_start(head, splits, cfg.seed)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            head.reset_parameters()
    # freeze_below finds the blocks and checks unfreeze (a count or "all") against them.
    unfrozen = freeze_below(model, spec.family, cfg.unfreeze, head)
    if from_scratch(spec, cfg):  # the stem too, which fine-tuning never trains
        unfrozen = [stem(model, spec.family, head), *unfrozen]
        model.requires_grad_(True)
    return model, head, unfrozen


def from_scratch(spec: BackboneSpec, cfg: FinetuneConfig) -> bool:
    """Random weights and every block trained: the retrain-from-scratch baseline, which trains
    the stem and BatchNorm statistics too, the backbone at the head's learning rate."""
    return not spec.weights.pretrained and cfg.unfreeze == "all"


def warm_start(head: nn.Linear, splits, seed: int) -> LinearProbe:
    """Fit a linear probe on the cached features and copy it into ``head``.

    Before the first step the network then predicts exactly what the probe predicts: the
    fine-tune starts from transfer learning's answer instead of from a random head.
    """
    probe = LinearProbe(random_state=seed).fit(splits["train"].X, splits["train"].y,
                                               X_val=splits["val"].X, y_val=splits["val"].y)
    with torch.no_grad():
        head.weight.copy_(torch.from_numpy(probe.coef_))
        head.bias.copy_(torch.from_numpy(probe.intercept_))
    return probe


def _run_args(spec: BackboneSpec, cfg: FinetuneConfig, cache_key: str, images: ImageSet) -> dict:
    """What a checkpoint must match to be resumed (the activation cache, if used, is added)."""
    config = {k: v for k, v in asdict(cfg).items() if k not in ACTIVATION_FIELDS}
    return {"backbone": spec.name, "weights": spec.weights.identity, "cache_key": cache_key,
            "classes": images.classes, "config": config}


# --- cached activations ------------------------------------------------------------------------

def _needs_images(cfg: FinetuneConfig, k: int, n_blocks: int) -> str | None:
    """Why this run must read images every epoch, or None when cached activations are exact."""
    if cfg.from_images:
        return "--from-images"
    if k == n_blocks:
        return "every block trained: nothing below them to cache"
    if k > n_blocks:
        return "the stem is trained: nothing below it to cache"
    if cfg.bn_train:
        return "--bn-train: BatchNorm statistics below the trained blocks would change"
    return None


def _activations(spec, model, images, train_rows, features, cfg, opts, device, ctx, progress, k,
                 depths):
    """The cut below the top ``k`` blocks and its activation cache. Rank 0 writes the caches
    missing among those of ``depths`` in one trunk pass (a sweep's later runs find theirs),
    on the engine that extracted ``features`` (an :class:`~pipeline.extract.ExtractResult`)."""
    blocks = spec.adapter.blocks(model)
    boundaries = {d: lowest_trained(spec, model, blocks, d) for d in depths}
    views = cfg.views if cfg.augment == "standard" else 0
    feature_spec = cache_spec(features.cache_path)
    keys = {}
    for d, block in boundaries.items():
        key_spec = activation_key_spec(feature_spec, block.name, cfg.activation_dtype, views,
                                       cfg.augment, cfg.seed)
        keys[d] = (key_spec, cache_key(key_spec))
    paths = {d: activation_file(opts.cache_dir, spec.name, key) for d, (_, key) in keys.items()}
    cuts = {k: cut_network(spec, model, boundaries[k])}
    missing = [d for d in depths if not paths[d].exists()]
    plan = ActivationPlan(len(images), train_rows, views)
    if ctx.is_main and missing:
        cuts.update({d: cut_network(spec, model, boundaries[d]) for d in missing if d not in cuts})
        workers = default_workers(ctx.local_world_size) if opts.workers is None else opts.workers
        write_activations([cuts[d] for d in missing], [keys[d] for d in missing],
                          [paths[d] for d in missing], images, plan, spec,
                          train_transform(spec), cfg.activation_dtype, cfg.seed, device,
                          opts.batch_size or default_batch_size(device), workers, progress,
                          features.engine)
    distributed.barrier()  # every rank reads the files rank 0 wrote
    return cuts[k], paths[k], plan


class _PreparedTrunk(nn.Module):
    """The frozen trunk prepared for inference (a copy: BatchNorm folded, static padding), then
    the trained top: what the activation pass caches, computed every step instead."""

    def __init__(self, lower: nn.Module, upper: nn.Module):
        super().__init__()
        self.lower, self.upper = lower, upper

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            activation = self.lower(x)
        return self.upper(activation)


def _below_prepared(spec, model, images, k: int, device, engine: str = "torch",
                    cache_dir=DEFAULT_CACHE_DIR) -> nn.Module | None:
    """``--from-images`` with a frozen trunk: the network cut below the top ``k`` blocks with
    the trunk prepared as the activation pass prepares it (on ``engine``, the features'), so
    both ways train alike; None for a network that cannot be cut there (it then runs
    whole)."""
    try:
        cut = cut_network(spec, model, lowest_trained(spec, model, spec.adapter.blocks(model), k))
    except ActivationError:
        return None
    prepared = prepare_trunk(spec, _Activation(cut.lower), images, device, engine, cache_dir,
                             {"activation": cut.node})
    return _PreparedTrunk(prepared.run, cut.upper)


class _Activation(nn.Module):
    def __init__(self, lower: nn.Module):
        super().__init__()
        self.lower = lower

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lower(x)["activation"]


# --- data ----------------------------------------------------------------------------------------

def train_transform(spec: BackboneSpec) -> v2.Compose:
    """Augmentation for training images only: crop, flip, small rotation, shear and zoom."""
    p = spec.preprocessing
    return v2.Compose([
        v2.PILToTensor(),
        v2.RandomResizedCrop(p.crop, scale=(0.6, 1.0),
                             interpolation=InterpolationMode(p.interpolation), antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=10, shear=8, scale=(0.9, 1.1)),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(p.mean), std=list(p.std)),
    ])


class _Labelled(torch.utils.data.Dataset):
    """Rows of an :class:`ImageFiles` with their labels: ``(tensor, index, error, sha256,
    label)``."""

    def __init__(self, files: ImageFiles, rows: np.ndarray, labels: np.ndarray):
        self.files, self.rows, self.labels = files, rows, labels

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, j: int):
        i = int(self.rows[j])
        return (*self.files[i], int(self.labels[i]))


def split_rows(images: ImageSet, splits) -> dict[str, np.ndarray]:
    """Each split's rows of the image set: the images the feature cache could read."""
    index = {p: i for i, p in enumerate(images.paths)}
    return {s: np.array([index[p] for p in splits[s].paths], dtype=np.int64)
            for s in ("train", "val", "test")}


class _Loaders:
    """Train, val and test loaders over the images the cache could read.

    Items are ``(input, index, error, sha256, label)``; the training order is seeded per epoch
    (per rank under torchrun), so a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, rows: dict[str, np.ndarray], labels: np.ndarray, cfg, device, workers,
                 ctx: distributed.Context):
        self.rows, self.labels_of, self.cfg, self.device, self.ctx = rows, labels, cfg, device, ctx
        self.workers = default_workers(ctx.local_world_size) if workers is None else workers

    def labels(self, split: str) -> np.ndarray:
        return self.labels_of[self.rows[split]]

    def train(self, epoch: int) -> torch.utils.data.DataLoader:
        data = self._train_data(epoch)
        if not self.ctx.distributed:
            generator = torch.Generator().manual_seed(self.cfg.seed * 100_003 + epoch)
            return self._loader(data, shuffle=True, generator=generator)
        # Each rank its share of one shuffle; padded with repeats to equal shares, so every
        # rank takes the same number of steps (DDP syncs gradients at each step).
        sampler = torch.utils.data.DistributedSampler(
            data, self.ctx.world_size, self.ctx.rank, shuffle=True, seed=self.cfg.seed)
        sampler.set_epoch(epoch)
        return self._loader(data, sampler=sampler)

    def eval(self, split: str) -> torch.utils.data.DataLoader:
        """This rank's images of ``split`` (all of them in a world of one), none repeated."""
        rows = self.rows[split]
        return self._loader(self._eval_data(rows[distributed.shard_indices(len(rows),
                                                                            self.ctx)]))

    def _loader(self, data, shuffle=False, generator=None, sampler=None):
        return torch.utils.data.DataLoader(
            data, batch_size=self.cfg.batch_size, shuffle=shuffle, generator=generator,
            sampler=sampler, num_workers=self.workers, pin_memory=self.device.type == "cuda",
            drop_last=False)


class _ImageLoaders(_Loaders):
    """Every epoch decodes the images and runs them through the whole network."""

    def __init__(self, images, spec, rows, cfg, device, workers, ctx):
        super().__init__(rows, images.labels, cfg, device, workers, ctx)
        crop = spec.preprocessing.crop
        shape = (3, crop, crop)
        train_tf = train_transform(spec) if cfg.augment == "standard" else None
        self.plain = ImageFiles(images, spec.preprocessing.transform(), shape)
        self.augmented = ImageFiles(images, train_tf or spec.preprocessing.transform(), shape)

    def _train_data(self, epoch: int):
        return _Labelled(self.augmented, self.rows["train"], self.labels_of)

    def _eval_data(self, rows: np.ndarray):
        return _Labelled(self.plain, rows, self.labels_of)


class _CachedLoaders(_Loaders):
    """Cached activations in the image loaders' order: with --augment none, the same batches."""

    def __init__(self, path: Path, plan: ActivationPlan, labels, rows, cfg, device, workers,
                 ctx):
        super().__init__(rows, labels, cfg, device, workers, ctx)
        self.path, self.plan = path, plan

    def _train_data(self, epoch: int):
        images = self.rows["train"]
        rows = images
        if self.plan.views:  # one cached view of each image per epoch, drawn with a seed
            draw = np.random.default_rng([self.cfg.seed, epoch]).integers(
                self.plan.views, size=len(images))
            rows = self.plan.view_rows(draw)
        return CachedActivations(self.path, rows, images, self.labels_of[images])

    def _eval_data(self, rows: np.ndarray):
        return CachedActivations(self.path, rows, rows, self.labels_of[rows])


# --- training ------------------------------------------------------------------------------------

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


def train_one_epoch(model, trainable, loader, optimizer, scaler, device, cfg
                    ) -> tuple[float, float]:
    set_train_mode(model, trainable, cfg.bn_train)
    total_loss, correct, seen = 0.0, 0, 0
    for x, _index, _errors, _digest, y in loader:
        x, y = _to_device(x, device), y.to(device)
        loss, logits = train_step(model, x, y, optimizer, scaler, device, cfg.clip_grad)
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
            logits = model(_to_device(x, device)).float()
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


def _to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    x = x.to(device, non_blocking=True)
    if device.type == "cuda" and x.ndim == 4:  # cached activations may be feature vectors
        return x.contiguous(memory_format=torch.channels_last)
    return x


class _Trainer:
    """Optimizer, schedule, early stopping and per-epoch checkpoints of one run."""

    def __init__(self, model, head, unfrozen, cfg, device, args, checkpoint: Path,
                 ctx: distributed.Context | None = None, compile: bool = False,
                 forward: nn.Module | None = None):
        self.model, self.head, self.cfg, self.device = model, head, cfg, device
        # What the steps run: the model, or its part above cached activations (same modules).
        self.forward = model if forward is None else forward
        self.args, self.checkpoint = args, checkpoint
        self.ctx = ctx or distributed.Context()
        self.trainable = [model.get_submodule(n) for b in unfrozen for n in b.modules] + [head]
        # What the rows call the trained part: a number of blocks, or of layers ("15L").
        self.unfrozen_blocks = (cfg.unfreeze if parse_layers(cfg.unfreeze)
                                else sum(block.name != STEM for block in unfrozen))
        model.to(device, memory_format=torch.channels_last)
        self.net = self._wrap(compile)
        self.optimizer = self._optimizer()
        self.scheduler = self._scheduler()
        amp = autocast_dtype(device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
        self.history: list[dict] = []
        # The best weights wait on the CPU: GPU memory is for training.
        self.stopping = EarlyStopping(cfg.patience, keep_on="cpu")
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
                forward_sync_buffers=self.cfg.bn_train)
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
        return make_optimizer(self.model, self.head, self.cfg)

    def _scheduler(self):
        if self.cfg.schedule == "step":
            return torch.optim.lr_scheduler.StepLR(self.optimizer, self.cfg.step_size, 0.1)
        return torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, max(1, self.cfg.epochs))

    def fit(self, loaders: _Loaders, on_epoch) -> list[dict]:
        self._resume()
        for epoch in range(self.start_epoch, self.cfg.epochs):
            if self.stopping.should_stop:
                break
            started = time.perf_counter()
            # Dropout and augmentation: seeded per epoch, and per rank so ranks differ.
            torch.manual_seed(self.cfg.seed * 100_003 + epoch + 7919 * self.ctx.rank)
            train_loss, train_acc = train_one_epoch(
                self.net, self.trainable, loaders.train(epoch), self.optimizer, self.scaler,
                self.device, self.cfg)
            val_loss, val_acc, _ = evaluate(self.forward, loaders.eval("val"), self.device)
            lr = self.optimizer.param_groups[0]["lr"]
            self.scheduler.step()
            row = {"epoch": epoch + 1, "train_loss": train_loss, "train_accuracy": train_acc,
                   "val_loss": val_loss, "val_accuracy": val_acc, "lr": lr,
                   "seconds": time.perf_counter() - started}
            self.history.append(row)
            self.stopping.step(val_loss, self.model.state_dict())
            if self.ctx.is_main:  # every rank holds the same weights; one file is enough
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
        if not self.checkpoint.exists():
            return
        try:
            state = torch.load(self.checkpoint, map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises many types for a damaged file
            raise FinetuneError(f"cannot read checkpoint {self.checkpoint}: "
                                f"{str(err).splitlines()[0]}; remove it to start over") from None
        if json.loads(state["args"]) != self.args:
            raise FinetuneError(f"{self.checkpoint} is from another run (other backbone, data "
                                "or settings); use another --out or remove it to start over")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["lr_scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.history = json.loads(state["history"])
        self.stopping.load_state_dict(_early_stopping_state(state["best"], len(self.history)))
        self.start_epoch = state["epoch"]


def make_optimizer(model: nn.Module, head: nn.Module, cfg: FinetuneConfig
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


def _early_stopping_state(best: dict, epochs: int) -> dict:
    """The checkpoint's ``best`` as EarlyStopping.load_state_dict reads it."""
    if "val_loss" not in best:
        return best
    # A checkpoint from before EarlyStopping: its own record, epochs counted from 1.
    epoch = best["epoch"] - 1 if best["epoch"] > 0 else -1
    return {"epochs": epochs, "loss": torch.tensor(best["val_loss"], dtype=torch.float64),
            "epoch": torch.tensor(epoch), "state": best["state"]}


# --- results -------------------------------------------------------------------------------------

def _result(spec, cfg, cache, classes, trainer: _Trainer, history, y, proba, started
            ) -> FinetuneResult:
    y_pred = proba.argmax(1)
    blocks = trainer.unfrozen_blocks
    scratch = from_scratch(spec, cfg)
    row = results_row(
        backbone=spec.name, head="from-scratch" if scratch else f"finetune-{blocks}",
        chosen=f"unfreeze={blocks},best_epoch={trainer.best['epoch']}", y_true=y,
        y_pred=y_pred, proba=proba, n_classes=proba.shape[1],
        fit_s=time.perf_counter() - started, predict_s=float("nan"), blocks_unfrozen=blocks,
        trainable_parameters=trainer.trainable_parameters, best_epoch=trainer.best["epoch"],
        epochs_run=len(history), cache_key=cache.key,
        method=FROM_SCRATCH if scratch else "fine-tune")
    # Training is over and the best weights are back in trainer.model: it moves to the CPU.
    network = FinetunedNetwork.from_module(trainer.model, spec, classes,
                                           request=spec.request,
                                           cache_key=cache.key, unfrozen=blocks)
    return FinetuneResult(row, history, y_pred, network, test_labels=y, test_proba=proba)


def _write(out: Path, spec, classes, cache, args, model, result: FinetuneResult) -> dict:
    name = f"{spec.name}-{cache.key[:8]}-finetune-{result.row['blocks_unfrozen']}"
    name = name.replace("/", "_")
    model_path = result.model.save(out / "models" / f"{name}{NETWORK_SUFFIX}")
    result.row["model"] = str(model_path)
    # The test images in the order they were scored (the cache's), for pipeline report to
    # pair this run with the heads and fine-tunes of the same cache key, image by image.
    paths, leaked = leaked_test_images(cache.cache_path)
    predictions = Path("predictions") / f"{name}.npz"
    RowPredictions(paths, result.test_labels, result.test_pred, result.test_proba, leaked,
                   classes).save(out / predictions)
    result.row["predictions"] = predictions.as_posix()
    if result.tta_row is not None:
        tta_predictions = predictions.with_name(f"{name}+tta.npz")
        RowPredictions(paths, result.test_labels, result.tta_proba.argmax(1), result.tta_proba,
                       leaked, classes).save(out / tta_predictions)
        result.tta_row.update(model=str(model_path), predictions=tta_predictions.as_posix())
    files = _write_row(out, *result.rows)
    if result.tta_row is not None:
        files["tta_predictions"] = str(out / tta_predictions)
    history_csv, _ = report.write_table(result.history, out / "history")
    files.update({"history_csv": str(history_csv), "model": str(model_path),
                  "predictions": str(out / predictions)})
    per_class = per_class_rows(result.test_labels, result.test_pred, classes,
                               backbone=spec.name, head=result.row["head"])
    files["per_class"] = str(report.write_table(per_class, out / "per_class")[0])
    files["confusion_png"] = str(report.confusion_matrix_plot(
        result.test_labels, result.test_pred, classes, out / "confusion_matrix.png",
        f"{spec.name}, {_trained(result.row)} fine-tuned "
        f"(accuracy {result.row['test_accuracy']:.3f})"))
    files["reliability_png"] = str(report.reliability_diagram(
        {_trained(result.row):
         reliability_curve(result.test_labels, result.test_proba)},
        out / "reliability.png", f"{spec.name}, fine-tuned: calibration on the test split"))
    if result.history:
        files["history_png"] = str(report.training_curves(
            result.history, out / "history.png",
            f"{spec.name}, {_trained(result.row)} fine-tuned"))
    return files


def _trained(row: dict) -> str:
    """What a run trained, for titles: "top 2 block(s)" or "top 15 layers"."""
    if row["method"] == FROM_SCRATCH:
        return "every layer (from scratch)"
    layers = parse_layers(row["blocks_unfrozen"])
    return f"top {layers} layers" if layers else f"top {row['blocks_unfrozen']} block(s)"


def _write_row(out: Path, *rows: dict) -> dict:
    """``results.csv|md|json`` of one run: its rows (the row, then a test-time augmented
    one), each score with its 95% interval."""
    csv, md = report.write_table(rows, out / "results")
    (out / "results.json").write_text(json.dumps(list(rows), indent=2) + "\n")
    return {"results_csv": str(csv), "results_md": str(md),
            "results_json": str(out / "results.json")}

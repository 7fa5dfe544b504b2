"""What a fine-tuning run trains and reads, built alike for a fine-tune and the lr finder.

:func:`prepare` resolves the backbone, extracts (or reuses) the features whose splits the run
trains on, builds the network with its new head warm-started by a linear probe, freezes the
blocks below ``unfreeze`` and, where the frozen trunk's output is cached, trains the top alone
on those activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, replace
from typing import NamedTuple

import torch
from torch import nn

from pipeline.core import distributed
from pipeline.core.devices import default_batch_size, default_workers
from pipeline.core.errors import DataError, FinetuneError
from pipeline.core.options import (
    ACTIVATION_DTYPES,
    ACTIVATION_FIELDS,
    AUGMENTS,
    AUTO_LR,
    DEFAULT_CACHE_DIR,
    HEAD_INITS,
    OPTIMIZERS,
    SCHEDULES,
    ExtractOptions,
    FinetuneConfig,
    split_settings,
)
from pipeline.data.images import ImageSet, load_image_set
from pipeline.data.layouts import display
from pipeline.extract.features import extract_features
from pipeline.finetuning.activations import (
    ActivationError,
    ActivationPlan,
    activation_file,
    activation_key_spec,
    cut_network,
    lowest_trained,
    prepare_trunk,
    write_activations,
)
from pipeline.finetuning.loaders import (
    CachedLoaders,
    ImageLoaders,
    Loaders,
    split_rows,
    train_transform,
)
from pipeline.heads import LinearProbe
from pipeline.metrics.scoring import (
    positive_class,
)
from pipeline.models.backbones import BackboneSpec, as_spec, replace_classifier
from pipeline.models.blocks import freeze_below, stem, unfreeze_depth
from pipeline.store.cache import cache_spec, read_splits
from pipeline.store.paths import cache_key

__all__ = ["FROM_SCRATCH", "FinetuneError", "Setup", "build_model", "from_scratch", "prepare",
           "warm_start"]


# The method of a run with random weights and every block trained, beside transfer and fine-tune.
FROM_SCRATCH = "from scratch"


# The resolve_backbone arguments finetune also takes, when given a backbone name.
_BACKBONE_ARGS = ("weights", "image_size", "offline")



class Setup(NamedTuple):
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
    loaders: Loaders
    forward: nn.Module  # what the steps run: the model, or its top above cached activations
    trained_from: str
    lr_found_by: str = "given"  # or "lr-find" (--lr auto)


def prepare(data, backbone, config, options, settings, *, split_seed=None, positive=None,
             activation_depths=(), progress=None) -> Setup:
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
    cache = extract_features(images, backbone=spec, options=replace(opts, compile=False),
                             progress=progress)
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
        loaders = CachedLoaders(path, plan, images.labels, rows, cfg, run_on, opts.workers,
                                 ctx)
        forward, trained_from = cut.upper, "cached activations"
    else:
        loaders = ImageLoaders(images, spec, rows, cfg, run_on, opts.workers, ctx)
        forward, trained_from = model, f"images ({why_images})"
        if cfg.from_images and not cfg.bn_train and depth < n_blocks:
            forward = _below_prepared(spec, model, images, depth, run_on, cache.engine,
                                      opts.cache_dir) or model
    return Setup(cfg, opts, ctx, run_on, data_seed, images, spec, cache, model, head, unfrozen,
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
    on the engine that extracted ``features`` (an
    :class:`~pipeline.extract.features.ExtractResult`)."""
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

"""What a fine-tuning run trains and reads, built alike for a fine-tune and the lr finder.

:func:`prepare` resolves the backbone, extracts (or reuses) the features whose splits the run
trains on, builds the network with its new head warm-started by a linear probe, freezes the
blocks below ``unfreeze`` and, where the frozen trunk's output is cached, trains the top alone
on those activations.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

import torch
from torch import nn

from pipeline.core import distributed
from pipeline.core.devices import default_batch_size, default_workers
from pipeline.core.errors import DataError, FinetuneError
from pipeline.core.options import (
    DEFAULT_CACHE_DIR,
    ActivationOptions,
    FinetuneOptions,
    NetworkOptions,
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
from pipeline.models.backbone_spec import BackboneSpec
from pipeline.models.backbones import build_classifier, replace_classifier, resolve_backbone
from pipeline.models.blocks import freeze_below, stem, unfreeze_depth
from pipeline.models.families import family_of
from pipeline.store.cache import cache_spec, read_splits
from pipeline.store.paths import cache_key

__all__ = ["FROM_SCRATCH", "FinetuneError", "Setup", "build_model", "from_scratch", "prepare",
           "run_args", "warm_start"]


# The method of a run with random weights and every block trained, beside transfer and fine-tune.
FROM_SCRATCH = "from scratch"




@dataclass(frozen=True)
class Setup:
    """What a run trains and reads, built alike for a fine-tune and the lr finder."""

    # As asked, but for what a run from scratch changes (BatchNorm trained, one rate), the
    # extraction's seed (the split seed) and, after the range test, the lr it found.
    options: FinetuneOptions
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


def prepare(data, backbone: str | BackboneSpec, options: FinetuneOptions, *,
            split_seed: int | None = None, positive: str | None = None,
            activation_depths: Sequence = (), progress=None) -> Setup:
    """Everything before the first step of :func:`~pipeline.finetuning.run.finetune` (its
    arguments): the splits, the features, the network with its head warm-started, and what
    each step reads, cached activations where exact."""
    data_seed = options.training.seed if split_seed is None else split_seed
    options = replace(options, extract=replace(options.extract, seed=data_seed))
    extract = options.extract
    ctx, run_on = distributed.setup(extract.device)
    images = load_image_set(data, extract.split_fractions, data_seed)
    if not images.labelled:
        raise FinetuneError(f"{display(str(data))}: unlabelled images (no class folders or "
                            "label column); fine-tuning needs labels")
    positive_class(images.classes, positive)  # a wrong class fails before any training
    spec = (backbone if isinstance(backbone, BackboneSpec)
            else resolve_backbone(backbone, seed=data_seed))
    if from_scratch(spec, options.network):
        # Nothing pretrained to keep: BatchNorm statistics are learnt, every layer at one rate.
        options = replace(options, network=replace(options.network, bn_train=True),
                          optim=replace(options.optim, backbone_lr_ratio=1.0))
    network, training, activations = options.network, options.training, options.activations
    # The features are extracted as plain float32 (compile is for the training steps).
    cache = extract_features(images, backbone=spec, options=replace(extract, compile=False),
                             progress=progress)
    splits = read_splits(cache.cache_path)
    _check_splits(splits, images)
    model, head, unfrozen = build_model(spec, images.classes, network, training.seed, splits)
    args = run_args(spec, options, cache.key, images.classes)
    n_blocks = len(family_of(spec).blocks(model))
    # The top blocks that hold every trained layer (the blocks themselves, for a block count).
    depth = unfreeze_depth(model, spec.family, network.unfreeze, head)
    why_images = _needs_images(activations, network, depth, n_blocks)
    rows = split_rows(images, splits)
    if why_images is None:  # exact: train the top blocks from the trunk's cached activations
        others = {unfreeze_depth(model, spec.family, d, head) for d in activation_depths}
        depths = {depth} | {d for d in others if 0 <= d < n_blocks}
        cut, path, plan = _activations(spec, model, images, rows["train"], cache, options,
                                       run_on, ctx, progress, depth, sorted(depths))
        args["activations"] = path.name
        loaders = CachedLoaders(path, plan, images.labels, rows, training, run_on,
                                extract.workers, ctx)
        forward, trained_from = cut.upper, "cached activations"
    else:
        loaders = ImageLoaders(images, spec, rows, training, run_on, extract.workers, ctx)
        forward, trained_from = model, f"images ({why_images})"
        if activations.from_images and not network.bn_train and depth < n_blocks:
            forward = _below_prepared(spec, model, images, depth, run_on, cache.engine,
                                      extract.cache_dir) or model
    return Setup(options=options, ctx=ctx, device=run_on, data_seed=data_seed,
                 images=images, spec=spec, cache=cache, model=model, head=head,
                 unfrozen=unfrozen, args=args, loaders=loaders, forward=forward,
                 trained_from=trained_from)


def _check_splits(splits, images: ImageSet) -> None:
    for name in ("train", "val", "test"):
        if len(splits[name].y) == 0:
            what = "no validation split" if name == "val" else f"no {name} split"
            raise DataError(f"{images.root}: {what}; fine-tuning needs train, val and test "
                            "images (early stopping and model choice use val)")


def build_model(spec: BackboneSpec, classes: Sequence[str], network: NetworkOptions,
                seed: int, splits) -> tuple[nn.Module, nn.Linear, list]:
    """The pretrained network with a new head (initialised with ``seed``), top blocks
    trainable, the rest frozen."""
    model = build_classifier(spec)
    head = replace_classifier(spec, model, len(classes))
    if network.head_init == "linear":
        warm_start(head, splits, seed)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            head.reset_parameters()
    # freeze_below finds the blocks and checks unfreeze (a count or "all") against them.
    unfrozen = freeze_below(model, spec.family, network.unfreeze, head)
    if from_scratch(spec, network):  # the stem too, which fine-tuning never trains
        unfrozen = [stem(model, spec.family, head), *unfrozen]
        model.requires_grad_(True)
    return model, head, unfrozen


def from_scratch(spec: BackboneSpec, network: NetworkOptions) -> bool:
    """Random weights and every block trained: the retrain-from-scratch baseline, which trains
    the stem and BatchNorm statistics too, the backbone at the head's learning rate."""
    return not spec.weights.pretrained and network.unfreeze == "all"


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


def run_args(spec: BackboneSpec, options: FinetuneOptions, cache_key: str,
             classes: Sequence[str]) -> dict:
    """What a checkpoint must match to be resumed: the backbone, the features, the classes and
    every concern's options but the activation cache's and the extraction's, which never
    change a result (the activation cache, if used, is added by name)."""
    config = {name: asdict(getattr(options, name)) for name in ("optim", "network", "training")}
    return {"backbone": spec.name, "weights": spec.weights.identity, "cache_key": cache_key,
            "classes": list(classes), "config": config}


def _needs_images(activations: ActivationOptions, network: NetworkOptions, k: int,
                  n_blocks: int) -> str | None:
    """Why this run must read images every epoch, or None when cached activations are exact."""
    if activations.from_images:
        return "--from-images"
    if k == n_blocks:
        return "every block trained: nothing below them to cache"
    if k > n_blocks:
        return "the stem is trained: nothing below it to cache"
    if network.bn_train:
        return "--bn-train: BatchNorm statistics below the trained blocks would change"
    return None


def _activations(spec, model, images, train_rows, features, options: FinetuneOptions, device,
                 ctx, progress, k, depths):
    """The cut below the top ``k`` blocks and its activation cache. Rank 0 writes the caches
    missing among those of ``depths`` in one trunk pass (a sweep's later runs find theirs),
    on the engine that extracted ``features`` (an
    :class:`~pipeline.extract.features.ExtractResult`)."""
    blocks = family_of(spec).blocks(model)
    boundaries = {d: lowest_trained(spec, model, blocks, d) for d in depths}
    cached, augment, seed = options.activations, options.training.augment, options.training.seed
    opts = options.extract
    views = cached.views if augment == "standard" else 0
    feature_spec = cache_spec(features.cache_path)
    keys = {}
    for d, block in boundaries.items():
        key_spec = activation_key_spec(feature_spec, block.name, cached.activation_dtype, views,
                                       augment, seed)
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
                          train_transform(spec), cached.activation_dtype, seed, device,
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
        blocks = family_of(spec).blocks(model)
        cut = cut_network(spec, model, lowest_trained(spec, model, blocks, k))
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

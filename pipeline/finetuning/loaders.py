"""The data a fine-tune reads: augmented training images, or their cached activations.

Training images go through :func:`train_transform` (the weights' recipe plus flips, shear and
zoom); evaluation images through the recipe alone. Where the frozen trunk's output is cached
(:mod:`pipeline.finetuning.activations`), the loaders serve those rows instead of images.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.transforms import InterpolationMode, v2

from pipeline.core import distributed
from pipeline.core.devices import default_workers
from pipeline.core.options import TrainingOptions
from pipeline.data.images import ImageFiles, ImageSet
from pipeline.finetuning.activations import (
    ActivationPlan,
    CachedActivations,
)
from pipeline.models.backbone_spec import BackboneSpec

__all__ = ["CachedLoaders", "ImageLoaders", "Loaders", "split_rows", "train_transform"]


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


class Loaders:
    """Train, val and test loaders over the images the cache could read.

    Items are ``(input, index, error, sha256, label)``; the training order is seeded per epoch
    (per rank under torchrun), so a resumed run sees the same batches as an uninterrupted one.
    """

    def __init__(self, rows: dict[str, np.ndarray], labels: np.ndarray,
                 training: TrainingOptions, device, workers, ctx: distributed.Context):
        self.rows, self.labels_of, self.training = rows, labels, training
        self.device, self.ctx = device, ctx
        self.workers = default_workers(ctx.local_world_size) if workers is None else workers

    def labels(self, split: str) -> np.ndarray:
        return self.labels_of[self.rows[split]]

    def train(self, epoch: int) -> torch.utils.data.DataLoader:
        data = self._train_data(epoch)
        if not self.ctx.distributed:
            generator = torch.Generator().manual_seed(self.training.seed * 100_003 + epoch)
            return self._loader(data, shuffle=True, generator=generator)
        # Each rank its share of one shuffle; padded with repeats to equal shares, so every
        # rank takes the same number of steps (DDP syncs gradients at each step).
        sampler = torch.utils.data.DistributedSampler(
            data, self.ctx.world_size, self.ctx.rank, shuffle=True, seed=self.training.seed)
        sampler.set_epoch(epoch)
        return self._loader(data, sampler=sampler)

    def eval(self, split: str) -> torch.utils.data.DataLoader:
        """This rank's images of ``split`` (all of them in a world of one), none repeated."""
        rows = self.rows[split]
        return self._loader(self._eval_data(rows[distributed.shard_indices(len(rows),
                                                                            self.ctx)]))

    def _loader(self, data, shuffle=False, generator=None, sampler=None):
        return torch.utils.data.DataLoader(
            data, batch_size=self.training.batch_size, shuffle=shuffle, generator=generator,
            sampler=sampler, num_workers=self.workers, pin_memory=self.device.type == "cuda",
            drop_last=False)


class ImageLoaders(Loaders):
    """Every epoch decodes the images and runs them through the whole network."""

    def __init__(self, images, spec, rows, training, device, workers, ctx):
        super().__init__(rows, images.labels, training, device, workers, ctx)
        crop = spec.preprocessing.crop
        shape = (3, crop, crop)
        train_tf = train_transform(spec) if training.augment == "standard" else None
        self.plain = ImageFiles(images, spec.preprocessing.transform(), shape)
        self.augmented = ImageFiles(images, train_tf or spec.preprocessing.transform(), shape)

    def _train_data(self, epoch: int):
        return _Labelled(self.augmented, self.rows["train"], self.labels_of)

    def _eval_data(self, rows: np.ndarray):
        return _Labelled(self.plain, rows, self.labels_of)


class CachedLoaders(Loaders):
    """Cached activations in the image loaders' order: with --augment none, the same batches."""

    def __init__(self, path: Path, plan: ActivationPlan, labels, rows, training, device, workers,
                 ctx):
        super().__init__(rows, labels, training, device, workers, ctx)
        self.path, self.plan = path, plan

    def _train_data(self, epoch: int):
        images = self.rows["train"]
        rows = images
        if self.plan.views:  # one cached view of each image per epoch, drawn with a seed
            draw = np.random.default_rng([self.training.seed, epoch]).integers(
                self.plan.views, size=len(images))
            rows = self.plan.view_rows(draw)
        return CachedActivations(self.path, rows, images, self.labels_of[images])

    def _eval_data(self, rows: np.ndarray):
        return CachedActivations(self.path, rows, rows, self.labels_of[rows])

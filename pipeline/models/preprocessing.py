"""Preprocessing: resize, centre crop and normalisation, as a weights' training recipe says."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Preprocessing:
    """Resize, centre crop and normalisation, as the weights' training recipe prescribes."""

    resize: int  # shorter side before cropping (224 / 0.875 = 256 in the classic recipe)
    crop: int  # square side the network sees
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str  # "bilinear" or "bicubic", as in the recipe

    def with_image_size(self, size: int) -> Preprocessing:
        """The same recipe at another input size, keeping the resize-to-crop ratio."""
        return replace(self, crop=size, resize=math.floor(size * self.resize / self.crop))

    def transform(self, normalize: bool = True):
        """The torchvision ``v2`` pipeline from a PIL image to a normalised float tensor.

        With ``normalize=False`` it stops after the crop, at an 8-bit tensor, and
        :meth:`normalize` finishes a whole batch of them: the same operations element by
        element, so the same numbers, at a quarter of the bytes to collate and to move to a
        GPU, and without a float pass per image in the thread that decodes.
        """
        import torch
        from torchvision.transforms import InterpolationMode, v2

        mode = InterpolationMode(self.interpolation)
        steps = [
            v2.PILToTensor(),
            v2.Resize(self.resize, interpolation=mode, antialias=True),
            v2.CenterCrop(self.crop),
        ]
        if normalize:
            steps += [v2.ToDtype(torch.float32, scale=True),
                      v2.Normalize(mean=list(self.mean), std=list(self.std))]
        return v2.Compose(steps)

    def normalize(self, batch):
        """A batch of 8-bit images from ``transform(normalize=False)`` as the network's input:
        scaled to [0, 1], then normalised, as the last two steps of :meth:`transform`."""
        import torch
        from torchvision.transforms.v2 import functional as F

        return F.normalize(F.to_dtype(batch, torch.float32, scale=True), list(self.mean),
                           list(self.std))

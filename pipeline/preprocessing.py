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

    def transform(self):
        """The torchvision ``v2`` pipeline from a PIL image to a normalised float tensor."""
        import torch
        from torchvision.transforms import InterpolationMode, v2

        mode = InterpolationMode(self.interpolation)
        return v2.Compose([
            v2.PILToTensor(),
            v2.Resize(self.resize, interpolation=mode, antialias=True),
            v2.CenterCrop(self.crop),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(self.mean), std=list(self.std)),
        ])

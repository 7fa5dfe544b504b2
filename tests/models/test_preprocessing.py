"""The recipe's preprocessing, whole per image or finished a batch at a time."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.models.preprocessing import Preprocessing

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _images() -> list[Image.Image]:
    """Shapes users have: a tiny grayscale digit, a wide photo, a tall one, a square."""
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).convert("RGB"),
            Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (97, 41, 3), dtype=np.uint8)),
            Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))]


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic"])
@pytest.mark.parametrize("size", [None, 48])
def test_a_batch_normalised_at_once_equals_each_image_normalised(interpolation, size):
    recipe = Preprocessing(256, 224, *IMAGENET, interpolation)
    if size is not None:
        recipe = recipe.with_image_size(size)
    crop = recipe.transform(normalize=False)
    whole = recipe.transform()
    crops = torch.stack([crop(image) for image in _images()])
    assert crops.dtype == torch.uint8 and crops.shape[1:] == (3, recipe.crop, recipe.crop)
    expected = torch.stack([whole(image) for image in _images()])
    got = recipe.normalize(crops)
    assert got.dtype == torch.float32
    assert torch.equal(got, expected)  # the same operations: the same bits


def test_normalising_scales_then_standardises_each_channel():
    recipe = Preprocessing(8, 8, (0.5, 0.25, 0.0), (0.5, 0.25, 1.0), "bilinear")
    batch = torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)
    got = recipe.normalize(batch)
    assert got[0, :, 0, 0].tolist() == [1.0, 3.0, 1.0]  # (1 - mean) / std per channel

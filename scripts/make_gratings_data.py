"""Write a set of noisy sinusoidal gratings, one class per orientation and frequency, as PNGs.

A data set far from ImageNet in a different way than Fashion-MNIST: no objects, only the
low-level structure (orientation, spatial frequency) that a CNN's early blocks detect and its
top blocks, specialised to ImageNet's classes, may pool away. ``pipeline advise`` and the
freeze-depth sweep were compared on it and on the demo (docs/advise.md).

Each image: a grating of its class's orientation and frequency with a random phase and
contrast, in random colours, under Gaussian noise. ``OUT/{train,val,test}/<class>/<i>.png``;
the same seed gives the same files.

Usage:
    python scripts/make_gratings_data.py [--out data/gratings] [--per-class 100] [--seed 0]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

ORIENTATIONS = (0, 45, 90, 135)  # degrees
FREQUENCIES = (3, 6)  # cycles across the image
SPLITS = {"train": 1.0, "val": 0.2, "test": 0.5}  # images per class, as shares of --per-class


def grating(rng: np.random.Generator, degrees: float, cycles: float, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] / size
    angle = np.deg2rad(degrees + rng.normal(0, 4))
    wave = np.sin(2 * np.pi * cycles * (xx * np.cos(angle) + yy * np.sin(angle))
                  + rng.uniform(0, 2 * np.pi))
    low, high = rng.uniform(0, 255, size=(2, 3))
    contrast = rng.uniform(0.4, 1.0)
    pixels = (low + (high - low) * (0.5 + 0.5 * contrast * wave[..., None]))
    return np.clip(pixels + rng.normal(0, 40, pixels.shape), 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/gratings"))
    parser.add_argument("--per-class", type=int, default=100, help="training images per class")
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    for split, share in SPLITS.items():
        for degrees in ORIENTATIONS:
            for cycles in FREQUENCIES:
                folder = args.out / split / f"o{degrees:03d}-f{cycles}"
                folder.mkdir(parents=True, exist_ok=True)
                for i in range(round(share * args.per_class)):
                    Image.fromarray(grating(rng, degrees, cycles, args.size)).save(
                        folder / f"{i:04d}.png")


if __name__ == "__main__":
    main()

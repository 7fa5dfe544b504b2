"""Render scikit-learn's handwritten digits (1,797 images of 8x8 pixels) as PNG files.

A second small set for the unlabelled-pool evidence (docs/unlabelled.md), unlike the demo's
clothes: ``OUT/{train,val,test}/<digit>/<index>.png``, each image scaled to 32x32 pixels
(nearest neighbour, grey levels 0-16 stretched to 0-255, white digits on black as in the
source). The split is a seeded stratified draw: 1,000 train, 200 val, the rest test.

Usage:
    python scripts/make_digits_data.py [--out data/digits]
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split


def make_digits(out: Path, seed: int = 0, train: int = 1000, val: int = 200) -> int:
    digits = load_digits()
    index = np.arange(len(digits.target))
    rest, train_idx = train_test_split(index, test_size=train, stratify=digits.target,
                                       random_state=seed)
    test_idx, val_idx = train_test_split(rest, test_size=val, stratify=digits.target[rest],
                                         random_state=seed)
    if out.exists():
        shutil.rmtree(out)
    for split, rows in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        for i in rows:
            folder = out / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            pixels = (digits.images[i] * (255 / 16)).round().astype(np.uint8)
            Image.fromarray(pixels).resize((32, 32), Image.NEAREST).save(folder / f"{i:04d}.png")
    return len(index)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("data/digits"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    print(f"wrote {make_digits(args.out, args.seed)} images to {args.out}")


if __name__ == "__main__":
    main()

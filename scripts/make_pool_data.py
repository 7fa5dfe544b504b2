"""Write a pool of Fashion-MNIST images that the demo does not hold, for self-training.

Reads Debian's ``dataset-fashion-mnist`` (as ``make_demo_data.py`` does) and writes ``N``
images of the official training set whose indices are in none of the demo's splits, as a flat
folder of unlabelled images ``OUT/train-<index>.png`` (``--labelled``: ``OUT/<class>/...``,
a labelled set whose labels ``pipeline heads --unlabelled`` ignores and only uses to score the
pseudo-labels). The same seed gives the same files.

Usage:
    python scripts/make_pool_data.py [--out data/fashion-mnist-pool] [--images 2000]
"""

from __future__ import annotations

import argparse
import re
import shutil
from pathlib import Path

import numpy as np
from make_demo_data import CLASS_NAMES, check_source, load_set
from PIL import Image


def demo_indices(demo: Path) -> set[int]:
    """Indices of the official training set that the demo's files carry in their names."""
    return {int(m.group(1)) for p in demo.rglob("train-*.png")
            if (m := re.fullmatch(r"train-(\d+)\.png", p.name))}


def make_pool(source: Path, demo: Path, out: Path, images: int, seed: int,
              labelled: bool) -> int:
    """Write the pool; the number of images written."""
    check_source(source)  # one line naming the Debian package where it is not installed
    pixels, labels = load_set(source, "train")
    taken = demo_indices(demo)
    free = np.array(sorted(set(range(len(labels))) - taken))
    chosen = np.sort(np.random.default_rng(seed).choice(free, images, replace=False))
    if out.exists():
        shutil.rmtree(out)
    for i in chosen:
        folder = out / CLASS_NAMES[labels[i]] if labelled else out
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels[i]).save(folder / f"train-{i:06d}.png")
    return len(chosen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, default=Path("/usr/share/datasets/fashion-mnist"))
    parser.add_argument("--demo", type=Path, default=Path("data/fashion-mnist-mini"))
    parser.add_argument("--out", type=Path, default=Path("data/fashion-mnist-pool"))
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--labelled", action="store_true",
                        help="class folders, whose labels only score the pseudo-labels")
    args = parser.parse_args()
    written = make_pool(args.source, args.demo, args.out, args.images, args.seed, args.labelled)
    print(f"wrote {written} images to {args.out}")


if __name__ == "__main__":
    main()

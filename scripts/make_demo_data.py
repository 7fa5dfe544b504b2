"""Write a small, stratified Fashion-MNIST subset as PNG files for demos and tests.

Reads the gzipped idx files shipped by Debian's ``dataset-fashion-mnist``
package and writes ``OUT/{train,val,test}/<class_name>/<name>.png``.
Train and val are disjoint draws from the official training set, test is
drawn from the official t10k test set. File names keep the source set and
original index (``train-012345.png``, ``t10k-00042.png``) so every image can
be traced back. The same seed always gives byte-identical files.

Usage:
    python scripts/make_demo_data.py [--out data/fashion-mnist-mini] [--seed 0]
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

# Official Fashion-MNIST labels 0..9, spelled as folder names.
CLASS_NAMES = (
    "t-shirt_top",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
SPLITS = ("train", "val", "test")
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "t10k": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Zero padding per source set, wide enough for its largest index.
INDEX_WIDTH = {"train": 6, "t10k": 5}
IDX_IMAGES_MAGIC = 0x00000803  # unsigned bytes, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # unsigned bytes, 1 dimension


def read_idx(path: Path, magic: int) -> np.ndarray:
    """Return the uint8 array stored in a gzipped idx file."""
    data = gzip.decompress(path.read_bytes())
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise SystemExit(
            f"error: {path}: bad idx magic {found:#010x}, expected {magic:#010x}"
        )
    ndim = magic & 0xFF
    shape = tuple(
        int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)
    )
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_set(source: Path, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Load images (N, 28, 28) and labels (N,) of one source set ("train" or "t10k")."""
    images_file, labels_file = IDX_FILES[name]
    images = read_idx(source / images_file, IDX_IMAGES_MAGIC)
    labels = read_idx(source / labels_file, IDX_LABELS_MAGIC)
    if len(images) != len(labels):
        raise SystemExit(
            f"error: {source}: {name} has {len(images)} images but {len(labels)} labels"
        )
    return images, labels


def check_source(source: Path) -> None:
    """Exit with one line naming the Debian package if any idx file is missing."""
    missing = [
        f for pair in IDX_FILES.values() for f in pair if not (source / f).is_file()
    ]
    if missing:
        raise SystemExit(
            f"error: Fashion-MNIST idx files not found in {source} "
            f"({', '.join(missing)}); "
            "install them with: apt-get install dataset-fashion-mnist"
        )


def sample_per_class(
    labels: np.ndarray, counts: tuple[int, ...], rng: np.random.Generator
) -> list[list[np.ndarray]]:
    """Draw disjoint index sets of the given sizes for every class.

    Returns ``result[label][k]``: the sorted indices for the k-th count.
    """
    result = []
    for label in range(len(CLASS_NAMES)):
        pool = np.flatnonzero(labels == label)
        if len(pool) < sum(counts):
            raise SystemExit(
                f"error: class {CLASS_NAMES[label]} has {len(pool)} images, "
                f"{sum(counts)} requested"
            )
        # One draw without replacement, then cut, keeps the parts disjoint.
        drawn = rng.choice(pool, size=sum(counts), replace=False)
        bounds = np.cumsum((0, *counts))
        result.append([np.sort(drawn[a:b]) for a, b in itertools.pairwise(bounds)])
    return result


def write_pngs(
    out_dir: Path, images: np.ndarray, indices: np.ndarray, set_name: str
) -> None:
    """Write the chosen images as grayscale PNGs named after their source index."""
    out_dir.mkdir(parents=True, exist_ok=True)
    width = INDEX_WIDTH[set_name]
    for index in indices:
        # A fresh image with no info dict: PIL then writes no text/time chunks,
        # so the bytes depend only on the pixels.
        Image.fromarray(images[index]).save(
            out_dir / f"{set_name}-{index:0{width}d}.png"
        )


def make_demo_data(
    source: Path, out: Path, n_train: int, n_val: int, n_test: int, seed: int
) -> int:
    """Build the subset under ``out`` and return the number of images written."""
    check_source(source)
    train_images, train_labels = load_set(source, "train")
    test_images, test_labels = load_set(source, "t10k")

    rng = np.random.default_rng(seed)
    train_val = sample_per_class(train_labels, (n_train, n_val), rng)
    test = sample_per_class(test_labels, (n_test,), rng)

    # Start from empty split folders so a rerun yields exactly the same tree.
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)

    for label, name in enumerate(CLASS_NAMES):
        write_pngs(out / "train" / name, train_images, train_val[label][0], "train")
        write_pngs(out / "val" / name, train_images, train_val[label][1], "train")
        write_pngs(out / "test" / name, test_images, test[label][0], "t10k")
    return len(CLASS_NAMES) * (n_train + n_val + n_test)


def parse_args() -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source",
        type=Path,
        default=Path("/usr/share/datasets/fashion-mnist"),
        help="folder with the gzipped idx files (default: %(default)s)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("data/fashion-mnist-mini"),
        help="output folder (default: %(default)s)",
    )
    parser.add_argument(
        "--train",
        type=int,
        default=100,
        help="train images per class (default: %(default)s)",
    )
    parser.add_argument(
        "--val",
        type=int,
        default=20,
        help="val images per class (default: %(default)s)",
    )
    parser.add_argument(
        "--test",
        type=int,
        default=50,
        help="test images per class (default: %(default)s)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed (default: %(default)s)"
    )
    args = parser.parse_args()
    if min(args.train, args.val, args.test) < 0:
        parser.error("--train, --val and --test must not be negative")
    return args


def main() -> None:
    """Entry point: build the subset and report how many images were written."""
    args = parse_args()
    written = make_demo_data(
        args.source, args.out, args.train, args.val, args.test, args.seed
    )
    print(f"wrote {written} images to {args.out}")


if __name__ == "__main__":
    main()

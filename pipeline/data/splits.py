"""Train, val and test: the splits a data set gives, and the ones carved out of its training images.

Given splits are never changed. A missing val or test split is carved out of the training
images (val first, then test), seeded and stratified: each class gives the same fraction of
its training images, at least one, and keeps at least one for training. The fractions are of
the training images as given (for a folder of classes: of all images), so a class folder and
a ``train/``-only folder with the same images get the same splits.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import DataError

SPLITS = ("train", "val", "test")


def check_fractions(fractions: tuple[float, float, float]) -> None:
    train, val, test = fractions
    if min(fractions) < 0 or not np.isclose(train + val + test, 1.0) or train == 0:
        raise DataError(f"split fractions {fractions} must be non-negative, sum to 1, "
                        "train > 0")


def assign_splits(labels: np.ndarray, classes: list[str], given: list[str] | None,
                  given_from: dict[str, str], fractions: tuple[float, float, float], seed: int
                  ) -> tuple[np.ndarray, dict[str, str]]:
    """Each image's split, and where each split came from.

    Parameters
    ----------
    labels, classes
        Class index of each image, and the class names.
    given
        Each image's given split, ``""`` where none was given; None when the data gives none.
    given_from
        For each given split, where it was given (``folder valid/``, ``split column``).
    fractions, seed
        Train/val/test fractions and seed for the splits that are carved.
    """
    check_fractions(fractions)
    given_arr = np.array(given if given is not None else [""] * len(labels), dtype=object)
    splits = np.where(given_arr == "", "train", given_arr).astype(object)
    pool = np.flatnonzero(splits == "train")
    if len(pool) == 0:
        raise DataError("no training images: give a train split (a train/ folder or 'train' "
                        "in the split column), or leave the split of some images empty")
    missing = [(s, f) for s, f in zip(SPLITS[1:], fractions[1:]) if s not in given_from]
    to_carve = [s for s, f in missing if f > 0]
    _check_class_sizes(labels[pool], classes, to_carve)
    sources = {s: f"given ({given_from[s]})" for s in SPLITS[1:] if s in given_from}
    counts = np.bincount(labels[pool], minlength=len(classes))
    for order, (split, fraction) in enumerate(missing):
        if fraction == 0:
            sources[split] = "none (its --split fraction is 0)"
            continue
        later = len(to_carve) - 1 - to_carve.index(split)
        rng = np.random.default_rng([seed, order])
        rows = _carve(labels, np.flatnonzero(splits == "train"), counts, fraction, later, rng)
        splits[rows] = split
        sources[split] = f"carved from train: {fraction:g} of each class, seed {seed}"
    sources["train"] = _train_source(given, given_from, to_carve)
    return splits.astype(str), {s: sources[s] for s in SPLITS}


def _check_class_sizes(pool_labels: np.ndarray, classes: list[str], to_carve: list[str]) -> None:
    if not to_carve:
        return
    counts = np.bincount(pool_labels, minlength=len(classes))
    small = [i for i, n in enumerate(counts) if 0 < n < 1 + len(to_carve)]
    if small:
        c = small[0]
        what = " and ".join(to_carve)
        raise DataError(
            f"class {classes[c]!r} has {counts[c]} training image(s): too few to carve {what} "
            f"out of (needs {1 + len(to_carve)}: one each, and one kept for training); add "
            f"images, give the {what} split(s) yourself, or set its split fraction to 0",
            cls=classes[c], images=int(counts[c]), splits=to_carve)


def _carve(labels: np.ndarray, pool: np.ndarray, counts: np.ndarray, fraction: float,
           later: int, rng: np.random.Generator) -> np.ndarray:
    """Rows of ``pool`` for one new split: per class, ``fraction`` of its training images
    (rounded, at least one), leaving one for each ``later`` split and one for training."""
    taken = []
    for c in np.unique(labels[pool]):
        members = pool[labels[pool] == c]
        want = max(1, round(fraction * counts[c]))
        taken.append(rng.permutation(members)[:min(want, len(members) - 1 - later)])
    return np.sort(np.concatenate(taken)) if taken else np.array([], np.int64)


def _train_source(given: list[str] | None, given_from: dict[str, str],
                  carved: list[str]) -> str:
    if given is None:
        base = "all images"
    else:
        parts = [f"given ({given_from['train']})"] if "train" in given_from else []
        if "" in given:
            parts.append("images with no split given")
        base = " and ".join(parts)
    return base + (f", minus the carved {' and '.join(carved)}" if carved else "")

"""Carving missing splits out of train: given splits kept, seeded, stratified, clear refusals."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import DataError
from pipeline.data.splits import assign_splits

CLASSES = ["a", "b", "c"]


def _labels(per_class=(20, 10, 5)) -> np.ndarray:
    return np.repeat(np.arange(len(per_class)), per_class)


def test_no_given_splits_carves_val_and_test_from_every_class():
    labels = _labels()
    splits, sources = assign_splits(labels, CLASSES, None, {}, (0.8, 0.1, 0.1), seed=0)
    for c, n in enumerate((20, 10, 5)):
        mine = splits[labels == c]
        # Each class gives round(0.1 * n), at least one, to val and to test.
        assert (mine == "val").sum() == (mine == "test").sum() == max(1, round(0.1 * n))
    assert sources["train"] == "all images, minus the carved val and test"


def test_given_splits_are_never_changed():
    labels = _labels()
    given = ["train"] * 25 + ["val"] * 5 + ["train"] * 5
    given[3], given[30] = "test", "test"
    splits, sources = assign_splits(labels, CLASSES, given, {"train": "t", "val": "v",
                                                              "test": "x"}, (0.8, 0.1, 0.1), 0)
    assert list(splits) == given
    assert sources == {"train": "given (t)", "val": "given (v)", "test": "given (x)"}


def test_only_missing_splits_are_carved_and_only_from_train():
    labels = _labels()
    given = ["train"] * 30 + ["val"] * 5
    splits, sources = assign_splits(labels, CLASSES, given, {"train": "folder train/",
                                                              "val": "folder val/"},
                                    (0.8, 0.1, 0.1), 0)
    assert (splits[30:] == "val").all()  # given val untouched
    assert set(splits[:30]) == {"train", "test"}
    assert sources["test"] == "carved from train: 0.1 of each class, seed 0"
    assert sources["train"] == "given (folder train/), minus the carved test"


def test_seeded_and_reproducible():
    labels = _labels()
    one, _ = assign_splits(labels, CLASSES, None, {}, (0.6, 0.2, 0.2), 1)
    again, _ = assign_splits(labels, CLASSES, None, {}, (0.6, 0.2, 0.2), 1)
    other, _ = assign_splits(labels, CLASSES, None, {}, (0.6, 0.2, 0.2), 2)
    assert (one == again).all() and (one != other).any()


def test_empty_split_cells_join_the_training_pool():
    labels = _labels((6, 6, 6))
    given = [""] * 15 + ["test"] * 3
    splits, sources = assign_splits(labels, CLASSES, given, {"test": "split column"},
                                    (0.8, 0.2, 0.0), 0)
    assert (splits[15:] == "test").all() and set(splits[:15]) == {"train", "val"}
    assert sources["train"] == "images with no split given, minus the carved val"


def test_zero_fraction_leaves_the_split_empty_and_says_so():
    splits, sources = assign_splits(_labels(), CLASSES, None, {}, (0.9, 0.0, 0.1), 0)
    assert "val" not in set(splits) and sources["val"].startswith("none")


def test_a_class_too_small_to_carve_is_one_clear_error():
    labels = _labels((10, 10, 2))
    with pytest.raises(DataError, match="class 'c' has 2 training image.*needs 3"):
        assign_splits(labels, CLASSES, None, {}, (0.8, 0.1, 0.1), 0)
    # Enough when only one split is carved: one for it, one kept for training.
    given = ["train"] * 22
    given[0] = given[10] = "val"
    splits, _ = assign_splits(labels, CLASSES, given, {"train": "t", "val": "v"},
                              (0.8, 0.1, 0.1), 0)
    assert sorted(splits[labels == 2]) == ["test", "train"]


def test_no_training_images_is_refused():
    with pytest.raises(DataError, match="no training images"):
        assign_splits(_labels((2, 2, 2)), CLASSES, ["val"] * 3 + ["test"] * 3,
                      {"val": "v", "test": "t"}, (0.8, 0.1, 0.1), 0)


@pytest.mark.parametrize("fractions", [(0.5, 0.6, -0.1), (0.0, 0.5, 0.5), (0.5, 0.2, 0.2)])
def test_bad_fractions(fractions):
    with pytest.raises(DataError, match="fractions"):
        assign_splits(_labels(), CLASSES, None, {}, fractions, 0)

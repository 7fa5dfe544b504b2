"""Test images that are also training or validation images, found by their stored hashes."""

from __future__ import annotations

import shutil

import h5py

from pipeline.store.cache import read_splits
from pipeline.store.leakage import leaked_test_images
from tests.conftest import extract_tiny, make_split_folder


def test_a_test_image_copied_from_train_or_val_is_flagged(tmp_path):
    root = make_split_folder(tmp_path / "d", {"train": 4, "val": 2, "test": 3})
    shutil.copy(root / "train" / "cat" / "001.png", root / "test" / "cat" / "900.png")
    shutil.copy(root / "val" / "dog" / "000.png", root / "test" / "dog" / "901.png")
    # Two identical test images leak nothing: neither was trained on.
    shutil.copy(root / "test" / "dog" / "002.png", root / "test" / "dog" / "902.png")
    path = extract_tiny(root, cache_dir=tmp_path / "c").cache_path
    paths, leaked = leaked_test_images(path)
    assert paths == read_splits(path)["test"].paths  # the order every stage scores them in
    assert sorted(p for p, flag in zip(paths, leaked) if flag) == [
        "test/cat/900.png", "test/dog/901.png"]


def test_a_cache_without_hashes_says_it_does_not_know(tmp_path):
    root = make_split_folder(tmp_path / "d", {"train": 3, "val": 1, "test": 2})
    path = extract_tiny(root, cache_dir=tmp_path / "c").cache_path
    with h5py.File(path, "a") as f:  # as a format-1 cache, written before hashes were stored
        del f["content_sha256"]
    paths, leaked = leaked_test_images(path)
    assert len(paths) == 4 and leaked is None

"""Data as people bring it: every layout, links, loops, odd names, other extensions."""

from __future__ import annotations

import os
import shutil

import pytest
from PIL import Image

from pipeline.core.errors import DataError
from pipeline.data.images import load_image_set
from pipeline.data.layouts import find_images, image_extensions, read_folder, read_manifest
from tests.conftest import make_folder, make_split_folder, write_image

NON_UTF8 = b"caf\xe9.png"  # Latin-1 bytes: not valid UTF-8


def test_split_folder_with_any_subset_of_splits(tmp_path):
    for counts, given in (({"train": 6, "val": 2}, {"train", "val"}),
                          ({"train": 6, "test": 2}, {"train", "test"}),
                          ({"train": 6}, {"train"})):
        root = make_split_folder(tmp_path / "-".join(counts), counts)
        listing = read_folder(root)
        assert set(listing.given) == given and set(listing.given_from) == given
        assert listing.names.count("cat") == listing.names.count("dog")


@pytest.mark.parametrize("alias", ["val", "valid", "validation", "Validation"])
def test_every_spelling_of_val(tmp_path, alias):
    root = make_split_folder(tmp_path / "d", {"train": 3, alias: 1})
    assert set(read_folder(root).given) == {"train", "val"}


def test_two_folders_for_one_split_is_a_data_error(tmp_path):
    root = make_split_folder(tmp_path / "d", {"train": 3, "val": 1, "valid": 1})
    with pytest.raises(DataError, match="two folders for the val split"):
        read_folder(root)


def test_flat_folder_is_an_unlabelled_set(tmp_path):
    for i in range(4):
        write_image(tmp_path / "flat" / f"{i}.jpg", i)
    (tmp_path / "flat" / "thumbs").mkdir()
    images = load_image_set(tmp_path / "flat")
    assert not images.labelled and images.classes == [] and len(images) == 4
    assert set(images.splits) == {""} and set(images.labels) == {-1}
    assert images.ignored == [("thumbs", "empty folder")]


def test_manifest_without_labels_is_unlabelled(tmp_path):
    for i in range(3):
        write_image(tmp_path / "img" / f"{i}.png", i)
    (tmp_path / "m.csv").write_text("path\nimg/0.png\nimg/1.png\nimg/2.png\n")
    images = load_image_set(tmp_path / "m.csv")
    assert not images.labelled and images.paths == ["img/0.png", "img/1.png", "img/2.png"]


def test_dangling_link_is_listed_as_an_image_and_fails_later(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=3)
    (root / "a" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    images = load_image_set(root, (1.0, 0.0, 0.0))
    assert "a/gone.png" in images.paths


def test_link_loop_is_followed_once_and_each_file_taken_once(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=3)
    (root / "a" / "up").symlink_to("..")  # a loop back to the root
    (root / "b" / "again.png").symlink_to(root / "a" / "000.png")  # a file reached twice
    images = load_image_set(root, (1.0, 0.0, 0.0))
    assert len(images) == 6 and len(set(images.paths)) == 6
    reasons = dict(images.ignored)
    assert reasons["a/up"].startswith("reached twice")
    assert reasons["b/again.png"] == "reached twice: the same file as a/000.png"


def test_a_link_between_splits_keeps_the_first_path(tmp_path):
    root = make_split_folder(tmp_path / "d", {"train": 3, "val": 1, "test": 1})
    (root / "test" / "cat" / "leak.png").symlink_to(root / "train" / "cat" / "000.png")
    images = load_image_set(root)
    assert "test/cat/leak.png" not in images.paths and "train/cat/000.png" in images.paths
    assert dict(images.ignored)["test/cat/leak.png"].startswith("reached twice")


def test_non_utf8_name_is_read_and_kept_losslessly(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=3)
    raw = os.fsencode(root / "a") + b"/" + NON_UTF8
    shutil.copy(root / "a" / "000.png", raw)
    images = load_image_set(root, (1.0, 0.0, 0.0))
    name = next(p for p in images.paths if p.startswith("a/caf"))
    assert os.fsencode(images.root / name) == raw


def test_every_pillow_extension_is_an_image_and_others_are_counted(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=2)
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "a" / "anim.gif")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "b" / "pic.WEBP")
    (root / "a" / "notes.txt").write_text("x")
    (root / "b" / "features.h5").write_bytes(b"\x89HDF\r\n")  # Pillow only identifies HDF5
    (root / "empty").mkdir()
    (root / "a" / ".DS_Store").write_bytes(b"")
    images = load_image_set(root, (1.0, 0.0, 0.0))
    assert {"a/anim.gif", "b/pic.WEBP"} <= set(images.paths)
    assert dict(images.ignored) == {"a/notes.txt": "other extension: .txt",
                                    "b/features.h5": "other extension: .h5",
                                    "empty": "empty class folder", "a/.DS_Store": "hidden"}
    assert {".gif", ".webp", ".tif", ".bmp"} <= image_extensions()


def test_fifo_is_not_read(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=2)
    os.mkfifo(root / "a" / "pipe.png")  # opening it would block forever
    images = load_image_set(root, (1.0, 0.0, 0.0))
    assert dict(images.ignored)["a/pipe.png"] == "not a regular file"


def test_images_beside_class_folders_are_ignored_with_why(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=2)
    write_image(root / "stray.png", 9)
    images = load_image_set(root, (1.0, 0.0, 0.0))
    assert dict(images.ignored)["stray.png"] == "outside the class folders"


def test_manifest_repeats_and_missing_files(tmp_path):
    write_image(tmp_path / "a.png", 1)
    write_image(tmp_path / "b.png", 2)
    (tmp_path / "m.csv").write_text("path,label\na.png,x\nb.png,y\n./a.png,x\nmissing.png,y\n")
    listing = read_manifest(tmp_path / "m.csv")
    assert listing.paths == ["a.png", "b.png", "missing.png"]  # missing: fails, listed, later
    assert listing.ignored == [("a.png", "listed again: line 4 repeats line 2")]


def test_find_images_for_predictions_walks_any_layout(tmp_path):
    root = make_split_folder(tmp_path / "d", {"train": 2, "test": 1})
    (root / "train" / "cat" / "loop").symlink_to(root)
    found = find_images(root).paths
    assert len(found) == 6 and found == sorted(found)


def test_no_images_says_how_many_other_files(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("x")
    with pytest.raises(DataError, match="no images found.*1 other file"):
        load_image_set(tmp_path / "d")


def test_split_sources_of_a_train_val_folder(tmp_path):
    root = make_split_folder(tmp_path / "d", {"train": 10, "val": 2})
    images = load_image_set(root, (0.8, 0.1, 0.1), seed=0)
    assert images.split_sources == {
        "train": "given (folder train/), minus the carved test",
        "val": "given (folder val/)",
        "test": "carved from train: 0.1 of each class, seed 0"}
    assert images.split_counts() == {"train": 18, "val": 4, "test": 2}
    assert all(p.startswith("val/") for p, s in zip(images.paths, images.splits) if s == "val")


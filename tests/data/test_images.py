"""Data sets, splits, manifests, fingerprints and robust image loading."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.errors import DataError
from pipeline.data.images import (
    ImageFiles,
    fingerprint_files,
    fingerprint_splits,
    load_image_set,
    load_rgb,
)
from tests.conftest import make_folder, write_image


def test_class_folder_gets_a_seeded_stratified_split(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=20)
    images = load_image_set(root, (0.6, 0.2, 0.2), seed=3)
    assert images.classes == ["a", "b"]
    assert len(images) == 40 and images.split_counts() == {"train": 24, "val": 8, "test": 8}
    for split in ("train", "val", "test"):  # stratified: each class equally in each split
        counts = np.bincount(images.labels[images.splits == split], minlength=2)
        assert counts[0] == counts[1]
    again = load_image_set(root, (0.6, 0.2, 0.2), seed=3)
    other = load_image_set(root, (0.6, 0.2, 0.2), seed=4)
    assert (again.splits == images.splits).all()
    assert (other.splits != images.splits).any()


def test_split_folders_are_kept_and_validation_alias_accepted(tmp_path):
    for split, n in (("train", 3), ("validation", 2), ("test", 1)):
        for name in ("x", "y"):
            for i in range(n):
                write_image(tmp_path / split / name / f"{i}.jpg", seed=i)
    images = load_image_set(tmp_path)
    assert images.split_sources == {"train": "given (folder train/)",
                                    "val": "given (folder validation/)",
                                    "test": "given (folder test/)"}
    assert images.split_counts() == {"train": 6, "val": 4, "test": 2}
    assert images.paths[0] == "train/x/0.jpg"


def test_manifest_paths_labels_and_splits(tmp_path):
    write_image(tmp_path / "imgs" / "a.png", 1)
    write_image(tmp_path / "imgs" / "b.png", 2)
    (tmp_path / "m.csv").write_text("path,label,split\nimgs/a.png,cat,train\nimgs/b.png,dog,test\n")
    images = load_image_set(tmp_path / "m.csv", (1.0, 0.0, 0.0))
    assert images.paths == ["imgs/a.png", "imgs/b.png"]
    assert images.classes == ["cat", "dog"] and list(images.splits) == ["train", "test"]
    assert images.split_sources["test"] == "given (split column)"
    assert images.split_sources["val"].startswith("none")


@pytest.mark.parametrize("body, message", [
    ("path,label\n../outside.png,cat\nimgs/a.png,dog\n", "outside the manifest's folder"),
    ("file,class\nimgs/a.png,cat\n", "needs a header"),
    ("path,label\nimgs/a.png,cat\nimgs/b.png,\n", "no label"),
    ("path,label,split\nimgs/a.png,cat,holdout\n", "must be one of train, val, test"),
])
def test_bad_manifests_say_what_is_wrong(tmp_path, body, message):
    write_image(tmp_path / "outside.png", 1)  # exists, but not under the manifest's folder
    write_image(tmp_path / "data" / "imgs" / "a.png", 2)
    csv = tmp_path / "data" / "m.csv"
    csv.write_text(body)
    with pytest.raises(DataError, match=message):
        load_image_set(csv)


def test_empty_single_class_and_missing_are_data_errors(tmp_path):
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images"):
        load_image_set(tmp_path / "empty")
    write_image(tmp_path / "one" / "only" / "0.png", 0)
    with pytest.raises(DataError, match="single class"):
        load_image_set(tmp_path / "one")
    with pytest.raises(DataError, match="no such file"):
        load_image_set(tmp_path / "nowhere")


def test_too_few_images_for_a_stratified_split_is_a_data_error(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=1)
    with pytest.raises(DataError, match="class 'a' has 1 training image.*too few to carve "
                                        "val and test"):
        load_image_set(root)


def test_fingerprint_changes_with_any_file_change(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=5)
    def fingerprint():
        return fingerprint_files(load_image_set(root, (1.0, 0.0, 0.0)))
    base = fingerprint()
    assert fingerprint() == base
    path = root / "a" / "000.png"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    touched = fingerprint()
    assert touched != base
    write_image(root / "b" / "new.png", 99)
    added = fingerprint()
    assert added not in (base, touched)
    (root / "b" / "new.png").unlink()
    assert fingerprint() == touched


def test_content_hash_ignores_touch_but_not_edits(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=3)
    def fingerprint():
        return fingerprint_files(load_image_set(root, (1.0, 0.0, 0.0)), hash_contents=True)
    base = fingerprint()
    path = root / "a" / "000.png"
    os.utime(path, ns=(0, 0))
    assert fingerprint() == base
    write_image(path, 12345)
    assert fingerprint() != base


def test_split_fingerprint_follows_the_split(tmp_path):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=10)
    one = fingerprint_splits(load_image_set(root, seed=0))
    assert one == fingerprint_splits(load_image_set(root, seed=0))
    assert one != fingerprint_splits(load_image_set(root, seed=1))


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


@pytest.mark.parametrize("mode", ["L", "P", "CMYK", "RGB"])
def test_modes_become_rgb(tmp_path, mode):
    img = Image.new("RGB", (5, 4), (10, 200, 30)).convert(mode)
    ext = "jpg" if mode == "CMYK" else "png"
    out = load_rgb(_save(img, tmp_path / f"x.{ext}"))
    assert out.mode == "RGB" and out.size == (5, 4)


def test_transparent_pixels_go_white(tmp_path):
    img = Image.new("RGBA", (2, 1), (255, 0, 0, 255))
    img.putpixel((1, 0), (0, 0, 255, 0))
    out = load_rgb(_save(img, tmp_path / "a.png"))
    assert out.getpixel((0, 0)) == (255, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)


def test_sixteen_bit_is_rescaled_not_clipped(tmp_path):
    wide = np.array([[0, 32896, 65535]], dtype=np.uint16)
    out = load_rgb(_save(Image.fromarray(wide), tmp_path / "w.png"))
    assert [out.getpixel((i, 0))[0] for i in range(3)] == [0, 128, 255]


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (20, 10), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    out = load_rgb(_save(img, tmp_path / "o.jpg", exif=exif))
    assert out.size == (10, 20)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = write_image(tmp_path / "big.png", 0, size=(100, 100))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)  # warning above 6000, error above 12000
    with pytest.raises((Image.DecompressionBombError, Image.DecompressionBombWarning)):
        load_rgb(path)


def test_unreadable_files_yield_zeros_and_a_reason(tmp_path):
    good = write_image(tmp_path / "a" / "good.png", 0)
    (tmp_path / "a" / "empty.png").write_bytes(b"")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "text.jpg").write_text("not an image")
    (tmp_path / "b" / "cut.png").write_bytes(good.read_bytes()[:200])
    images = load_image_set(tmp_path, (1.0, 0.0, 0.0))
    files = ImageFiles(images, lambda im: torch.ones(3, 4, 4), (3, 4, 4), hash_files=True)
    results = {images.paths[i]: files[i] for i in range(len(files))}
    assert results["a/good.png"][2] == ""
    assert results["a/good.png"][3] == hashlib.sha256(good.read_bytes()).hexdigest()
    unhashed = ImageFiles(images, lambda im: torch.ones(3, 4, 4), (3, 4, 4))
    assert unhashed[images.paths.index("a/good.png")][3] == ""  # fine-tuning epochs skip it
    for bad in ("a/empty.png", "b/text.jpg", "b/cut.png"):
        tensor, _, reason, digest = results[bad]
        assert reason and not tensor.any() and digest == ""

"""Image data sets: class folders, split folders, CSV manifests, splits and robust image loading."""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps
from sklearn.model_selection import train_test_split
from torchvision.datasets.folder import IMG_EXTENSIONS

from pipeline.errors import DataError

SPLITS = ("train", "val", "test")
# Keras users name the validation folder "validation"; accept the common spellings.
_SPLIT_ALIASES = {
    "train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
}
_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class ImageSet:
    """A labelled image data set with its train/val/test assignment.

    Paths are POSIX, relative to ``root``; ``labels`` index into ``classes``; ``splits`` holds
    one of :data:`SPLITS` per image. ``split_source`` says where the split came from.
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    splits: np.ndarray
    split_source: str

    def __len__(self) -> int:
        return len(self.paths)

    def absolute(self, i: int) -> Path:
        return self.root / self.paths[i]

    def split_counts(self) -> dict[str, int]:
        return {s: int((self.splits == s).sum()) for s in SPLITS}


def load_image_set(
    source: str | os.PathLike,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> ImageSet:
    """Read an image folder, a split folder or a CSV manifest.

    Parameters
    ----------
    source
        ``root/<class>/<image>``; ``root/{train,val,test}/<class>/<image>``; or a CSV file with
        columns ``path,label[,split]`` whose paths are relative to the CSV's folder.
    split_fractions
        Train/val/test fractions for a seeded stratified split, used only when the source gives
        no split of its own.
    seed
        Seed of that split.
    """
    source = Path(source)
    if not source.exists():
        raise DataError(f"{source}: no such file or folder")
    if source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{source}: expected an image folder or a .csv manifest")
        paths, names, given = _read_manifest(source)
        root = source.parent
    else:
        root = source
        paths, names, given = _scan_folder(source)
    if not paths:
        raise DataError(f"{source}: no images found (extensions: {', '.join(IMG_EXTENSIONS)})")
    classes = sorted(set(names))
    if len(classes) < 2:
        raise DataError(f"{source}: found a single class ({classes[0]!r}); a classifier needs two")
    labels = np.array([classes.index(n) for n in names], dtype=np.int64)
    if given is not None:
        splits, split_source = np.array(given, dtype=object), "given"
    else:
        splits = _stratified_split(labels, split_fractions, seed)
        split_source = f"stratified fractions={list(split_fractions)} seed={seed}"
    return ImageSet(root.resolve(), paths, labels, classes, splits.astype(str), split_source)


def is_image_file(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _class_images(class_dir: Path, root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(class_dir, followlinks=True):
        dirnames.sort()
        base = Path(dirpath).relative_to(root)
        found += [(base / f).as_posix() for f in sorted(filenames) if is_image_file(f)]
    return found


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _scan_folder(root: Path) -> tuple[list[str], list[str], list[str] | None]:
    split_dirs = {_SPLIT_ALIASES[d.name.lower()]: d for d in _subdirs(root)
                  if d.name.lower() in _SPLIT_ALIASES}
    paths: list[str] = []
    names: list[str] = []
    if not split_dirs:
        for class_dir in _subdirs(root):
            found = _class_images(class_dir, root)
            paths += found
            names += [class_dir.name] * len(found)
        return paths, names, None
    if "train" not in split_dirs:
        raise DataError(f"{root}: split folders {sorted(split_dirs)} found but no train/ folder")
    given: list[str] = []
    for split in SPLITS:
        for class_dir in _subdirs(split_dirs[split]) if split in split_dirs else []:
            found = _class_images(class_dir, root)
            paths += found
            names += [class_dir.name] * len(found)
            given += [split] * len(found)
    return paths, names, given


def _read_manifest(csv_path: Path) -> tuple[list[str], list[str], list[str] | None]:
    folder = csv_path.parent.resolve()
    with open(csv_path, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        columns = set(reader.fieldnames or [])
        if not {"path", "label"} <= columns:
            raise DataError(f"{csv_path}: needs a header with columns path,label[,split]")
        rows = list(reader)
    paths, names, given = [], [], []
    for line, row in enumerate(rows, start=2):
        rel = (row.get("path") or "").strip()
        target = (folder / rel).resolve()
        if not rel or not target.is_relative_to(folder):
            raise DataError(f"{csv_path}:{line}: path {rel!r} lies outside the manifest's folder")
        if not target.is_file():
            raise DataError(f"{csv_path}:{line}: {rel} does not exist")
        paths.append(target.relative_to(folder).as_posix())
        names.append((row.get("label") or "").strip())
        if "split" in columns:
            split = _SPLIT_ALIASES.get((row.get("split") or "").strip().lower())
            if split is None:
                raise DataError(f"{csv_path}:{line}: split must be one of {', '.join(SPLITS)}")
            given.append(split)
    return paths, names, given if "split" in columns else None


def _stratified_split(labels: np.ndarray, fractions: tuple[float, float, float],
                      seed: int) -> np.ndarray:
    train, val, test = fractions
    if min(fractions) < 0 or not np.isclose(train + val + test, 1.0) or train == 0:
        raise DataError(f"split fractions {fractions} must be non-negative, sum to 1, train > 0")
    index = np.arange(len(labels))
    splits = np.full(len(labels), "train", dtype=object)
    try:
        rest = index
        if test > 0:
            rest, test_idx = train_test_split(index, test_size=test, stratify=labels,
                                              random_state=seed)
            splits[test_idx] = "test"
        if val > 0:
            _, val_idx = train_test_split(rest, test_size=val / (train + val),
                                          stratify=labels[rest], random_state=seed)
            splits[val_idx] = "val"
    except ValueError as err:
        raise DataError(f"cannot make a stratified {fractions} split: {err}; "
                        "add images or give the splits as folders or a CSV column") from None
    return splits


def fingerprint_files(image_set: ImageSet, hash_contents: bool = False,
                      stamps: Sequence[str] | None = None) -> str:
    """SHA-256 over every file's relative path and either (size, mtime) or its content hash.

    Adding, removing, renaming or modifying one image changes the fingerprint, so a cache keyed
    by it is never served stale. ``stamps`` (from :func:`file_stamps`, in image order) may be
    given when they were computed elsewhere, such as by several processes sharing the work.
    """
    stamps = file_stamps(image_set, hash_contents) if stamps is None else stamps
    digest = hashlib.sha256()
    for rel, stamp in zip(image_set.paths, stamps, strict=True):
        digest.update(f"{rel}\t{stamp}\n".encode())
    return digest.hexdigest()


def file_stamps(image_set: ImageSet, hash_contents: bool = False,
                indices: Sequence[int] | None = None) -> list[str]:
    """What identifies each file's contents: ``size:mtime_ns``, or its SHA-256."""
    indices = range(len(image_set)) if indices is None else indices
    stamps = []
    for i in indices:
        path = image_set.absolute(i)
        if hash_contents:
            stamps.append(file_sha256(path))
        else:
            st = path.stat()
            stamps.append(f"{st.st_size}:{st.st_mtime_ns}")
    return stamps


def fingerprint_splits(image_set: ImageSet) -> str:
    """SHA-256 over the class names and each image's label and split."""
    digest = hashlib.sha256("\t".join(image_set.classes).encode() + b"\n")
    for rel, label, split in zip(image_set.paths, image_set.labels, image_set.splits):
        digest.update(f"{rel}\t{label}\t{split}\n".encode())
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image as 8-bit RGB with its EXIF orientation applied.

    Raises ``OSError`` or ``ValueError`` for truncated, empty or non-image files and
    ``Image.DecompressionBombError`` for images above Pillow's pixel limit (its warning, for
    images above half the limit, is raised as an error too, so a bomb never gets decoded).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as img:
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's own convert() clips 16-bit values at 255 instead of rescaling them.
        wide = np.asarray(img, dtype=np.uint32)
        return Image.fromarray((wide // 257).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels carry arbitrary colours; put the image on white as viewers do.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


class ImageFiles(torch.utils.data.Dataset):
    """Images of an :class:`ImageSet` as preprocessed tensors, never raising on a bad file.

    Each item is ``(tensor, index, error)``: ``error`` is ``""`` for a good image; for an
    unreadable one it says why and the tensor is zeros, so one bad file cannot stop a run.
    """

    def __init__(self, image_set: ImageSet, transform, image_shape: tuple[int, int, int]):
        self.image_set = image_set
        self.transform = transform
        self.image_shape = image_shape

    def __len__(self) -> int:
        return len(self.image_set)

    def __getitem__(self, i: int):
        try:
            return self.transform(load_rgb(self.image_set.absolute(i))), i, ""
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as err:
            reason = f"{type(err).__name__}: {err}".splitlines()[0]
            return torch.zeros(self.image_shape), i, reason

"""Image data sets: class folders, split folders, CSV manifests, splits and robust image loading."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from pipeline.core.errors import DataError
from pipeline.data.decode import decode_image
from pipeline.data.layouts import Listing, as_bytes, display, read_folder, read_manifest
from pipeline.data.shards import container, image_bytes, read_shards, shard_files
from pipeline.data.splits import SPLITS, assign_splits, check_fractions

_HASH_BLOCK = 1 << 20


@dataclass(frozen=True)
class ImageSet:
    """An image data set: labelled with its train/val/test assignment, or unlabelled.

    Paths are POSIX, relative to ``root`` (bytes that are not UTF-8 kept as surrogate escapes,
    as ``os.fsdecode`` gives them, so every name round-trips); ``labels`` index into
    ``classes``; ``splits`` holds one of :data:`SPLITS` per image. An unlabelled set has no
    classes, labels -1 and splits "". ``split_sources`` says where each split came from;
    ``ignored`` lists the files and folders that were not taken, with why.
    """

    root: Path
    paths: list[str]
    labels: np.ndarray
    classes: list[str]
    splits: np.ndarray
    split_sources: dict[str, str]
    ignored: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def absolute(self, i: int) -> Path:
        return self.root / self.paths[i]

    def split_counts(self) -> dict[str, int]:
        return {s: int((self.splits == s).sum()) for s in SPLITS}


def load_image_set(
    source: str | os.PathLike,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
) -> ImageSet:
    """Read a class folder, a split folder, a flat folder, a CSV manifest or shard files.

    Parameters
    ----------
    source
        ``root/<class>/<image>``; ``root/{train,val,test}/<class>/<image>`` with any of the
        splits (``val`` also spelled ``valid`` or ``validation``); a folder of images without
        class folders (an unlabelled set); or a CSV file with a header ``path[,label][,split]``
        whose paths are relative to the CSV's folder; or Parquet, Arrow or WebDataset tar
        files: one, a folder of them, or a brace pattern (see :mod:`pipeline.data.shards`).
    split_fractions
        Train/val/test fractions of the training images for the splits the source does not
        give (see :mod:`pipeline.data.splits`).
    seed
        Seed of those splits.
    """
    check_fractions(split_fractions)
    listing = _shards(source)
    source = Path(source)
    if listing is not None:
        listing, root = listing
    elif not source.exists():
        raise DataError(f"{display(str(source))}: no such file or folder")
    elif source.is_file():
        if source.suffix.lower() != ".csv":
            raise DataError(f"{display(str(source))}: expected an image folder or a .csv "
                            "manifest")
        listing, root = read_manifest(source), source.parent
    else:
        listing, root = read_folder(source), source
        if not listing.paths and (found := shard_files(source)):  # a folder of shards
            listing, root = read_shards(*found, root=source)
    if not listing.paths:
        raise DataError(f"{display(str(source))}: no images found (files with an extension "
                        f"that Pillow opens, such as .jpg, .png, .gif, .webp, .tif); "
                        f"{len(listing.ignored)} other file(s) or folder(s) ignored")
    if listing.names is None:
        n = len(listing.paths)
        return ImageSet(root.resolve(), listing.paths, np.full(n, -1, np.int64), [],
                        np.full(n, "", dtype=object).astype(str), {}, listing.ignored)
    return _labelled(source, root, listing, split_fractions, seed)


def _shards(source: str | os.PathLike) -> tuple[Listing, Path] | None:
    """A shard file or pattern's listing (a folder of shards is read when it has no image)."""
    if Path(source).is_dir():
        return None
    found = shard_files(source)
    return read_shards(*found) if found else None


def _labelled(source: Path, root: Path, listing: Listing,
              fractions: tuple[float, float, float], seed: int) -> ImageSet:
    classes = listing.classes or sorted(set(listing.names))
    if len(classes) < 2:
        raise DataError(f"{display(str(source))}: found a single class ({classes[0]!r}); a "
                        "classifier needs two (a folder without class folders is read as "
                        "unlabelled images)")
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[n] for n in listing.names], dtype=np.int64)
    splits, sources = assign_splits(labels, classes, listing.given, listing.given_from,
                                    fractions, seed)
    return ImageSet(root.resolve(), listing.paths, labels, classes, splits, sources,
                    listing.ignored)


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
        digest.update(as_bytes(f"{rel}\t{stamp}\n"))
    return digest.hexdigest()


def file_stamps(image_set: ImageSet, hash_contents: bool = False,
                indices: Sequence[int] | None = None) -> list[str]:
    """What identifies each file's contents: ``size:mtime_ns``, or its SHA-256."""
    indices = range(len(image_set)) if indices is None else indices
    root = os.fspath(image_set.root)
    stamps, shards = [], {}
    for i in indices:
        path = os.path.join(root, image_set.paths[i])  # str, not Path: once per file
        if "#" in path:  # an image inside a shard: the shard's stamp, computed once
            path = container(path)
            if path not in shards:
                shards[path] = _stamp(path, hash_contents)
            stamps.append(shards[path])
        else:
            stamps.append(_stamp(path, hash_contents))
    return stamps


def _stamp(path: str, hash_contents: bool) -> str:
    try:
        if hash_contents:
            return file_sha256(path)
        st = os.stat(path)
        return f"{st.st_size}:{st.st_mtime_ns}"
    except OSError as err:  # a dangling link or unreadable file: it fails, listed, later
        return f"unreadable:{type(err).__name__}"


def fingerprint_splits(image_set: ImageSet) -> str:
    """SHA-256 over the class names and each image's label and split."""
    digest = hashlib.sha256(as_bytes("\t".join(image_set.classes)) + b"\n")
    for rel, label, split in zip(image_set.paths, image_set.labels, image_set.splits):
        digest.update(as_bytes(f"{rel}\t{label}\t{split}\n"))
    return digest.hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def load_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode an image as 8-bit RGB with its EXIF orientation applied (see :func:`read_image`)."""
    return read_image(path)[0]


def read_image(path: str | os.PathLike, hash_file: bool = True, *, resize: int | None = None,
               interpolation: str = "bilinear", decode: str = "exact"
               ) -> tuple[Image.Image, str]:
    """Decode an image as 8-bit RGB with its EXIF orientation applied, and hash its bytes.

    ``path`` is a file or an address inside a shard (``train.parquet#12``).

    The file is read once: its SHA-256 (which finds the same picture stored twice) comes from
    the bytes that are decoded. ``resize``, ``interpolation`` and ``decode`` are
    :func:`pipeline.data.decode.decode_image`'s (by default every pixel, whatever the
    format). Raises ``OSError`` or ``ValueError`` for missing, truncated, empty or non-image
    files and ``Image.DecompressionBombError`` for images above Pillow's pixel limit (its
    warning, for images above half the limit, is raised as an error too, so a bomb never
    gets decoded).
    """
    data = image_bytes(path)  # a file, or an image inside a shard (pipeline.data.shards)
    image = decode_image(data, resize=resize, interpolation=interpolation, mode=decode)
    return image, hashlib.sha256(data).hexdigest() if hash_file else ""


def unreadable_reason(path: Path, err: Exception) -> str:
    """Why an image could not be read, in one line and without repeating its path."""
    if isinstance(err, FileNotFoundError) and path.is_symlink():
        return f"dangling link (to {display(os.readlink(path))})"
    if isinstance(err, UnidentifiedImageError):  # its message names the in-memory buffer
        return f"{type(err).__name__}: not an image that Pillow can decode"
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{type(err).__name__}: {err.strerror}"
    return display(f"{type(err).__name__}: {err}".splitlines()[0])


class ImageFiles:
    """Images of an :class:`ImageSet` as preprocessed tensors, never raising on a bad file.

    A map-style dataset for ``torch.utils.data.DataLoader`` (which needs only ``__len__`` and
    ``__getitem__``): not a subclass, so listing a data set never imports torch.

    Each item is ``(tensor, index, error, sha256)``: ``error`` is ``""`` for a good image;
    for an unreadable one it says why and the tensor is zeros, so one bad file cannot stop a
    run. ``sha256`` is the file's hash with ``hash_files`` (extraction records it once), else
    ``""``: a fine-tuning epoch that reads every image again has no use for it. ``dtype`` is
    the transform's output dtype ("uint8" for images normalised later, a batch at a time), so
    that a placeholder collates with the good images. ``recipe`` (a ``Preprocessing``: its
    ``resize`` and ``interpolation``) and ``decode`` say how images are decoded
    (:func:`pipeline.data.decode.decode_image`); without a recipe, every pixel. ``early``
    (:class:`pipeline.data.early.EarlyDecodes`, made with :meth:`read_settings`) holds the
    first images decoded by a helper process while this one started.
    """

    def __init__(self, image_set: ImageSet, transform, image_shape: tuple[int, int, int],
                 hash_files: bool = False, dtype: str = "float32", recipe=None,
                 decode: str = "exact", early=None):
        self.image_set = image_set
        self.transform = transform
        self.image_shape = image_shape
        self.hash_files = hash_files
        self.dtype = dtype
        self.decoding = ({} if recipe is None else
                         {"resize": recipe.resize, "interpolation": recipe.interpolation,
                          "decode": decode})
        if early is not None and early.decoding != self.read_settings():
            raise ValueError("early decodes were made with other settings: "
                             f"{early.decoding} against {self.read_settings()}")
        self.early = early

    def read_settings(self) -> dict:
        """:func:`read_image`'s keywords for these images."""
        return {"hash_file": self.hash_files, **self.decoding}

    def __len__(self) -> int:
        return len(self.image_set)

    def preprocess(self, image: Image.Image, i: int):
        """Image ``i`` as the network's input (a subclass may use ``i``, to seed it say)."""
        return self.transform(image)

    def __getitem__(self, i: int):
        path = self.image_set.absolute(i)
        try:
            early = self.early.take(i) if self.early is not None else None
            image, digest = early or read_image(path, **self.read_settings())
            return self.preprocess(image, i), i, "", digest
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
                Image.DecompressionBombWarning) as err:
            import torch

            placeholder = torch.zeros(self.image_shape, dtype=getattr(torch, self.dtype))
            return placeholder, i, unreadable_reason(path, err), ""

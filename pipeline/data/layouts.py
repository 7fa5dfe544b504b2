"""Reading a data set as people bring it: class folders, split folders, flat folders, manifests.

Each reader returns a :class:`Listing`: the image files (paths relative to the root, each file
once), their class names and given splits when the layout has them, and everything that was
not taken, with why. Nothing here decodes an image; files that cannot be read (a dangling link,
a truncated file) are listed as images and fail, listed, when they are decoded.
"""

from __future__ import annotations

import csv
import os
import stat
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from PIL import Image, ImageFile

from pipeline.core.errors import DataError

SPLITS = ("train", "val", "test")
# Keras users name the validation folder "validation", Kaggle's data sets "valid".
SPLIT_ALIASES = {
    "train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test",
}


@cache
def image_extensions() -> frozenset[str]:
    """Every file extension that Pillow can open, lower case with the dot.

    Pillow's stub formats (HDF5, GRIB, BUFR, WMF) only identify a file and need a handler to
    decode it: a ``features.h5`` beside the images is not an image.
    """
    Image.init()
    stubs = {fmt for fmt, (cls, _) in Image.OPEN.items()
             if isinstance(cls, type) and issubclass(cls, ImageFile.StubImageFile)}
    return frozenset(ext for ext, fmt in Image.registered_extensions().items()
                     if fmt in Image.OPEN and fmt not in stubs)


def is_image_name(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in image_extensions()


def as_bytes(name: str) -> bytes:
    """A name as the bytes it has on disk (``os.fsdecode``'s surrogate escapes undone)."""
    return name.encode("utf-8", "surrogateescape")


def display(path: str) -> str:
    """A name for messages and text files: bytes that are not UTF-8 shown as ``\\xNN``."""
    return as_bytes(path).decode("utf-8", "backslashreplace")


@dataclass
class Listing:
    """What a reader found: ``names`` and ``given`` are None when the layout has none."""

    paths: list[str] = field(default_factory=list)
    names: list[str] | None = None  # class name of each image
    given: list[str] | None = None  # "train", "val", "test", or "" (not given) per image
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, why it was not taken)
    given_from: dict[str, str] = field(default_factory=dict)  # split -> where it was given
    classes: list[str] | None = None  # class order the data gives (else sorted by name)


class _Walk:
    """One pass over a folder tree: links followed, every file and folder entered once.

    A file reached again (through a link, or a hard link) is taken under its first path only;
    a folder reached again (a link back up the tree) is not entered, so loops end.
    """

    def __init__(self, root: Path, listing: Listing):
        self.root, self.listing = root, listing
        self.files: dict[tuple[int, int], str] = {}
        self.folders: set[tuple[int, int]] = set()

    def rel(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()

    def ignore(self, path: Path, why: str) -> None:
        self.listing.ignored.append((self.rel(path) or ".", why))

    def enter(self, folder: Path) -> bool:
        """True the first time ``folder`` (followed through links) is reached."""
        try:
            st = folder.stat()
        except OSError as err:
            self.ignore(folder, f"unreadable folder: {err.strerror}")
            return False
        if (st.st_dev, st.st_ino) in self.folders:
            self.ignore(folder, "reached twice: a link to a folder already read")
            return False
        self.folders.add((st.st_dev, st.st_ino))
        return True

    def take(self, path: Path, listed: bool = False) -> str | None:
        """``path``'s relative name if it is an image to read, else None (and why, listed).

        A ``listed`` file (a manifest names it) is an image whatever its name.
        """
        return self._take(os.fspath(path), self.rel(path), listed)

    def _take(self, full: str, rel: str, listed: bool = False) -> str | None:
        # Plain strings, not Path objects: a walk calls this once per file of the data set.
        name = rel.rpartition("/")[2]
        suffix = os.path.splitext(name)[1].lower()
        if not listed and name.startswith("."):
            self.listing.ignored.append((rel, "hidden"))
            return None
        if not listed and suffix not in image_extensions():
            self.listing.ignored.append((rel, f"other extension: {suffix or '(none)'}"))
            return None
        try:
            st = os.stat(full)
        except OSError:  # a dangling link: listed as an image, it fails with its reason
            return rel
        if not stat.S_ISREG(st.st_mode):  # a FIFO would block the reader forever
            self.listing.ignored.append((rel, "not a regular file"))
            return None
        first = self.files.setdefault((st.st_dev, st.st_ino), rel)
        if first != rel:
            self.listing.ignored.append((rel, f"reached twice: the same file as {first}"))
            return None
        return rel

    def images(self, folder: Path) -> list[str] | None:
        """Images under ``folder``, sorted, recursively; None if the folder was not entered."""
        if not self.enter(folder):
            return None
        found = []
        for dirpath, dirnames, filenames in os.walk(folder, followlinks=True,
                                                     onerror=self._unlistable):
            here = Path(dirpath)
            dirnames[:] = [d for d in sorted(dirnames) if self._visible(here / d)
                           and self.enter(here / d)]
            base = self.rel(here)
            found += [rel for name in sorted(filenames)
                      if (rel := self._take(os.path.join(dirpath, name),
                                            name if base == "." else f"{base}/{name}"))]
        return found

    def _visible(self, folder: Path) -> bool:
        if folder.name.startswith("."):
            self.ignore(folder, "hidden")
            return False
        return True

    def _unlistable(self, err: OSError) -> None:
        self.ignore(Path(err.filename), f"unreadable folder: {err.strerror}")

    def entries(self, folder: Path) -> tuple[list[Path], list[Path]]:
        """Visible sub-folders and files directly in ``folder``, sorted."""
        try:
            children = sorted(folder.iterdir())
        except OSError as err:
            raise DataError(f"{display(str(folder))}: cannot list it ({err.strerror})") from None
        folders = [p for p in children if p.is_dir() and self._visible(p)]
        return folders, [p for p in children if not p.is_dir()]


def read_folder(root: Path) -> Listing:
    """A split folder, a class folder, or a flat folder of unlabelled images."""
    listing = Listing()
    walk = _Walk(root, listing)
    walk.enter(root)
    folders, files = walk.entries(root)
    splits: dict[str, Path] = {}
    for folder in folders:
        split = SPLIT_ALIASES.get(folder.name.lower())
        if split in splits:
            raise DataError(f"{display(str(root))}: two folders for the {split} split: "
                            f"{splits[split].name}/ and {folder.name}/; keep one")
        if split:
            splits[split] = folder
    if splits:
        _read_splits(walk, splits, [f for f in folders if f not in splits.values()], files)
    else:
        _read_classes(walk, root, folders, files)
    return listing


def _read_splits(walk: _Walk, splits: dict[str, Path], others: list[Path],
                 files: list[Path]) -> None:
    listing = walk.listing
    listing.names, listing.given = [], []
    for path in others + files:
        walk.ignore(path, "outside the split folders")
    for split in SPLITS:
        if split not in splits or not walk.enter(splits[split]):
            continue
        listing.given_from[split] = f"folder {splits[split].name}/"
        classes, loose = walk.entries(splits[split])
        for path in loose:
            walk.ignore(path, "outside the class folders")
        for folder in classes:
            found = _class_images(walk, folder)
            listing.paths += found
            listing.names += [folder.name] * len(found)
            listing.given += [split] * len(found)


def _read_classes(walk: _Walk, root: Path, folders: list[Path], files: list[Path]) -> None:
    listing = walk.listing
    by_class = [(folder, _class_images(walk, folder)) for folder in folders]
    loose = [rel for path in files if (rel := walk.take(path))]
    if any(found for _, found in by_class):
        listing.names = []
        for folder, found in by_class:
            listing.paths += found
            listing.names += [folder.name] * len(found)
        for rel in loose:
            listing.ignored.append((rel, "outside the class folders"))
    else:  # no class folder holds an image: a flat folder of unlabelled images
        listing.paths = loose
        listing.ignored = [(p, "empty folder" if why == "empty class folder" else why)
                           for p, why in listing.ignored]


def _class_images(walk: _Walk, folder: Path) -> list[str]:
    found = walk.images(folder)
    if found == []:
        walk.ignore(folder, "empty class folder")
    return found or []


def find_images(folder: Path) -> Listing:
    """Every image under ``folder``, whatever its layout, each file once (for predictions)."""
    listing = Listing()
    listing.paths = _Walk(folder, listing).images(folder) or []
    return listing


def read_manifest(csv_path: Path) -> Listing:
    """A CSV file ``path[,label][,split]``, paths relative to its folder and never outside.

    Without a label column (or with every label empty) the images are unlabelled; an empty
    split cell leaves that image's split to be carved like a train image's.
    """
    folder = csv_path.parent.resolve()
    rows, columns = _csv_rows(csv_path)
    labelled = "label" in columns and any((r.get("label") or "").strip() for _, r in rows)
    listing = Listing(names=[] if labelled else None,
                      given=[] if labelled and "split" in columns else None)
    walk = _Walk(folder, listing)
    listed: dict[str, int] = {}
    for line, row in rows:
        rel = _manifest_path(csv_path, folder, line, row)
        if rel in listed:
            listing.ignored.append((rel, f"listed again: line {line} repeats line {listed[rel]}"))
            continue
        listed[rel] = line
        if walk.take(folder / rel, listed=True) is None:
            continue
        listing.paths.append(rel)
        if labelled:
            listing.names.append(_manifest_label(csv_path, line, row))
        if listing.given is not None:
            listing.given.append(_manifest_split(csv_path, line, row))
    if listing.given is not None:
        listing.given_from = {s: "split column" for s in set(listing.given) - {""}}
    return listing


def _csv_rows(csv_path: Path) -> tuple[list[tuple[int, dict]], set[str]]:
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            columns = {c.strip().lower() for c in reader.fieldnames or []}
            rows = [(line, {k.strip().lower(): v for k, v in row.items() if k})
                    for line, row in enumerate(reader, start=2)]
    except UnicodeDecodeError:
        raise DataError(f"{display(str(csv_path))}: not UTF-8 text; save the manifest as "
                        "UTF-8") from None
    if "path" not in columns:
        raise DataError(f"{display(str(csv_path))}: needs a header with columns "
                        "path[,label][,split]")
    return rows, columns


def _manifest_path(csv_path: Path, folder: Path, line: int, row: dict) -> str:
    rel = (row.get("path") or "").strip()
    target = Path(os.path.normpath(folder / rel))
    if not rel or not target.is_relative_to(folder) or target == folder:
        raise DataError(f"{display(str(csv_path))}:{line}: path {rel!r} lies outside the "
                        "manifest's folder")
    return target.relative_to(folder).as_posix()


def _manifest_label(csv_path: Path, line: int, row: dict) -> str:
    label = (row.get("label") or "").strip()
    if not label:
        raise DataError(f"{display(str(csv_path))}:{line}: no label; give every row a label, "
                        "or none for an unlabelled set")
    return label


def _manifest_split(csv_path: Path, line: int, row: dict) -> str:
    cell = (row.get("split") or "").strip().lower()
    if cell and cell not in SPLIT_ALIASES:
        raise DataError(f"{display(str(csv_path))}:{line}: split {cell!r} must be one of "
                        f"{', '.join(SPLITS)} or empty")
    return SPLIT_ALIASES.get(cell, "")

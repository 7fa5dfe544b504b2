"""Data sets that come as shard files: Parquet, Arrow (``save_to_disk``) and WebDataset tars.

An image inside a shard has an address, ``<file>#<row>`` (Parquet, Arrow) or
``<file>#<member>`` (tar), which stands in the image set's paths where a folder has file
names: ``train-00000.parquet#12``, ``shard-0001.tar#000017.jpg``. :func:`image_bytes` opens
any path, address or file, so every stage that reads an image again (the audit's galleries,
the report's mistakes, fine-tuning, predictions on a cache) reads it the same way.

The formats: one entry per file suffix in :data:`FORMATS`, each a lister (labels and splits
of every image, read in one pass) and a reader (one image's bytes).
"""

from __future__ import annotations

import glob
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.errors import DataError
from pipeline.data.layouts import SPLIT_ALIASES, Listing, display

__all__ = ["FORMATS", "container", "expand_braces", "image_bytes", "read_shards",
           "shard_files", "split_address"]


@dataclass(frozen=True)
class ShardFormat:
    """How one kind of shard file is listed and read."""

    name: str
    # file -> (image members: row numbers or member names, label names or None, classes or
    # None (ClassLabel order), given split of each image or None, ignored (member, why))
    rows: Callable[[Path], tuple[list[str], list | None, list | None, list | None, list]]
    read: Callable[[Path, str], bytes]  # file, member -> the image's bytes


def _parquet_rows(path: Path):
    from pipeline.data.parquet import list_arrow, list_parquet

    table = (list_arrow if path.suffix.lower() == ".arrow" else list_parquet)(path)
    return ([str(r) for r in range(table.rows)], table.labels, table.classes, table.given,
            table.ignored)


def _parquet_read(path: Path, member: str) -> bytes:
    from pipeline.data.parquet import row_reader

    try:
        if not member.isdigit():
            raise IndexError(member)
        return row_reader(path).image_bytes(int(member))
    except IndexError:
        raise FileNotFoundError(2, f"no row {member} in the file", os.fspath(path)) from None


def _tar_rows(path: Path):
    from pipeline.data.webdataset import list_tar

    samples = list_tar(path)
    return samples.members, samples.labels, None, None, samples.ignored


def _tar_read(path: Path, member: str) -> bytes:
    from pipeline.data.webdataset import member_bytes

    return member_bytes(path, member)


FORMATS = {
    ".parquet": ShardFormat("Parquet", _parquet_rows, _parquet_read),
    ".arrow": ShardFormat("Arrow", _parquet_rows, _parquet_read),
    ".tar": ShardFormat("WebDataset", _tar_rows, _tar_read),
}

_ADDRESS = re.compile("(" + "|".join(re.escape(s) for s in FORMATS) + ")#", re.IGNORECASE)


def split_address(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(file, member)`` of an address such as ``.../train.parquet#12``; None for a file.

    A real file whose name has such a ``#`` in it stays a file.
    """
    text = os.fspath(path)
    if "#" not in text:
        return None
    for match in _ADDRESS.finditer(text):
        file = text[:match.end() - 1]
        if os.path.isfile(file) and not os.path.isfile(text):
            return file, text[match.end():]
    if not os.path.exists(text):  # the shard has gone: still an address, read as missing
        match = _ADDRESS.search(text)
        if match:
            return text[:match.end() - 1], text[match.end():]
    return None


def container(path: str | os.PathLike) -> str:
    """The file that holds ``path``'s bytes: the shard of an address, else ``path``."""
    address = split_address(path)
    return address[0] if address else os.fspath(path)


def image_bytes(path: str | os.PathLike) -> bytes:
    """The bytes of the image at ``path``: a file, or an address inside a shard.

    Raises ``OSError`` (``FileNotFoundError`` for a missing file, row or member) or
    ``ValueError`` (a row without image bytes), as reading a file would.
    """
    address = split_address(path)
    if address is None:
        with open(path, "rb") as fh:
            return fh.read()
    file, member = address
    if not os.path.isfile(file):
        raise FileNotFoundError(2, "No such file or directory", file)
    return FORMATS[Path(file).suffix.lower()].read(Path(file), member)


# --- which files a source names ---------------------------------------------------------------

def expand_braces(pattern: str) -> list[str]:
    """Bash's brace expansion, as WebDataset's shard lists use it.

    ``train-{0000..0003}.tar`` gives four names (zero-padded as the bounds are);
    ``{train,test}-0.tar`` two; braces nest and combine. A pattern without braces is itself.
    """
    start = pattern.find("{")
    while start >= 0:
        end, depth, commas = start, 0, []
        for end in range(start, len(pattern)):
            c = pattern[end]
            depth += (c == "{") - (c == "}")
            if c == "," and depth == 1:
                commas.append(end)
            if depth == 0:
                break
        if depth:  # unbalanced: the rest is literal
            return [pattern]
        head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
        if commas:
            cuts = [start, *commas, end]
            parts = [pattern[a + 1:b] for a, b in zip(cuts, cuts[1:])]
        elif (m := re.fullmatch(r"(-?\d+)\.\.(-?\d+)(?:\.\.(-?\d+))?", body)):
            parts = _range(*m.groups())
        else:
            start = pattern.find("{", start + 1)
            continue
        return [x for part in parts for x in expand_braces(head + part + tail)]
    return [pattern]


def _range(lo: str, hi: str, step: str | None) -> list[str]:
    a, b, s = int(lo), int(hi), abs(int(step or 1)) or 1
    padded = any(len(x.lstrip("-")) > 1 and x.lstrip("-").startswith("0") for x in (lo, hi))
    width = max(len(lo), len(hi)) if padded else 0
    values = range(a, b + 1, s) if a <= b else range(a, b - 1, -s)
    return [str(v).zfill(width) for v in values]


def _is_shard(name: str) -> bool:
    return not name.startswith(".") and Path(name).suffix.lower() in FORMATS


def _arrow_folder(folder: Path) -> list[Path] | None:
    """The data files of a ``save_to_disk`` folder, as its ``state.json`` lists them (its
    ``cache-*.arrow`` files from ``map`` are not data); None if it has no state.json."""
    import json

    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        names = [d["filename"] for d in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [folder / n for n in names]


def _find(folder: Path) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Shard files under ``folder``, sorted, and what was passed over, with why."""
    found, passed = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        listed = _arrow_folder(here) if "state.json" in filenames else None
        for name in sorted(filenames):
            path = here / name
            if listed is not None and name.endswith(".arrow"):
                if path not in listed:
                    passed.append((path, "not a data file of its state.json"))
                continue
            if _is_shard(name):
                found.append(path)
            else:
                passed.append((path, "hidden" if name.startswith(".") else
                               f"other extension: {path.suffix.lower() or '(none)'}"))
        found += [p for p in listed or [] if p.is_file()]
    return sorted(found), passed


def shard_files(source: str | os.PathLike) -> tuple[list[Path], list[tuple[Path, str]]] | None:
    """The shard files a source names, with what was passed over; None if it names none.

    A Parquet, Arrow or tar file; a brace or glob pattern of them; or a folder holding them
    (and no images: the caller asks only when its folder reader found none).
    """
    text = os.fspath(source)
    path = Path(text)
    if path.is_file():
        return ([path], []) if _is_shard(path.name) else None
    if path.is_dir():
        found, passed = _find(path)
        return (found, passed) if found else None
    patterns = expand_braces(text)
    if patterns == [text] and not glob.has_magic(text):
        return None  # a plain name of nothing: the caller says so
    names = [n for p in patterns for n in (sorted(glob.glob(p)) if glob.has_magic(p) else [p])]
    if not names:
        raise DataError(f"{display(text)}: the pattern matches no file")
    missing = [n for n in names if not os.path.isfile(n)]
    if missing:
        raise DataError(f"{display(text)}: {len(missing)} of its {len(names)} files do not "
                        f"exist, the first {display(missing[0])}")
    files = [Path(n) for n in dict.fromkeys(names)]
    odd = [f for f in files if not _is_shard(f.name)]
    if odd:
        raise DataError(f"{display(str(odd[0]))}: not a shard file (.parquet, .arrow, .tar)")
    return files, []


# --- one listing from many files --------------------------------------------------------------

def _split_of(rel: str) -> str:
    """A split named by a shard's file name (``train-00000.parquet``, ``test_0.tar``) or by
    a folder above it (``train/data-00000.arrow``), else ""."""
    parts = rel.split("/")
    token = re.split(r"[-_.]", parts[-1], maxsplit=1)[0].lower()
    if token in SPLIT_ALIASES:
        return SPLIT_ALIASES[token]
    for folder in reversed(parts[:-1]):
        if folder.lower() in SPLIT_ALIASES:
            return SPLIT_ALIASES[folder.lower()]
    return ""


def read_shards(files: list[Path], passed: list[tuple[Path, str]] = (),
                root: Path | None = None) -> tuple[Listing, Path]:
    """One :class:`Listing` of every image in ``files``, and the folder its addresses are
    relative to: ``root``, else the files' common folder."""
    root = (root or Path(os.path.commonpath([f.parent.absolute() for f in files]))).absolute()
    listing = Listing(ignored=[(display(os.path.relpath(p, root)), why) for p, why in passed])
    names: list[str | None] = []
    given: list[str] = []
    classes: list[str] | None = None
    labelled_files, unlabelled_files = [], []
    for file in files:
        rel = Path(os.path.relpath(file.absolute(), root)).as_posix()
        members, labels, order, column, ignored = FORMATS[file.suffix.lower()].rows(file)
        if order is not None:
            if classes is not None and order != classes:
                raise DataError(f"{display(rel)}: its ClassLabel names differ from the other "
                                f"files' ({', '.join(order[:4])}, ... against "
                                f"{', '.join(classes[:4])}, ...)")
            classes = order
        (labelled_files if labels is not None else unlabelled_files).append(rel)
        listing.paths += [f"{rel}#{m}" for m in members]
        names += labels if labels is not None else [None] * len(members)
        from_name = _split_of(rel)
        given += column if column is not None else [from_name] * len(members)
        if column is not None:
            for s in set(column) - {""}:
                listing.given_from.setdefault(s, "split column")
        elif from_name:
            listing.given_from.setdefault(from_name, f"file names such as {rel}")
        listing.ignored += [(f"{rel}#{m}", why) for m, why in ignored]
    _label(listing, names, given, classes, labelled_files, unlabelled_files)
    return listing, root


def _label(listing: Listing, names: list, given: list[str], classes, labelled: list[str],
           unlabelled: list[str]) -> None:
    """Names, splits and class order onto ``listing``; an image without a label among
    labelled ones is a DataError naming it."""
    if not labelled:
        return
    missing = [i for i, n in enumerate(names) if n is None]
    if len(missing) == len(names):
        return  # every label empty (-1 or null): an unlabelled set
    if missing:
        where = listing.paths[missing[0]]
        why = (f"{unlabelled[0]} has no label column or member while {labelled[0]} has"
               if unlabelled else f"{len(missing)} image(s) have no label (-1 or empty)")
        raise DataError(f"{display(where)}: no label; {why}: give every image a label, or "
                        "none for an unlabelled set")
    listing.names = names
    listing.given = given if any(given) else None
    if not any(given):
        listing.given_from = {}
    present = set(names)
    if classes is not None:
        listing.classes = [c for c in classes if c in present]
    elif all(re.fullmatch(r"-?\d+", n) for n in present):  # integers: in numeric order
        listing.classes = sorted(present, key=int)

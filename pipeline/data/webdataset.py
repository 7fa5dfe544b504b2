"""WebDataset tar shards: each sample a group of members sharing a key, read with tarfile.

The WebDataset convention: a member's key is its path up to the first dot of its base name,
the rest its extension (``shard/000017.jpg`` and ``shard/000017.cls`` are one sample). A
sample's image is its ``.jpg``, ``.jpeg``, ``.png`` or ``.webp`` member; its label the
integer in ``.cls``, or the ``label`` (else ``cls``, else ``class``) value of ``.json``
(integer or string). Other members are listed as ignored.

Listing is one sequential pass over the headers (image data is seeked over, not read; only the
small label members are read), which also records where each member's bytes lie, so an image
is then read with one seek and one read.
"""

from __future__ import annotations

import json
import os
import tarfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.errors import DataError
from pipeline.data.layouts import display

__all__ = ["IMAGE_EXTENSIONS", "JSON_LABEL_KEYS", "SampleRows", "list_tar", "member_bytes"]

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")  # in this order when a sample has several
LABEL_EXTENSIONS = ("cls", "json")
JSON_LABEL_KEYS = ("label", "cls", "class")

_INDEX: dict[tuple, dict[str, tuple[int, int]]] = {}  # (path, size, mtime) -> member spans
_INDEX_LOCK = threading.Lock()
_MAX_INDEXES = 64


@dataclass
class SampleRows:
    """One shard's samples: each one's image member, and its label name (None: none)."""

    members: list[str]
    labels: list[str | None] | None
    ignored: list[tuple[str, str]] = field(default_factory=list)


def _key_ext(name: str) -> tuple[str, str] | None:
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    if not dot or not stem:
        return None
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _stamp(path: Path) -> tuple:
    st = os.stat(path)
    return (os.fspath(path), st.st_size, st.st_mtime_ns)


def list_tar(path: Path) -> SampleRows:
    """Every sample of a tar shard in the order of its members, in one pass over the file."""
    where = display(str(path))
    samples: dict[str, dict[str, tarfile.TarInfo]] = {}
    spans: dict[str, tuple[int, int]] = {}
    labels: dict[str, str] = {}
    ignored: list[tuple[str, str]] = []
    try:
        with tarfile.open(path, "r:") as tar:  # seekable: data of unread members is skipped
            for info in tar:
                if not info.isfile():
                    continue
                spans[info.name] = (info.offset_data, info.size)
                split = _key_ext(info.name)
                if split is None:
                    ignored.append((info.name, "no extension: not part of a sample"))
                    continue
                key, ext = split
                samples.setdefault(key, {})[ext] = info
                if ext in LABEL_EXTENSIONS and ext not in _other_label(samples[key], ext):
                    labels[key] = _label(where, info, tar.extractfile(info).read(), ext)
    except (tarfile.TarError, OSError) as err:
        raise DataError(f"{where}: not a tar file that can be read ({err})") from None
    if not samples:
        raise DataError(f"{where}: an empty shard (no samples); remove it or write its samples")
    with _INDEX_LOCK:
        _INDEX[_stamp(path)] = spans
    members, names = [], []
    for key, parts in samples.items():
        image = next((parts[e].name for e in IMAGE_EXTENSIONS if e in parts), None)
        if image is None:
            raise DataError(f"{where}: sample {key!r} has no image member (.jpg, .jpeg, .png "
                            f"or .webp; it has {', '.join('.' + e for e in parts)})")
        members.append(image)
        names.append(labels.get(key))
        ignored += [(info.name, f"not the image or label of sample {key}")
                    for ext, info in parts.items()
                    if info.name != image and ext not in LABEL_EXTENSIONS]
    return SampleRows(members, names if any(n is not None for n in names) else None, ignored)


def _other_label(parts: dict, ext: str) -> set[str]:
    """``.cls`` wins over ``.json``: a sample's .json is read for its label only without one."""
    return {"cls"} & set(parts) if ext == "json" else set()


def _label(where: str, info: tarfile.TarInfo, data: bytes, ext: str) -> str:
    if ext == "cls":
        text = data.decode("utf-8", "replace").strip()
        try:
            return str(int(text))
        except ValueError:
            raise DataError(f"{where}: {info.name} holds {text[:40]!r}, not an integer class "
                            "index") from None
    try:
        value = json.loads(data)
    except ValueError:
        raise DataError(f"{where}: {info.name} is not valid JSON") from None
    if isinstance(value, dict):
        for key in JSON_LABEL_KEYS:
            if isinstance(value.get(key), (int, str)) and not isinstance(value[key], bool):
                return str(value[key])
    raise DataError(f"{where}: {info.name} has no label: expected a JSON object with an "
                    f"integer or string under {', '.join(JSON_LABEL_KEYS)}")


def _spans(path: Path) -> dict[str, tuple[int, int]]:
    stamp = _stamp(path)
    with _INDEX_LOCK:
        spans = _INDEX.get(stamp)
    if spans is None:  # this process has not listed the shard (or it changed): one header pass
        with tarfile.open(path, "r:") as tar:
            spans = {i.name: (i.offset_data, i.size) for i in tar if i.isfile()}
        with _INDEX_LOCK:
            if len(_INDEX) >= _MAX_INDEXES:
                _INDEX.pop(next(iter(_INDEX)))
            _INDEX[stamp] = spans
    return spans


def member_bytes(path: str | os.PathLike, member: str) -> bytes:
    """The bytes of the tar member ``member``; FileNotFoundError when the tar has none."""
    path = Path(path)
    span = _spans(path).get(member)
    if span is None:
        raise FileNotFoundError(2, f"no member {member} in the tar file", os.fspath(path))
    offset, size = span
    # A file opened per read: DataLoader workers and decoding threads never share an offset.
    with open(path, "rb") as fh:
        fh.seek(offset)
        data = fh.read(size)
    if len(data) != size:
        raise OSError(f"{member}: the tar file ends inside it (truncated)")
    return data

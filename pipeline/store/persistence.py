"""Saved models, signed: a fitted head (``.head``) or a fine-tuned network (``.net``).

A file is one JSON header line followed by its payload::

    {"about": "...", "format": "pipeline-head", "format_version": 2, "meta": {...},
     "payload": "joblib", "sha256": "..."}\\n<joblib pickle of a scikit-learn estimator>

    {"about": "...", "format": "pipeline-network", "format_version": 2, "meta": {...},
     "payload": "torch", "sha256": "..."}\\n<torch.save of a state dict>

The header's other keys are sorted; ``"sha256"`` is always its last field. Its 64 hex digits are
the SHA-256 of the whole file as it would be with those digits replaced by zeros: the header
line's exact bytes, its newline and the payload. Any edited byte, in the class order, the
feature size ``dim`` or the backbone ``request`` as much as in the payload, is therefore
refused before anything is unpickled. (A checksum guards against accidents, not attackers:
load only files you or your pipeline wrote.)

Files of ``format_version`` 1, written by earlier versions, are still read; their checksum
covers the payload only, so an edit to their header goes unnoticed. Saving such a model again
writes version 2.

A head classifies bottleneck features, so it is used with the backbone named in its ``meta``
(or a cache of that backbone's features); a network classifies images end to end. Fine-tuned
networks saved before they had a format of their own (a ``.head`` file whose meta ``kind`` is
``"finetuned"``) are read as networks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.core.atomic import atomic_write
from pipeline.core.errors import ModelFileError

HEAD_FORMAT = "pipeline-head"
NETWORK_FORMAT = "pipeline-network"
FORMAT_VERSION = 2
# Version 1 checksummed the payload only; it is read so that older models still load.
_READABLE_VERSIONS = (1, FORMAT_VERSION)
HEAD_SUFFIX = ".head"
NETWORK_SUFFIX = ".net"
# The header line is small; a bound keeps a foreign binary file from being read whole.
_HEADER_LIMIT = 1 << 20
# The digest is the header's last field; while it is computed its digits are zeros.
_BLANK_DIGEST = b"0" * 64
_DIGEST_FIELD = re.compile(rb'"sha256": "([0-9a-f]{64})"}\n\Z')
_ABOUT = {
    HEAD_FORMAT: "a scikit-learn head (joblib) for the bottleneck features of meta.request's "
                 "backbone; `pipeline predict` runs that backbone, then the head",
    NETWORK_FORMAT: "a fine-tuned network (torch state dict of meta.request's backbone with a "
                    "new classifier for meta.classes); `pipeline predict` runs it end to end",
}



@dataclass
class SavedHead:
    """A fitted estimator and what it needs at prediction time.

    ``meta`` holds ``classes``, ``dim``, ``head`` (its spec), ``backbone``, ``cache_key``,
    ``spec`` (the feature-cache key spec) and ``request`` (the arguments that rebuild the
    backbone).
    """

    estimator: object
    meta: dict


@dataclass
class SavedNetwork:
    """A fine-tuned network's weights and what rebuilds it.

    ``meta`` holds ``classes``, ``backbone``, ``request`` (the arguments that rebuild the
    backbone), ``spec`` (its key: preprocessing, weights), ``cache_key`` (the features its head
    was warm-started on), ``head`` (``finetune-K``) and ``unfrozen`` (K, the top blocks trained;
    None in files from before it was recorded).
    """

    state_dict: dict
    meta: dict


def save_head(path: str | os.PathLike, estimator, meta: dict) -> Path:
    """Save a fitted scikit-learn head (joblib payload)."""
    import joblib

    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    return _write(Path(path), HEAD_FORMAT, buffer.getvalue(), "joblib", meta)


def save_network(path: str | os.PathLike, state_dict: dict, meta: dict) -> Path:
    """Save a fine-tuned network's weights (torch payload, loaded with ``weights_only``)."""
    import torch

    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return _write(Path(path), NETWORK_FORMAT, buffer.getvalue(), "torch", meta)


def _write(path: Path, format: str, payload: bytes, kind: str, meta: dict) -> Path:
    """Write atomically (:func:`pipeline.core.atomic.atomic_write`), signed over header and
    payload."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": format, "format_version": FORMAT_VERSION, "about": _ABOUT[format],
              "payload": kind, "meta": meta}
    line = _signed(json.dumps(header, sort_keys=True).encode(), payload)
    with atomic_write(path, size=len(line) + len(payload)) as fh:
        fh.write(line)
        fh.write(payload)
    return path


def _signed(header: bytes, payload: bytes) -> bytes:
    """The header line, ``header`` (its JSON without a digest) with the digest field last."""
    # Appended by hand rather than by json.dumps, so that the digest stays the last field
    # whatever keys the header gains, and a reader finds its exact bytes without guessing.
    line = header[:-1] + b', "sha256": "' + _BLANK_DIGEST + b'"}\n'
    end = len(line) - len(b'"}\n')
    return line[:end - len(_BLANK_DIGEST)] + _digest(line, payload).encode() + line[end:]


def _digest(line: bytes, payload: bytes) -> str:
    """SHA-256 of a header line whose digest digits are zeros, then the payload."""
    return hashlib.sha256(line + payload).hexdigest()


def read_header(path: str | os.PathLike) -> dict:
    """The header of a saved model of either kind, without touching its payload."""
    with _open(path) as fh:
        return _parse(path, fh.readline(_HEADER_LIMIT))


def model_kind(header: dict) -> str:
    """``"head"`` or ``"network"``: what a file holds, whatever its suffix."""
    if header["format"] == NETWORK_FORMAT:
        return "network"
    # Before networks had a format of their own they were saved as heads of kind "finetuned".
    if header.get("payload") == "torch" or header["meta"].get("kind") == "finetuned":
        return "network"
    return "head"


def load_head(path: str | os.PathLike) -> SavedHead:
    """A saved head, its checksum verified before it is unpickled; refuses a network."""
    header, payload = _read(path)
    if model_kind(header) != "head":
        raise ModelFileError(f"{path} is a fine-tuned network, not a head; load it with "
                             "load_network or load_model", path=path, kind="network",
                             expected="head")
    return _head(header, payload)


def load_network(path: str | os.PathLike) -> SavedNetwork:
    """A saved network's weights, checksum verified, read with ``weights_only``; refuses a
    head."""
    header, payload = _read(path)
    if model_kind(header) != "network":
        raise ModelFileError(f"{path} is a head for bottleneck features, not a fine-tuned "
                             "network; load it with load_head or load_model", path=path,
                             kind="head", expected="network")
    return _network(header, payload)


def load_model(path: str | os.PathLike) -> SavedHead | SavedNetwork:
    """Whichever kind of model ``path`` holds; anything else is refused in one line."""
    header, payload = _read(path)
    if model_kind(header) == "network":
        return _network(header, payload)
    return _head(header, payload)


def _head(header: dict, payload: bytes) -> SavedHead:
    import joblib

    return SavedHead(joblib.load(io.BytesIO(payload)), header["meta"])


def _network(header: dict, payload: bytes) -> SavedNetwork:
    import torch

    state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    meta = dict(header["meta"])
    if header["format"] == HEAD_FORMAT:  # saved by the version before networks had a format
        meta.pop("kind", None)
        meta.pop("dim", None)
        count = meta.get("head", "").rpartition("-")[2]
        meta.setdefault("unfrozen", int(count) if count.isdigit() else None)
    return SavedNetwork(state, meta)


def _open(path: str | os.PathLike):
    if not Path(path).is_file():
        raise ModelFileError(f"{path}: no such model file", path=path, reason="missing")
    return open(path, "rb")


def _parse(path: str | os.PathLike, line: bytes) -> dict:
    """The header from its line; refuses what is not a model file this pipeline reads."""
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if (not isinstance(header, dict) or header.get("format") not in _ABOUT
            or not isinstance(header.get("meta"), dict)):
        raise ModelFileError(f"{path} is not a model saved by pipeline (a .head or .net file)",
                             path=path, reason="not-a-model")
    if header.get("format_version") not in _READABLE_VERSIONS:
        raise ModelFileError(f"{path} has format version {header.get('format_version')}; "
                             f"this pipeline reads versions up to {FORMAT_VERSION}: upgrade "
                             "pipeline to load it", path=path,
                             version=header.get("format_version"), readable=_READABLE_VERSIONS)
    return header


def _read(path: str | os.PathLike) -> tuple[dict, bytes]:
    """Header and payload from one opening of the file, verified before either is used."""
    with _open(path) as fh:
        line = fh.readline(_HEADER_LIMIT)
        header = _parse(path, line)
        payload = fh.read()
    if not _intact(line, payload, header):
        raise ModelFileError(f"{path} is corrupt or was edited: its checksum does not match; "
                             "save it again", path=path, reason="checksum")
    return header, payload


def _intact(line: bytes, payload: bytes, header: dict) -> bool:
    """Whether the digest matches: of the whole file in version 2, of the payload in 1."""
    if header["format_version"] == 1:
        return hashlib.sha256(payload).hexdigest() == header.get("sha256")
    field = _DIGEST_FIELD.search(line)
    if field is None or field.group(1).decode() != header.get("sha256"):
        return False
    blanked = line[:field.start(1)] + _BLANK_DIGEST + line[field.end(1):]
    return _digest(blanked, payload) == header["sha256"]

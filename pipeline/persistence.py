"""Saved models, checksummed: a fitted head (``.head``) or a fine-tuned network (``.net``).

A file is one JSON header line followed by its payload::

    {"format": "pipeline-head", "format_version": 1, "about": "...", "payload": "joblib",
     "sha256": "...", "meta": {...}}\\n<joblib pickle of a scikit-learn estimator>

    {"format": "pipeline-network", "format_version": 1, "about": "...", "payload": "torch",
     "sha256": "...", "meta": {...}}\\n<torch.save of a state dict>

A head classifies bottleneck features, so it is used with the backbone named in its ``meta``
(or a cache of that backbone's features); a network classifies images end to end. The header
is read first and the payload's SHA-256 is verified before anything is unpickled, so a
truncated, corrupted or swapped file is refused instead of being loaded. (A checksum guards
against accidents, not attackers: load only files you or your pipeline wrote.)

Fine-tuned networks saved before they had a format of their own (a ``.head`` file whose meta
``kind`` is ``"finetuned"``) are read as networks.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import PipelineError

HEAD_FORMAT = "pipeline-head"
NETWORK_FORMAT = "pipeline-network"
FORMAT_VERSION = 1
HEAD_SUFFIX = ".head"
NETWORK_SUFFIX = ".net"
# The header line is small; a bound keeps a foreign binary file from being read whole.
_HEADER_LIMIT = 1 << 20
_ABOUT = {
    HEAD_FORMAT: "a scikit-learn head (joblib) for the bottleneck features of meta.request's "
                 "backbone; `pipeline predict` runs that backbone, then the head",
    NETWORK_FORMAT: "a fine-tuned network (torch state dict of meta.request's backbone with a "
                    "new classifier for meta.classes); `pipeline predict` runs it end to end",
}


class ModelFileError(PipelineError):
    """A saved model that cannot be used: missing, corrupt, of another kind, or made for other
    features."""


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
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": format, "format_version": FORMAT_VERSION, "about": _ABOUT[format],
              "payload": kind, "sha256": hashlib.sha256(payload).hexdigest(), "meta": meta}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(json.dumps(header, sort_keys=True).encode() + b"\n")
        fh.write(payload)
    os.replace(tmp, path)
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The header of a saved model of either kind, without touching its payload."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    with open(path, "rb") as fh:
        line = fh.readline(_HEADER_LIMIT)
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if (not isinstance(header, dict) or header.get("format") not in _ABOUT
            or not isinstance(header.get("meta"), dict)):
        raise ModelFileError(f"{path} is not a model saved by pipeline (a .head or .net file)")
    if header.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path} has format version {header.get('format_version')}; "
                             f"this pipeline reads version {FORMAT_VERSION}")
    return header


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
    header = read_header(path)
    if model_kind(header) != "head":
        raise ModelFileError(f"{path} is a fine-tuned network, not a head; load it with "
                             "load_network or load_model")
    import joblib

    return SavedHead(joblib.load(io.BytesIO(_payload(path, header))), header["meta"])


def load_network(path: str | os.PathLike) -> SavedNetwork:
    """A saved network's weights, checksum verified, read with ``weights_only``; refuses a
    head."""
    header = read_header(path)
    if model_kind(header) != "network":
        raise ModelFileError(f"{path} is a head for bottleneck features, not a fine-tuned "
                             "network; load it with load_head or load_model")
    import torch

    state = torch.load(io.BytesIO(_payload(path, header)), map_location="cpu", weights_only=True)
    meta = dict(header["meta"])
    if header["format"] == HEAD_FORMAT:  # saved by the version before networks had a format
        meta.pop("kind", None)
        meta.pop("dim", None)
        count = meta.get("head", "").rpartition("-")[2]
        meta.setdefault("unfrozen", int(count) if count.isdigit() else None)
    return SavedNetwork(state, meta)


def load_model(path: str | os.PathLike) -> SavedHead | SavedNetwork:
    """Whichever kind of model ``path`` holds; anything else is refused in one line."""
    if model_kind(read_header(path)) == "network":
        return load_network(path)
    return load_head(path)


def _payload(path: str | os.PathLike, header: dict) -> bytes:
    with open(path, "rb") as fh:
        fh.readline(_HEADER_LIMIT)
        payload = fh.read()
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise ModelFileError(f"{path} is corrupt: its checksum does not match; save it again")
    return payload

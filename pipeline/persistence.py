"""Saved models: a fitted head with the feature-cache key it was trained on, checksummed.

A file is one JSON header line followed by a joblib payload::

    {"format": "pipeline-head", "format_version": 1, "sha256": "...", "meta": {...}}\\n<joblib>

The header is read first and the payload's SHA-256 is verified before anything is unpickled,
so a truncated, corrupted or swapped file is refused instead of being loaded. (A checksum
guards against accidents, not attackers: load only files you or your pipeline wrote.)
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import joblib
import torch

from pipeline.errors import PipelineError

FORMAT = "pipeline-head"
FORMAT_VERSION = 1
SUFFIX = ".head"


class ModelFileError(PipelineError):
    """A saved model that cannot be used: missing, corrupt, or made for other features."""


@dataclass
class SavedHead:
    """A fitted estimator and what it needs at prediction time.

    ``meta`` holds ``classes``, ``dim``, ``head`` (its spec), ``cache_key``, ``spec`` (the
    feature-cache key spec) and ``request`` (the arguments that rebuild the backbone).
    """

    estimator: object  # a fitted estimator, or a fine-tuned model's state dict
    meta: dict


def save_head(path: str | os.PathLike, estimator, meta: dict) -> Path:
    """Save a fitted scikit-learn head (joblib payload)."""
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    return _write(Path(path), buffer.getvalue(), "joblib", meta)


def save_state_dict(path: str | os.PathLike, state_dict: dict, meta: dict) -> Path:
    """Save a fine-tuned network's weights (torch payload, loaded with ``weights_only``)."""
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return _write(Path(path), buffer.getvalue(), "torch", meta)


def _write(path: Path, payload: bytes, kind: str, meta: dict) -> Path:
    """Write atomically: a temporary file in the same folder, then ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "payload": kind,
              "sha256": hashlib.sha256(payload).hexdigest(), "meta": meta}
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(json.dumps(header, sort_keys=True).encode() + b"\n")
        fh.write(payload)
    os.replace(tmp, path)
    return path


def read_header(path: str | os.PathLike) -> dict:
    """The header of a saved head, without touching its payload."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"{path}: no such model file")
    with open(path, "rb") as fh:
        line = fh.readline(1 << 20)
    try:
        header = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError):
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a model saved by pipeline")
    if header.get("format_version") != FORMAT_VERSION:
        raise ModelFileError(f"{path} has format version {header.get('format_version')}; "
                             f"this pipeline reads version {FORMAT_VERSION}")
    return header


def load_head(path: str | os.PathLike) -> SavedHead:
    """Verify the checksum, then unpickle."""
    header = read_header(path)
    with open(path, "rb") as fh:
        fh.readline(1 << 20)
        payload = fh.read()
    if hashlib.sha256(payload).hexdigest() != header["sha256"]:
        raise ModelFileError(f"{path} is corrupt: its checksum does not match; save it again")
    if header.get("payload") == "torch":
        return SavedHead(torch.load(io.BytesIO(payload), weights_only=True), header["meta"])
    return SavedHead(joblib.load(io.BytesIO(payload)), header["meta"])

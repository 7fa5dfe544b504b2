"""Where the store keeps things and what it calls them; no HDF5 needed to ask.

A cache key names one file ``<backbone>-<key>.h5`` in the cache folder; beside it lie its partial
and shard files while it is written, a damaged copy moved aside, the record of the extraction
(``.run.json``) and the engines' exports of the network (``.exported/``).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from pipeline.models.engines import EXPORTED, REFUSED

SUFFIX = ".h5"


PARTIAL = ".partial"


SHARD = ".shard-"


DAMAGED = ".damaged"


def cache_key(spec: dict) -> str:
    """A stable hash of a key spec: same spec, same key; any change, another key."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:20]


def cache_path(cache_dir: str | os.PathLike, backbone: str, key: str) -> Path:
    safe = backbone.replace("/", "_")
    return Path(cache_dir) / f"{safe}-{key}{SUFFIX}"


def extract_record_path(cache_path: str | os.PathLike) -> Path:
    """The record of the extraction that wrote ``cache_path``: ``<backbone>-<key>.run.json``
    beside the cache (not ``*.h5*``, so cache listings do not take it for a cache)."""
    return Path(cache_path).with_suffix(".run.json")


def shard_path(final: Path, rank: int, world_size: int) -> Path:
    """The file in which rank ``rank`` of ``world_size`` writes its rows of cache ``final``."""
    return final.with_name(f"{final.name}{SHARD}{rank}-of-{world_size}")


def shard_paths(final: Path) -> list[Path]:
    """Every shard file of ``final``, complete or partial, whatever the world size."""
    return sorted(final.parent.glob(f"{final.name}{SHARD}*"))


def is_export(path: Path) -> bool:
    """An engine's export folder (finished or interrupted) or auto's refusal note."""
    name = path.name
    return (path.is_dir() and (name.endswith(EXPORTED) or EXPORTED + ".partial-" in name)
            or path.is_file() and name.endswith(EXPORTED + REFUSED))

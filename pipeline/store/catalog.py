"""The cache folder as a catalogue: list, find and remove caches and the engines' exports.

Every byte a run leaves in the cache folder can be seen (:func:`list_caches`, ``pipeline cache
list``) and removed (:func:`remove_cache`), exports of the network and auto's refusal notes too.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from pipeline.core.errors import CacheError
from pipeline.models.engines import EXPORTED, REFUSED, refusal_path
from pipeline.store.cache import cache_info, cache_kind
from pipeline.store.locks import LOCK_SUFFIX
from pipeline.store.paths import DAMAGED, PARTIAL, SHARD, SUFFIX, extract_record_path, is_export


def _cache_files(cache_dir: str | os.PathLike) -> list[Path]:
    """The cache files of a folder, without the writer locks beside them."""
    return sorted(p for p in Path(cache_dir).glob(f"*{SUFFIX}*")
                  if not p.name.endswith(LOCK_SUFFIX) and LOCK_SUFFIX + ".stale-" not in p.name)


def list_caches(cache_dir: str | os.PathLike) -> list[dict]:
    """One row per cache file in ``cache_dir``, complete ones and interrupted ones."""
    rows = []
    for path in _cache_files(cache_dir):
        if path.name.endswith(SUFFIX):
            try:
                info = cache_info(path)
            except CacheError as err:
                rows.append({"path": str(path), "status": str(err)})
                continue
            kind = cache_kind(info["spec"])
            rows.append({"path": str(path), "status": "complete", "kind": kind, "backbone":
                         info["spec"]["backbone"], "images": info["images"], "dim": info["dim"],
                         "bytes": info["bytes"], "created": info["created"]})
        elif SUFFIX + SHARD in path.name:
            status = "shard (partial)" if path.name.endswith(PARTIAL) else "shard"
            rows.append({"path": str(path), "status": status, "bytes": path.stat().st_size})
        elif path.name.endswith(SUFFIX + PARTIAL):
            rows.append({"path": str(path), "status": "partial", "bytes": path.stat().st_size})
        elif SUFFIX + DAMAGED in path.name:
            rows.append({"path": str(path), "status": "damaged (moved aside)",
                         "bytes": path.stat().st_size})
    return rows + [_export_row(path) for path in _export_files(cache_dir)]


def _export_files(cache_dir: str | os.PathLike) -> list[Path]:
    """The engines' exports in a cache folder: finished and interrupted export folders, and
    auto's refusal notes."""
    return sorted(p for p in Path(cache_dir).glob(f"*{EXPORTED}*") if is_export(p))


def _export_row(path: Path) -> dict:
    if path.name.endswith(REFUSED):
        refused = ", ".join(sorted(_read_json(path)))
        return {"path": str(path), "status": f"auto refused {refused or 'no engine'}",
                "bytes": path.stat().st_size}
    if not path.name.endswith(EXPORTED):
        return {"path": str(path), "status": "export (partial)", "bytes": _folder_bytes(path)}
    info = export_info(path)
    if not info["complete"]:
        return {"path": str(path), "status": "export (no model.onnx)", "bytes": info["bytes"]}
    return {"path": str(path), "status": "complete", "kind": "export",
            "backbone": info["backbone"], "network": info["network_part"],
            "bytes": info["bytes"], "created": info["created"]}


def export_info(path: str | os.PathLike) -> dict:
    """What an engine's export folder holds: the network it was exported from (its record,
    ``exported.json``), the part of it (the whole feature network, or the trunk below
    fine-tuning's cut), its size and files."""
    path = Path(path)
    record = _read_json(path / "exported.json")
    network = record.get("network") or {}
    cut = network.get("activation") or network.get("activations")
    if isinstance(cut, list):
        cut = ", ".join(cut)
    return {"path": str(path), "complete": (path / "model.onnx").is_file(),
            "backbone": network.get("backbone", "?"),
            "network_part": f"trunk to {cut}" if cut else "features",
            "network": network, "input_shape": record.get("input_shape"),
            "exporters": record.get("exporters", {}), "created": record.get("created", "?"),
            "files": sorted(p.name for p in path.iterdir()), "bytes": _folder_bytes(path)}


def _folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # a missing or half-written record: shown as unknown
        return {}


def find_cache(cache_dir: str | os.PathLike, name: str) -> Path:
    """A cache file by path, file name, or (a prefix of) its key."""
    as_path = Path(name)
    if as_path.exists():
        return as_path
    matches = [p for p in _cache_files(cache_dir) + _export_files(cache_dir) if name in p.name]
    if len(matches) > 1 and SHARD not in name:  # a key names its cache before its shards
        matches = [p for p in matches if SUFFIX + SHARD not in p.name] or matches
    if len(matches) > 1 and REFUSED not in name:  # and an export before auto's note on it
        matches = [p for p in matches if not p.name.endswith(REFUSED)] or matches
    if len(matches) != 1:
        what = "no cache" if not matches else f"{len(matches)} caches"
        raise CacheError(f"{what} in {cache_dir} match {name!r}", path=Path(cache_dir), name=name,
                         matches=matches, reason="cache-match")
    return matches[0]


def remove_cache(path: Path) -> None:
    """Remove a cache file (with its extraction record), or an engine's export (with auto's
    refusal note beside it)."""
    if is_export(path) and path.is_dir():
        shutil.rmtree(path)
        refusal_path(path).unlink(missing_ok=True)
        return
    if is_export(path):  # a refusal note
        path.unlink()
        return
    if not (path.name.endswith((SUFFIX, SUFFIX + PARTIAL)) or SUFFIX + SHARD in path.name
            or SUFFIX + DAMAGED in path.name):
        raise CacheError(f"{path} is not a cache file")
    path.unlink()
    if path.name.endswith(SUFFIX):  # the record of the extraction that wrote it goes too
        extract_record_path(path).unlink(missing_ok=True)

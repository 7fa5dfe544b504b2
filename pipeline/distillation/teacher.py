"""The teacher of a distillation: a saved head (``.head``) or a fine-tuned network (``.net``),
and its predictions on a cache's images, computed once and stored beside the cache.

A head teacher classifies the cached features directly; a network teacher reads the images
again (the cache's data root and paths) and runs end to end. Either way its log-probabilities
(its logits up to a constant per image, which a softmax ignores, so any temperature can be
applied later) are stored in ``<cache>.teacher-<digest>.npz`` beside the cache file, keyed by
the teacher file's SHA-256 and the cache's key: a second run with the same teacher and cache
only trains.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.atomic import atomic_write
from pipeline.core.errors import TeacherError
from pipeline.core.progress import Progress
from pipeline.heads.pool import Pool, feature_space, space_differences
from pipeline.store.cache import open_cache, read_strings
from pipeline.store.persistence import (
    HEAD_SUFFIX,
    NETWORK_SUFFIX,
    load_head,
    model_kind,
    read_header,
)

__all__ = ["SOFT_FORMAT", "Teacher", "TeacherError", "load_teacher", "soft_targets"]

SOFT_FORMAT = "pipeline-teacher-predictions"
_FLOOR = 1e-12  # the smallest probability kept before the log: a teacher's 0 stays finite


@dataclass
class Teacher:
    """A loaded teacher.

    Attributes
    ----------
    path, sha256
        Its file and the file's digest (the header's ``sha256``, which covers every byte).
    kind
        ``"head"`` or ``"network"``.
    name
        Its head's name (``logreg``, ``finetune-1``).
    classes
        Its classes, in its output order.
    cache_key
        The feature cache it was trained on.
    model
        The fitted estimator (head), or None until a network is needed.
    """

    path: Path
    sha256: str
    kind: str
    name: str
    classes: list[str]
    cache_key: str
    meta: dict
    model: object = None

    def log_proba_features(self, X: np.ndarray) -> np.ndarray:
        """A head teacher's log-probabilities for rows of features, float32."""
        proba = np.zeros((len(X), len(self.classes)))
        proba[:, np.asarray(self.model.classes_).astype(int)] = self.model.predict_proba(X)
        return np.log(np.maximum(proba, _FLOOR)).astype(np.float32)


def load_teacher(path: str | os.PathLike, cache_info: dict) -> Teacher:
    """The teacher at ``path``, checked against the labelled cache (``cache_info`` as
    :func:`pipeline.store.cache.cache_info` gives it).

    Raises
    ------
    TeacherError
        Not a ``.head`` or ``.net`` file, classes other than the cache's, or (a head) features
        of another backbone, weights, layer or preprocessing.
    """
    path = Path(path)
    if path.suffix not in (HEAD_SUFFIX, NETWORK_SUFFIX):
        raise TeacherError(f"{path}: a teacher is a saved head ({HEAD_SUFFIX}, pipeline heads) "
                           f"or a fine-tuned network ({NETWORK_SUFFIX}, pipeline finetune)")
    header = read_header(path)
    kind, meta = model_kind(header), header["meta"]
    if list(meta["classes"]) != list(cache_info["classes"]):
        raise TeacherError(f"{path.name} was trained on the classes {meta['classes']}, the "
                           f"cache holds {cache_info['classes']}; give a teacher of the same "
                           "classes in the same order")
    teacher = Teacher(path, header["sha256"], "head" if kind == "head" else "network",
                      str(meta.get("head", kind)), list(meta["classes"]),
                      str(meta.get("cache_key", "")), meta)
    if teacher.kind == "head":
        spec = meta.get("spec", {})
        differ = space_differences(
            feature_space(spec, meta.get("dim"), spec.get("layers") or []),
            feature_space(cache_info["spec"], cache_info["dim"], []))
        if differ:
            raise TeacherError(f"{path.name} classifies other features than the cache's "
                               f"({differ}); a head teacher needs the cache's backbone, "
                               "weights, layer and preprocessing")
        teacher.model = load_head(path).estimator
    return teacher


def soft_targets(teacher: Teacher, cache_path: Path, *, pool: Pool | None = None,
                 progress: bool | str | None = None) -> tuple[dict[str, np.ndarray], bool]:
    """The teacher's log-probabilities for every readable image of the cache at
    ``cache_path`` (by image path), or of ``pool``'s rows (by position, as a one-key dict
    ``{"pool": array}``), and whether they were read from the store rather than computed.

    The store is ``<file>.teacher-<digest[:16]>.npz`` beside the cache (or pool) file; a pool
    held in memory is not stored.
    """
    source = pool.path if pool is not None else cache_path
    store = None if source is None else _store_path(Path(source), teacher)
    if store is not None and store.exists():
        found = _read_store(store, teacher)
        if found is not None:
            return found, True
    computed = (_pool_targets(teacher, pool, progress) if pool is not None
                else _cache_targets(teacher, cache_path, progress))
    if store is not None:
        _write_store(store, teacher, computed)
    return computed, False


def _store_path(source: Path, teacher: Teacher) -> Path:
    return source.with_name(f"{source.stem}.teacher-{teacher.sha256[:16]}.npz")


def _read_store(store: Path, teacher: Teacher) -> dict[str, np.ndarray] | None:
    """The stored predictions, or None where the file is another teacher's or unreadable."""
    try:
        with np.load(store, allow_pickle=False) as f:
            if str(f["format"]) != SOFT_FORMAT or str(f["teacher_sha256"]) != teacher.sha256:
                return None
            return dict(zip(f["paths"].tolist(), f["log_proba"]))
    except (OSError, ValueError, KeyError):
        return None


def _write_store(store: Path, teacher: Teacher, targets: dict[str, np.ndarray]) -> None:
    arrays = {"format": np.array(SOFT_FORMAT), "teacher_sha256": np.array(teacher.sha256),
              "teacher": np.array(str(teacher.path)), "classes": np.array(teacher.classes),
              "paths": np.array(list(targets), dtype=str),
              "log_proba": np.stack(list(targets.values())).astype(np.float32)}
    with atomic_write(store) as fh:  # a file object: savez would append .npz to the name
        np.savez_compressed(fh, **arrays)


def _cache_rows(cache_path: Path) -> tuple[list[str], np.ndarray, Path]:
    """The readable rows of a cache: their paths, their indices, and the data root."""
    with open_cache(cache_path) as f:
        valid = f["valid"][:]
        rows = np.flatnonzero(valid)
        return read_strings(f["paths"])[rows].tolist(), rows, Path(f.attrs["data_root"])


def _cache_targets(teacher: Teacher, cache_path: Path, progress) -> dict[str, np.ndarray]:
    paths, rows, root = _cache_rows(cache_path)
    if teacher.kind == "head":
        with open_cache(cache_path) as f:
            features = f["features"]
            out = np.concatenate([teacher.log_proba_features(
                np.asarray(features[lo:hi], np.float32)[rows[(rows >= lo) & (rows < hi)] - lo])
                for lo, hi in _spans(len(f["valid"]))]) if len(rows) else np.zeros((0, 1))
        return dict(zip(paths, out))
    return _network_targets(teacher, [root / p for p in paths], paths, progress)


def _pool_targets(teacher: Teacher, pool: Pool, progress) -> dict[str, np.ndarray]:
    if teacher.kind == "head":
        out = np.empty((len(pool), len(teacher.classes)), np.float32)
        for start, block in pool.blocks():
            out[start:start + len(block)] = teacher.log_proba_features(block)
        return dict(zip(pool.paths, out))
    if pool.path is None:
        raise TeacherError("a fine-tuned network teaches from images: give the pool as the "
                           "cache of an image folder, not as features in memory")
    with open_cache(pool.path) as f:
        root = Path(f.attrs["data_root"])
    return _network_targets(teacher, [root / p for p in pool.paths], pool.paths, progress)


def _spans(n: int, step: int = 16384):
    return [(lo, min(n, lo + step)) for lo in range(0, n, step)]


def _network_targets(teacher: Teacher, files: list[Path], keys: list[str], progress
                     ) -> dict[str, np.ndarray]:
    """A fine-tuned network's log-probabilities for image files, read again from disk."""
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise TeacherError(f"a fine-tuned teacher reads the images, and {len(missing)} of "
                           f"{len(files)} are not where the cache says (such as {missing[0]}); "
                           "run from where the data was extracted")
    from pipeline.core.options import PredictOptions
    from pipeline.deploy.predict import predict_images
    from pipeline.finetuning.network import FinetunedNetwork

    network = FinetunedNetwork.load(teacher.path)
    index = {c: i for i, c in enumerate(teacher.classes)}
    out = {}
    with Progress(len(files), f"teacher {teacher.name}", "img", progress=progress) as bar:
        for lo, hi in _spans(len(files), 512):
            rows = predict_images(network, files[lo:hi], progress=False,
                                  options=PredictOptions(top_k=len(teacher.classes))).rows
            by_path = {r["path"]: r for r in rows}
            for file, key in zip(files[lo:hi], keys[lo:hi]):
                row = by_path.get(str(file.absolute()))  # predict_images gives them absolute
                if row is None or "error" in row:
                    raise TeacherError(f"the teacher could not read {file}: "
                                       f"{(row or {}).get('error', 'not found')}")
                proba = np.full(len(index), _FLOOR)
                for name, p in row["top_k"]:
                    proba[index[name]] = max(p, _FLOOR)
                out[key] = np.log(proba).astype(np.float32)
            bar.update(hi - lo)
    return out

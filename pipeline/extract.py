"""Stage 1: run a frozen backbone once over an image set and cache its features in HDF5."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline.backbones import DEFAULT_BACKBONE, BackboneSpec, resolve_backbone
from pipeline.cache import FeatureWriter, cache_key, cache_path, stored_summary
from pipeline.data import (
    ImageFiles,
    ImageSet,
    fingerprint_files,
    fingerprint_splits,
    load_image_set,
)
from pipeline.devices import (
    autocast,
    autocast_dtype,
    default_batch_size,
    default_workers,
    keep_freed_memory,
    resolve_device,
)
from pipeline.errors import DataError

DTYPES = ("float32", "float16")
DEFAULT_CACHE_DIR = os.environ.get("PIPELINE_CACHE_DIR", "cache")


@dataclass
class ExtractResult:
    """What one ``extract`` call did; ``to_json`` is the CLI's ``--json`` object."""

    cache_path: Path
    hit: bool
    images: int
    failed: int
    dim: int
    seconds: float
    key: str
    resumed_from: int = 0
    failures: list[tuple[str, str]] = field(default_factory=list)

    def to_json(self) -> dict:
        out = asdict(self)
        out["cache_path"] = str(self.cache_path)
        out["failures"] = [{"path": p, "reason": r} for p, r in self.failures]
        return out


def extract_features(
    data: str | os.PathLike,
    backbone: str = DEFAULT_BACKBONE,
    weights: str = "default",
    layer: str | None = None,
    pool: str = "avg",
    image_size: int | None = None,
    dtype: str = "float32",
    cache_dir: str | os.PathLike = DEFAULT_CACHE_DIR,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    strict: bool = False,
    hash_contents: bool = False,
    split_fractions: tuple[float, float, float] = (0.8, 0.1, 0.1),
    seed: int = 0,
    progress: bool | None = None,
    on_batch: Callable[[int, int], None] | None = None,
) -> ExtractResult:
    """Extract bottleneck features of every image once, or find them in the cache.

    Parameters
    ----------
    data
        Image folder, split folder or CSV manifest (see :func:`pipeline.data.load_image_set`).
    backbone, weights, layer, pool, image_size
        Which network and features (see :func:`pipeline.backbones.resolve_backbone`).
    dtype
        Stored feature type, ``float32`` or ``float16`` (half the disk).
    cache_dir
        Folder of the HDF5 caches.
    batch_size, workers, device
        Images per forward pass [default: by device], loader processes, ``auto|cuda|mps|cpu``.
    strict
        Stop at the first unreadable image instead of skipping and listing it.
    hash_contents
        Fingerprint images by content hash instead of size and modification time.
    split_fractions, seed
        The stratified split made when the data gives none; ``seed`` also seeds a random init.
    progress
        Show a progress bar; by default only when stderr is a terminal.
    on_batch
        Called with ``(rows_done, total)`` after each batch is safely on disk.

    Returns
    -------
    ExtractResult
        ``hit`` is True when the cache already held these features and no model ran.
    """
    started = time.perf_counter()
    if dtype not in DTYPES:
        raise DataError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    images = load_image_set(data, split_fractions, seed)
    spec = resolve_backbone(backbone, weights, layer, pool, image_size, seed)
    run_on = resolve_device(device)
    key_spec = feature_key_spec(spec, images, dtype, hash_contents, autocast_dtype(run_on))
    key = cache_key(key_spec)
    final = cache_path(cache_dir, spec.name, key)
    if final.exists():
        images_n, dim, failures = stored_summary(final)
        return ExtractResult(final, True, images_n, len(failures), dim,
                             time.perf_counter() - started, key, failures=failures)
    model = prepare_model(spec, run_on)
    dim = _feature_dim(model, spec, run_on)
    meta = {"paths": images.paths, "labels": images.labels, "split": images.splits,
            "classes": images.classes, "data_root": str(images.root),
            # The arguments that rebuild this backbone, for `pipeline predict` on new images.
            "request": {"backbone": backbone, "weights": weights, "layer": layer, "pool": pool,
                        "image_size": image_size, "seed": seed}}
    writer = FeatureWriter(final, key_spec, key, dim, dtype, meta)
    resumed_from = writer.rows_done
    try:
        forward_s = _run(model, spec, images, writer, run_on, batch_size, workers, strict,
                         progress, on_batch)
        failures = writer.failures()
        seconds = time.perf_counter() - started
        writer.finish({"timings": {"seconds": seconds, "forward_seconds": forward_s,
                                   "resumed_from": resumed_from, "device": str(run_on)},
                       "versions": _versions()})
    finally:
        writer.close()
    return ExtractResult(final, False, len(images), len(failures), dim, seconds, key,
                         resumed_from, failures)


def feature_key_spec(spec: BackboneSpec, images: ImageSet, dtype: str, hash_contents: bool,
                     amp: torch.dtype | None) -> dict:
    """Everything that changes the stored numbers; its hash names the cache file."""
    return {
        **spec.key(),
        "autocast": str(amp).removeprefix("torch.") if amp else None,
        "dataset": {
            "fingerprint": fingerprint_files(images, hash_contents),
            "fingerprint_method": "sha256" if hash_contents else "size+mtime",
            "images": len(images),
        },
        "splits": {"sha256": fingerprint_splits(images), "source": images.split_source},
        "dtype": dtype,
    }


def prepare_model(spec: BackboneSpec, device: torch.device) -> torch.nn.Module:
    """The feature model on ``device``, ready for inference."""
    if device.type == "cpu":
        keep_freed_memory()
    # channels_last weights are faster on GPUs and, measured here, on this CPU too.
    return spec.build().to(device, memory_format=torch.channels_last)


@torch.inference_mode()
def _feature_dim(model: torch.nn.Module, spec: BackboneSpec, device: torch.device) -> int:
    crop = spec.preprocessing.crop
    return int(model(torch.zeros(1, 3, crop, crop, device=device)).shape[1])


def _loader(images: ImageSet, spec: BackboneSpec, start: int, batch_size: int | None,
            workers: int | None, device: torch.device) -> torch.utils.data.DataLoader:
    crop = spec.preprocessing.crop
    files = ImageFiles(images, spec.preprocessing.transform(), (3, crop, crop))
    workers = default_workers() if workers is None else workers
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(files, range(start, len(images))),
        batch_size=batch_size or default_batch_size(device), shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)


@dataclass
class FeatureBatch:
    """Features of images ``start:start+len(features)``; NaN rows where ``valid`` is False."""

    start: int
    features: np.ndarray
    valid: np.ndarray
    failures: list[tuple[int, str]]  # (image index, why it could not be read)
    forward_s: float


@torch.inference_mode()
def feature_batches(model: torch.nn.Module, spec: BackboneSpec, images: ImageSet,
                    device: torch.device, start: int = 0, batch_size: int | None = None,
                    workers: int | None = None, progress: bool | None = None,
                    desc: str = "extract") -> Iterator[FeatureBatch]:
    """Decode, preprocess and run images ``start:`` through ``model``, batch by batch."""
    show = sys.stderr.isatty() if progress is None else progress
    with tqdm(total=len(images), initial=start, unit="img", disable=not show,
              desc=f"{desc} {spec.name}", dynamic_ncols=True) as bar:
        for x, index, errors in _loader(images, spec, start, batch_size, workers, device):
            started = time.perf_counter()
            x = x.to(device, non_blocking=True)
            if device.type == "cuda":
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(device):
                feats = model(x).float().cpu().numpy()
            valid = np.array([not e for e in errors])
            feats[~valid] = np.nan
            failures = [(int(i), e) for i, e in zip(index, errors) if e]
            yield FeatureBatch(int(index[0]), feats, valid, failures,
                               time.perf_counter() - started)
            bar.update(len(index))


def _run(model, spec, images, writer, device, batch_size, workers, strict, progress,
         on_batch) -> float:
    """Feed every not-yet-written image through the model; returns seconds spent in forward."""
    forward_s = 0.0
    for batch in feature_batches(model, spec, images, device, writer.rows_done, batch_size,
                                 workers, progress):
        if strict and batch.failures:
            i, reason = batch.failures[0]
            raise DataError(f"{images.paths[i]}: unreadable image ({reason}); "
                            "drop --strict to skip and list such files")
        writer.write(batch.start, batch.features, batch.valid, batch.failures)
        forward_s += batch.forward_s
        if on_batch is not None:
            on_batch(writer.rows_done, len(images))
    return forward_s


def _versions() -> dict:
    names = ("torch", "torchvision", "timm", "h5py", "numpy", "pillow")
    return {"pipeline": version("pipeline"), **{n: version(n) for n in names}}

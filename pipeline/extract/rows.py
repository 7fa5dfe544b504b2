"""One extraction's loop: images through the prepared network into a cache file's writer.

:class:`ExtractionRun` holds what every list of images is fed through with (the network, the
loading settings, the images decoded early); ``pipeline extract`` runs it once over the whole
set, and under torchrun each rank over its shard (:mod:`pipeline.extract.sharded`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import version
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core import distribution
from pipeline.core.errors import DataError
from pipeline.data.early import EarlyDecodes
from pipeline.data.images import ImageSet
from pipeline.data.layouts import display
from pipeline.extract.batches import FeatureBatch, feature_batches
from pipeline.models import engines
from pipeline.models.backbones import BackboneSpec
from pipeline.store.writer import FeatureWriter

if TYPE_CHECKING:
    import torch

__all__ = ["WRITE_EVERY_S", "ExtractionRun", "engine_record", "library_versions"]

# Features wait in memory until they fill a chunk of the cache (at most 256 KiB) or this many
# seconds have passed, then go to disk in one write: each write costs about 0.7 ms whatever
# its size (h5py's calls, the rows_done stamp), and in the main thread it holds up the
# decoding threads; a chunk at a time (31 writes on the demo instead of 213), onnxruntime's
# loop ran 209-213 img/s against 204-208 a batch at a time (2026-12-04, two runs each). A
# kill loses at most that much work; an error or Ctrl-C writes what is waiting first.
WRITE_EVERY_S = 2.0


@dataclass
class ExtractionRun:
    """One extraction's model and loading settings, to feed any list of images through."""

    model: torch.nn.Module
    spec: BackboneSpec
    images: ImageSet
    device: torch.device
    batch_size: int | None
    workers: int
    strict: bool
    progress: bool | str | None
    on_batch: Callable[[int, int], None] | None
    decode_ahead: bool | None = None  # see feature_batches
    streams: int = 1  # batches run at once (see feature_batches)
    decode: str = "draft"  # how JPEGs are decoded (pipeline.data.decode)
    early: EarlyDecodes | None = None  # the first images, decoded while the network loaded

    def rows(self, writer: FeatureWriter, indices: np.ndarray, desc: str = "extract") -> float:
        """Write the features of ``indices[writer.rows_done:]``; returns seconds in forward.

        Batches are written together once they fill a chunk of the file or every
        :data:`WRITE_EVERY_S` seconds; whatever waits is written before an error (an
        unreadable image under ``strict``, Ctrl-C) leaves.
        """
        forward_s, waiting, rows, written_at = 0.0, [], 0, time.perf_counter()
        try:
            for batch in feature_batches(self.model, self.spec, self.images, self.device,
                                         indices[writer.rows_done:], self.batch_size,
                                         self.workers, self.progress, desc,
                                         done=writer.rows_done, decode_ahead=self.decode_ahead,
                                         streams=self.streams, decode=self.decode,
                                         early=self.early):
                if self.strict and batch.failures:
                    i, reason = batch.failures[0]
                    raise DataError(f"{display(self.images.paths[i])}: unreadable image "
                                    f"({reason}), and strict mode stops at the first",
                                    path=self.images.paths[i], why=reason,
                                    reason="strict-unreadable")
                waiting.append(batch)
                forward_s, rows = forward_s + batch.forward_s, rows + len(batch.index)
                if rows >= writer.chunk_rows or time.perf_counter() - written_at >= WRITE_EVERY_S:
                    batches, waiting, rows = waiting, [], 0
                    self._write(writer, batches, len(indices))
                    written_at = time.perf_counter()
        finally:
            if waiting:
                self._write(writer, waiting, len(indices))
        return forward_s

    def _write(self, writer: FeatureWriter, batches: list[FeatureBatch], total: int) -> None:
        writer.write(writer.rows_done, np.concatenate([b.features for b in batches]),
                     np.concatenate([b.valid for b in batches]),
                     [f for b in batches for f in b.failures],
                     np.concatenate([b.digests for b in batches]))
        if self.on_batch is not None:
            self.on_batch(writer.rows_done, total)


def engine_record(prepared: engines.Prepared) -> dict:
    """What the cache records of the engine that computed it."""
    return {"name": prepared.engine, "version": engines.get_engine(prepared.engine).version(),
            "prepare_seconds": prepared.seconds, "exported": prepared.exported,
            "check_difference": prepared.difference, "note": prepared.note}


def library_versions(engine: str = "torch") -> dict:
    """The versions of the libraries that computed a cache (and of its engine)."""
    names = ("torch", "torchvision", "timm", "h5py", "numpy", "pillow")
    out = {"pipeline": distribution.version(), **{n: version(n) for n in names}}
    if engine != "torch":
        out[engines.get_engine(engine).distribution] = engines.get_engine(engine).version()
    return out

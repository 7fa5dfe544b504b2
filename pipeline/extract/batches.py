"""From images to feature rows: the prepared network, and batches streamed through it.

:func:`feature_batches` decodes images (in loader processes, or a background thread that keeps
:data:`_PREFETCH_BATCHES` batches ahead) while the engine runs the current batch, and yields
each batch's rows with their timings; :func:`prepare_model` puts a backbone in inference form.
Used by extraction, by ``pipeline predict`` and by the benchmarks alike.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.devices import (
    autocast,
    default_batch_size,
    default_workers,
)
from pipeline.core.progress import Progress
from pipeline.data.early import EarlyDecodes
from pipeline.data.images import (
    ImageFiles,
    ImageSet,
)
from pipeline.models import engines
from pipeline.models.backbones import BackboneSpec, build_feature_model
from pipeline.models.families import family_of

if TYPE_CHECKING:
    import torch


__all__ = ["FeatureBatch", "extraction_reads", "feature_batches", "feature_dim", "prefetched",
           "prepare_model"]


# Batches decoded ahead by a background thread while the engine runs the current one (when
# no loader processes do it); 0 decodes in turn with the forward passes.
_PREFETCH_BATCHES = 2
# Decoding a batch in turn takes this fraction of its forward pass or more: threads decode
# ahead, torch on one thread. The demo's 28 px PNGs take 0.08 of Lite0's forward pass, 12 MP
# JPEGs drafted about 5 on an idle 2-core machine; a busy machine slows torch's threads most
# (0.26 measured there, 2026-12-07), hence a threshold well below 1.
_THREADS_FROM = 0.25


def prepare_model(spec: BackboneSpec, device: torch.device) -> torch.nn.Module:
    """The feature model on ``device``, prepared for inference by the torch engine
    (:func:`pipeline.models.engines.prepare_for_inference`: BatchNorm folded, static padding,
    channels_last weights, which are faster on GPUs and, measured here, on this CPU too)."""
    import torch

    crop = spec.preprocessing.crop
    example = torch.randn(2, 3, crop, crop, generator=torch.Generator().manual_seed(0))
    return engines.prepare("torch", build_feature_model(spec), example, family_of(spec), device).run


def feature_dim(model: torch.nn.Module, spec: BackboneSpec, device: torch.device) -> int:
    import torch

    crop = spec.preprocessing.crop
    with torch.inference_mode():
        return int(model(torch.zeros(1, 3, crop, crop, device=device)).shape[1])


def _files(images: ImageSet, spec: BackboneSpec, files: ImageFiles | None,
           decode: str = "draft", early: EarlyDecodes | None = None) -> ImageFiles:
    """``files``, or extraction's own: the recipe's preprocessing up to 8-bit crops, which
    :func:`feature_batches` normalises a batch at a time, each file hashed once, a JPEG
    decoded as ``decode`` says (:func:`pipeline.data.decode.decode_image`), the first ones
    taken from ``early`` where a helper process decoded them (:func:`extraction_reads`)."""
    if files is not None:
        return files
    crop = spec.preprocessing.crop
    return ImageFiles(images, spec.preprocessing.transform(normalize=False), (3, crop, crop),
                      hash_files=True, dtype="uint8", recipe=spec.preprocessing, decode=decode,
                      early=early)


def extraction_reads(spec: BackboneSpec, decode: str = "draft") -> dict:
    """How extraction reads each image (:func:`pipeline.data.images.read_image`'s keywords),
    known before torch is imported: what :class:`pipeline.data.early.EarlyDecodes` needs to
    decode the first images the way the loop would."""
    recipe = spec.preprocessing
    return {"hash_file": True, "resize": recipe.resize, "interpolation": recipe.interpolation,
            "decode": decode}


def _loader(images: ImageSet, spec: BackboneSpec, indices: Sequence[int],
            batch_size: int | None, workers: int | None, device: torch.device,
            files: ImageFiles | None = None, decode: str = "draft"
            ) -> torch.utils.data.DataLoader:
    import torch

    workers = default_workers() if workers is None else workers
    return torch.utils.data.DataLoader(
        torch.utils.data.Subset(_files(images, spec, files, decode), indices),
        batch_size=batch_size or default_batch_size(device), shuffle=False, num_workers=workers,
        pin_memory=device.type == "cuda", prefetch_factor=4 if workers else None)


@dataclass
class FeatureBatch:
    """Features of the images ``index``; NaN rows where ``valid`` is False."""

    index: np.ndarray  # positions of the rows in the image set
    features: np.ndarray
    valid: np.ndarray
    failures: list[tuple[int, str]]  # (image index, why it could not be read)
    forward_s: float
    digests: np.ndarray  # SHA-256 (hex bytes) of each image file, b"" where unreadable

    @property
    def start(self) -> int:
        return int(self.index[0])


def feature_batches(model: torch.nn.Module, spec: BackboneSpec, images: ImageSet,
                    device: torch.device, indices: Sequence[int] | None = None,
                    batch_size: int | None = None, workers: int | None = None,
                    progress: bool | str | None = None, desc: str = "extract", done: int = 0,
                    files: ImageFiles | None = None,
                    decode_ahead: bool | None = None, streams: int = 1, decode: str = "draft",
                    early: EarlyDecodes | None = None) -> Iterator[FeatureBatch]:
    """Decode, preprocess and run images ``indices`` (default: all) through ``model``, in order.

    ``model`` is any callable from an image batch to a feature batch (a network, or an engine
    of :mod:`pipeline.models.engines`). ``done`` rows already handled elsewhere start the progress
    bar part-full. ``files`` reads the images instead of the recipe's preprocessing with hashing
    (augmented views, say); ``decode`` is how that preprocessing decodes a JPEG
    (:func:`pipeline.data.decode.decode_image`), and ``early`` the first images a helper
    process decoded while this one started (:mod:`pipeline.data.early`).

    Without loader processes, the first batch is decoded and run in turn, and timed. If its
    decoding took a quarter of its forward pass or more (photos of several megapixels, say),
    threads, one per core, decode the next images while ``model`` runs (decoding, resizing and
    hashing release the GIL) and torch runs on one thread: decoding is then the larger share,
    and a core left idle while one thread decodes costs more than the forward pass loses.
    Otherwise, with ``decode_ahead``, one background thread decodes the next batches; by default
    it does so on a GPU, whose forward pass leaves the CPU free, and not on a CPU, where torch's
    own threads already take every core and the extra thread slows them (measured:
    :meth:`pipeline.models.engines.Engine.decodes_ahead` says per engine). With ``streams`` > 1
    and no loader processes, that many threads each decode a whole batch and run it, ``model``
    being built for that many calls at once, one core each
    (:meth:`pipeline.models.engines.Engine.streams`): a thread decoding never holds up a forward
    pass spread over every core.
    """
    indices = range(len(images)) if indices is None else indices
    workers = default_workers() if workers is None else workers
    decode_ahead = device.type != "cpu" if decode_ahead is None else decode_ahead
    run = _forward(model, spec, device)
    size = batch_size or default_batch_size(device)
    if early is not None and workers:
        raise ValueError("early decodes are for decoding in this process (workers=0)")
    if streams > 1 and workers == 0:
        batches = _streamed(run, _files(images, spec, files, decode, early), indices, size,
                            streams)
    elif workers == 0:
        batches = _in_process(run, _files(images, spec, files, decode, early), indices, size,
                              decode_ahead, device.type == "cpu")
    else:
        loaded = _loader(images, spec, indices, size, workers, device, files, decode)
        batches = ((*_timed(run, x), index, errors, digests)
                   for x, index, errors, digests in loaded)
    with Progress(done + len(indices), f"{desc} {spec.name}", "img", progress=progress,
                  initial=done) as bar:
        for feats, forward_s, index, errors, digests in batches:
            valid = np.array([not e for e in errors])
            feats[~valid] = np.nan
            failures = [(int(i), e) for i, e in zip(index, errors) if e]
            yield FeatureBatch(index.numpy(), feats, valid, failures, forward_s,
                               np.asarray(digests, "S64"))
            bar.update(len(index))


def _forward(model: Callable, spec: BackboneSpec, device: torch.device) -> Callable:
    """A batch as the loader gives it (8-bit crops, or images already normalised) to its
    features as a NumPy array, in inference mode (which is per thread: entered on each call)."""
    import torch

    def run(x: torch.Tensor) -> np.ndarray:
        x = x.to(device, non_blocking=True)
        if x.dtype == torch.uint8:  # the recipe's crops, not yet normalised
            x = spec.preprocessing.normalize(x)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(device), torch.inference_mode():
            return model(x).float().cpu().numpy()

    return run


def _timed(run: Callable, x) -> tuple[np.ndarray, float]:
    started = time.perf_counter()
    return run(x), time.perf_counter() - started


def _streamed(run: Callable, files: ImageFiles, indices: Sequence[int], batch_size: int,
              streams: int) -> Iterator[tuple]:
    """``(features, forward seconds, index, errors, digests)`` of each batch of ``indices``,
    in order, ``streams`` threads each decoding and running one batch at a time (each batch's
    forward seconds are its own thread's: summed, they exceed the loop's).

    Twice as many batches as threads are handed out, so a thread that finishes finds the next
    one waiting while this thread writes. Closing the generator cancels the batches not
    started and waits for the running ones.
    """
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    def one(batch: Sequence[int]) -> tuple:
        x, index, errors, digests = _collated([files[i] for i in batch])
        return (*_timed(run, x), index, errors, digests)

    pending: deque = deque()
    with ThreadPoolExecutor(streams, thread_name_prefix="pipeline-stream") as pool:
        try:
            for start in range(0, len(indices), batch_size):
                pending.append(pool.submit(one, indices[start:start + batch_size]))
                if len(pending) >= 2 * streams:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for future in pending:
                future.cancel()


def _in_process(run: Callable, files: ImageFiles, indices: Sequence[int], batch_size: int,
                decode_ahead: bool, on_cpu: bool = True) -> Iterator[tuple]:
    """``(features, forward seconds, index, errors, digests)`` of each batch of ``indices``, in
    order, decoded in this process: the batches a helper process decoded early first (torch on
    all its threads: there is nothing left to decode), then the next batch in turn, the rest
    as :func:`feature_batches` says (by threads, one per core, where decoding outweighs the
    forward pass; else by one thread ahead with ``decode_ahead``, or in turn).

    While threads decode on the CPU, torch runs on one thread (:func:`_one_torch_thread`)."""
    batches = [indices[start:start + batch_size]
               for start in range(0, len(indices), batch_size)]
    early = files.early
    while batches and early is not None and all(early.holds(i) for i in batches[0]):
        x, index, errors, digests = _collated([files[i] for i in batches.pop(0)])
        yield (*_timed(run, x), index, errors, digests)
    if not batches:
        return
    started, early_s = time.perf_counter(), _early_seconds(files)
    x, index, errors, digests = _collated([files[i] for i in batches[0]])
    # Images a helper process decoded early count with the seconds they took there.
    decode_s = time.perf_counter() - started + _early_seconds(files) - early_s
    feats, forward_s = _timed(run, x)
    yield feats, forward_s, index, errors, digests
    threaded = decode_s > _THREADS_FROM * forward_s
    if threaded:
        decoded = _decoded_by_threads(files, batches[1:], _cores(), _PREFETCH_BATCHES)
    else:
        decoded = (_collated([files[i] for i in batch]) for batch in batches[1:])
        if decode_ahead:
            decoded = prefetched(decoded, _PREFETCH_BATCHES)
    with _one_torch_thread(threaded and on_cpu):
        for x, index, errors, digests in decoded:
            yield (*_timed(run, x), index, errors, digests)


def _early_seconds(files: ImageFiles) -> float:
    return 0.0 if files.early is None else files.early.seconds


def _decoded_by_threads(files: ImageFiles, batches: Sequence[Sequence[int]], threads: int,
                        depth: int) -> Iterator[tuple]:
    """Each of ``batches`` collated, in order, its images decoded one per task by ``threads``
    threads that keep ``depth`` batches ahead of the one handed out. Closing the generator
    cancels the images not started and waits for the running ones."""
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pending: deque = deque()
    with ThreadPoolExecutor(threads, thread_name_prefix="pipeline-decode") as pool:
        try:
            for batch in batches:
                pending.append([pool.submit(files.__getitem__, i) for i in batch])
                if len(pending) > depth:
                    yield _collated([f.result() for f in pending.popleft()])
            while pending:
                yield _collated([f.result() for f in pending.popleft()])
        finally:
            for futures in pending:
                for future in futures:
                    future.cancel()


@contextmanager
def _one_torch_thread(active: bool) -> Iterator[None]:
    """Torch's operations on one thread (the forward pass, and the decoding threads' few)
    while ``active``, then as many as before.

    Threads that decode already take every core; torch's own OpenMP threads would then spin at
    each layer's barrier waiting for a core (measured 2026-12-07 on 24 phone photos, 2 cores
    busy with other work: 1.3 img/s and 205 CPU-ms per image with two torch threads, 4.0 to
    4.7 img/s and 62 to 72 CPU-ms with one). Set before the decoding threads start, which
    take the count when they first run a torch operation.
    """
    if not active:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _collated(items: list) -> tuple:
    from torch.utils.data import default_collate

    return default_collate(items)


def _cores() -> int:
    """The cores this process may run on (a container's or taskset's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def prefetched(items: Iterable, depth: int) -> Iterator:
    """``items`` in order, produced ``depth`` ahead by a background thread (``depth`` 0: in
    this thread). An exception in the producer is raised here; closing the generator (an
    error or Ctrl-C in the consumer) stops the thread before it returns."""
    if depth <= 0:
        yield from items
        return
    import queue
    import threading

    ahead: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ahead.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((True, item)):
                    return
        except BaseException as err:  # handed to the consumer, which raises it
            put((False, err))
            return
        put((False, None))

    thread = threading.Thread(target=produce, name="pipeline-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            ok, item = ahead.get()
            if not ok:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stop.set()
        thread.join()

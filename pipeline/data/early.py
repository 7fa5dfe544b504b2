"""The first images decoded by a helper process while this one starts.

A fresh ``pipeline extract`` spends its first seconds on one core: importing torch, timm and
torchvision, building the network and checking its engine (about 5 s on the 2-core CPU the
project runs on, against 4 s for the loop over 120 phone photos). A 12-megapixel JPEG takes
tens of milliseconds to decode even drafted, so the other core can decode the first hundred
photos in that time. Threads cannot do it: the imports hold the GIL, and a decoding thread
that waits for it at each step between C calls decoded two thirds as many as a process
(measured 2026-12-07). :class:`EarlyDecodes` forks one process that decodes the first images
in order, exactly as :func:`pipeline.data.images.read_image` would here. Once the loop asks
for its first image the process takes nothing new: what it has decoded is handed over, the
image it is decoding is waited for, and the rest is left to the loop's own decoding.

Forked, not spawned: a spawned process imports the caller's main module again, which runs a
script's top level a second time where it lacks the ``if __name__ == "__main__"`` guard. A
fork is safe only before torch is loaded (its thread pools do not survive a fork) and while
this process runs one thread, which is when decoding early pays anyway: :func:`can_start`.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError, Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from PIL import Image

__all__ = ["EARLY_IMAGES", "EarlyDecodes", "can_start"]

# At most this many images are decoded early: about 5 s of start-up at 39 ms a drafted phone
# photo is 130 images; a drafted image (the recipe's resize, about 260 KB at 256 px) held
# until the loop takes it costs little memory at this count.
EARLY_IMAGES = 192


def can_start() -> bool:
    """Whether a process can be forked safely here, and has start-up to hide: on Linux (where
    fork is the platform's own way), torch not yet imported, one thread running."""
    return (sys.platform.startswith("linux") and hasattr(os, "fork")
            and "torch" not in sys.modules and threading.active_count() == 1)


def _timed_read(path: str, **decoding) -> tuple[Image.Image, str, float]:
    """``read_image(path, ...)`` and the seconds it took (in the helper process)."""
    from pipeline.data.images import read_image

    started = time.perf_counter()
    image, digest = read_image(path, **decoding)
    return image, digest, time.perf_counter() - started


class EarlyDecodes:
    """Images ``0 .. count - 1`` of ``paths`` decoded, in order, by one forked process.

    ``decoding`` holds :func:`~pipeline.data.images.read_image`'s keywords (``hash_file``,
    ``resize``, ``interpolation``, ``decode``); :meth:`take` gives ``(image, digest)`` as it
    would, raises what it would raise, or returns None for an image the process never
    decoded. ``taken`` counts the images handed over and ``seconds`` their decoding time,
    for a caller that weighs decoding against the forward pass. Start one only where
    :func:`can_start` says so.
    """

    def __init__(self, paths: Sequence[str], *, count: int = EARLY_IMAGES, **decoding):
        import multiprocessing

        self.decoding = decoding
        self.seconds, self.taken = 0.0, 0
        self._lock = threading.Lock()
        self._stopped = False
        self._pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork"))
        read = functools.partial(_timed_read, **decoding)
        self._futures: dict[int, Future] = {
            i: self._pool.submit(read, str(path)) for i, path in enumerate(paths[:count])}

    def take(self, i: int) -> tuple[Image.Image, str] | None:
        """Image ``i`` as ``read_image`` gives it, if the helper process decoded it; the first
        call stops the process from starting any other."""
        self.stop()
        with self._lock:
            future = self._futures.pop(i, None)
        if future is None:
            return None
        try:
            image, digest, seconds = future.result()
        except (CancelledError, BrokenProcessPool):  # not started, or the process could not run
            return None
        with self._lock:  # decoding threads take images side by side
            self.seconds, self.taken = self.seconds + seconds, self.taken + 1
        return image, digest

    def ready(self) -> int:
        """How many images are decoded and waiting to be taken."""
        with self._lock:
            return sum(f.done() and not f.cancelled() for f in self._futures.values())

    def holds(self, i: int) -> bool:
        """Whether :meth:`take` will give image ``i`` (decoded, or being decoded); stops the
        process from starting any other, so the answer stays true."""
        self.stop()
        with self._lock:
            future = self._futures.get(i)
        return future is not None and not future.cancelled()

    def stop(self) -> None:
        """Start no other image; the one being decoded finishes (and can be taken)."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            # Cancelled here, not by shutdown's cancel_futures, which the executor's own thread
            # carries out later: until then holds() would count images that never come.
            for future in self._futures.values():
                future.cancel()  # False for the images decoded or being decoded: kept
        self._pool.shutdown(wait=False)

    def close(self) -> None:
        """Stop, drop what was never taken, and let the process end."""
        self.stop()
        with self._lock:
            self._futures.clear()

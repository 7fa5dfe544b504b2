"""Test images that are also training images: which ones, from the hashes a cache stores.

A test image whose bytes are those of a training or validation image measures memory, not
generalisation: the head or network has seen it (or chose its hyperparameters on it). The
cache stores each image's SHA-256 (``content_sha256``); a test image leaks when an image of
another split has the same one.
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.store.cache import open_cache, read_strings


def leaked_test_images(path: str | os.PathLike) -> tuple[list[str], np.ndarray | None]:
    """The readable test images of a cache, and whether each one is also a train or val image.

    Parameters
    ----------
    path
        A complete, labelled feature cache.

    Returns
    -------
    paths : list of str
        The test images, relative to the data root, in the order of
        :func:`pipeline.store.cache.read_splits` (the order every stage scores them in).
    leaked : numpy.ndarray or None
        ``(len(paths),)`` booleans: True where an image of the train or val split has the same
        bytes; None for a cache that stores no hashes (format 1).
    """
    with open_cache(path) as f:
        valid = f["valid"][:]
        split = read_strings(f["split"])
        test = valid & (split == "test")
        paths = read_strings(f["paths"])[test].tolist()
        if "content_sha256" not in f:
            return paths, None
        digests = f["content_sha256"][:]
    seen = digests[valid & (split != "test") & (digests != b"")]
    return paths, np.isin(digests[test], seen) & (digests[test] != b"")


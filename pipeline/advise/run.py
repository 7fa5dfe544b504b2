"""``advise``: extract every block's features of a data set (or reuse their cache), then advise."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.advise.rule import Advice, advise_cache
from pipeline.core.options import DEFAULT_BACKBONE

__all__ = ["advise"]


def advise(data: str | os.PathLike, out: str | os.PathLike | None = "results/advice", *,
           backbone: str = DEFAULT_BACKBONE, seed: int = 0, progress: bool | str | None = None,
           **settings) -> Advice:
    """Which strategy (heads only, fine-tune the top block, or deeper) suits ``data``.

    Parameters
    ----------
    data
        An image folder, split folder or manifest (its blocks are extracted in one pass into a
        cache, or found there: :func:`pipeline.extract_features` with ``layer="blocks"``), or a
        cache extracted with ``--layer blocks``.
    out
        Folder of ``advice.json|md`` and ``advice_layers.csv|md``; None: nothing written.
    backbone, settings
        As :func:`pipeline.extract_features` takes them (``weights``, ``image_size``,
        ``cache_dir``, ``split_fractions``, ``offline``, ...).
    seed
        Seed of the splits carved from training images and of the per-layer probes.

    Returns
    -------
    Advice
        The strategy, the ``--unfreeze`` depth and the depths to sweep around it, with the
        size per class, the per-layer probes and LogME that chose them
        (:mod:`pipeline.advise.rule`).
    """
    if Path(data).suffix == ".h5":
        return advise_cache(data, out, seed)
    from pipeline.extract.features import extract_features

    result = extract_features(data, backbone, layer="blocks", seed=seed, progress=progress,
                              **settings)
    return advise_cache(result.cache_path, out, seed)

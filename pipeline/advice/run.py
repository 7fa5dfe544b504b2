"""``advise``: extract every block's features of a data set (or reuse their cache), then advise."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.advice.rule import AdviceResult, advise_cache
from pipeline.core.errors import DataError
from pipeline.core.options import DEFAULT_BACKBONE, AdviseOptions
from pipeline.models.backbones import BackboneSpec

__all__ = ["advise"]


def advise(data: str | os.PathLike, *, backbone: str | BackboneSpec = DEFAULT_BACKBONE,
           options: AdviseOptions = AdviseOptions(), progress: bool | str | None = None
           ) -> AdviceResult:
    """Which strategy (heads only, fine-tune the top block, or deeper) suits ``data``.

    Computes and writes nothing but the blocks' cache: ``result.write(out)`` writes
    ``advice.json|md|png`` and ``advice_layers.csv|md``.

    Parameters
    ----------
    data
        An image folder, split folder or manifest (its blocks are extracted in one pass into a
        cache, or found there: :func:`pipeline.extract_features`), or a cache extracted with
        ``--layer blocks``.
    backbone
        For an image set: a backbone name (resolved with ``layer="blocks"``, its default
        weights and ``options.extract.seed``) or a
        :class:`~pipeline.models.backbones.BackboneSpec` resolved with ``layer="blocks"``
        (:func:`pipeline.resolve_backbone`, for other weights or an image size). Unused for a
        cache.
    options
        :class:`~pipeline.core.options.AdviseOptions`: ``seed`` of the per-layer probes, and
        ``extract``, the :class:`~pipeline.core.options.ExtractOptions` of the extraction
        (``cache_dir``, ``split_fractions``, ``seed`` of the carved splits, ``device``, ...).
    progress
        The extraction's progress on stderr (:mod:`pipeline.core.progress`); False: nothing.

    Returns
    -------
    AdviceResult
        The strategy, the ``--unfreeze`` depth and the depths to sweep around it, with the
        size per class, the per-layer probes and LogME that chose them
        (:mod:`pipeline.advice.rule`).
    """
    if Path(data).suffix == ".h5":
        return advise_cache(data, options=options)
    from pipeline.extract.features import extract_features
    from pipeline.models.backbones import resolve_backbone

    if isinstance(backbone, BackboneSpec):
        if backbone.layer != "blocks":
            raise DataError(f"advice needs every block's features; resolve {backbone.name} "
                            "with layer='blocks'")
        spec = backbone
    else:
        spec = resolve_backbone(backbone, layer="blocks", seed=options.extract.seed)
    result = extract_features(data, backbone=spec, options=options.extract, progress=progress)
    return advise_cache(result.cache_path, options=options)

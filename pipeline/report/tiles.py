"""Sheets of image tiles, each with a caption: the report's mistakes and the audit's suspects.

Both read their images again from the data folder, which may have moved since the cache was
written, so an image that cannot be read gets a blank tile that says so rather than an error.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.report.plots import figure

__all__ = ["thumbnail", "tile_sheet"]

_BLANK = 235  # the grey of an unreadable image's tile


def thumbnail(path: Path, size: int) -> np.ndarray | None:
    """The image at ``path``, shrunk to a tile (``size`` px on its longer side), as RGB
    pixels; None if it cannot be read. A large JPEG is decoded at the scale the tile needs
    (:func:`pipeline.data.decode.decode_image`), its EXIF orientation applied as extraction
    applies it."""
    from PIL import Image

    from pipeline.data.images import read_image

    try:  # a file, or an image inside a shard
        image, _ = read_image(path, hash_file=False, resize=size, interpolation="bicubic",
                              decode="draft")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning):
        return None
    image.thumbnail((size, size))
    return np.asarray(image)


def tile_sheet(paths: Sequence[str], captions: Sequence[str], root: str | os.PathLike | None,
               title: str, *, columns: int, size: int, tile_inches: tuple[float, float],
               caption_size: int, empty: str):
    """A :class:`matplotlib.figure.Figure` of one tile per image, left to right, then down.

    Parameters
    ----------
    paths, captions
        Each image's path (relative to ``root``; None: as it is) and the caption above it.
    title
        Above the tiles.
    columns
        Tiles per row, at most.
    size
        Pixels on a tile image's longer side.
    tile_inches
        Width and height of one tile, its caption included.
    caption_size
        Font size of the captions.
    empty
        What the sheet says when there is no image.
    """
    columns = max(1, min(columns, len(paths)))
    rows = max(1, -(-len(paths) // columns))
    width, height = tile_inches
    fig, axes = figure(rows, columns, figsize=(width * columns, height * rows + 0.6),
                       squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, path, caption in zip(axes.flat, paths, captions):
        image = thumbnail(Path(root or "") / path, size)
        if image is None:
            ax.imshow(np.full((size, size, 3), _BLANK, np.uint8))
            ax.text(0.5, 0.5, "unreadable", transform=ax.transAxes, ha="center", va="center",
                    color="tab:red")
        else:
            ax.imshow(image)
        ax.set_title(caption, fontsize=caption_size)
    if not paths:
        axes[0][0].text(0.5, 0.5, empty, transform=axes[0][0].transAxes, ha="center",
                        va="center")
    fig.suptitle(title, fontsize=10)
    return fig

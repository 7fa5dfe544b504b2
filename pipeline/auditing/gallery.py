"""Contact sheets of the audit's suspects: each image with what the audit says of it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from pipeline.report.plots import save
from pipeline.report.tiles import tile_sheet

__all__ = ["gallery"]

_THUMBNAIL = 128  # pixels, the longer side of a tile's image: more tiles than the report's
_COLUMNS = 6


def gallery(paths: Sequence[str], captions: Sequence[str], out: str | os.PathLike,
            root: str | os.PathLike | None, title: str, columns: int = _COLUMNS) -> Path:
    """One tile per image (read from ``root / path``), its caption above it, saved as PNG.

    An image that cannot be read (the data folder moved) gets a blank tile saying so.
    """
    return save(tile_sheet(paths, captions, root, title, columns=columns, size=_THUMBNAIL,
                           tile_inches=(2.2, 2.5), caption_size=7, empty="nothing to show"),
                out)

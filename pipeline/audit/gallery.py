"""Contact sheets of the audit's suspects: each image with what the audit says of it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.report.mistakes import thumbnail as report_thumbnail
from pipeline.report.plots import figure, save

__all__ = ["gallery", "thumbnail"]

_THUMBNAIL = 128  # pixels, the longer side of a tile's image
_COLUMNS = 6


def thumbnail(path: Path) -> np.ndarray | None:
    """The image at ``path`` shrunk to an audit tile; None if it cannot be read."""
    return report_thumbnail(path, _THUMBNAIL)


def gallery(paths: Sequence[str], captions: Sequence[str], out: str | os.PathLike,
            root: str | os.PathLike | None, title: str, columns: int = _COLUMNS) -> Path:
    """One tile per image (read from ``root / path``), its caption above it, saved as PNG.

    An image that cannot be read (the data folder moved) gets a blank tile saying so.
    """
    columns = max(1, min(columns, len(paths)))
    rows = max(1, -(-len(paths) // columns))
    fig, axes = figure(rows, columns, figsize=(2.2 * columns, 2.5 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.set_axis_off()
    for ax, path, caption in zip(axes.flat, paths, captions):
        image = thumbnail(Path(root or "") / path)
        if image is None:
            ax.imshow(np.full((_THUMBNAIL, _THUMBNAIL, 3), 235, np.uint8))
            ax.text(0.5, 0.5, "unreadable", transform=ax.transAxes, ha="center",
                    va="center", color="tab:red")
        else:
            ax.imshow(image)
        ax.set_title(caption, fontsize=7)
    if not paths:
        axes[0][0].text(0.5, 0.5, "nothing to show", transform=axes[0][0].transAxes,
                        ha="center", va="center")
    fig.suptitle(title, fontsize=10)
    return save(fig, out)

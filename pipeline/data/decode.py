"""Decoding an image at the size the network needs: a JPEG through its DCT scaling.

A 12-megapixel phone photo takes tens of milliseconds to decode in full and as long again to
resize to the 256 pixels a recipe crops from, while the network needs a few. A JPEG stores
8 x 8 blocks of frequencies, and libjpeg can decode them at 1/2, 1/4 or 1/8 of the size
(Pillow's ``Image.draft``), skipping most of the inverse transforms and all the pixels that the
resize would have averaged away. In ``"draft"`` mode :func:`decode_image` asks for a scale
that keeps the shorter side at least :data:`DRAFT_OVERSAMPLING` times the recipe's resize,
then resizes (antialiased, with the recipe's interpolation) over the part of the scaled image
that is the original picture (``draft`` returns that box, which differs from the whole
scaled image when a side is not a multiple of the scale), so the result has the size and
geometry that a full decode and resize give. ``"exact"`` decodes every pixel, as before.

Only JPEG (and MPO, the same codec) can be drafted. Any other image, and a JPEG too small to
be scaled down by at least 2, decodes the same in both modes: every pixel, with no resize here.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Sequence
from pathlib import PurePosixPath
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps

from pipeline.core.options import DECODE_MODES

__all__ = ["DECODE_MODES", "DRAFT_OVERSAMPLING", "decode_image", "may_draft", "resized_size"]

# The drafted image's shorter side is at least this many times the recipe's resize: the scaled
# decode averages 2 x 2 to 8 x 8 pixels with the inverse DCT's own filter, not the recipe's, so
# the recipe's antialiased resize still does the last factor of two or more and the result
# stays within a pixel level or so of a full decode and resize (docs/data.md has the figures).
DRAFT_OVERSAMPLING = 2
# Pillow's formats that draft() can scale: JPEG, and MPO (a JPEG with more pictures after it).
_DRAFTABLE = frozenset({"JPEG", "MPO"})


def decode_image(source: str | os.PathLike | bytes | BinaryIO, *, resize: int | None = None,
                 interpolation: str = "bilinear", mode: str = "draft") -> Image.Image:
    """Decode an image as 8-bit RGB with its EXIF orientation applied.

    Parameters
    ----------
    source
        A path, the file's bytes, or a binary file object (read from where it stands).
    resize
        The shorter side the recipe resizes to before cropping (``Preprocessing.resize``);
        None decodes every pixel, whatever ``mode``.
    interpolation
        The recipe's interpolation ("bilinear", "bicubic", ...), for a drafted image's resize.
    mode
        ``"draft"``: a JPEG large enough is decoded at a scale of 1/2 to 1/8 (its shorter side
        still at least ``DRAFT_OVERSAMPLING * resize``) and resized here to the recipe's
        size (:func:`resized_size`), so the recipe's own resize then leaves it as it is.
        ``"exact"``: every pixel, as the recipe's resize expects.

    Returns
    -------
    PIL.Image.Image
        In ``"draft"`` mode a drafted JPEG at the recipe's resized size; any other image at its
        own size.

    Raises
    ------
    OSError, ValueError, SyntaxError
        Missing, truncated, empty or non-image data.
    PIL.Image.DecompressionBombError
        An image above Pillow's pixel limit (its warning, above half the limit, is raised as an
        error too, so a bomb never gets decoded).
    """
    if mode not in DECODE_MODES:
        raise ValueError(f"mode must be one of {', '.join(DECODE_MODES)}, not {mode!r}")
    if isinstance(source, (bytes, bytearray, memoryview)):
        source = io.BytesIO(source)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(source) as img:
            original = img.size
            box = _draft(img, resize) if mode == "draft" and resize else None
            img.load()
            if box is None:
                return _to_rgb(ImageOps.exif_transpose(img))
            # Resized in the stored orientation, then turned: the target size is symmetric in
            # the two sides (shorter side -> resize), so it is the same either way round, and
            # the turn moves far fewer pixels after the resize than before it.
            rgb = _to_rgb(img)
            rgb.info = img.info  # the EXIF orientation, which convert() may drop
            small = rgb.resize(resized_size(original, resize), _resampling(interpolation),
                               box=box)
            return ImageOps.exif_transpose(small)


def resized_size(size: tuple[int, int], resize: int) -> tuple[int, int]:
    """(width, height) of an image of ``size`` whose shorter side is resized to ``resize``:
    torchvision's ``Resize(resize)`` rounding (the longer side truncated), so a drafted image
    comes out at the size the recipe's resize gives the full one."""
    width, height = size
    if width <= height:
        return resize, int(resize * height / width)
    return int(resize * width / height), resize


def may_draft(paths: Sequence[str]) -> bool:
    """Whether ``"draft"`` mode could decode any of ``paths`` otherwise than ``"exact"``.

    Judged by extension, so that a cache hit opens no image: True if any has a JPEG or MPO
    extension, or one Pillow does not register (bytes read from a shard, say). Pillow opens an
    image by its content, not its name: a JPEG named ``.png`` is drafted, yet not counted here.
    """
    Image.init()
    formats = Image.registered_extensions()
    return any(formats.get(PurePosixPath(p).suffix.lower(), "JPEG") in _DRAFTABLE
               for p in paths)


def _draft(img: Image.Image, resize: int) -> tuple[float, float, float, float] | None:
    """Configure a JPEG's decoder for the smallest DCT scale that keeps the shorter side at
    least ``DRAFT_OVERSAMPLING * resize``; the original picture's box in the scaled image, or
    None where it cannot be scaled down (another format, or too small)."""
    least = DRAFT_OVERSAMPLING * resize
    if img.format not in _DRAFTABLE or min(img.size) // least < 2:
        return None
    # A square request: draft() keeps each side at least the request's, and the shorter side
    # bounds both, whichever way the EXIF orientation turns the picture later.
    drafted = img.draft(img.mode, (least, least))
    return None if drafted is None else drafted[1]


def _resampling(interpolation: str) -> Image.Resampling:
    return Image.Resampling[interpolation.upper()]


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's own convert() clips 16-bit values at 255 instead of rescaling them.
        wide = np.asarray(img, dtype=np.uint32)
        return Image.fromarray((wide // 257).clip(0, 255).astype(np.uint8), "L").convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Transparent pixels carry arbitrary colours; put the image on white as viewers do.
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")

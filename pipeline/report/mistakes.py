"""Mistakes to look at: the best row's most confident wrong predictions, and its most-confused
classes.

An accuracy says how often a model is wrong, not on what. ``pipeline report`` therefore shows,
for its best row, the test images that row got wrong with the highest probability on the wrong
class (a contact sheet, ``mistakes.png``: often a label error, an ambiguous picture or a
class that the data cannot tell apart), and the class pairs it confuses most
(``confused_pairs.csv|md``). Both come from the row's stored test predictions
(:class:`pipeline.metrics.scoring.RowPredictions`); the images are read again from the data folder
that the row's run recorded (:mod:`pipeline.store.run_record`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.options import MISTAKES
from pipeline.data.layouts import display
from pipeline.metrics.scoring import RowPredictions
from pipeline.report.plots import save
from pipeline.report.tables import write_table
from pipeline.report.tiles import tile_sheet
from pipeline.store.run_record import read_record

__all__ = ["MISTAKES", "Mistake", "best_row", "confused_pairs", "contact_sheet",
           "contact_sheet_figure", "image_root", "top_mistakes", "write_mistakes"]

_THUMBNAIL = 160  # pixels, the longer side of a tile's image
_COLUMNS = 4
_LABEL = 24  # characters of a class name shown on a tile


@dataclass(frozen=True)
class Mistake:
    """A test image predicted wrong."""

    index: int  # its row in the predictions
    path: str  # as stored: relative to the data root
    true: str  # its class
    predicted: str  # the class predicted
    probability: float  # of the predicted class; NaN for a head without probabilities


def top_mistakes(predictions: RowPredictions, n: int = MISTAKES) -> list[Mistake]:
    """The ``n`` wrong predictions made with the highest probability, highest first.

    Ties keep the order of the images; without probabilities every mistake ties, so the first
    ``n`` wrong images are taken.
    """
    wrong = np.flatnonzero(predictions.y_pred != predictions.y_true)
    if predictions.proba is None:
        confidence = np.full(len(wrong), np.nan)
    else:
        confidence = predictions.proba[wrong, predictions.y_pred[wrong]].astype(np.float64)
        order = np.argsort(-confidence, kind="stable")
        wrong, confidence = wrong[order], confidence[order]
    classes = predictions.classes
    return [Mistake(int(i), str(predictions.paths[i]), classes[predictions.y_true[i]],
                    classes[predictions.y_pred[i]], float(p))
            for i, p in zip(wrong[:n], confidence[:n])]


def confused_pairs(predictions: RowPredictions, top: int | None = None) -> list[dict]:
    """Class pairs by how often images of the first were predicted as the second.

    Returns
    -------
    list of dict
        ``true``, ``predicted``, ``count`` and ``share_of_true`` (the count over the test
        images of the true class), for each pair of distinct classes with a count, the most
        frequent first (then the larger share, then the classes' order); the first ``top``
        (None: all).
    """
    k = len(predictions.classes)
    counts = np.zeros((k, k), np.int64)
    np.add.at(counts, (predictions.y_true, predictions.y_pred), 1)
    support = counts.sum(1)
    np.fill_diagonal(counts, 0)
    true, predicted = np.nonzero(counts)
    pairs = sorted(zip(true.tolist(), predicted.tolist()),
                   key=lambda tp: (-counts[tp], -counts[tp] / support[tp[0]], tp))
    return [{"true": predictions.classes[t], "predicted": predictions.classes[p],
             "count": int(counts[t, p]), "share_of_true": float(counts[t, p] / support[t])}
            for t, p in pairs[:top]]


def contact_sheet(mistakes: Sequence[Mistake], path: str | os.PathLike,
                  root: str | os.PathLike | None = None, title: str = "",
                  columns: int = _COLUMNS) -> Path:
    """One tile per mistake, in order, written to ``path`` (``.png``): the image, its true and
    predicted class and the predicted probability (:func:`contact_sheet_figure`)."""

    return save(contact_sheet_figure(mistakes, root, title, columns), path)


def contact_sheet_figure(mistakes: Sequence[Mistake], root: str | os.PathLike | None = None,
                         title: str = "", columns: int = _COLUMNS):
    """The contact sheet as a :class:`matplotlib.figure.Figure`, tiles left to right, then
    down.

    Parameters
    ----------
    mistakes
        From :func:`top_mistakes`.
    root
        The folder the mistakes' paths are relative to (None: as they are). An image that
        cannot be read gets a blank tile labelled "unreadable".
    title
        Above the tiles.
    columns
        Tiles per row, at most.
    """

    return tile_sheet([m.path for m in mistakes], [_caption(m) for m in mistakes], root, title,
                      columns=columns, size=_THUMBNAIL, tile_inches=(2.4, 2.7), caption_size=8,
                      empty="no test image was predicted wrong")


def _caption(mistake: Mistake) -> str:
    probability = "" if np.isnan(mistake.probability) else f" ({mistake.probability:.2f})"
    return f"true: {_short(mistake.true)}\npredicted: {_short(mistake.predicted)}{probability}"


def _images(count: int) -> str:
    return f"{count} image" + ("" if count == 1 else "s")


def _short(name: str) -> str:
    name = display(name)
    return name if len(name) <= _LABEL else name[:_LABEL - 1] + "…"


def best_row(rows: Sequence[dict], predictions: Sequence[RowPredictions | None]) -> int | None:
    """The most accurate row with stored predictions (ties: the first): the row that
    ``pipeline report`` calls best; None if no row has predictions."""
    stored = [i for i, p in enumerate(predictions) if p is not None]
    return max(stored, key=lambda i: (rows[i]["test_accuracy"], -i)) if stored else None


def image_root(row: dict) -> Path | None:
    """The data folder that ``row``'s test image paths are relative to, from the run record
    of the run that wrote it (the cache of the row's key); None where it has no record."""
    if not row.get("run_record"):
        return None
    try:
        record = read_record(row["run_record"])
    except (OSError, ValueError):
        return None
    for cache in record.get("caches") or []:
        if cache.get("cache_key") == row.get("cache_key") and cache.get("data"):
            return Path(cache["data"])
    return Path(record["data"]) if isinstance(record.get("data"), str) else None


def write_mistakes(rows: Sequence[dict], predictions: Sequence[RowPredictions | None],
                   out: str | os.PathLike, n: int = MISTAKES) -> tuple[dict[str, str], str]:
    """``mistakes.png`` and ``confused_pairs.csv|md`` of the best row, in ``out``.

    Parameters
    ----------
    rows, predictions
        The report's rows and each one's stored predictions (None: none stored).
    out
        The report's folder.
    n
        Tiles on the contact sheet, at most.

    Returns
    -------
    files : dict
        ``mistakes_png``, ``confused_pairs_csv``, ``confused_pairs_md``; empty when no row
        has predictions.
    section : str
        A Markdown paragraph for ``report.md`` that names them ("" with no files).
    """

    best = best_row(rows, predictions)
    if best is None:
        return {}, ""
    out = Path(out)
    row, stored = rows[best], predictions[best]
    name = f"{row['method']} {row['backbone']} / {row['head']}"
    root = image_root(row)
    shown = top_mistakes(stored, n)
    wrong = int(np.sum(stored.y_pred != stored.y_true))
    png = contact_sheet(shown, out / "mistakes.png", root,
                        f"{display(name)}: the {len(shown)} most confident of {wrong} wrong "
                        "predictions (predicted probability)")
    pairs = confused_pairs(stored)
    csv, md = write_table(pairs, out / "confused_pairs",
                          f"Most-confused class pairs of {display(name)} on "
                          f"{len(stored.y_true)} test images (true -> predicted)."
                          + ("" if pairs else " None: every test image was predicted right."))
    files = {"mistakes_png": str(png), "confused_pairs_csv": str(csv),
             "confused_pairs_md": str(md)}
    where = f"images read from {display(str(root))}" if root else "image paths as stored"
    section = (f"Mistakes of the best row ({display(name)}, {wrong} of {len(stored.y_true)} "
               f"test images wrong): the {len(shown)} most confident in mistakes.png "
               f"({where}), the most-confused class pairs in confused_pairs.md"
               + (f" (first: {display(pairs[0]['true'])} -> {display(pairs[0]['predicted'])}, "
                  f"{_images(pairs[0]['count'])}, {pairs[0]['share_of_true']:.0%} of its class)"
                  if pairs else "") + ".\n")
    return files, section

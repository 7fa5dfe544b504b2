"""Results tables: one CSV and one Markdown file per table, cells rounded the same way."""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.atomic import write_text
from pipeline.data.layouts import display


def _cell(value) -> str:
    if isinstance(value, float):
        if np.isnan(value):
            return "nan"
        # Four decimals for scores and seconds; a small value (a learning rate of 1e-05, a
        # p-value) keeps three significant digits instead of becoming 0.0000.
        return f"{value:.3g}" if 0 < abs(value) < 1e-3 else f"{value:.4f}"
    return display(str(value))  # class names from folders may hold bytes that are not UTF-8


def write_table(rows: Sequence[dict], stem: str | os.PathLike, preamble: str = "",
                shown: Sequence[dict] | None = None, postscript: str = "") -> tuple[Path, Path]:
    """``stem.csv`` and ``stem.md`` with the same columns, in the order of the first row.

    ``preamble`` (Markdown) goes above the table in ``stem.md`` and ``postscript`` below it;
    ``shown``: the rows ``stem.md`` shows instead (a compact view of the same rows), the CSV
    keeping every column.
    """
    stem = Path(stem)
    columns = list(rows[0]) if rows else []
    text = io.StringIO(newline="")  # the csv module's own line ends (\r\n), as on disk
    writer = csv.DictWriter(text, columns)
    writer.writeheader()
    writer.writerows({c: _cell(r.get(c, "")) for c in columns} for r in rows)
    csv_path = write_text(stem.with_suffix(".csv"), text.getvalue())
    md_path = write_text(stem.with_suffix(".md"), markdown_document(
        rows if shown is None else shown, preamble, postscript))
    return csv_path, md_path


def markdown_document(rows: Sequence[dict], preamble: str = "", postscript: str = "") -> str:
    """The text of a table's ``.md`` file: ``preamble``, the table, ``postscript``."""
    return ((preamble.rstrip() + "\n\n" if preamble else "") + markdown_table(rows)
            + ("\n" + postscript.rstrip() + "\n" if postscript else ""))


def markdown_table(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"

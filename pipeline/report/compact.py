"""The table a person reads: one row per method, each score with its interval in one cell.

The full rows (every score with its low and high bound, paths, keys) stay in ``report.csv``
and ``report.json``; the terminal and ``report.md`` show these columns, and only those that
some row fills:

``method | backbone | head | setting | accuracy [95% CI] | seeds | Δ vs best [95% CI] | p |
Δ vs base [95% CI] | p vs base | macro-F1 | ECE | fit s``

plus ``cache`` when the rows come from several feature caches (only rows of one cache are
compared), ``positive recall`` on two-class data and ``without leaked`` where test images
are training images, and ``Δ vs base`` where a row was derived from another on the same test
images (a self-trained head from its supervised head, a distilled student from the same head
without its teacher).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipeline.data.layouts import display

__all__ = ["COMPACT_COLUMNS", "compact_rows", "format_interval", "format_p"]

COMPACT_COLUMNS = ("method", "cache", "backbone", "head", "setting", "accuracy [95% CI]",
                   "seeds", "Δ vs best [95% CI]", "p", "Δ vs base [95% CI]", "p vs base",
                   "macro-F1", "ECE", "positive recall",
                   "without leaked", "excluded", "fit s")


def _number(value) -> float | None:
    """A row's cell as a float; None where it is blank or not a number."""
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(number) else number


def format_interval(value, low, high, signed: bool = False) -> str:
    """``0.858 [0.824, 0.887]``; signed: ``-0.002 [-0.020, +0.014]``; blank without a value."""
    value, low, high = _number(value), _number(low), _number(high)
    if value is None:
        return ""
    spec = "+.3f" if signed else ".3f"
    if low is None or high is None:
        return format(value, spec)
    return f"{value:{spec}} [{low:{spec}}, {high:{spec}}]"


def format_p(value) -> str:
    """A p-value as people read it: three decimals, ``< 0.001`` below that."""
    value = _number(value)
    if value is None:
        return ""
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _plain(value, digits: int) -> str:
    value = _number(value)
    return "" if value is None else f"{value:.{digits}f}"


def _seeds(row: dict) -> str:
    mean, std = _number(row.get("test_accuracy_seeds_mean")), \
        _number(row.get("test_accuracy_seeds_std"))
    repeats = row.get("repeats", "")
    if mean is None:
        return ""
    return f"{mean:.3f} ± {std or 0:.3f} ({repeats})" if repeats != "" else f"{mean:.3f}"


def _is_reference(row: dict) -> bool:
    """The best row of its cache key: compared with itself, no difference and no interval."""
    return (_number(row.get("diff_vs_best")) == 0 and _number(row.get("diff_vs_best_ci_low")) == 0
            and _number(row.get("diff_vs_best_ci_high")) == 0)


def _cells(row: dict, several_caches: bool) -> dict:
    reference = _is_reference(row)
    return {
        "method": row.get("method", ""),
        "cache": str(row.get("cache_key", ""))[:8] if several_caches else "",
        "backbone": row.get("backbone", ""),
        "head": display(str(row.get("head", ""))),
        "setting": row.get("chosen", ""),
        "accuracy [95% CI]": format_interval(row.get("test_accuracy"),
                                             row.get("test_accuracy_ci_low"),
                                             row.get("test_accuracy_ci_high")),
        "seeds": _seeds(row),
        "Δ vs best [95% CI]": "best" if reference else format_interval(
            row.get("diff_vs_best"), row.get("diff_vs_best_ci_low"),
            row.get("diff_vs_best_ci_high"), signed=True),
        "p": "" if reference else format_p(row.get("p_vs_best")),
        # the row it was derived from (pipeline.heads.self_training, pipeline.distillation)
        "Δ vs base [95% CI]": format_interval(row.get("diff_vs_base"),
                                              row.get("diff_vs_base_ci_low"),
                                              row.get("diff_vs_base_ci_high"), signed=True),
        "p vs base": format_p(row.get("p_vs_base")),
        "macro-F1": _plain(row.get("macro_f1"), 3),
        "ECE": _plain(row.get("ece"), 3),
        "positive recall": _plain(row.get("positive_recall"), 3),
        "without leaked": format_interval(row.get("test_accuracy_without_leaked"),
                                          row.get("test_accuracy_without_leaked_ci_low"),
                                          row.get("test_accuracy_without_leaked_ci_high")),
        # training and validation images left out (pipeline heads --exclude)
        "excluded": str(row.get("excluded", "")),
        "fit s": _plain(row.get("fit_s"), 1),
    }


def compact_rows(rows: Sequence[dict]) -> list[dict]:
    """``rows`` (results or report rows) as the compact table, in the same order.

    A column is kept only where some row fills it, so a heads-only table has no comparison
    columns and a one-cache report no ``cache`` column.
    """
    several_caches = len({r.get("cache_key", "") for r in rows}) > 1
    cells = [_cells(r, several_caches) for r in rows]
    kept = [c for c in COMPACT_COLUMNS if any(row[c] != "" for row in cells)]
    return [{c: row[c] for c in kept} for row in cells]

"""Results rows derived from another row on the same test images (a self-trained head from its
supervised head, a distilled student from the same head without its teacher): their paired
comparison, and how their models, predictions, tables and run record are written."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from pipeline.core.atomic import write_json, write_text
from pipeline.metrics.scoring import RowPredictions
from pipeline.metrics.significance import paired_difference
from pipeline.report.tables import markdown_table
from pipeline.store import tracking
from pipeline.store.persistence import HEAD_SUFFIX, save_head
from pipeline.store.run_record import RECORD, RunRecord

__all__ = ["base_columns", "write_derived", "write_rows"]


def base_columns(y_true: np.ndarray, y_pred: np.ndarray, base_pred: np.ndarray,
                 base_head: str, base_accuracy: float) -> dict:
    """A row's paired comparison with the row it was derived from, on the same test images:
    accuracy difference with its paired bootstrap interval and McNemar's p
    (:func:`pipeline.metrics.significance.paired_difference`)."""
    paired = paired_difference(y_true, y_pred, base_pred)
    return {"base_head": base_head, "base_test_accuracy": base_accuracy,
            "diff_vs_base": paired.difference, "diff_vs_base_ci_low": paired.ci_low,
            "diff_vs_base_ci_high": paired.ci_high, "p_vs_base": paired.p_value}


def write_rows(rows: list[dict], stem: Path) -> list[Path]:
    """``stem.csv`` and ``stem.md`` of ``rows`` (columns: every key of any row, in order of
    first appearance), written atomically."""
    columns = list(dict.fromkeys(k for r in rows for k in r))
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, restval="")
    writer.writeheader()
    writer.writerows(rows)
    shown = [{c: r.get(c, "") for c in columns} for r in rows]
    return [write_text(stem.with_suffix(".csv"), text.getvalue()),
            write_text(stem.with_suffix(".md"), markdown_table(shown))]


def write_derived(out: Path, stage: str, rows: list[dict], estimators: Mapping,
                  predictions: Mapping[str, RowPredictions], cache: Mapping, options,
                  tables: Mapping[str, list[dict]], record: Mapping,
                  track: bool | tracking.Run | None = None) -> list[Path]:
    """Write a stage's rows as stage 2 writes its own.

    ``models/<backbone>-<key>-<head>.head`` for each row with an estimator (its ``model``
    column), ``predictions/*.npz`` (its ``predictions`` column, relative to ``out``),
    ``results.csv|md|json``, each of ``tables`` as ``<name>.csv|md``, and ``run.json`` with
    ``record``'s fields; with ``track``, an MLflow run with a nested run per fitted row
    (:mod:`pipeline.store.tracking`). ``cache``: ``path``, ``key``, ``backbone``, ``classes``,
    ``dim``, ``spec``, ``request`` of the labelled cache.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    for row in rows:
        name = f"{cache['backbone']}-{cache['key'][:8]}-{row['head']}"
        name = "".join(c if c.isalnum() or c in "+-_." else "_" for c in name)
        if row["head"] in estimators:
            (out / "models").mkdir(exist_ok=True)
            model = save_head(out / "models" / f"{name}{HEAD_SUFFIX}", estimators[row["head"]],
                              {"head": row["head"], "backbone": cache["backbone"],
                               "classes": cache["classes"], "dim": cache["dim"],
                               "cache_key": cache["key"], "spec": cache["spec"],
                               "request": cache["request"]})
            row["model"] = str(model)
            files.append(model)
        relative = Path("predictions") / f"{name}.npz"
        predictions[row["head"]].save(out / relative)
        row["predictions"] = relative.as_posix()
        files.append(out / relative)
    files += write_rows(rows, out / "results")
    files.append(write_json(out / "results.json", rows))
    for table, table_rows in tables.items():
        files += write_rows(table_rows, out / table)
    run = RunRecord(stage, options, getattr(options, "seed", None))
    if cache.get("path"):
        run.with_caches([cache["path"]])
    run.update(**record)
    files.append(run.write(out / RECORD, files))
    parent = tracking.start(track, out.parent, out.name, stage)
    with tracking.ending(parent):
        for row in rows:
            if row["head"] in estimators:
                tracking.log_head_fit(parent, row, estimators[row["head"]], out,
                                      getattr(options, "seed", 0), time.time())
        tracking.log_runs(parent, {**options.to_json(), **record},
                          {"best_test_accuracy": max(r["test_accuracy"] for r in rows)},
                          [f for f in files if Path(f).suffix in (".csv", ".md", ".json")])
    return files

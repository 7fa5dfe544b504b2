"""``report.html``: the whole report in one file that opens anywhere, with no network.

Every plot is embedded as a ``data:`` URI and the table is sorted by a few lines of inline
script, so the file can be mailed, attached to a ticket or opened from an archive years
later. The page is rendered from a Jinja2 template (``templates/report.html.j2``) with
autoescaping on: class names and paths come from users' folders.
"""

from __future__ import annotations

import base64
import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.atomic import write_text
from pipeline.data.layouts import display
from pipeline.metrics.scoring import RowPredictions, per_class_rows
from pipeline.report import plots
from pipeline.report.mistakes import best_row
from pipeline.store.tracking import STORE

__all__ = ["HTML", "drift_sections", "embedded_png", "freeze_depth_series", "results_files",
           "write_html"]

HTML = "report.html"
TEMPLATE = "report.html.j2"
# What each run record contributes to the page, in this order.
RECORD_FIELDS = ("stage", "command", "started", "seconds", "cache_key", "device", "seed")


def embedded_png(path: str | os.PathLike) -> str:
    """A PNG file as a ``data:`` URI, so the page needs no file beside it."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def results_files(folder: Path, name: str) -> list[Path]:
    """Every ``name`` the stages wrote under ``folder``, leaving out the report's own folder
    and the copies in a local MLflow store."""
    found = []
    for path in sorted(folder.rglob(name)):
        parts = path.relative_to(folder).parts
        if STORE not in parts and "report" not in parts[:-1]:
            found.append(path)
    return found


def freeze_depth_series(folder: Path) -> dict[str, tuple[list, list, list, list]]:
    """Test accuracy against blocks unfrozen, one series per freeze-depth experiment found."""
    series = {}
    for path in results_files(folder, "freeze_depth.csv"):
        with open(path, newline="") as fh:
            rows = [r for r in csv.DictReader(fh) if r["blocks_unfrozen"].isdigit()]
        if len(rows) < 2:
            continue
        rows.sort(key=lambda r: int(r["blocks_unfrozen"]))
        series[str(path.parent.relative_to(folder))] = tuple(
            [float(r[c]) if c != "blocks_unfrozen" else int(r[c]) for r in rows]
            for c in ("blocks_unfrozen", "test_accuracy", "test_accuracy_ci_low",
                      "test_accuracy_ci_high"))
    return series


def _freeze_depth_plot(folder: Path, out: Path) -> Path | None:
    series = freeze_depth_series(folder)
    if not series:
        return None
    return plots.curve_plot(series, out / "freeze_depth.png",
                            "Fine-tuning: test accuracy against blocks unfrozen (95% interval)",
                            "blocks unfrozen (0: the linear probe on the frozen trunk)",
                            "test accuracy")


def _run_records(rows: Sequence[dict], folder: Path, out: Path) -> list[dict]:
    """Each run record behind the rows (and the report's own), the fields a reader checks."""
    records = []
    for path in [*dict.fromkeys(r["run_record"] for r in rows if r.get("run_record")),
                 str(out / "run.json")]:
        if not Path(path).exists():
            continue
        record = json.loads(Path(path).read_text())
        entry = {field: record.get(field, "") for field in RECORD_FIELDS}
        entry["cache_key"] = ", ".join(entry["cache_key"]) if isinstance(
            entry["cache_key"], list) else entry["cache_key"]
        entry["versions"] = ", ".join(f"{k} {v}" for k, v in record.get("versions", {}).items())
        entry["record"] = os.path.relpath(path, out)
        records.append(entry)
    return records


def drift_sections(folder: Path) -> list[dict]:
    """Each ``drift.json`` (``pipeline drift``) under ``folder``: its folder, sentence, the
    measures' rows and its gallery, for the page's drift section."""
    sections = []
    for path in results_files(folder, "drift.json"):
        try:
            body = json.loads(path.read_text())
            measures = [(name, body[key]) for name, key in (
                ("domain classifier AUC", "domain_classifier"), ("MMD²", "mmd"),
                ("predicted classes (total variation)", "label_shift"))]
            if body.get("novelty"):  # a drift.json from before the novelty test has none
                measures.append(("novel images (excess outlier share)", body["novelty"]))
            rows = [{"measure": name, "statistic": m.get("statistic", m.get("auc", m.get(
                         "mmd2", m.get("total_variation")))),
                     "low": m["ci_low"], "high": m["ci_high"], "p": m["p_value"]}
                    for name, m in measures]
            sentence, shifted, harmful = body["sentence"], body["shifted"], body["harmful"]
        except (OSError, ValueError, KeyError, TypeError):  # another tool's drift.json
            continue
        gallery = path.parent / "drift_gallery.png"
        sections.append({"folder": str(path.parent.relative_to(folder)), "sentence": sentence,
                         "shifted": shifted, "harmful": harmful, "measures": rows,
                         "gallery": embedded_png(gallery) if gallery.exists() else ""})
    return sections


def _best_details(rows, predictions, out: Path) -> dict:
    """The best row's confusion matrix (drawn here) and per-class scores."""
    best = best_row(rows, predictions)
    if best is None:
        return {}
    row, stored = rows[best], predictions[best]
    name = f"{row['method']} {row['backbone']} / {row['head']}"
    classes = [display(c) for c in stored.classes]
    path = plots.confusion_matrix_plot(stored.y_true, stored.y_pred, classes,
                                       out / "confusion_matrix.png",
                                       f"Confusion matrix of the best row: {name}")
    per_class = per_class_rows(stored.y_true, stored.y_pred, classes)
    return {"best_name": name, "confusion_png": path, "per_class": per_class}


def write_html(folder: str | os.PathLike, out: str | os.PathLike, *, summary: Sequence[str],
               compact: Sequence[dict], rows: Sequence[dict],
               predictions: Sequence[RowPredictions | None], files: dict) -> dict[str, str]:
    """Render ``report.html`` in ``out`` from the report's sentences, tables and plots.

    Parameters
    ----------
    folder
        The folder the report was gathered from (for the freeze-depth and k-shot curves).
    out
        The report's folder, holding the plots already drawn (``files``).
    summary, compact
        The sentences and the compact table (:func:`pipeline.report.compact.compact_rows`).
    rows, predictions
        The full rows and each one's stored test predictions, for the best row's confusion
        matrix and per-class table, and for the run records.
    files
        The report's files so far; the plots among them are embedded.

    Returns
    -------
    dict
        The files written here: ``report_html``, and ``freeze_depth_png`` /
        ``confusion_matrix_png`` where drawn.
    """
    from jinja2 import Environment, PackageLoader, select_autoescape

    folder, out = Path(folder), Path(out)
    written = {}
    figures = [("Every row against the best", files.get("forest_png")),
               ("Test accuracy of every row", files.get("report_png"))]
    depth = _freeze_depth_plot(folder, out)
    if depth is not None:
        written["freeze_depth_png"] = str(depth)
        figures.append(("Freeze depth", depth))
    figures += [(f"k-shot: {p.parent.relative_to(folder)}", p)
                for p in results_files(folder, "shots.png")]
    figures += [(f"Linear probe per layer: {p.parent.relative_to(folder)}", p)
                for p in results_files(folder, "layers.png")]
    figures += [(f"Advice: {p.parent.relative_to(folder)}", p)
                for p in results_files(folder, "advice.png")]
    best = _best_details(rows, predictions, out)
    if best:
        written["confusion_matrix_png"] = str(best["confusion_png"])
        figures.append((f"Confusion matrix: {best['best_name']}", best["confusion_png"]))
    figures += [("Calibration", files.get("reliability_png")),
                ("Most confident mistakes of the best row", files.get("mistakes_png"))]
    environment = Environment(loader=PackageLoader("pipeline.report", "templates"),
                              autoescape=select_autoescape(["html", "j2"]))
    page = environment.get_template(TEMPLATE).render(
        summary=summary, columns=list(compact[0]) if compact else [], rows=compact,
        figures=[(title, embedded_png(path)) for title, path in figures if path],
        best_name=best.get("best_name", ""), per_class=best.get("per_class", []),
        records=_run_records(rows, folder, out), drift=drift_sections(folder),
        numeric=[_is_numeric(compact, c) for c in (compact[0] if compact else [])])
    path = write_text(out / HTML, page)
    written["report_html"] = str(path)
    return written


def _is_numeric(rows: Sequence[dict], column: str) -> bool:
    """Whether the column sorts as numbers (its cells start with one, or are blank)."""
    def leading(cell: str) -> bool:
        token = str(cell).split(" ")[0].lstrip("<")
        try:
            float(token or "nan")
        except ValueError:
            return False
        return True
    return all(leading(r[column]) for r in rows if str(r[column]).strip()) and bool(
        np.any([str(r[column]).strip() for r in rows]))

"""``pipeline report``: every results row of a run in one table, and which differences are real.

``pipeline report`` gathers every results row of heads and fine-tunes, and compares the rows
scored on the same test images (the same cache key) image by image, from the test predictions
each stage stores beside its ``results.json`` (:class:`pipeline.metrics.scoring.RowPredictions`):
each row against the best one (McNemar's test and the paired bootstrap interval of the
accuracy difference, :mod:`pipeline.metrics.significance`), and the best fine-tune against the best
transfer head, in one sentence at the top of ``report.md``.

Tables are written by :mod:`pipeline.report.tables`, plots drawn by :mod:`pipeline.report.plots`.
"""


from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core.atomic import write_json
from pipeline.core.contract import Result, to_plain
from pipeline.core.errors import PipelineError
from pipeline.core.options import ReportOptions
from pipeline.metrics.calibration import ReliabilityCurve, reliability_curve
from pipeline.metrics.scoring import (
    POSITIVE_COLUMNS,
    SCORE_COLUMNS,
    RowPredictions,
    interval_columns,
)
from pipeline.metrics.significance import SIGNIFICANCE_LEVEL, accuracy_interval, paired_difference
from pipeline.report.compact import compact_rows
from pipeline.report.html import results_files, write_html
from pipeline.report.mistakes import write_mistakes
from pipeline.report.plots import forest_plot, interval_chart, reliability_diagram
from pipeline.report.tables import write_table
from pipeline.store.run_record import RECORD, RunRecord
from pipeline.store.tracking import STORE

_SCORES = tuple(c for name in SCORE_COLUMNS for c in (name, *interval_columns(name)))
SEED_COLUMNS = ("repeats", "test_accuracy_seeds_mean", "test_accuracy_seeds_std",
                "test_accuracy_seeds_ci_low", "test_accuracy_seeds_ci_high")
# What the report takes from each results.json row.
# A row derived from another on the same test images (self-training, distillation): the
# paired comparison with it, the pseudo-labels' accuracy, a student's agreement with its teacher.
BASE_COLUMNS = ("base_head", "diff_vs_base", "diff_vs_base_ci_low", "diff_vs_base_ci_high",
                "p_vs_base", "pseudo_accuracy", "agreement", "agreement_ci_low",
                "agreement_ci_high")
REPORT_COLUMNS = ("method", "backbone", "head", "chosen", *_SCORES, *SEED_COLUMNS,
                  *POSITIVE_COLUMNS, *BASE_COLUMNS, "excluded", "fit_s", "cache_key")
# What it adds: the comparison with the best row of the same test images ...
COMPARISON_COLUMNS = ("diff_vs_best", *interval_columns("diff_vs_best"), "p_vs_best")
# ... and, where test images are also training images, the scores without them.
LEAK_COLUMNS = ("leaked_test_images", "test_accuracy_without_leaked",
                *interval_columns("test_accuracy_without_leaked"))
# The report's columns in order: accuracy, its spread over seeds and the comparison first.
# Bars by method: transfer blue, fine-tune orange, anything else (from scratch) grey.
_METHOD_COLOURS = {"transfer": "tab:blue", "fine-tune": "tab:orange"}
_ORDER = ("method", "backbone", "head", "chosen", *_SCORES[:3], *SEED_COLUMNS,
          *COMPARISON_COLUMNS, *BASE_COLUMNS, *_SCORES[3:], *POSITIVE_COLUMNS, *LEAK_COLUMNS,
          "excluded",
          "fit_s",
          "cache_key", "predictions", "run_record")


EVERY_COLUMN = ("Every column, each score with its interval bounds, the paths of the stored "
                "predictions and run records and the cache keys: report.csv and report.json; "
                "the same page with every plot: report.html.")


def gather_results(folder: str | os.PathLike) -> list[dict]:
    """Every results row that stage 2 (heads) and stage 3 (fine-tunes) wrote under ``folder``.

    Each row has :data:`REPORT_COLUMNS` (blank where a row lacks one), ``predictions``: the
    path of its stored test predictions, and ``run_record``: the ``run.json`` of the run that
    wrote it (:mod:`pipeline.store.run_record`), each blank for rows written without one. The
    report's own folder, the seed repeats of a fine-tune (``repeats/seed-<S>/``, summarised in
    their first seed's row) and the copies in a local MLflow store (``mlruns/``) are not rows.
    """
    folder = Path(folder)
    rows = []
    for path in sorted(folder.rglob("results.json")):
        run = path.parent
        if run.name == "report" or (run.parent.name == "repeats"
                                    and run.name.startswith("seed-")):
            continue
        if STORE in run.relative_to(folder).parts:  # artifacts logged to the local store
            continue
        record = run / RECORD
        for row in json.loads(path.read_text()):
            entry = {c: row.get(c, "") for c in REPORT_COLUMNS}
            entry["predictions"] = str(run / row["predictions"]) if row.get("predictions") \
                else ""
            entry["run_record"] = str(record) if record.exists() else ""
            rows.append(entry)
    return rows


def advice_sentences(folder: str | os.PathLike) -> list[str]:
    """The sentence of each ``advice.json`` (``pipeline advise``) under ``folder``."""
    sentences = []
    for path in results_files(Path(folder), "advice.json"):
        try:
            sentences.append(json.loads(path.read_text())["sentence"])
        except (OSError, ValueError, KeyError):  # another tool's advice.json: not ours to read
            continue
    return sentences


@dataclass
class ReportResult(Result):
    """What :func:`compare_results` found under a folder; :meth:`write` puts the report's
    table, plots and page in a folder (``pipeline report`` writes ``FOLDER/report``)."""

    folder: str  # the folder whose results were gathered
    summary: list[str]  # the sentences at the top of report.md
    rows: list[dict]  # the table: every column, in the report's order
    cache_keys: list[str]
    # The files of the last write(out), by kind; empty until the result is written.
    files: dict[str, str] = field(default_factory=dict)
    # What the files show beside the table (not in to_json): the options, its compact view,
    # the gathered rows with their paths and each one's stored predictions, the run record.
    options: ReportOptions = field(default_factory=ReportOptions, repr=False)
    compact: list[dict] = field(default_factory=list, repr=False)
    entries: list[dict] = field(default_factory=list, repr=False)
    predictions: list[RowPredictions | None] = field(default_factory=list, repr=False)
    record: RunRecord | None = field(default=None, repr=False)

    def to_json(self) -> dict:
        """``summary``, ``rows``, ``cache_keys`` and ``files`` (``pipeline report --json``)."""
        return to_plain({"summary": self.summary, "rows": self.rows,
                         "cache_keys": self.cache_keys, "files": self.files})

    def write(self, out: str | os.PathLike) -> list[Path]:
        """``report.csv|md|json|png|html``, ``forest.png``, ``reliability.png``,
        ``mistakes.png``, ``confused_pairs.csv|md``, ``freeze_depth.png`` and
        ``confusion_matrix.png`` (each where there is something to draw) and the report's
        ``run.json``, into the folder ``out``; their paths."""
        out, rows = Path(out), self.entries
        found, section = write_mistakes(rows, self.predictions, out, self.options.mistakes)
        csv, md = write_table(self.rows, out / "report", preamble="\n\n".join(self.summary),
                              shown=self.compact,
                              postscript=EVERY_COLUMN + ("\n\n" + section if section else ""))
        json_path = write_json(out / "report.json", {"summary": self.summary, "rows": self.rows})
        files = {"report_csv": str(csv), "report_md": str(md), "report_json": str(json_path)}
        labels = [f"{r['method']}: {r['backbone']} / {r['head']}" for r in rows]
        files["report_png"] = str(interval_chart(
            labels, [r["test_accuracy"] for r in rows], out / "report.png",
            "Transfer learning (frozen trunk) against fine-tuning\n(test accuracy, 95% interval)",
            colors=[_METHOD_COLOURS.get(r["method"], "tab:gray") for r in rows],
            intervals=[[r[c] for c in interval_columns("test_accuracy")] for r in rows]))
        forest = _forest(rows, labels, out, several_caches=len(self.cache_keys) > 1)
        if forest:
            files["forest_png"] = str(forest)
        curves = _best_curves(rows, self.predictions)
        if curves:
            files["reliability_png"] = str(reliability_diagram(
                curves, out / "reliability.png", "Calibration of the best head and fine-tune"))
        files.update(found)
        record = self.record or RunRecord("report")
        record.update(settings={"folder": self.folder, "out": str(out)})
        files["run_record"] = str(record.write(out / RECORD, files.values()))
        # The page embeds the plots and shows the run records, the report's own included.
        files.update(write_html(self.folder, out, summary=self.summary, compact=self.compact,
                                rows=rows, predictions=self.predictions, files=files))
        self.files = files
        return [Path(f) for f in files.values()]


def compare_results(folder: str | os.PathLike, *, options: ReportOptions = ReportOptions()
                    ) -> ReportResult:
    """One table of every results row under ``folder``, and which differences are real.

    Computes and writes nothing: ``result.write(out)`` writes ``report.md`` (the compact
    table, :mod:`pipeline.report.compact`), ``report.csv`` and ``report.json`` (every
    column), the plots and ``report.html``.

    Rows are grouped by cache key (backbone, weights, preprocessing, data and splits); only
    rows that share one are measured on the same test images, and only those are compared:
    each with the best row of its key (``diff_vs_best`` with its paired bootstrap interval,
    ``p_vs_best`` from McNemar's exact test), and the best fine-tune with the best transfer
    head, in one sentence per key at the top of ``report.md``. Test images identical to a
    training or validation image are counted, and the rows scored without them too.

    Parameters
    ----------
    folder
        A folder of results written by ``pipeline heads`` and ``pipeline finetune``
        (searched recursively for ``results.json``).
    options
        :class:`~pipeline.core.options.ReportOptions`: ``mistakes``, the best row's most
        confident wrong predictions drawn in ``mistakes.png``, whose most-confused class
        pairs go to ``confused_pairs.csv|md`` (:mod:`pipeline.report.mistakes`) and a
        paragraph at the end of ``report.md``.

    Returns
    -------
    ReportResult
        ``summary`` (the sentences), ``rows`` (the table) and ``cache_keys``.
    """
    record = RunRecord("report", {"folder": str(folder), "out": None})
    rows = gather_results(folder)
    if not rows:
        raise PipelineError(f"no results.json of heads or fine-tunes under {folder}; "
                            "run `pipeline heads` or `pipeline finetune` first")
    rows.sort(key=lambda r: (r["cache_key"], -r["test_accuracy"]))
    predictions = [_load_predictions(r["predictions"]) for r in rows]
    keys = sorted({r["cache_key"] for r in rows})
    summary = []
    for key in keys:
        mine = [i for i, r in enumerate(rows) if r["cache_key"] == key]
        summary += _compare_key([rows[i] for i in mine], [predictions[i] for i in mine],
                                f"On cache {key[:8]} ({rows[mine[0]]['backbone']}): "
                                if len(keys) > 1 else "")
    summary += advice_sentences(folder)
    missing = sum(p is None for p in predictions)
    if missing:
        summary.append(f"{missing} row(s) have no stored test predictions (results written "
                       "before predictions were stored): run their stage again to compare "
                       "them image by image.")
    table = _table(rows)
    record.update(cache_key=keys, runs=sorted({r["run_record"] for r in rows} - {""}))
    return ReportResult(str(folder), summary, table, keys, options=options,
                        compact=compact_rows(table), entries=rows, predictions=predictions,
                        record=record)


def _forest(rows: list[dict], labels: list[str], out: Path, several_caches: bool):
    """``forest.png``: each compared row's difference to the best of its cache key."""
    compared = [i for i, r in enumerate(rows) if r.get("diff_vs_best", "") != ""]
    if not compared:
        return None
    return forest_plot(
        [f"{rows[i]['cache_key'][:8]} {labels[i]}" if several_caches else labels[i]
         for i in compared],
        [rows[i]["diff_vs_best"] for i in compared],
        [[rows[i][c] for c in interval_columns("diff_vs_best")] for i in compared],
        out / "forest.png", "Each row against the best row on the same test images",
        colors=[_METHOD_COLOURS.get(rows[i]["method"], "tab:gray") for i in compared])


def _load_predictions(path: str) -> RowPredictions | None:
    if not path or not Path(path).exists():
        return None
    try:
        return RowPredictions.load(path)
    except (OSError, ValueError) as err:  # a damaged or foreign file: numpy raises either
        raise PipelineError(f"cannot read stored predictions {path}: {err}; run the stage "
                            "that wrote them again") from None


def _aligned(predictions: RowPredictions, reference: RowPredictions) -> RowPredictions | None:
    """``predictions`` in the order of ``reference``'s images; None if the images differ."""
    if np.array_equal(predictions.paths, reference.paths):
        out = predictions
    elif sorted(predictions.paths.tolist()) == sorted(reference.paths.tolist()):
        position = {p: i for i, p in enumerate(predictions.paths.tolist())}
        order = np.array([position[p] for p in reference.paths.tolist()], dtype=np.int64)
        out = RowPredictions(
            predictions.paths[order], predictions.y_true[order], predictions.y_pred[order],
            None if predictions.proba is None else predictions.proba[order],
            None if predictions.leaked is None else predictions.leaked[order],
            predictions.classes)
    else:
        return None
    return out if np.array_equal(out.y_true, reference.y_true) else None


def _compare_key(rows: list[dict], predictions: list, prefix: str) -> list[str]:
    """Add the comparison (and leakage) columns to the rows of one cache key; its sentences.

    ``rows`` are sorted best first.
    """
    stored = [i for i, p in enumerate(predictions) if p is not None]
    if not stored:
        return []
    best = stored[0]  # the most accurate row with predictions (ties: the first listed)
    reference = predictions[best]
    paired = {i: _aligned(predictions[i], reference) for i in stored}
    paired = {i: p for i, p in paired.items() if p is not None}
    for i, p in paired.items():
        d = paired_difference(reference.y_true, p.y_pred, reference.y_pred)
        rows[i].update(zip(COMPARISON_COLUMNS, (d.difference, d.ci_low, d.ci_high, d.p_value)))
    sentences = [_verdict(rows, paired, best, prefix)]
    if reference.leaked is not None and reference.leaked.any():
        sentences.append(_leakage(rows, paired, best, reference.leaked, prefix))
    return sentences


def _verdict(rows: list[dict], paired: dict, best: int, prefix: str) -> str:
    """Which row is best, how many are within noise of it, and transfer against fine-tuning."""
    top, y = rows[best], paired[best].y_true
    low, high = (top[c] for c in interval_columns("test_accuracy"))
    text = (f"{prefix}Best: {top['method']} {top['backbone']} / {top['head']}, test accuracy "
            f"{top['test_accuracy']:.3f} (95% CI {low:.3f} to {high:.3f}) on {len(y)} test "
            "images")
    others = [i for i in paired if i != best]
    close = sum(rows[i]["p_vs_best"] >= SIGNIFICANCE_LEVEL for i in others)
    rows_word = "row" if len(others) == 1 else "rows"
    if close:
        text += (f", though {close} of the {len(others)} other {rows_word} "
                 f"{'is' if close == 1 else 'are'} not significantly worse (McNemar p >= "
                 f"{SIGNIFICANCE_LEVEL})")
    elif others:
        text += f", significantly better than the {len(others)} other {rows_word}"
    first = {}  # the best row of each method: rows are sorted best first
    for i in paired:
        first.setdefault(rows[i]["method"], i)
    if {"transfer", "fine-tune"} <= set(first):
        tuned, transfer = first["fine-tune"], first["transfer"]
        d = paired_difference(y, paired[tuned].y_pred, paired[transfer].y_pred)
        verdict = "differ" if d.p_value < SIGNIFICANCE_LEVEL else "do not differ"
        text += (f"; fine-tuning (best: {rows[tuned]['head']}, "
                 f"{rows[tuned]['test_accuracy']:.3f}) and transfer (best: "
                 f"{rows[transfer]['head']}, {rows[transfer]['test_accuracy']:.3f}) {verdict} "
                 f"significantly on this data (difference {d.difference:+.3f}, 95% CI "
                 f"{d.ci_low:+.3f} to {d.ci_high:+.3f}, McNemar p = {_p(d.p_value)})")
    else:
        only = next(iter(first))
        text += (f"; only {only} rows were scored on these images, so transfer and "
                 "fine-tuning are not compared")
    return text + "."


def _leakage(rows: list[dict], paired: dict, best: int, leaked: np.ndarray, prefix: str) -> str:
    """Score every row without the test images that are also training images; say so."""
    keep = ~leaked
    for i, p in paired.items():
        right = int(np.sum(p.y_pred[keep] == p.y_true[keep]))
        low, high = (accuracy_interval(right, int(keep.sum())) if keep.any()
                     else (float("nan"), float("nan")))
        rows[i].update(zip(LEAK_COLUMNS, (int(leaked.sum()),
                                          right / keep.sum() if keep.any() else float("nan"),
                                          low, high)))
    top = rows[best]
    return (f"{prefix}Warning: {int(leaked.sum())} of {len(leaked)} test images are "
            "identical to a training or validation image (same bytes), which inflates every "
            f"score; without them the best row scores {top['test_accuracy_without_leaked']:.3f} "
            f"instead of {top['test_accuracy']:.3f} (column test_accuracy_without_leaked).")


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


def _table(rows: list[dict]) -> list[dict]:
    """The rows in the report's column order; seed, comparison and leakage columns only where
    some row has them."""
    optional = {*SEED_COLUMNS, *COMPARISON_COLUMNS, *POSITIVE_COLUMNS, *LEAK_COLUMNS,
                "excluded"}
    columns = [c for c in _ORDER
               if c not in optional or any(r.get(c, "") != "" for r in rows)]
    return [{c: r.get(c, "") for c in columns} for r in rows]


def _best_curves(rows: list[dict], predictions: list) -> dict[str, ReliabilityCurve]:
    """Reliability of the most accurate head and fine-tune that have probabilities."""
    curves = {}
    for method in ("transfer", "fine-tune"):
        found = [i for i, p in enumerate(predictions)
                 if p is not None and p.proba is not None and rows[i]["method"] == method]
        if found:
            i = max(found, key=lambda i: rows[i]["test_accuracy"])
            name = f"{method}: {rows[i]['backbone']} / {rows[i]['head']}"
            curves[name] = reliability_curve(predictions[i].y_true, predictions[i].proba)
    return curves

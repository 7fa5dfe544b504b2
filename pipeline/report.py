"""Tables and plots of the stages' results: CSV and Markdown tables, bar charts, curves.

Plots are drawn on a :class:`matplotlib.figure.Figure` and written to a file: no pyplot, so
the caller's matplotlib backend and figures are left alone (and matplotlib is imported only
when a plot is drawn).
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.layouts import display


def _cell(value) -> str:
    if isinstance(value, float):
        return "nan" if np.isnan(value) else f"{value:.4f}"
    return display(str(value))  # class names from folders may hold bytes that are not UTF-8


def write_table(rows: Sequence[dict], stem: str | os.PathLike) -> tuple[Path, Path]:
    """``stem.csv`` and ``stem.md`` with the same columns, in the order of the first row."""
    stem = Path(stem)
    stem.parent.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0]) if rows else []
    with open(stem.with_suffix(".csv"), "w", newline="") as fh:
        writer = csv.DictWriter(fh, columns)
        writer.writeheader()
        writer.writerows({c: _cell(r.get(c, "")) for c in columns} for r in rows)
    stem.with_suffix(".md").write_text(markdown_table(rows))
    return stem.with_suffix(".csv"), stem.with_suffix(".md")


def markdown_table(rows: Sequence[dict]) -> str:
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


REPORT_COLUMNS = ("method", "backbone", "head", "chosen", "test_accuracy", "balanced_accuracy",
                  "macro_f1", "log_loss", "fit_s", "cache_key")


def gather_results(folder: str | os.PathLike) -> list[dict]:
    """Every results row that stage 2 (heads) and stage 3 (fine-tunes) wrote under ``folder``."""
    rows = []
    for path in sorted(Path(folder).rglob("results.json")):
        if path.parent.name == "report":
            continue
        for row in json.loads(path.read_text()):
            rows.append({c: row.get(c, "") for c in REPORT_COLUMNS})
    return rows


def write_report(folder: str | os.PathLike, out: str | os.PathLike | None = None) -> dict:
    """One table and one chart: transfer learning and fine-tuning on the same features.

    Rows are grouped by cache key (backbone, weights, preprocessing, data and splits); only
    rows that share one are measured on the same test images.
    """
    out = Path(out) if out else Path(folder) / "report"
    rows = gather_results(folder)
    if not rows:
        raise PipelineError(f"no results.json of heads or fine-tunes under {folder}; "
                            "run `pipeline heads` or `pipeline finetune` first")
    rows.sort(key=lambda r: (r["cache_key"], -r["test_accuracy"]))
    csv, md = write_table(rows, out / "report")
    labels = [f"{r['method']}: {r['backbone']} / {r['head']}" for r in rows]
    png = bar_chart(labels, [r["test_accuracy"] for r in rows], out / "report.png",
                    "Transfer learning (frozen trunk) against fine-tuning",
                    colors=["tab:orange" if r["method"] == "fine-tune" else "tab:blue"
                            for r in rows])
    keys = sorted({r["cache_key"] for r in rows})
    return {"rows": rows, "cache_keys": keys, "files": {"report_csv": str(csv),
                                                        "report_md": str(md),
                                                        "report_png": str(png)}}


def bar_chart(labels: Sequence[str], values: Sequence[float], path: str | os.PathLike,
              title: str, xlabel: str = "test accuracy", colors: Sequence[str] | None = None
              ) -> Path:
    """Horizontal bars, best on top, each labelled with its value."""
    order = np.argsort(values, kind="stable")
    colors = colors or ["tab:blue"] * len(labels)
    fig, ax = _figure(figsize=(8, 0.45 * len(labels) + 1.2))
    bars = ax.barh([labels[i] for i in order], [values[i] for i in order],
                   color=[colors[i] for i in order])
    ax.bar_label(bars, fmt="%.3f", padding=3)
    ax.set_xlim(0, 1.08)
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    return _save(fig, path)


def confusion_matrix_plot(y_true, y_pred, classes: Sequence[str], path: str | os.PathLike,
                          title: str) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = _figure(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=np.arange(len(classes)),
        display_labels=[display(c) for c in classes], ax=ax,
        xticks_rotation=45, colorbar=False)
    ax.set_title(title)
    return _save(fig, path)


def curve_plot(series: dict[str, tuple[list, list, list]], path: str | os.PathLike, title: str,
               xlabel: str, ylabel: str, log_x: bool = False) -> Path:
    """One line per series ``name -> (x, mean, spread)``, the spread drawn as a band."""
    fig, ax = _figure(figsize=(7, 4.5))
    for name, (x, mean, spread) in series.items():
        x, mean, spread = map(np.asarray, (x, mean, spread))
        ax.plot(x, mean, marker="o", label=name)
        ax.fill_between(x, mean - spread, mean + spread, alpha=0.2)
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def training_curves(history: Sequence[dict], path: str | os.PathLike, title: str) -> Path:
    """Train and validation loss and accuracy per epoch: where the two part, it over-fits."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = _figure(1, 2, figsize=(10, 4))
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], marker="o", label="train")
        ax.plot(epochs, [h[f"val_{metric}"] for h in history], marker="o", label="validation")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    best = min(history, key=lambda h: h["val_loss"])["epoch"]
    loss_ax.axvline(best, color="grey", linestyle=":", label="best")
    fig.suptitle(title)
    return _save(fig, path)


def _figure(*grid: int, figsize: tuple[float, float]):
    """A figure of its own and its axes, outside pyplot's registry of open figures."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid)


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)  # Figure.savefig renders with Agg for a .png, no backend needed
    return path

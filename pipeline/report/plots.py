"""The plots of the stages' results, each drawn on its own :class:`matplotlib.figure.Figure`.

No pyplot: the caller's matplotlib backend and figures are left alone, and matplotlib is
imported only when a plot is drawn. :func:`figure` and :func:`save` are the two steps every
plot here (and the mistakes gallery) shares.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipeline.core.atomic import save_figure
from pipeline.data.layouts import display
from pipeline.metrics.calibration import ReliabilityCurve


def interval_chart(labels: Sequence[str], values: Sequence[float], path: str | os.PathLike,
                   title: str, xlabel: str = "test accuracy",
                   colors: Sequence[str] | None = None,
                   intervals: Sequence[Sequence[float]] | None = None) -> Path:
    """Each value a point with its interval, best on top, on an axis zoomed to the data.

    A bar from 0 would make 0.844 and 0.860 look alike; points on a zoomed axis show the
    difference and, with ``intervals`` (one ``(low, high)`` per row; blank or NaN for none),
    whether it is larger than the noise.
    """
    order = np.argsort(values, kind="stable")
    colors = colors or ["tab:blue"] * len(labels)
    fig, ax = figure(figsize=(8, 0.45 * len(labels) + 1.2))
    values = np.asarray(values, dtype=np.float64)[order]
    bounds = np.array([[_number(v) for v in intervals[i]] for i in order]
                      if intervals else np.full((len(order), 2), np.nan)).reshape(-1, 2)
    errors = np.nan_to_num(np.abs(bounds - values[:, None]).T)  # (2, rows): below, above
    for y, i in enumerate(order):
        ax.errorbar(values[y], y, xerr=errors[:, y:y + 1], fmt="o", color=colors[i],
                    capsize=3, elinewidth=1)
    tops = np.fmax(bounds[:, 1], values)
    for y, (value, top) in enumerate(zip(values, tops)):
        ax.annotate(f"{value:.3f}", (top, y), xytext=(4, 0), textcoords="offset points",
                    va="center")
    ax.set_yticks(range(len(order)), [labels[i] for i in order])
    ax.set_xlim(*zoomed(np.concatenate([values, bounds.ravel()]), room_right=0.12))
    ax.set_ylim(-0.6, len(order) - 0.4)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    return save(fig, path)


def forest_plot(labels: Sequence[str], differences: Sequence[float],
                intervals: Sequence[Sequence[float]], path: str | os.PathLike, title: str,
                colors: Sequence[str] | None = None,
                xlabel: str = "test accuracy minus the best row's (paired 95% interval)"
                ) -> Path:
    """Each row's difference to the best row with its paired interval, and the zero line.

    An interval that crosses zero is a difference the test set cannot tell from noise. Rows
    keep the order given (best first), top to bottom.
    """
    colors = colors or ["tab:blue"] * len(labels)
    differences = np.asarray(differences, dtype=np.float64)
    bounds = np.array([[_number(v) for v in pair] for pair in intervals]).reshape(-1, 2)
    fig, ax = figure(figsize=(8, 0.45 * len(labels) + 1.4))
    ax.axvline(0, color="grey", linestyle="--", linewidth=1)
    rows = np.arange(len(labels))[::-1]  # the first row on top
    errors = np.nan_to_num(np.abs(bounds - differences[:, None]).T)
    for y, i in zip(rows, range(len(labels))):
        ax.errorbar(differences[i], y, xerr=errors[:, i:i + 1], fmt="s", color=colors[i],
                    capsize=3, elinewidth=1.2)
        reference = differences[i] == 0 and not np.any(np.nan_to_num(bounds[i]))
        ax.annotate("best" if reference else f"{differences[i]:+.3f}",
                    (np.fmax(bounds[i, 1], differences[i]), y),
                    xytext=(4, 0), textcoords="offset points", va="center")
    ax.set_yticks(rows, list(labels))
    ax.set_xlim(*zoomed(np.concatenate([differences, bounds.ravel(), [0.0]]),
                        room_right=0.15))
    ax.set_ylim(-0.6, len(labels) - 0.4)
    ax.set_xlabel(xlabel)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(title)
    return save(fig, path)


def zoomed(values, margin: float = 0.08, room_right: float = 0.0) -> tuple[float, float]:
    """Axis limits around the finite ``values``: a margin each side, room for labels right."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = float(values.min()), float(values.max())
    span = max(high - low, 0.01)  # equal values still get an axis a point or so wide
    return low - margin * span, high + (margin + room_right) * span


def confusion_matrix_plot(y_true, y_pred, classes: Sequence[str], path: str | os.PathLike,
                          title: str) -> Path:
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = figure(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    ConfusionMatrixDisplay.from_predictions(
        y_true, y_pred, labels=np.arange(len(classes)),
        display_labels=[display(c) for c in classes], ax=ax,
        xticks_rotation=45, colorbar=False)
    ax.set_title(title)
    return save(fig, path)


def curve_plot(series: dict[str, tuple[list, list, list, list]], path: str | os.PathLike,
               title: str, xlabel: str, ylabel: str, log_x: bool = False) -> Path:
    """One line per series ``name -> (x, mean, low, high)``, ``low`` to ``high`` a band
    (None, None: a line without one)."""
    fig, ax = figure(figsize=(7, 4.5))
    for name, (x, mean, low, high) in series.items():
        line, = ax.plot(x, mean, marker="o", label=name)
        if low is not None and high is not None:
            ax.fill_between(x, low, high, alpha=0.2, color=line.get_color())
    if log_x:
        ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return save(fig, path)


def reliability_diagram(curves: dict[str, ReliabilityCurve], path: str | os.PathLike,
                        title: str) -> Path:
    """Accuracy against confidence per bin (on the diagonal: calibrated), and bin sizes.

    Parameters
    ----------
    curves
        Name (with which the legend shows its expected calibration error) to curve, from
        :func:`pipeline.metrics.calibration.reliability_curve`.
    path, title
        The image file and its title.
    """
    fig, (ax, share) = figure(2, 1, figsize=(6, 6.5), sharex=True,
                               gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="calibrated")
    for name, curve in curves.items():
        filled = curve.count > 0
        ax.plot(curve.confidence[filled], curve.accuracy[filled], marker="o",
                label=f"{name} (ECE {curve.ece:.3f})")
        centres = (curve.edges[:-1] + curve.edges[1:]) / 2
        share.plot(centres, curve.count / curve.count.sum(), drawstyle="steps-mid")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy in bin")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left")
    share.set_xlabel("confidence (largest class probability)")
    share.set_ylabel("share of images")
    share.grid(alpha=0.3)
    return save(fig, path)


def training_curves(history: Sequence[dict], path: str | os.PathLike, title: str) -> Path:
    """Train and validation loss and accuracy per epoch: where the two part, it over-fits."""
    from matplotlib.ticker import MaxNLocator

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = figure(1, 2, figsize=(10, 4))
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
    return save(fig, path)


def factor_plot(rows: Sequence[dict], factors: Sequence[str], metric: str,
                path: str | os.PathLike, title: str, chosen: dict | None = None) -> Path:
    """``metric`` against each factor of a sweep, one panel per factor: every run a point,
    the best run per value joined by a line, the chosen run ringed."""
    fig, axes = figure(1, len(factors), figsize=(4.5 * len(factors), 4), squeeze=False)
    for ax, factor in zip(axes[0], factors):
        values = list(dict.fromkeys(r[factor] for r in rows))
        # "all" (every block) sits right of the counts; learning rates spread on a log axis.
        position = {v: i for i, v in enumerate(values)}
        numeric = all(isinstance(v, (int, float)) for v in values)
        x = (lambda v: v) if numeric else position.__getitem__
        ax.scatter([x(r[factor]) for r in rows], [_number(r[metric]) for r in rows],
                   alpha=0.5, label="runs")
        best = [max((_number(r[metric]) for r in rows if r[factor] == v), default=np.nan)
                for v in values]
        order = np.argsort([x(v) for v in values])
        ax.plot([x(values[i]) for i in order], [best[i] for i in order], marker="o",
                label="best per value")
        if chosen is not None:
            ax.scatter([x(chosen[factor])], [_number(chosen[metric])], s=160,
                       facecolors="none", edgecolors="red", label="chosen")
        if numeric and factor == "lr" and min(values) > 0:
            ax.set_xscale("log")
        elif numeric:  # batch sizes, depths: a tick at each value run, not 0.96 ... 1.04
            ax.set_xticks(sorted(values), [str(v) for v in sorted(values)])
        else:
            ax.set_xticks(range(len(values)), [str(v) for v in values])
        ax.set_xlabel(factor)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend()
    fig.suptitle(title)
    return save(fig, path)


def figure(*grid: int, figsize: tuple[float, float], **subplots):
    """A figure of its own and its axes, outside pyplot's registry of open figures."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    return fig, fig.subplots(*grid, **subplots)


def _number(value) -> float:
    """A table cell as a float: blank (a row written without it) is NaN."""
    return float("nan") if value == "" or value is None else float(value)


def save(fig, path: str | os.PathLike) -> Path:
    """``fig`` laid out and saved at 110 dpi, all at once
    (:func:`~pipeline.core.atomic.save_figure`).

    ``Figure.savefig`` renders with Agg for a .png, no backend needed.
    """
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)

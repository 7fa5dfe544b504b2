"""The 2-D map of the features: openTSNE on their first principal components, one colour per
class, the suspects marked."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.core.extras import require
from pipeline.core.options import AuditOptions
from pipeline.data.layouts import display
from pipeline.report.plots import figure

__all__ = ["MAP_POINTS", "MapPoints", "embed", "embed_map", "map_figure"]

# Points on the map at most: t-SNE's cost grows with the points, and beyond ~10,000 a PNG
# shows density, not images. Larger sets are subsampled (seeded), suspects always kept.
MAP_POINTS = AuditOptions.map_points
_COMPONENTS = 50  # PCA before t-SNE, as openTSNE's and scikit-learn's guides advise


def embed(Xn: np.ndarray, seed: int = 0) -> np.ndarray:
    """``(n, 2)`` t-SNE coordinates of the rows (openTSNE, PCA initialisation)."""
    from sklearn.decomposition import PCA

    TSNE = require("openTSNE", "the audit's t-SNE map").TSNE

    n = len(Xn)
    if n < 4:  # t-SNE needs a few neighbours; fewer points are placed on a line
        return np.column_stack([np.arange(n, dtype=np.float64), np.zeros(n)])
    components = max(1, min(_COMPONENTS, Xn.shape[1], n - 1))
    reduced = PCA(n_components=components, random_state=seed).fit_transform(Xn)
    perplexity = float(min(30.0, max(1.0, (n - 1) / 3.5)))
    tsne = TSNE(n_components=2, perplexity=perplexity, initialization="pca", n_jobs=1,
                random_state=seed, verbose=False)
    return np.asarray(tsne.fit(reduced.astype(np.float64)))


def map_figure(xy: np.ndarray, labels: np.ndarray | None, classes: Sequence[str],
               suspects: np.ndarray, outliers: np.ndarray, title: str):
    """The points coloured by class (grey unlabelled), label suspects as black crosses,
    outliers as red rings; a :class:`matplotlib.figure.Figure`."""
    fig, ax = figure(figsize=(8, 7))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=4, color="tab:grey", alpha=0.6, label="images")
    else:
        from matplotlib import colormaps

        cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
        for c, name in enumerate(classes):
            here = labels == c
            ax.scatter(xy[here, 0], xy[here, 1], s=4, color=cmap(c % cmap.N), alpha=0.6,
                       label=display(name))
    if suspects.any():
        ax.scatter(xy[suspects, 0], xy[suspects, 1], s=28, marker="x", color="black",
                   linewidths=1, label="label issue")
    if outliers.any():
        ax.scatter(xy[outliers, 0], xy[outliers, 1], s=60, facecolors="none",
                   edgecolors="red", linewidths=1.2, label="outlier")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title)
    ax.legend(fontsize="small", markerscale=2, loc="best")
    return fig


@dataclass
class MapPoints:
    """The map's points, computed once: what :meth:`figure` draws."""

    xy: np.ndarray  # (points, 2) t-SNE coordinates
    labels: np.ndarray | None  # class index per point; None for an unlabelled set
    classes: list[str]
    suspects: np.ndarray  # (points,) bool: a label issue
    outliers: np.ndarray  # (points,) bool: an outlier
    title: str

    def __len__(self) -> int:
        return len(self.xy)

    def figure(self):
        """The map as a :class:`matplotlib.figure.Figure`."""
        return map_figure(self.xy, self.labels, self.classes, self.suspects, self.outliers,
                          self.title)


def embed_map(Xn: np.ndarray, labels: np.ndarray | None, classes: Sequence[str],
              suspects: np.ndarray, outliers: np.ndarray, seed: int = 0,
              points: int = MAP_POINTS) -> MapPoints:
    """Embed at most ``points`` rows (every suspect and outlier among them) for the map."""
    n = len(Xn)
    keep = np.arange(n)
    if n > points:
        marked = np.flatnonzero(suspects | outliers)[:points]
        rest = np.setdiff1d(keep, marked)
        rng = np.random.default_rng(seed)
        keep = np.sort(np.concatenate([marked, rng.choice(rest, points - len(marked),
                                                          replace=False)]))
    xy = embed(Xn[keep], seed)
    sub = None if labels is None else labels[keep]
    title = (f"t-SNE of the features, {len(keep):,} of {n:,} images"
             if len(keep) < n else f"t-SNE of the features, {n:,} images")
    return MapPoints(xy, sub, list(classes), suspects[keep], outliers[keep], title)

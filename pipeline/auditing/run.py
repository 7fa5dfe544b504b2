"""The audit stage: every screen of a cache's data in one call; its result writes the tables,
galleries and map."""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from pipeline.auditing.gallery import gallery
from pipeline.auditing.labels import (
    LabelIssue,
    fold_count,
    label_issues,
    out_of_fold_probabilities,
)
from pipeline.auditing.neighbours import (
    Pair,
    exact_pairs,
    leakage_counts,
    near_pairs,
    nearest_neighbours,
    normalised,
)
from pipeline.auditing.outliers import Outlier, outlier_scores, top_outliers
from pipeline.auditing.projection import MapPoints, embed_map
from pipeline.auditing.rows import AuditRows, read_rows
from pipeline.core.atomic import write_json
from pipeline.core.contract import Result, to_plain
from pipeline.core.errors import DataError
from pipeline.core.options import AuditOptions
from pipeline.core.progress import Progress, note
from pipeline.data.layouts import display
from pipeline.report.plots import save
from pipeline.report.tables import write_table
from pipeline.store.cache import cache_kind, cache_spec

__all__ = ["AuditResult", "audit"]

_SPLITS = ("train", "val", "test")


@dataclass
class AuditResult(Result):
    """What :func:`audit` found; :meth:`write` puts its tables, galleries and map in a folder."""

    cache: str
    images: int
    labelled: bool
    label_issues: list[LabelIssue] = field(default_factory=list)
    # Why label issues were not looked for (an unlabelled set, a class too small); None: they were.
    label_issues_skipped: str | None = None
    out_of_fold_accuracy: float | None = None  # of the fast head, over the audited images
    folds: int = 0
    duplicates: list[dict] = field(default_factory=list)  # exact, then near pairs
    leakage: dict[str, dict[str, int]] = field(default_factory=dict)
    outliers: list[Outlier] = field(default_factory=list)
    threshold: float = AuditOptions.threshold
    map_points: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    # The files of the last write(out), by kind; empty until the result is written.
    files: dict[str, str] = field(default_factory=dict)
    # What the files show beside the findings above (not in to_json): the options, the
    # images' folder (the galleries read them again), each outlier's row of outliers.csv,
    # the leakage table's rows and the map's points (None: no map).
    options: AuditOptions = field(default_factory=AuditOptions, repr=False)
    data_root: str | None = field(default=None, repr=False)
    outlier_rows: list[dict] = field(default_factory=list, repr=False)
    leakage_rows: list[dict] = field(default_factory=list, repr=False)
    map: MapPoints | None = field(default=None, repr=False)

    _HIDDEN = ("options", "data_root", "outlier_rows", "leakage_rows", "map")

    def to_json(self) -> dict:
        """The findings as ``audit.json`` holds them, with the counts of exact and near pairs."""
        found = {f.name: getattr(self, f.name) for f in fields(self)
                 if f.name not in self._HIDDEN}
        found.update(label_issues=[asdict(i) for i in self.label_issues],
                     outliers=[asdict(o) for o in self.outliers])
        kinds = [d["kind"] for d in self.duplicates]
        return {**to_plain(found), "exact_pairs": kinds.count("exact"),
                "near_pairs": kinds.count("near")}

    def write(self, out: str | os.PathLike) -> list[Path]:
        """``label_issues.csv|md|png`` (labelled sets), ``duplicates.csv|md``,
        ``leakage.csv|md`` (labelled sets), ``outliers.csv|md|png``, ``map.png`` (with a map)
        and ``audit.json`` into the folder ``out``; their paths."""
        out = Path(out)
        files = _write_tables(self, out)
        if self.map is not None:
            files["map_png"] = str(save(self.map.figure(), out / "map.png"))
        self.files = files  # audit.json lists the files beside it, itself aside
        write_json(out / "audit.json", self.to_json())
        files["json"] = str(out / "audit.json")
        return [Path(f) for f in files.values()]


def audit(cache: str | os.PathLike, *, options: AuditOptions = AuditOptions(),
          progress: bool | str | None = None) -> AuditResult:
    """Screen the images of a feature cache for label errors, duplicates, leaks and outliers.

    Reads only the cache (features, labels, splits, content hashes) and writes nothing:
    ``result.write(out)`` writes the tables, the galleries (which read the suspects' images
    again from the cache's data root) and the map.

    Parameters
    ----------
    cache
        A complete feature cache (:func:`pipeline.extract_features`), labelled or not.
    options
        :class:`~pipeline.core.options.AuditOptions`: ``folds`` of the stratified K-fold that
        gives each labelled image an out-of-fold probability (fewer when a class has fewer
        images), the near-duplicate ``threshold`` (cosine similarity of L2-normalised
        features), ``neighbours`` kept per image, the ``top`` suspects drawn and listed,
        ``map`` and ``map_points`` (the 2-D t-SNE map, a seeded sample beyond), ``seed``.
    progress
        Progress on stderr (:mod:`pipeline.core.progress`); False: nothing.

    Returns
    -------
    AuditResult
        The label issues (all that cleanlab flags, most doubtful first), every exact and near
        pair, leakage counts per split pair, the ``top`` outliers and the map's points.

    Notes
    -----
    Every labelled split is audited together, test included: label noise in the test split
    is what a user most needs to see, since it caps every score measured on it. The fast head
    is standardised features and a multinomial logistic regression.
    """
    opts = options
    if cache_kind(cache_spec(cache)) != "features":
        raise DataError(f"{cache} is an activation cache written by fine-tuning, not a feature "
                        "cache; `pipeline cache list` shows each file's kind")
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    rows = read_rows(cache)
    seconds["read"] = time.perf_counter() - started
    if len(rows.paths) < 2:
        raise DataError(f"{cache}: fewer than 2 readable images, nothing to compare")
    result = AuditResult(str(cache), len(rows.paths), rows.labelled, threshold=opts.threshold,
                         options=opts, data_root=rows.info.get("data_root"))
    suspects = np.zeros(len(rows.paths), bool)
    started = time.perf_counter()
    _audit_labels(rows, opts, result, progress)
    suspects[[i.index for i in result.label_issues]] = True
    seconds["labels"] = time.perf_counter() - started
    started = time.perf_counter()
    Xn = normalised(rows.X, copy=False)  # in place: the raw features are not read again
    with Progress(len(Xn), "audit neighbours", "img", progress=progress) as bar:
        knn = nearest_neighbours(Xn, opts.neighbours, bar.update)
    exact = exact_pairs(rows.digests)
    pairs = exact + near_pairs(knn, opts.threshold, {(p.a, p.b) for p in exact})
    result.duplicates = [_pair_row(rows, p) for p in pairs]
    if rows.labelled:
        result.leakage = leakage_counts(pairs, rows.split)
        result.leakage_rows = _leakage_rows(result)
    seconds["neighbours"] = time.perf_counter() - started
    started = time.perf_counter()
    scores = outlier_scores(knn)
    result.outliers = top_outliers(scores, rows.paths, opts.top)
    result.outlier_rows = [_outlier_row(rows, o) for o in result.outliers]
    seconds["outliers"] = time.perf_counter() - started
    far = np.zeros(len(rows.paths), bool)
    far[[o.index for o in result.outliers]] = True
    if opts.map:
        started = time.perf_counter()
        note("audit: computing the t-SNE map", progress)
        result.map = embed_map(Xn, rows.labels, rows.classes, suspects, far, opts.seed,
                               opts.map_points)
        result.map_points = len(result.map)
        seconds["map"] = time.perf_counter() - started
    result.seconds = seconds
    return result


def _audit_labels(rows: AuditRows, opts: AuditOptions, result: AuditResult,
                  progress: bool | str | None) -> None:
    if not rows.labelled:
        result.label_issues_skipped = ("label issues skipped: the cache holds unlabelled "
                                       "images (no classes), so no label can be doubted")
        return
    k = fold_count(rows.labels, opts.folds)
    present = np.unique(rows.labels)
    if len(present) < 2 or k == 0:
        small = [rows.classes[c] for c in present if np.sum(rows.labels == c) < 2]
        result.label_issues_skipped = (
            "label issues skipped: out-of-fold probabilities need two classes with at least "
            "2 images each" + (f" ({', '.join(map(display, small))} has fewer)" if small else ""))
        return
    note(f"audit: out-of-fold probabilities of {len(rows.labels):,} images, {k} folds", progress)
    proba = out_of_fold_probabilities(rows.X, rows.labels, len(rows.classes), k, opts.seed)
    result.folds = k
    result.out_of_fold_accuracy = float(np.mean(proba.argmax(1) == rows.labels))
    result.label_issues = label_issues(rows.labels, proba, rows.classes, rows.paths, rows.split)


def _pair_row(rows: AuditRows, p: Pair) -> dict:
    row = {"kind": p.kind, "similarity": p.similarity, "path_a": rows.paths[p.a],
           "path_b": rows.paths[p.b]}
    if rows.labelled:
        sa, sb = str(rows.split[p.a]), str(rows.split[p.b])
        la, lb = rows.classes[rows.labels[p.a]], rows.classes[rows.labels[p.b]]
        row.update(split_a=sa, split_b=sb, label_a=la, label_b=lb,
                   cross_split=sa != sb, different_labels=la != lb)
    return row


def _leakage_rows(result: AuditResult) -> list[dict]:
    """``leakage.csv``'s rows: each split pair's exact and near pairs, and how many of them
    carry different labels."""
    different: dict[str, int] = {}
    for d in result.duplicates:
        if d["cross_split"] and d["different_labels"]:
            pair = "-".join(sorted((d["split_a"], d["split_b"]), key=_SPLITS.index))
            different[pair] = different.get(pair, 0) + 1
    return [{"splits": k, **v, "different_labels": different.get(k, 0)}
            for k, v in result.leakage.items()]


def _outlier_row(rows: AuditRows, o: Outlier) -> dict:
    """``outliers.csv``'s row of one outlier: its score, with its label and split if any."""
    row = asdict(o)
    if rows.labelled:
        row.update(label=rows.classes[rows.labels[o.index]], split=str(rows.split[o.index]))
    return row


def _write_tables(result: AuditResult, out: Path) -> dict[str, str]:
    """The tables and galleries of ``result`` into ``out``; their paths by kind."""
    files: dict[str, str] = {}
    opts, root = result.options, result.data_root
    if result.labelled and result.label_issues_skipped is None:
        issues = [asdict(i) for i in result.label_issues]
        csv, md = write_table(issues, out / "label_issues",
                              f"{len(issues)} label issues among {result.images} images "
                              f"(out-of-fold accuracy {result.out_of_fold_accuracy:.4f}, "
                              f"{result.folds} folds), most doubtful first.")
        files.update(label_issues_csv=str(csv), label_issues_md=str(md))
        shown = result.label_issues[:opts.top]
        files["label_issues_png"] = str(gallery(
            [i.path for i in shown],
            [f"{i.split}: {display(i.given)}\n-> {display(i.suggested)} ({i.confidence:.2f})"
             for i in shown], out / "label_issues.png", root,
            f"The {len(shown)} most doubtful of {len(issues)} label issues "
            "(split: given -> suggested, its probability)"))
    csv, md = write_table(result.duplicates, out / "duplicates",
                          f"Image pairs with the same bytes (exact) or cosine similarity >= "
                          f"{opts.threshold} (near).")
    files.update(duplicates_csv=str(csv), duplicates_md=str(md))
    if result.labelled:
        csv, md = write_table(result.leakage_rows, out / "leakage",
                              "Duplicate pairs whose images lie in two splits.")
        files.update(leakage_csv=str(csv), leakage_md=str(md))
    csv, md = write_table(result.outlier_rows, out / "outliers",
                          f"The {len(result.outlier_rows)} images farthest from their "
                          f"{opts.neighbours} nearest neighbours (mean cosine distance).")
    files.update(outliers_csv=str(csv), outliers_md=str(md))
    files["outliers_png"] = str(gallery(
        [o.path for o in result.outliers],
        [f"#{o.rank} {o.score:.3f}" + (f"\n{display(r['label'])}" if "label" in r else "")
         for o, r in zip(result.outliers, result.outlier_rows)], out / "outliers.png", root,
        f"The {len(result.outliers)} images farthest from their nearest neighbours"))
    return files

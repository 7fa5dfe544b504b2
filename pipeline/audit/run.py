"""The audit stage: every screen of a cache's data in one call, its tables, galleries and map."""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from pipeline.audit.gallery import gallery
from pipeline.audit.labels import (
    LabelIssue,
    fold_count,
    label_issues,
    out_of_fold_probabilities,
)
from pipeline.audit.neighbours import (
    Pair,
    exact_pairs,
    leakage_counts,
    near_pairs,
    nearest_neighbours,
    normalised,
)
from pipeline.audit.outliers import Outlier, outlier_scores, top_outliers
from pipeline.audit.projection import write_map
from pipeline.audit.rows import AuditRows, read_rows
from pipeline.core.errors import DataError, PipelineError
from pipeline.core.options import AuditOptions
from pipeline.core.progress import Progress, note
from pipeline.data.layouts import display
from pipeline.report.tables import write_table
from pipeline.store.cache import cache_kind, cache_spec

__all__ = ["AuditResult", "audit"]


@dataclass
class AuditResult:
    """What :func:`audit` found, and the files it wrote."""

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
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**asdict(self), "exact_pairs": sum(d["kind"] == "exact" for d in self.duplicates),
                "near_pairs": sum(d["kind"] == "near" for d in self.duplicates)}


def audit(cache: str | os.PathLike, out: str | os.PathLike | None = None, *,
          folds: int | None = None, threshold: float | None = None,
          neighbours: int | None = None, top: int | None = None, draw_map: bool | None = None,
          map_points: int | None = None, seed: int | None = None,
          options: AuditOptions | None = None, progress: bool | str | None = None
          ) -> AuditResult:
    """Screen the images of a feature cache for label errors, duplicates, leaks and outliers.

    Reads only the cache (features, labels, splits, content hashes); the galleries read the
    images again from the cache's data root. Settings come from ``options``
    (:class:`~pipeline.core.options.AuditOptions`); any keyword given overrides its field.

    Parameters
    ----------
    cache
        A complete feature cache (:func:`pipeline.extract_features`), labelled or not.
    out
        Folder of ``label_issues.csv|md|png``, ``duplicates.csv|md``, ``leakage.csv|md``,
        ``outliers.csv|md|png``, ``map.png`` and ``audit.json``.
    folds
        K of the stratified K-fold giving each labelled image an out-of-fold probability
        (fewer when a class has fewer images).
    threshold
        Cosine similarity of L2-normalised features from which two images are near-duplicates.
    neighbours
        Nearest images kept per image, for the outlier score and the near-duplicate pairs.
    top
        Suspects drawn in each gallery and listed as outliers.
    draw_map
        Draw the 2-D t-SNE map (``map.png``).
    map_points
        Images on the map at most (a seeded sample beyond, suspects kept).
    seed
        Seeds the folds, the map and its sample.
    options
        The settings as one value.
    progress
        Progress on stderr (:mod:`pipeline.core.progress`); False: nothing.

    Returns
    -------
    AuditResult
        The label issues (all that cleanlab flags, most doubtful first), every exact and near
        pair, leakage counts per split pair, the ``top`` outliers, the files written.

    Notes
    -----
    Every labelled split is audited together, test included: label noise in the test split
    is what a user most needs to see, since it caps every score measured on it. The fast head
    is standardised features and a multinomial logistic regression.
    """
    given = {"out": out, "folds": folds, "threshold": threshold, "neighbours": neighbours,
             "top": top, "map": draw_map, "map_points": map_points, "seed": seed}
    opts = replace(options or AuditOptions(), **{k: v for k, v in given.items() if v is not None})
    if opts.folds < 2:
        raise PipelineError("folds must be at least 2")
    if not 0 < opts.threshold <= 1:
        raise PipelineError(f"threshold is a cosine similarity in (0, 1], not {opts.threshold}")
    if cache_kind(cache_spec(cache)) != "features":
        raise DataError(f"{cache} is an activation cache written by fine-tuning, not a feature "
                        "cache; `pipeline cache list` shows each file's kind")
    out = Path(opts.out)
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    rows = read_rows(cache)
    seconds["read"] = time.perf_counter() - started
    if len(rows.paths) < 2:
        raise DataError(f"{cache}: fewer than 2 readable images, nothing to compare")
    result = AuditResult(str(cache), len(rows.paths), rows.labelled, threshold=opts.threshold)
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
    seconds["neighbours"] = time.perf_counter() - started
    started = time.perf_counter()
    scores = outlier_scores(knn)
    result.outliers = top_outliers(scores, rows.paths, opts.top)
    seconds["outliers"] = time.perf_counter() - started
    far = np.zeros(len(rows.paths), bool)
    far[[o.index for o in result.outliers]] = True
    result.files = _write(out, rows, result, opts)
    if opts.map:
        started = time.perf_counter()
        note("audit: drawing the t-SNE map", progress)
        png, result.map_points = write_map(Xn, rows.labels, rows.classes, suspects, far,
                                           out / "map.png", opts.seed, opts.map_points)
        result.files["map_png"] = str(png)
        seconds["map"] = time.perf_counter() - started
    result.seconds = seconds
    (out / "audit.json").write_text(json.dumps(result.to_json(), indent=2, default=str) + "\n")
    result.files["json"] = str(out / "audit.json")
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


def _write(out: Path, rows: AuditRows, result: AuditResult, opts: AuditOptions) -> dict:
    files: dict[str, str] = {}
    root = rows.info.get("data_root")
    issues = [asdict(i) for i in result.label_issues]
    if rows.labelled and result.label_issues_skipped is None:
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
    if rows.labelled:
        different = {}
        for d in result.duplicates:
            if d["cross_split"] and d["different_labels"]:
                pair = "-".join(sorted((d["split_a"], d["split_b"]),
                                       key=["train", "val", "test"].index))
                different[pair] = different.get(pair, 0) + 1
        leak_rows = [{"splits": k, **v, "different_labels": different.get(k, 0)}
                     for k, v in result.leakage.items()]
        csv, md = write_table(leak_rows, out / "leakage",
                              "Duplicate pairs whose images lie in two splits.")
        files.update(leakage_csv=str(csv), leakage_md=str(md))
    labels = (None if not rows.labelled else rows.labels)
    outlier_rows = [{**asdict(o), **({"label": rows.classes[labels[o.index]],
                                      "split": str(rows.split[o.index])} if rows.labelled
                                     else {})} for o in result.outliers]
    csv, md = write_table(outlier_rows, out / "outliers",
                          f"The {len(outlier_rows)} images farthest from their "
                          f"{opts.neighbours} nearest neighbours (mean cosine distance).")
    files.update(outliers_csv=str(csv), outliers_md=str(md))
    files["outliers_png"] = str(gallery(
        [o.path for o in result.outliers],
        [f"#{o.rank} {o.score:.3f}" + (f"\n{display(r['label'])}" if "label" in r else "")
         for o, r in zip(result.outliers, outlier_rows)], out / "outliers.png", root,
        f"The {len(result.outliers)} images farthest from their nearest neighbours"))
    return files

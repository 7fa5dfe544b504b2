"""``distill``: a stage-2 student head on cached features, taught by a teacher's soft predictions.

The teacher (a fine-tuned network of stage 3 or a saved head) predicts the cache's images and
the unlabelled pool once (:mod:`pipeline.distillation.teacher` stores the predictions beside the
caches); the student, a :class:`~pipeline.heads.student.StudentHead` on the cached features,
learns from them and from the true labels of the training split. The temperature and the mix
``alpha`` are chosen on the validation split; the test split scores three rows on the same
images: the student, the same head trained on the labels alone, and the teacher itself.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from sklearn.base import clone
from sklearn.metrics import log_loss

from pipeline.core.contract import Result
from pipeline.core.options import DistillOptions
from pipeline.core.progress import Progress
from pipeline.distillation.teacher import Teacher, TeacherError, load_teacher, soft_targets
from pipeline.heads.compare import CacheData, load_cache_data
from pipeline.heads.derived import base_columns, write_derived
from pipeline.heads.pool import Pool, open_pool
from pipeline.heads.self_training import fit_prepared
from pipeline.heads.student import UNLABELLED, StudentHead
from pipeline.metrics.scoring import RowPredictions, class_probabilities, results_row
from pipeline.metrics.significance import accuracy_interval
from pipeline.store import tracking

__all__ = ["DistillResult", "distill"]

# The student heads: the linear probe and the MLP of stage 2, as StudentHead settings.
STUDENT_HEADS = {"linear": {"hidden_sizes": ()}, "mlp": {"hidden_sizes": (512,)}}
SUFFIX = "+distill"
ALONE = " (no teacher)"


@dataclass
class DistillResult(Result):
    """What distillation found.

    Attributes
    ----------
    rows
        Three results rows on the cache's test images: the student (``<student>+distill``,
        with its paired comparison against the next row and its top-1 ``agreement`` with the
        teacher and that agreement's interval), the same head trained on the labels alone
        (``<student> (no teacher)``), and the teacher (``teacher <name>``).
    grid
        Per temperature and alpha: the student's validation accuracy and log loss.
    teacher
        Its file, kind, digest, and whether its predictions were read from the store
        (``reused``) or computed.
    """

    rows: list[dict]
    grid: list[dict]
    teacher: dict
    options: DistillOptions
    pool: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    estimators: dict = field(default_factory=dict, repr=False)
    predictions: dict = field(default_factory=dict, repr=False)

    def to_json(self) -> dict:
        return {"results": self.rows, "grid": self.grid, "teacher": self.teacher,
                "pool": self.pool, "options": self.options.to_json()}

    def write(self, out: str | os.PathLike, *, track: bool | tracking.Run | None = None
              ) -> list[Path]:
        """``results.csv|md|json`` (the three rows), ``grid.csv|md``, ``models/*.head`` (the
        student, exportable with ``pipeline export``, and the head without teacher),
        ``predictions/*.npz`` (all three) and ``run.json`` in ``out``."""
        return write_derived(Path(out), "distill", self.rows, self.estimators,
                             self.predictions, self.cache, self.options, {"grid": self.grid},
                             {"teacher": self.teacher, "pool": self.pool}, track)


def distill(cache: str | os.PathLike | CacheData, *, teacher: str | os.PathLike,
            pool: str | os.PathLike | Pool | None = None, options: DistillOptions | None = None,
            progress: bool | str | None = None) -> DistillResult:
    """Train a student head on ``cache``'s features from ``teacher``'s soft predictions.

    Parameters
    ----------
    cache
        A labelled feature cache (or its data, :class:`pipeline.heads.compare.CacheData`).
    teacher
        A fine-tuned network (``.net``, pipeline finetune) or a saved head (``.head``) of the
        cache's classes.
    pool
        Optionally, the cache of unlabelled images (or a :class:`~pipeline.heads.pool.Pool`):
        the teacher labels them softly and the student learns from them too.
    options
        :class:`~pipeline.core.options.DistillOptions`.
    progress
        The teacher's pass over images and the student fits, as
        :class:`pipeline.core.progress.Progress` shows them.

    Returns
    -------
    DistillResult
        Computed; only the teacher's predictions are stored (beside the caches), and
        ``result.write(out)`` writes the rest.

    Raises
    ------
    TeacherError
        A teacher of other classes or features, or whose images cannot be read.
    PoolError
        A pool that is empty, of another feature space, or the labelled cache itself.
    """
    options = options or DistillOptions()
    data = cache if isinstance(cache, CacheData) else load_cache_data(cache)
    if pool is not None and not isinstance(pool, Pool):
        pool = open_pool(pool, data.path, data.info)
    master = load_teacher(teacher, data.info)
    soft, reused = soft_targets(master, data.path, progress=progress)
    pool_soft, pool_reused = ({}, True) if pool is None else soft_targets(
        master, data.path, pool=pool, progress=progress)
    logits = {name: _aligned(soft, split.paths, name)
              for name, split in (("train", data.train), ("val", data.val), ("test", data.test))}
    X_pool, pool_logits = _pool_sample(pool, pool_soft, options)
    grid_size = len(options.temperatures) * len(options.alphas)
    template = StudentHead(**STUDENT_HEADS[options.student])
    with Progress(1 + grid_size, "distill", "fit", progress=progress) as bar:
        started = time.perf_counter()
        alone = fit_prepared(template, data, options.seed, data.train.X, data.train.y)
        alone_s = time.perf_counter() - started
        bar.update(1)
        started = time.perf_counter()
        student, grid = _search(template, data, logits["train"], X_pool, pool_logits, options,
                                bar)
        student_s = time.perf_counter() - started
    rows, predictions = _rows(data, master, options, student, alone, logits["test"],
                              (student_s, alone_s), len(X_pool), grid)
    name = options.student
    return DistillResult(
        rows, grid,
        teacher={"teacher_path": str(master.path), "teacher_kind": master.kind,
                 "teacher_name": master.name, "teacher_sha256": master.sha256,
                 "teacher_cache_key": master.cache_key,
                 "reused": bool(reused and pool_reused),
                 "same_cache": master.cache_key == data.info["key"]},
        options=options,
        pool={"pool_path": str(getattr(pool, "path", "") or ""), "pool_size": len(pool or []),
              "pool_used": len(X_pool)},
        cache={"path": str(data.path) if data.path else "", "key": data.info["key"],
               "backbone": data.backbone, "classes": data.classes,
               "dim": int(data.train.X.shape[1]), "spec": data.info["spec"],
               "request": data.info.get("request", {})},
        estimators={f"{name}{SUFFIX}": student, f"{name}{ALONE}": alone},
        predictions=predictions)


def _aligned(soft: dict[str, np.ndarray], paths: list[str], split: str) -> np.ndarray:
    try:
        return np.stack([soft[p] for p in paths])
    except KeyError as err:  # a bug: the store holds every readable image of the cache
        raise TeacherError(f"the teacher's stored predictions lack the {split} image "
                           f"{err.args[0]}; delete the .teacher-*.npz beside the cache") from None


def _pool_sample(pool: Pool | None, pool_soft: dict, options: DistillOptions):
    """The pool rows the student trains on (a seeded sample beyond ``max_pool``), with the
    teacher's logits."""
    if pool is None:
        return np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32)
    positions = np.arange(len(pool))
    if len(pool) > options.max_pool:
        rng = np.random.default_rng(options.seed)
        positions = np.sort(rng.choice(len(pool), options.max_pool, replace=False))
    return pool.take(positions), np.stack([pool_soft[pool.paths[i]] for i in positions])


def _search(template, data: CacheData, train_logits, X_pool, pool_logits,
            options: DistillOptions, bar: Progress):
    """Fit a student per temperature and alpha; the best on validation (accuracy, then log
    loss, then the first in the grid's order), and the grid's scores."""
    X = np.concatenate([data.train.X, X_pool]) if len(X_pool) else data.train.X
    y = np.concatenate([data.train.y, np.full(len(X_pool), UNLABELLED)])
    teacher = np.concatenate([train_logits, pool_logits]) if len(X_pool) else train_logits
    best, grid = None, []
    for temperature in options.temperatures:
        for alpha in options.alphas:
            student = clone(template).set_params(temperature=temperature, alpha=alpha,
                                                 random_state=options.seed)
            student.fit(X, y, X_val=data.val.X, y_val=data.val.y, teacher_logits=teacher)
            proba = class_probabilities(student, data.val.X, len(data.classes))
            accuracy = float(np.mean(proba.argmax(1) == data.val.y))
            loss = float(log_loss(data.val.y, proba / proba.sum(1, keepdims=True),
                                  labels=np.arange(len(data.classes))))
            grid.append({"temperature": temperature, "alpha": alpha, "val_accuracy": accuracy,
                         "val_log_loss": loss, "chosen": False})
            if best is None or (accuracy, -loss) > (best[1], -best[2]):
                best = (student, accuracy, loss, len(grid) - 1)
            bar.update(1)
    grid[best[3]]["chosen"] = True
    return best[0], grid


def _rows(data: CacheData, teacher: Teacher, options: DistillOptions, student, alone,
          test_logits, seconds, pool_used: int, grid: list[dict]):
    """The student's, the head alone's and the teacher's rows on the test split."""
    n = len(data.classes)
    chosen = next(g for g in grid if g["chosen"])
    y = data.test.y
    found = {}
    for head, estimator in ((f"{options.student}{SUFFIX}", student),
                            (f"{options.student}{ALONE}", alone)):
        started = time.perf_counter()
        proba = class_probabilities(estimator, data.test.X, n)
        found[head] = (proba, proba.argmax(1), time.perf_counter() - started)
    teacher_proba = np.exp(test_logits.astype(np.float64))
    teacher_proba /= teacher_proba.sum(1, keepdims=True)
    teacher_head = f"teacher {teacher.name}"
    found[teacher_head] = (teacher_proba, teacher_proba.argmax(1), float("nan"))
    common = {"backbone": data.backbone, "y_true": y, "n_classes": n,
              "cache_key": data.info["key"], "test_n": len(y)}
    (s_proba, s_pred, s_time), (a_proba, a_pred, a_time), (t_proba, t_pred, _) = found.values()
    agree = int(np.sum(s_pred == t_pred))
    low, high = accuracy_interval(agree, len(y))
    student_row = results_row(
        head=f"{options.student}{SUFFIX}",
        chosen=f"T={chosen['temperature']:g},alpha={chosen['alpha']:g},pool={pool_used}",
        y_pred=s_pred, proba=s_proba, fit_s=seconds[0], predict_s=s_time, method="transfer",
        train_n=len(data.train.y) + pool_used, **common,
        **base_columns(y, s_pred, a_pred, f"{options.student}{ALONE}",
                       float(np.mean(a_pred == y))),
        agreement=agree / len(y), agreement_ci_low=float(low), agreement_ci_high=float(high),
        temperature=chosen["temperature"], alpha=chosen["alpha"], teacher=str(teacher.path))
    alone_row = results_row(
        head=f"{options.student}{ALONE}", chosen="labels only", y_pred=a_pred, proba=a_proba,
        fit_s=seconds[1], predict_s=a_time, method="transfer", train_n=len(data.train.y),
        **common)
    teacher_row = results_row(
        head=teacher_head, chosen=teacher.path.name, y_pred=t_pred, proba=t_proba,
        fit_s=float("nan"), predict_s=float("nan"),
        method="fine-tune" if teacher.kind == "network" else "transfer",
        train_n="", **common,
        **base_columns(y, t_pred, s_pred, f"{options.student}{SUFFIX}",
                       float(np.mean(s_pred == y))))
    rows = [student_row, alone_row, teacher_row]
    predictions = {row["head"]: RowPredictions(data.test.paths, y, pred, proba, data.leaked,
                                               data.classes)
                   for row, (proba, pred, _) in zip(rows, found.values())}
    return rows, predictions

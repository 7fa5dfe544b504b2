"""The drift stage: is the new data different, does it hurt, and what to retrain.

Four measures say whether the new set differs from the reference, each with an effect size,
its 95% interval and a p-value: the domain classifier (:mod:`~pipeline.monitoring.classifier`)
and the MMD test (:mod:`~pipeline.monitoring.kernel`) compare the features' distributions, the
novelty test (:mod:`~pipeline.monitoring.novelty`) counts new images unlike any reference image
(a minority, such as a class never seen, that barely moves a distribution), and the shift of the
classes the deployed model predicts (:mod:`~pipeline.monitoring.outputs`) looks at its outputs.
The set counts as shifted when the smallest of the four Holm-adjusted p-values is below the
level, so the four together raise a false alarm at most that often. On a cache of several
layers the three feature measures run on each layer too: where in the network the shift
appears.

Whether it hurts is the model's accuracy: measured where the new set has labels, expected by
ATC (:mod:`~pipeline.monitoring.harm`) where it has none; beside it the shift of the softmax
outputs. What to do follows in one sentence: nothing, watch, refit the head on old and new
features (tried and measured when the new set has labels), or fine-tune from a depth.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

import numpy as np

from pipeline.core.contract import to_plain
from pipeline.core.errors import DataError
from pipeline.data.layouts import display
from pipeline.metrics.significance import mcnemar_test
from pipeline.monitoring.classifier import ClassifierTest, domain_classifier
from pipeline.monitoring.harm import accuracy_change, atc_estimate, atc_threshold
from pipeline.monitoring.kernel import MMDTest, mmd_test
from pipeline.monitoring.novelty import NoveltyTest, novelty_test
from pipeline.monitoring.options import SPLITS, DriftOptions
from pipeline.monitoring.outputs import (
    LabelShiftTest,
    SoftmaxShift,
    holm,
    label_shift,
    softmax_shift,
)
from pipeline.monitoring.result import DriftResult, sentence
from pipeline.monitoring.sources import (
    Model,
    Rows,
    find_reference,
    load_deployed,
    new_rows,
    read_rows,
)

__all__ = ["MIN_IMAGES", "DriftResult", "Shift", "drift", "measure_shift"]

# Fewer new images than this cannot show a distribution: the cross-fit needs a few per fold
# and a permutation test of a handful of rows has no power.
MIN_IMAGES = 10


def drift(new: str | os.PathLike, *, against: str | os.PathLike,
          options: DriftOptions = DriftOptions(),  # noqa: B008 (frozen: safe to share)
          progress: bool | str | None = None) -> DriftResult:
    """Compare new images with the reference a model was built on, and judge the model on them.

    Parameters
    ----------
    new
        An image folder or manifest (labelled or not), or a feature cache of one. It is
        extracted with the reference cache's exact backbone spec, or found in the cache; a
        cache made with another spec is extracted again from its images.
    against
        The reference: a feature cache, or a results folder (``pipeline heads`` /
        ``pipeline finetune`` output) whose best row's saved model is judged, with the cache
        that row was fitted on.
    options
        :class:`~pipeline.monitoring.options.DriftOptions`.
    progress
        Extraction progress on stderr; False: nothing.

    Returns
    -------
    DriftResult
        ``shifted``, ``harmful`` (None when it cannot be judged), the sentence, and every
        measure with its statistic, interval and p-value.

    Raises
    ------
    DataError
        NEW has fewer than :data:`MIN_IMAGES` readable images, the reference is unlabelled,
        or its reference splits are empty.
    """
    started = time.perf_counter()
    where = find_reference(against, options.model)
    reference = read_rows(where.cache)
    if reference.labels is None:
        raise DataError(f"{display(str(where.cache))} holds unlabelled images: the reference "
                        "must be the labelled cache the model was fitted on")
    notes = list(where.notes)
    cache_dir = options.cache_dir or reference.path.parent
    new_set, found = new_rows(new, reference, cache_dir, options.device, progress)
    notes += found
    if len(new_set.X) < MIN_IMAGES:
        raise DataError(f"{display(str(new))} has {len(new_set.X)} readable image(s); drift "
                        f"compares distributions and needs at least {MIN_IMAGES}")
    splits = {s: reference.take(reference.split == s) for s in SPLITS}
    sample, bank, copies = _reference_sample(reference, new_set, options.reference)
    if copies:
        notes.append(f"{copies} reference image(s) identical to images of NEW were left out of "
                     "the reference sample")
    model = load_deployed(where.model, reference, splits["train"], splits["val"])
    if model.note:
        notes.append(model.note)

    shift = measure_shift(sample, new_set, model, options, bank=bank)
    classifier, mmd, predicted = shift.classifier, shift.mmd, shift.predicted
    family, shifted, proba_new = shift.family, shift.shifted, shift.proba_new
    layers = _layer_rows(sample, bank, new_set, options) if len(reference.layers) > 1 else []

    y_new, unseen = _new_labels(new_set, model.classes)
    if unseen:
        notes.append(f"NEW has {sum(unseen.values())} image(s) of {len(unseen)} class(es) the "
                     f"model has never seen: {', '.join(sorted(unseen))}")
    held_out = splits["test"] if len(splits["test"].X) else splits["val"]
    proba_held = _proba(model, held_out, options)
    right_ref = int(np.sum(proba_held.argmax(1) == held_out.labels))
    atc = None
    if len(splits["val"].X):
        atc = _atc(model, splits["val"], proba_held, proba_new, options)
    else:
        notes.append("the reference has no validation split: the accuracy expected without "
                     "labels (ATC) needs one to calibrate its threshold")
    accuracy = None
    if y_new is not None:
        right = int(np.sum(proba_new.argmax(1) == y_new))
        accuracy = asdict(accuracy_change(right, len(y_new), right_ref, len(held_out.X)))
    judged = accuracy if accuracy is not None else (atc or {}).get("change")
    harmful = None if judged is None else _drops(judged, options)
    refit = None
    if harmful and y_new is not None:
        refit = _refit(model, splits, new_set, y_new, proba_new, unseen, options)
    action, unfreeze = _action(shifted, harmful, refit, layers, reference)
    result = DriftResult(
        str(new), str(against), str(reference.path), str(new_set.path), model.name,
        list(options.reference), len(sample.X), len(new_set.X), options.level, shifted,
        harmful, action, unfreeze, "", _plain(classifier), _plain(mmd),
        {**_plain(predicted), "p_holm": float(family[2])}, _plain(shift.outputs), atc,
        accuracy, refit, layers, unseen, notes,
        _gallery(new_set, shift, proba_new, model, options),
        str(new_set.root), novelty={**_plain(shift.novelty), "p_holm": float(family[3])})
    result.domain_classifier["p_holm"], result.mmd["p_holm"] = float(family[0]), float(family[1])
    # Each measure names its statistic the same way, beside its own name for it.
    for measure, key in ((result.domain_classifier, "auc"), (result.mmd, "mmd2"),
                         (result.label_shift, "total_variation"),
                         (result.novelty, "excess"), (result.softmax, "confidence_change")):
        measure["statistic"] = measure[key]
    result.sentence = sentence(result)
    result.seconds = time.perf_counter() - started
    return result


@dataclass
class Shift:
    """The four measures of one comparison, and the model's outputs on either side."""

    classifier: ClassifierTest
    scores: np.ndarray  # each new row's out-of-fold probability of being new
    mmd: MMDTest
    predicted: LabelShiftTest
    outputs: SoftmaxShift
    novelty: NoveltyTest
    novelty_scores: np.ndarray  # each new row's distance to its nearest reference rows
    family: np.ndarray  # Holm-adjusted p-values: classifier, MMD, predicted classes, novelty
    shifted: bool
    proba_sample: np.ndarray
    proba_new: np.ndarray


def measure_shift(sample: Rows, new: Rows, model: Model, options: DriftOptions, *,
                  bank: Rows | None = None) -> Shift:
    """Whether ``new`` differs from the reference ``sample``: the domain classifier, the MMD
    test, the predicted classes of ``model`` and the novelty test, one decision at
    ``options.level`` over the four Holm-adjusted p-values; the softmax shift beside them.

    ``bank`` holds more reference rows (the training split) for the novelty test alone: the
    frozen backbone's features do not know which images trained the head, and a larger
    reference makes each image's nearest neighbours, and so the test, sharper.
    """
    classifier, scores = domain_classifier(sample.X, new.X, folds=options.folds,
                                           seed=options.seed)
    mmd = mmd_test(sample.X, new.X, permutations=options.permutations, seed=options.seed)
    proba_sample, proba_new = _proba(model, sample, options), _proba(model, new, options)
    predicted = label_shift(proba_sample.argmax(1), proba_new.argmax(1), model.classes,
                            seed=options.seed)
    outputs = softmax_shift(proba_sample, proba_new, model.classes)
    novelty, novelty_scores = _novelty(sample.X, None if bank is None else bank.X, new.X,
                                       options)
    family = holm([classifier.p_value, mmd.p_value, predicted.p_value, novelty.p_value])
    return Shift(classifier, scores, mmd, predicted, outputs, novelty, novelty_scores, family,
                 bool(family.min() < options.level), proba_sample, proba_new)


def _novelty(X: np.ndarray, bank: np.ndarray | None, Y: np.ndarray, options: DriftOptions
             ) -> tuple[NoveltyTest, np.ndarray]:
    reference = X if bank is None or not len(bank) else np.concatenate([X, bank])
    return novelty_test(reference, Y, neighbours=options.neighbours, tail=options.tail,
                        permutations=options.permutations, seed=options.seed)


def _plain(value) -> dict:
    return to_plain(asdict(value))


def _reference_sample(reference: Rows, new: Rows, splits: tuple[str, ...]
                      ) -> tuple[Rows, Rows, int]:
    """The reference rows of ``splits``, the training split's other rows (the novelty test's
    larger reference; a split left out of ``splits``, such as a test split NEW was made
    from, stays out), both less exact copies of new images (same content hash: a copy on both
    sides makes the two sets look more alike than they are), and the copies in ``splits``."""
    mask = np.isin(reference.split, splits)
    known = new.hashes[new.hashes != b""]
    copied = (reference.hashes != b"") & np.isin(reference.hashes, known)
    copies = mask & copied
    sample = reference.take(mask & ~copies)
    if len(sample.X) < MIN_IMAGES:
        raise DataError(f"the reference split(s) {', '.join(splits)} hold {len(sample.X)} "
                        f"image(s) other than NEW's; drift needs at least {MIN_IMAGES}: choose "
                        "others with --reference")
    bank = reference.take((reference.split == "train") & ~mask & ~copied)
    return sample, bank, int(copies.sum())


def _proba(model: Model, rows: Rows, options: DriftOptions) -> np.ndarray:
    proba = model.proba(rows, options.device)
    # A network reads the images again: one that cannot be read now gets uniform odds.
    bad = np.isnan(proba).any(1)
    proba[bad] = 1.0 / proba.shape[1]
    return proba


def _new_labels(new: Rows, classes: list[str]) -> tuple[np.ndarray | None, dict[str, int]]:
    """NEW's labels as indices into ``classes`` (a class the model does not know gets an index
    past them, so it is never predicted right), and the unknown classes' counts."""
    if new.labels is None:
        return None, {}
    names = np.asarray(new.classes, dtype=object)[new.labels]
    unknown = sorted(set(new.classes) - set(classes))
    index = {c: j for j, c in enumerate([*classes, *unknown])}
    counts = {c: int(np.sum(names == c)) for c in unknown}
    return np.array([index[n] for n in names]), {c: n for c, n in counts.items() if n}


def _atc(model: Model, val: Rows, proba_held: np.ndarray, proba_new: np.ndarray,
         options: DriftOptions) -> dict:
    """The accuracy ATC expects on NEW and on the reference's held-out split, and the change."""
    proba_val = _proba(model, val, options)
    threshold = atc_threshold(proba_val.max(1), proba_val.argmax(1) == val.labels)
    new, low, high = atc_estimate(proba_new.max(1), threshold)
    held = atc_estimate(proba_held.max(1), threshold)[0]
    change = accuracy_change(int(round(new * len(proba_new))), len(proba_new),
                             int(round(held * len(proba_held))), len(proba_held))
    return {"threshold": threshold, "expected": new, "ci_low": low, "ci_high": high,
            "reference_expected": held, "change": asdict(change)}


def _drops(change: dict, options: DriftOptions) -> bool:
    """A significant drop of at least the tolerance."""
    return bool(change["p_drop"] < options.level and -change["difference"] >= options.tolerance)


def _layer_rows(sample: Rows, bank: Rows, new: Rows, options: DriftOptions) -> list[dict]:
    """The domain classifier, the MMD and the novelty test on each layer's columns; a layer is
    shifted where one Holm-adjusted p-value (over every layer's three tests) is below the
    level."""
    rows = []
    for depth, (name, start, stop) in enumerate(sample.layers):
        X, Y = sample.X[:, start:stop], new.X[:, start:stop]
        classifier, _ = domain_classifier(X, Y, folds=options.folds, seed=options.seed)
        mmd = mmd_test(X, Y, permutations=options.permutations, seed=options.seed)
        novelty, _ = _novelty(X, bank.X[:, start:stop], Y, options)
        rows.append({"layer": name, "depth": depth, "features": stop - start,
                     "auc": classifier.auc, "auc_ci_low": classifier.ci_low,
                     "auc_ci_high": classifier.ci_high, "p_classifier": classifier.p_value,
                     "proxy_a_distance": classifier.proxy_a_distance, "mmd2": mmd.mmd2,
                     "mmd2_ci_low": mmd.ci_low, "mmd2_ci_high": mmd.ci_high,
                     "p_mmd": mmd.p_value, "outlier_share": novelty.outlier_share,
                     "novelty_excess": novelty.excess, "novelty_ci_low": novelty.ci_low,
                     "novelty_ci_high": novelty.ci_high, "p_novelty": novelty.p_value})
    tests = ("p_classifier", "p_mmd", "p_novelty")
    adjusted = holm([r[t] for r in rows for t in tests]).reshape(len(rows), len(tests))
    for row, row_adjusted in zip(rows, adjusted):
        row["p_holm"] = float(row_adjusted.min())
        row["shifted"] = bool(row["p_holm"] < options.level)
    return rows


def _refit(model: Model, splits: dict[str, Rows], new: Rows, y_new: np.ndarray,
           proba_new: np.ndarray, unseen: dict[str, int], options: DriftOptions) -> dict:
    """Refit the head on the reference's training split and half of NEW's labelled images;
    measure it and the deployed model on the other half."""
    from sklearn.model_selection import train_test_split
    from sklearn.utils.validation import has_fit_parameter

    from pipeline.heads import make_head

    counts = np.bincount(y_new)
    stratify = y_new if counts[counts > 0].min() >= 2 else None
    fit, held = train_test_split(np.arange(len(y_new)), test_size=0.5, stratify=stratify,
                                 random_state=options.seed)
    train, val, test = splits["train"], splits["val"], splits["test"]
    head = make_head(model.head_spec)
    X = np.concatenate([train.X, new.X[fit]])
    y = np.concatenate([train.labels, y_new[fit]])
    if has_fit_parameter(head, "X_val") and len(val.X):
        head.fit(X, y, X_val=val.X, y_val=val.labels)
    else:
        head.fit(X, y)
    refit_right = head.predict(new.X[held]) == y_new[held]
    deployed_right = proba_new[held].argmax(1) == y_new[held]
    reference = test if len(test.X) else val
    kept = int(np.sum(head.predict(reference.X) == reference.labels))
    deployed_kept = int(np.sum(model.proba(reference).argmax(1) == reference.labels)) \
        if model.estimator is not None else None
    change = accuracy_change(int(refit_right.sum()), len(held),
                             deployed_kept if deployed_kept is not None else kept,
                             len(reference.X))
    suffices = not _drops(asdict(change), options)
    return {"head": model.head_spec, "fit_images": len(fit), "held_images": len(held),
            "new_classes_learned": sorted(unseen),
            "accuracy": float(refit_right.mean()), "deployed_accuracy":
            float(deployed_right.mean()), "p_vs_deployed": mcnemar_test(refit_right,
                                                                         deployed_right),
            "reference_accuracy": kept / len(reference.X), "change": asdict(change),
            "suffices": suffices}


def _action(shifted: bool, harmful: bool | None, refit: dict | None, layers: list[dict],
            reference: Rows) -> tuple[str, int | None]:
    """What to do, and the --unfreeze depth where fine-tuning should start."""
    if harmful is None:
        return ("judge" if shifted else "none"), None
    if not harmful:
        return ("watch" if shifted else "none"), None
    if refit is not None and refit["suffices"]:
        return "refit", None
    return "fine-tune", _unfreeze(layers, reference)


def _unfreeze(layers: list[dict], reference: Rows) -> int:
    """The blocks above the lowest layer where the shift shows (a cache of every block), at
    least 1; the top block (1) when the cache cannot tell."""
    shifted = [r["depth"] for r in layers if r["shifted"]]
    if not shifted or reference.spec.get("layer") != "blocks":
        return 1
    return max(1, len(layers) - 1 - min(shifted))


def _gallery(new: Rows, shift: Shift, proba: np.ndarray, model: Model,
             options: DriftOptions) -> list[dict]:
    """The new images most unlike the reference, by the measure more sure of a difference:
    the domain classifier's score, or the novelty (distance to the nearest reference images)
    where the novelty test's p-value is the smaller (a few novel images among many)."""
    by_novelty = shift.novelty.p_value < shift.classifier.p_value
    scores = shift.novelty_scores if by_novelty else shift.scores
    order = np.argsort(-scores, kind="stable")[:options.gallery]
    return [{"path": str(new.paths[i]), "score": float(scores[i]),
             "measure": "novelty" if by_novelty else "domain classifier",
             "predicted": model.classes[int(proba[i].argmax())]} for i in order]


# --- words ------------------------------------------------------------------------------------

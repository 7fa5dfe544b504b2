"""Stage 3: fine-tune the top blocks of a backbone end to end, warm-started from a linear probe.

Transfer learning trains a new head on frozen features (stage 2); fine-tuning also updates the
top K blocks of the pretrained network, with a lower learning rate than the head's, BatchNorm
statistics frozen, and the head warm-started from a linear probe on the cached features so the
pretrained blocks are not hit by the gradients of a random head.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core import distributed
from pipeline.core.options import (
    AUGMENTS,
    AUTO_LR,
    DEFAULT_BACKBONE,
    HEAD_INITS,
    OPTIMIZERS,
    SCHEDULES,
    ExtractOptions,
    FinetuneConfig,
)
from pipeline.core.progress import EpochLines
from pipeline.finetuning.loop import CHECKPOINT, Trainer, evaluate
from pipeline.finetuning.lr_find import with_found_lr
from pipeline.finetuning.network import FinetunedNetwork
from pipeline.finetuning.setup import FROM_SCRATCH, FinetuneError, from_scratch, prepare
from pipeline.finetuning.tta import check_mode as check_tta
from pipeline.finetuning.tta import score_finetune
from pipeline.metrics.calibration import reliability_curve
from pipeline.metrics.scoring import (
    POSITIVE_COLUMNS,
    SCORE_COLUMNS,
    RowPredictions,
    per_class_rows,
    positive_scores,
    results_row,
    with_repeats,
)
from pipeline.models.backbones import BackboneSpec
from pipeline.models.blocks import parse_layers
from pipeline.report import plots, tables
from pipeline.store import tracking
from pipeline.store.leakage import leaked_test_images
from pipeline.store.persistence import NETWORK_SUFFIX
from pipeline.store.run_record import RECORD, RunRecord, device_name, shared_fields

__all__ = ["AUGMENTS", "HEAD_INITS", "OPTIMIZERS", "SCHEDULES", "FinetuneConfig", "FinetuneError",
           "FinetuneResult", "finetune", "repeat_seeds", "sweep_depths"]


@dataclass
class FinetuneResult:
    """The results row, the per-epoch history, the trained network and the files written."""

    row: dict
    history: list[dict]
    test_pred: np.ndarray
    # The best epoch's weights, in eval mode on the CPU: predict_images(result.model, ...).
    model: FinetunedNetwork | None = None
    files: dict[str, str] = field(default_factory=dict)
    # Labels and class probabilities of the test images, in the order of test_pred.
    test_labels: np.ndarray | None = None
    test_proba: np.ndarray | None = None
    # With test-time augmentation (pipeline.finetuning.tta): its results row and probabilities.
    tta_row: dict | None = None
    tta_proba: np.ndarray | None = None

    @property
    def rows(self) -> list[dict]:
        """The results rows of the run: its row, and its test-time augmented row if any."""
        return [self.row] + ([self.tta_row] if self.tta_row is not None else [])


def finetune(
    data: str | os.PathLike,
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    config: FinetuneConfig | None = None,
    *,
    out: str | os.PathLike = "results/finetune",
    options: ExtractOptions | None = None,
    progress: bool | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    activation_depths: Sequence[int] = (),
    split_seed: int | None = None,
    positive: str | None = None,
    track: bool | tracking.Run | None = None,
    tta: str | None = None,
    **settings,
) -> FinetuneResult:
    """Fine-tune the top ``unfreeze`` blocks of ``backbone`` on ``data``; resume if stopped.

    Parameters
    ----------
    data
        As for :func:`pipeline.extract_features`; the features of these settings (cached, or
        extracted now) warm-start the head, and their splits are the ones trained on.
    backbone
        A :class:`~pipeline.models.backbones.BackboneSpec`, or a name resolved here with the
        ``weights``, ``image_size`` and ``offline`` given in ``settings`` (random init seeded
        by ``config.seed``).
    config
        How the blocks are trained (:class:`~pipeline.core.options.FinetuneConfig`); its fields,
        recorded in the checkpoint, decide whether a run resumes.
    out
        Folder of ``checkpoint.pt`` (each epoch), ``history.csv|png``, ``results.csv|md|json``
        and the saved model. A run whose checkpoint is there resumes from it.
    options
        Where the features are cached and how images are read
        (:class:`~pipeline.core.options.ExtractOptions`: ``cache_dir``, ``device``, ``workers``,
        ``split_fractions``; ``compile`` compiles the training steps). Its ``seed`` is
        ``config.seed``, so the splits are those of the same seed's extraction.
    progress
        Extraction and activation passes: a bar where stderr is a terminal, elsewhere a line
        every 30 s and at the end; and one line per epoch either way (train and validation
        loss and accuracy, learning rate, seconds; :mod:`pipeline.core.progress`). False: nothing.
    on_epoch
        Called with ``(epoch, history_row)`` after each epoch's checkpoint is written.
    activation_depths
        Other ``unfreeze`` depths whose activation caches the same trunk pass should write
        (a sweep's), so that the trunk runs once for all of them.
    split_seed
        Seed of the carved splits and of a random backbone init instead of ``config.seed``,
        which then seeds training alone (head, minibatch order, augmentation): the repeats of
        :func:`sweep_depths` train with other seeds on the same splits and features.
    positive
        Two-class data: the positive class (default the second), whose recall and
        false-negative rate the results row adds.
    track
        Log the run to MLflow (:mod:`pipeline.store.tracking`): parameters, each epoch's metrics as
        it ends, the results row, plots and the saved network. None: only when
        ``MLFLOW_TRACKING_URI`` is set; a :class:`pipeline.store.tracking.Run`: nested under it.
    tta
        ``"flip"`` or ``"crops"``: also score the test images with test-time augmentation
        (:mod:`pipeline.finetuning.tta`), as a second results row ``finetune-K+tta`` with its own
        predictions (``result.tta_row``); None: not.
    **settings
        Fields of ``FinetuneConfig`` (``unfreeze`` may be ``"all"``) and of ``ExtractOptions``
        overriding ``config``'s and ``options``'s, and the backbone arguments above.
        ``lr="auto"``: the learning-rate range test (:mod:`pipeline.finetuning.lr_find`) runs first
        on the same network (its weights put back) and its suggestion is the head's rate,
        recorded in the row (``lr``, ``lr_found_by``); its files in ``out/lr-find/`` are read
        back by a resumed run.

    Notes
    -----
    Under ``torchrun`` the ranks train one model with DistributedDataParallel: each takes its
    share of every epoch's shuffled training images (``batch_size`` per rank), gradients of
    the trained blocks are averaged (the frozen trunk has none to sync), validation and test
    images are split between the ranks and their metrics gathered, and rank 0 alone writes
    checkpoints and results. A restarted job resumes from rank 0's checkpoint.

    ``out/run.json`` records the run (:mod:`pipeline.store.run_record`).
    """
    started = time.perf_counter()
    record = RunRecord("finetune")
    check_tta(tta)
    # Asked here, before any extraction: a missing MLflow stops the run at once.
    track = track if isinstance(track, tracking.Run) else tracking.check(track)
    out = Path(out)
    setup = prepare(data, backbone, config, options, settings, split_seed=split_seed,
                     positive=positive, activation_depths=activation_depths, progress=progress)
    if setup.cfg.lr == AUTO_LR:  # the range test on this network first (weights put back)
        setup = with_found_lr(setup, out, progress)
    (cfg, opts, ctx, run_on, data_seed, images, spec, cache, model, head, unfrozen, args,
     loaders, forward, trained_from, lr_found_by) = setup
    trainer = Trainer(model, head, unfrozen, cfg, run_on, args, out / CHECKPOINT, ctx,
                       opts.compile, forward=forward)
    record.update(settings={"data": str(data), "backbone": spec.request, "config": cfg,
                            "options": opts, "positive": positive, "out": str(out)},
                  seed=cfg.seed, split_seed=data_seed, device=device_name(run_on),
                  world_size=ctx.world_size, trained_from=trained_from)
    record.with_caches([cache.cache_path])
    run = (tracking.start(track, out.absolute().parent, f"{spec.name} {out.name}", "finetune",
                          tags={"pipeline.cache_key": cache.key,
                                "pipeline.out": str(out.absolute())})
           if ctx.is_main else None)
    with tracking.ending(run):
        tracking.log_finetune_start(run, cfg, {
            "backbone": spec.name, "weights": spec.weights.identity, "cache_key": cache.key,
            "data": str(data), "trained_from": trained_from, "device": str(run_on),
            "world_size": ctx.world_size, "split_seed": data_seed, "positive": positive})
        epochs = tracking.EpochLogger(run)
        lines = EpochLines(f"finetune {out.name}", cfg.epochs,
                           progress if ctx.is_main else False)
        history = trainer.fit(loaders, _each(lines, epochs, on_epoch))
        _, _, proba = evaluate(forward, loaders.eval("test"), run_on)
        y_test = loaders.labels("test")
        result = _result(spec, cfg, cache, images.classes, trainer, history, y_test, proba,
                         started)
        result.row["trained_from"] = trained_from
        result.row.update(lr=cfg.lr, lr_found_by=lr_found_by)
        result.row.update(positive_scores(y_test, result.test_pred, images.classes, positive))
        if tta:
            score_finetune(result, images, loaders.rows["test"], tta, run_on, cfg.batch_size,
                           opts.workers, positive)
        if ctx.is_main:
            result.files = _write(out, spec, images.classes, cache, args, model, result)
            epochs.finish(history)  # a resumed run's earlier epochs
            # trainer.start_epoch: the epochs of an interrupted run's checkpoint, resumed.
            record.update(resumed_from_epoch=trainer.start_epoch,
                          tracking=run.describe() if run else None)
            written = record.write(out / RECORD, result.files.values())
            tracking.log_finetune_end(run, result.row, result.files, written)
    distributed.barrier()  # no rank returns before the results are on disk
    return result


def _each(*callbacks: Callable | None) -> Callable[[int, dict], None]:
    """One ``on_epoch`` that calls each of ``callbacks`` (None skipped) in turn."""
    def call(epoch: int, row: dict) -> None:
        for callback in callbacks:
            if callback is not None:
                callback(epoch, row)
    return call


def sweep_depths(data: str | os.PathLike, depths: Sequence[int | str],
                 out: str | os.PathLike = "results/finetune", repeats: int = 1, *,
                 track: bool | tracking.Run | None = None, **kwargs) -> list[dict]:
    """One fine-tune per number of unfrozen blocks, everything else equal, and one table.

    Depth 0 trains only the new head by the same loop: the linear probe baseline. Writes
    ``freeze_depth.csv|md`` and each run's files under ``unfreeze-<K>/``. With ``repeats``
    above 1, each depth is trained again with seeds ``seed + 1`` .. ``seed + repeats - 1``
    on the same splits (:func:`repeat_seeds`), and its row adds the spread over seeds.
    With ``track`` every run is logged to MLflow nested under one run of the experiment;
    ``out/run.json`` records the whole call, each run's folder its own run.
    """
    if repeats < 1:
        raise FinetuneError("repeats must be at least 1")
    out = Path(out)
    config = kwargs.get("config") or FinetuneConfig()
    record = RunRecord("freeze-depth", {"data": str(data), "depths": list(depths),
                                        "repeats": repeats, **kwargs},
                       seed=kwargs.get("seed", config.seed))
    is_main = distributed.context().is_main
    parent = (tracking.start(track, out.absolute().parent, out.name, "freeze-depth")
              if is_main else None)
    # One trunk pass writes the activation caches of every depth (all: no cache, images).
    counts = [k for k in depths if k != "all"]
    rows = []
    with tracking.ending(parent):
        for k in depths:
            run = finetune(data, out=out / f"unfreeze-{k}", unfreeze=k,
                           activation_depths=counts, track=parent or track, **kwargs)
            if repeats > 1:
                repeat_seeds(data, run, out / f"unfreeze-{k}", repeats, unfreeze=k,
                             activation_depths=counts, track=parent or track, **kwargs)
            rows.append(run.row)
        table = [{"blocks_unfrozen": r["blocks_unfrozen"],
                  "trainable_parameters": r["trainable_parameters"],
                  "best_epoch": r["best_epoch"],
                  **{c: r[c] for c in r if c.startswith("test_accuracy") or c == "repeats"},
                  "macro_f1": r["macro_f1"],
                  **{c: r[c] for c in POSITIVE_COLUMNS if c in r},
                  "seconds": r["fit_s"]} for r in rows]
        if is_main:
            files = list(tables.write_table(table, out / "freeze_depth"))
            # Every depth reads the same cache on the same device: the first run's record says.
            record.update(**shared_fields(out / f"unfreeze-{depths[0]}" / RECORD),
                          tracking=parent.describe() if parent else None)
            files.append(record.write(out / RECORD, [*files, *(out / f"unfreeze-{k}" / RECORD
                                                             for k in depths)]))
            tracking.log_runs(parent, {"depths": list(depths), "repeats": repeats}, {}, files)
    return table


def repeat_seeds(data: str | os.PathLike, first: FinetuneResult, out: str | os.PathLike,
                 repeats: int, **kwargs) -> list[dict]:
    """Train ``first``'s run again with the next ``repeats - 1`` seeds; summarise the seeds.

    Only training is reseeded (head init, minibatch order, augmentation): the splits and the
    features stay those of ``first``'s seed, so every seed is scored on the same test images.
    Each repeat writes its own run under ``out/repeats/seed-<S>/`` (``pipeline report`` does
    not take those as rows); ``first.row`` gains the mean, standard deviation and t-interval
    of the test accuracy over the seeds
    (:func:`pipeline.metrics.scoring.with_repeats`), written again into ``out/results.*``, and
    ``out/repeats.csv|md`` lists every seed's scores.

    Parameters
    ----------
    data, kwargs
        As given to :func:`finetune` for ``first`` (``seed`` and ``config`` included).
    first
        The run of the first seed.
    out
        ``first``'s folder.
    repeats
        Seeds in all, ``first``'s included.

    Returns
    -------
    list of dict
        One row of ``repeats.csv`` per seed.
    """
    out = Path(out)
    config = kwargs.get("config") or FinetuneConfig()
    seed = kwargs.pop("seed", config.seed)
    runs = [first] + [finetune(data, out=out / "repeats" / f"seed-{seed + r}", seed=seed + r,
                               split_seed=seed, **kwargs) for r in range(1, repeats)]
    per_seed = [{"seed": seed + r, "best_epoch": run.row["best_epoch"],
                 **{c: run.row[c] for c in SCORE_COLUMNS}, "seconds": run.row["fit_s"]}
                for r, run in enumerate(runs)]
    first.row = with_repeats(first.row, [run.row["test_accuracy"] for run in runs])
    if distributed.context().is_main:
        first.files.update(_write_row(out, *first.rows))
        first.files.update(zip(("repeats_csv", "repeats_md"),
                               map(str, tables.write_table(per_seed, out / "repeats"))))
    return per_seed


def _result(spec, cfg, cache, classes, trainer: Trainer, history, y, proba, started
            ) -> FinetuneResult:
    y_pred = proba.argmax(1)
    blocks = trainer.unfrozen_blocks
    scratch = from_scratch(spec, cfg)
    row = results_row(
        backbone=spec.name, head="from-scratch" if scratch else f"finetune-{blocks}",
        chosen=f"unfreeze={blocks},best_epoch={trainer.best['epoch']}", y_true=y,
        y_pred=y_pred, proba=proba, n_classes=proba.shape[1],
        fit_s=time.perf_counter() - started, predict_s=float("nan"), blocks_unfrozen=blocks,
        trainable_parameters=trainer.trainable_parameters, best_epoch=trainer.best["epoch"],
        epochs_run=len(history), cache_key=cache.key,
        method=FROM_SCRATCH if scratch else "fine-tune")
    # Training is over and the best weights are back in trainer.model: it moves to the CPU.
    network = FinetunedNetwork.from_module(trainer.model, spec, classes,
                                           request=spec.request,
                                           cache_key=cache.key, unfrozen=blocks)
    return FinetuneResult(row, history, y_pred, network, test_labels=y, test_proba=proba)


def _write(out: Path, spec, classes, cache, args, model, result: FinetuneResult) -> dict:
    name = f"{spec.name}-{cache.key[:8]}-finetune-{result.row['blocks_unfrozen']}"
    name = name.replace("/", "_")
    model_path = result.model.save(out / "models" / f"{name}{NETWORK_SUFFIX}")
    result.row["model"] = str(model_path)
    # The test images in the order they were scored (the cache's), for pipeline report to
    # pair this run with the heads and fine-tunes of the same cache key, image by image.
    paths, leaked = leaked_test_images(cache.cache_path)
    predictions = Path("predictions") / f"{name}.npz"
    RowPredictions(paths, result.test_labels, result.test_pred, result.test_proba, leaked,
                   classes).save(out / predictions)
    result.row["predictions"] = predictions.as_posix()
    if result.tta_row is not None:
        tta_predictions = predictions.with_name(f"{name}+tta.npz")
        RowPredictions(paths, result.test_labels, result.tta_proba.argmax(1), result.tta_proba,
                       leaked, classes).save(out / tta_predictions)
        result.tta_row.update(model=str(model_path), predictions=tta_predictions.as_posix())
    files = _write_row(out, *result.rows)
    if result.tta_row is not None:
        files["tta_predictions"] = str(out / tta_predictions)
    history_csv, _ = tables.write_table(result.history, out / "history")
    files.update({"history_csv": str(history_csv), "model": str(model_path),
                  "predictions": str(out / predictions)})
    per_class = per_class_rows(result.test_labels, result.test_pred, classes,
                               backbone=spec.name, head=result.row["head"])
    files["per_class"] = str(tables.write_table(per_class, out / "per_class")[0])
    files["confusion_png"] = str(plots.confusion_matrix_plot(
        result.test_labels, result.test_pred, classes, out / "confusion_matrix.png",
        f"{spec.name}, {_trained(result.row)} fine-tuned "
        f"(accuracy {result.row['test_accuracy']:.3f})"))
    files["reliability_png"] = str(plots.reliability_diagram(
        {_trained(result.row):
         reliability_curve(result.test_labels, result.test_proba)},
        out / "reliability.png", f"{spec.name}, fine-tuned: calibration on the test split"))
    if result.history:
        files["history_png"] = str(plots.training_curves(
            result.history, out / "history.png",
            f"{spec.name}, {_trained(result.row)} fine-tuned"))
    return files


def _trained(row: dict) -> str:
    """What a run trained, for titles: "top 2 block(s)" or "top 15 layers"."""
    if row["method"] == FROM_SCRATCH:
        return "every layer (from scratch)"
    layers = parse_layers(row["blocks_unfrozen"])
    return f"top {layers} layers" if layers else f"top {row['blocks_unfrozen']} block(s)"


def _write_row(out: Path, *rows: dict) -> dict:
    """``results.csv|md|json`` of one run: its rows (the row, then a test-time augmented
    one), each score with its 95% interval."""
    csv, md = tables.write_table(rows, out / "results")
    (out / "results.json").write_text(json.dumps(list(rows), indent=2) + "\n")
    return {"results_csv": str(csv), "results_md": str(md),
            "results_json": str(out / "results.json")}

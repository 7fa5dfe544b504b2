"""Stage 3: fine-tune the top blocks of a backbone end to end, warm-started from a linear probe.

Transfer learning trains a new head on frozen features (stage 2); fine-tuning also updates the
top K blocks of the pretrained network, with a lower learning rate than the head's, BatchNorm
statistics frozen, and the head warm-started from a linear probe on the cached features so the
pretrained blocks are not hit by the gradients of a random head.

:func:`finetune` and :func:`sweep_depths` compute; their results write themselves
(``result.write(out)``: results, history, per-class table, plots, test predictions, the saved
network, ``run.json``), every file through :mod:`pipeline.core.atomic`. What a killed run
resumes from is written as it goes, as torchvision's reference script does with
``save_on_master``: each epoch's ``checkpoint.pt`` (:mod:`pipeline.finetuning.loop`) and, for
``lr="auto"``, the range test's files, in the run's ``workdir``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.core import distributed
from pipeline.core.atomic import write_json
from pipeline.core.contract import Result
from pipeline.core.options import AUTO_LR, DEFAULT_BACKBONE, FinetuneOptions
from pipeline.core.progress import EpochLines
from pipeline.finetuning.loop import CHECKPOINT, Trainer, evaluate
from pipeline.finetuning.lr_find import with_found_lr
from pipeline.finetuning.network import FinetunedNetwork
from pipeline.finetuning.setup import FROM_SCRATCH, FinetuneError, Setup, from_scratch, prepare
from pipeline.finetuning.tta import check_mode as check_tta
from pipeline.finetuning.tta import score_split
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
from pipeline.models.backbone_spec import BackboneSpec
from pipeline.models.blocks import parse_layers
from pipeline.report import plots, tables
from pipeline.store import tracking
from pipeline.store.leakage import leaked_test_images
from pipeline.store.persistence import NETWORK_SUFFIX
from pipeline.store.run_record import RECORD, RunRecord, device_name, shared_fields

__all__ = ["DepthSweepResult", "FinetuneError", "FinetuneOptions", "FinetuneResult",
           "finetune", "repeat_seeds", "sweep_depths"]


@dataclass
class FinetuneResult(Result):
    """One run: its results row, per-epoch history, test predictions and trained network.

    ``write(out)`` writes its files; until then ``files`` is empty and the row has no
    ``model`` or ``predictions`` path.
    """

    row: dict
    history: list[dict]
    test_pred: np.ndarray
    # The best epoch's weights, in eval mode on the CPU: predict_images(result.model, ...).
    model: FinetunedNetwork | None = None
    # Labels and class probabilities of the test images, in the order of test_pred.
    test_labels: np.ndarray | None = None
    test_proba: np.ndarray | None = None
    # With test-time augmentation (pipeline.finetuning.tta): its results row and probabilities.
    tta_row: dict | None = None
    tta_proba: np.ndarray | None = None
    classes: list[str] = field(default_factory=list)
    # The test images in the order they were scored (the cache's) and which of them also sit
    # in train or val: what pipeline report pairs runs by, image by image.
    test_paths: list[str] = field(default_factory=list)
    leaked: np.ndarray | None = None
    # Other seeds of the same run (repeat_seeds) by seed, each written under repeats/seed-<S>/.
    repeats: dict[int, FinetuneResult] = field(default_factory=dict)
    per_seed: list[dict] = field(default_factory=list)  # one repeats.csv row per seed
    record: RunRecord | None = field(default=None, repr=False)  # run.json, written with it
    # The MLflow run, open until the files are written and logged (tracking on).
    tracking_run: tracking.Run | None = field(default=None, repr=False)
    files: dict[str, str] = field(default_factory=dict)  # what write() wrote, by kind

    @property
    def rows(self) -> list[dict]:
        """The results rows of the run: its row, and its test-time augmented row if any."""
        return [self.row] + ([self.tta_row] if self.tta_row is not None else [])

    def to_json(self) -> dict:
        """The rows (as ``results.json`` holds them), the history and the files written."""
        return {"rows": self.rows, "history": self.history, "files": dict(self.files)}

    def write(self, out: str | os.PathLike) -> list[Path]:
        """Write the run's files into ``out`` (rank 0 only; every rank waits for them).

        ``models/<name>.net`` (the network), ``predictions/<name>.npz`` (and ``+tta``),
        ``results.csv|md|json``, ``history.csv|md|png``, ``per_class.csv|md``,
        ``confusion_matrix.png``, ``reliability.png``, the repeats' runs under
        ``repeats/seed-<S>/`` with ``repeats.csv|md``, and ``run.json``. Sets ``files`` and
        the rows' ``model`` and ``predictions``; logs them to the run's MLflow run and ends it.
        """
        written = self._write_files(Path(out)) if distributed.context().is_main else []
        distributed.barrier()  # no rank returns before the results are on disk
        return written

    def _write_files(self, out: Path) -> list[Path]:
        self.files = _write(out, self)
        written: list[Path] = []
        for seed, repeat in self.repeats.items():
            written += repeat._write_files(out / "repeats" / f"seed-{seed}")
        if self.per_seed:
            csv, md = tables.write_table(self.per_seed, out / "repeats")
            self.files.update(repeats_csv=str(csv), repeats_md=str(md))
        written += [Path(f) for f in self.files.values()]
        if self.record is not None:
            self.record.update(
                tracking=self.tracking_run.describe() if self.tracking_run else None)
            record = self.record.write(out / RECORD, self.files.values())
            written.append(record)
            tracking.log_finetune_end(self.tracking_run, self.row, self.files, record)
        if self.tracking_run is not None:
            self.tracking_run.end()
            self.tracking_run = None
        return written


def finetune(
    data: str | os.PathLike,
    *,
    backbone: str | BackboneSpec = DEFAULT_BACKBONE,
    options: FinetuneOptions = FinetuneOptions(),
    workdir: str | os.PathLike | None = None,
    split_seed: int | None = None,
    positive: str | None = None,
    tta: str | None = None,
    activation_depths: Sequence[int] = (),
    progress: bool | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
    track: bool | tracking.Run | None = None,
) -> FinetuneResult:
    """Fine-tune the top ``options.network.unfreeze`` blocks of ``backbone`` on ``data``.

    Computes; ``result.write(out)`` writes the results. Only what a killed run resumes from
    is written as it goes, into ``workdir``.

    Parameters
    ----------
    data
        As for :func:`pipeline.extract_features`; the features of these settings (cached, or
        extracted now) warm-start the head, and their splits are the ones trained on.
    backbone
        A :class:`~pipeline.models.backbone_spec.BackboneSpec`
        (:func:`pipeline.resolve_backbone` with the weights, image size and layer wanted), or
        a name resolved here with its default weights.
    options
        How the blocks are trained, by concern (:class:`~pipeline.core.options.FinetuneOptions`:
        ``optim``, ``network``, ``training``, ``activations``, and ``extract`` for where the
        features are cached and how images are read; ``extract.compile`` compiles the
        training steps). Every field is recorded in the checkpoint; all but the activation
        cache's and the extraction's decide whether a run resumes. The extraction's seed is
        the split seed, so the splits are those of the same seed's extraction.
    workdir
        Folder of ``checkpoint.pt`` (each epoch) and, with ``lr="auto"``, ``lr-find/``: a run
        whose checkpoint is there resumes from it. None: no checkpoint, nothing written.
    split_seed
        Seed of the carved splits and of a random backbone init (a name given) instead of
        ``options.training.seed``, which then seeds training alone (head, minibatch order,
        augmentation): the repeats of :func:`sweep_depths` train with other seeds on the same
        splits and features.
    positive
        Two-class data: the positive class (default the second), whose recall and
        false-negative rate the results row adds.
    tta
        ``"flip"`` or ``"crops"``: also score the test images with test-time augmentation
        (:mod:`pipeline.finetuning.tta`), as a second results row ``finetune-K+tta`` with its own
        predictions (``result.tta_row``); None: not.
    activation_depths
        Other ``unfreeze`` depths whose activation caches the same trunk pass should write
        (a sweep's), so that the trunk runs once for all of them.
    progress
        Extraction and activation passes: a bar where stderr is a terminal, elsewhere a line
        every 30 s and at the end; and one line per epoch either way (train and validation
        loss and accuracy, learning rate, seconds; :mod:`pipeline.core.progress`). False: nothing.
    on_epoch
        Called with ``(epoch, history_row)`` after each epoch's checkpoint is written.
    track
        Log the run to MLflow (:mod:`pipeline.store.tracking`): parameters and each epoch's
        metrics as it ends, then, when the result is written, the results row, plots and the
        saved network. None: only when ``MLFLOW_TRACKING_URI`` is set; a
        :class:`pipeline.store.tracking.Run`: nested under it.

    Notes
    -----
    ``options.optim.lr="auto"``: the learning-rate range test
    (:mod:`pipeline.finetuning.lr_find`) runs first on the same network (its weights put back)
    and its suggestion is the head's rate, recorded in the row (``lr``, ``lr_found_by``); its
    files in ``workdir/lr-find/`` are read back by a resumed run.

    Under ``torchrun`` the ranks train one model with DistributedDataParallel: each takes its
    share of every epoch's shuffled training images (``batch_size`` per rank), gradients of
    the trained blocks are averaged (the frozen trunk has none to sync), validation and test
    images are split between the ranks and their metrics gathered, and rank 0 alone writes
    checkpoints and results. A restarted job resumes from rank 0's checkpoint.
    """
    started = time.perf_counter()
    record = RunRecord("finetune")
    check_tta(tta)
    # Asked here, before any extraction: a missing MLflow stops the run at once.
    track = track if isinstance(track, tracking.Run) else tracking.check(track)
    workdir = None if workdir is None else Path(workdir)
    setup = prepare(data, backbone, options, split_seed=split_seed, positive=positive,
                    activation_depths=activation_depths, progress=progress)
    if setup.options.optim.lr == AUTO_LR:  # the range test on this network first
        setup = with_found_lr(setup, workdir, progress)
    options, ctx, run_on, spec = setup.options, setup.ctx, setup.device, setup.spec
    trainer = Trainer(setup.model, setup.head, setup.unfrozen, options, run_on, setup.args,
                      None if workdir is None else workdir / CHECKPOINT, ctx,
                      options.extract.compile, forward=setup.forward)
    record.update(settings={"data": str(data), "backbone": spec.request,
                            "options": options.to_json(), "positive": positive, "tta": tta,
                            "workdir": None if workdir is None else str(workdir)},
                  seed=options.training.seed, split_seed=setup.data_seed,
                  device=device_name(run_on), world_size=ctx.world_size,
                  trained_from=setup.trained_from)
    record.with_caches([setup.cache.cache_path])
    name = spec.name if workdir is None else workdir.name
    results = (workdir or Path("results") / "finetune").absolute().parent
    run = (tracking.start(track, results, f"{spec.name} {name}", "finetune",
                          tags={"pipeline.cache_key": setup.cache.key,
                                "pipeline.out": str(workdir.absolute()) if workdir else ""})
           if ctx.is_main else None)
    try:
        tracking.log_finetune_start(run, options.flat(), {
            "backbone": spec.name, "weights": spec.weights.identity,
            "cache_key": setup.cache.key, "data": str(data), "trained_from": setup.trained_from,
            "device": str(run_on), "world_size": ctx.world_size, "split_seed": setup.data_seed,
            "positive": positive})
        epochs = tracking.EpochLogger(run)
        lines = EpochLines(f"finetune {name}", options.training.epochs,
                           progress if ctx.is_main else False)
        history = trainer.fit(setup.loaders, _each(lines, epochs, on_epoch))
        result = _result(setup, trainer, history, positive, tta, started)
        epochs.finish(history)  # a resumed run's earlier epochs
    except BaseException as error:
        if run is not None:
            run.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    # trainer.start_epoch: the epochs of an interrupted run's checkpoint, resumed.
    record.update(resumed_from_epoch=trainer.start_epoch)
    result.record, result.tracking_run = record, run
    return result


def _each(*callbacks: Callable | None) -> Callable[[int, dict], None]:
    """One ``on_epoch`` that calls each of ``callbacks`` (None skipped) in turn."""
    def call(epoch: int, row: dict) -> None:
        for callback in callbacks:
            if callback is not None:
                callback(epoch, row)
    return call


def _result(setup: Setup, trainer: Trainer, history: list[dict], positive: str | None,
            tta: str | None, started: float) -> FinetuneResult:
    """The run's results row (and its test-time augmented row), scored on the test split."""
    spec, cache, classes = setup.spec, setup.cache, setup.images.classes
    _, _, proba = evaluate(setup.forward, setup.loaders.eval("test"), setup.device)
    y = setup.loaders.labels("test")
    y_pred = proba.argmax(1)
    blocks = trainer.unfrozen_blocks
    scratch = from_scratch(spec, setup.options.network)
    row = results_row(
        backbone=spec.name, head="from-scratch" if scratch else f"finetune-{blocks}",
        chosen=f"unfreeze={blocks},best_epoch={trainer.best['epoch']}", y_true=y,
        y_pred=y_pred, proba=proba, n_classes=proba.shape[1],
        fit_s=time.perf_counter() - started, predict_s=float("nan"), blocks_unfrozen=blocks,
        trainable_parameters=trainer.trainable_parameters, best_epoch=trainer.best["epoch"],
        epochs_run=len(history), cache_key=cache.key,
        method=FROM_SCRATCH if scratch else "fine-tune")
    row["trained_from"] = setup.trained_from
    row.update(lr=setup.options.optim.lr, lr_found_by=setup.lr_found_by)
    row.update(positive_scores(y, y_pred, classes, positive))
    # Training is over and the best weights are back in trainer.model: it moves to the CPU.
    network = FinetunedNetwork.from_module(trainer.model, spec, classes, request=spec.request,
                                           cache_key=cache.key, unfrozen=blocks)
    tta_row = tta_proba = None
    if tta:
        tta_proba, scores = score_split(network, setup.images, setup.loaders.rows["test"], y,
                                        tta, setup.device, setup.options.training.batch_size,
                                        setup.options.extract.workers, positive)
        tta_row = {**row, **scores, "head": f"{row['head']}+tta",
                   "chosen": f"{row['chosen']},tta={tta}"}
    paths, leaked = leaked_test_images(cache.cache_path)
    return FinetuneResult(row, history, y_pred, network, test_labels=y, test_proba=proba,
                          tta_row=tta_row, tta_proba=tta_proba, classes=list(classes),
                          test_paths=list(paths), leaked=leaked)


@dataclass
class DepthSweepResult(Result):
    """The freeze-depth experiment: one run per depth (with its repeats) and their table."""

    table: list[dict]  # one row per depth: freeze_depth.csv|md
    runs: dict[int | str, FinetuneResult]  # by depth, each written under unfreeze-<K>/
    depths: list[int | str] = field(default_factory=list)
    repeats: int = 1
    record: RunRecord | None = field(default=None, repr=False)
    tracking_run: tracking.Run | None = field(default=None, repr=False)
    files: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"rows": self.table, "depths": list(self.depths), "repeats": self.repeats,
                "files": dict(self.files)}

    def write(self, out: str | os.PathLike) -> list[Path]:
        """Each run's files under ``out/unfreeze-<K>/`` (:meth:`FinetuneResult.write`),
        ``freeze_depth.csv|md`` and ``run.json`` (rank 0 only)."""
        out = Path(out)
        written: list[Path] = []
        if distributed.context().is_main:
            for k, run in self.runs.items():
                written += run._write_files(out / f"unfreeze-{k}")
            csv, md = tables.write_table(self.table, out / "freeze_depth")
            self.files = {"freeze_depth_csv": str(csv), "freeze_depth_md": str(md)}
            written += [csv, md]
            if self.record is not None:
                # Every depth reads the same cache on the same device: the first run's record.
                first = out / f"unfreeze-{self.depths[0]}" / RECORD
                self.record.update(**shared_fields(first), tracking=(
                    self.tracking_run.describe() if self.tracking_run else None))
                records = [out / f"unfreeze-{k}" / RECORD for k in self.depths]
                written.append(self.record.write(out / RECORD, [csv, md, *records]))
                tracking.log_runs(self.tracking_run,
                                  {"depths": list(self.depths), "repeats": self.repeats}, {},
                                  [csv, md, written[-1]])
            if self.tracking_run is not None:
                self.tracking_run.end()
                self.tracking_run = None
        distributed.barrier()
        return written


def sweep_depths(data: str | os.PathLike, depths: Sequence[int | str], *,
                 backbone: str | BackboneSpec = DEFAULT_BACKBONE,
                 options: FinetuneOptions = FinetuneOptions(), repeats: int = 1,
                 workdir: str | os.PathLike | None = None,
                 track: bool | tracking.Run | None = None, **kwargs) -> DepthSweepResult:
    """One fine-tune per number of unfrozen blocks, everything else equal, and one table.

    Depth 0 trains only the new head by the same loop: the linear probe baseline. With
    ``repeats`` above 1, each depth is trained again with seeds ``seed + 1`` ..
    ``seed + repeats - 1`` on the same splits (:func:`repeat_seeds`), and its row adds the
    spread over seeds. Computes; ``result.write(out)`` writes ``freeze_depth.csv|md``, each
    run's files under ``unfreeze-<K>/`` and ``run.json``. Each run's checkpoint is in
    ``workdir/unfreeze-<K>/`` (None: none). With ``track`` every run is logged to MLflow
    nested under one run of the experiment.

    Parameters
    ----------
    data, backbone, options
        As for :func:`finetune`; ``options.network.unfreeze`` is replaced by each depth.
    depths
        Block counts, layer counts (``"15L"``) or ``"all"``, one run each.
    kwargs
        ``split_seed``, ``positive``, ``tta``, ``progress``, ``on_epoch``: as for
        :func:`finetune`.
    """
    if repeats < 1:
        raise FinetuneError("repeats must be at least 1")
    workdir = None if workdir is None else Path(workdir)
    record = RunRecord("freeze-depth", {"data": str(data), "depths": list(depths),
                                        "repeats": repeats, "options": options.to_json(),
                                        **kwargs}, seed=options.training.seed)
    results = (workdir or Path("results") / "finetune").absolute()
    parent = (tracking.start(track, results.parent, results.name, "freeze-depth")
              if distributed.context().is_main else None)
    # One trunk pass writes the activation caches of every depth (all: no cache, images).
    counts = [k for k in depths if k != "all"]
    runs = {}
    try:
        for k in depths:
            at = options.replace(network=options.network.replace(unfreeze=k))
            folder = None if workdir is None else workdir / f"unfreeze-{k}"
            run = finetune(data, backbone=backbone, options=at, workdir=folder,
                           activation_depths=counts, track=parent or track, **kwargs)
            if repeats > 1:
                repeat_seeds(data, run, repeats, backbone=backbone, options=at,
                             workdir=folder, activation_depths=counts, track=parent or track,
                             **kwargs)
            runs[k] = run
    except BaseException as error:
        if parent is not None:
            parent.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    table = [{"blocks_unfrozen": r["blocks_unfrozen"],
              "trainable_parameters": r["trainable_parameters"],
              "best_epoch": r["best_epoch"],
              **{c: r[c] for c in r if c.startswith("test_accuracy") or c == "repeats"},
              "macro_f1": r["macro_f1"],
              **{c: r[c] for c in POSITIVE_COLUMNS if c in r},
              "seconds": r["fit_s"]} for r in (run.row for run in runs.values())]
    return DepthSweepResult(table, runs, list(depths), repeats, record, parent)


def repeat_seeds(data: str | os.PathLike, first: FinetuneResult, repeats: int, *,
                 options: FinetuneOptions = FinetuneOptions(),
                 workdir: str | os.PathLike | None = None, **kwargs) -> list[dict]:
    """Train ``first``'s run again with the next ``repeats - 1`` seeds; summarise the seeds.

    Only training is reseeded (head init, minibatch order, augmentation): the splits and the
    features stay those of ``first``'s seed, so every seed is scored on the same test images.
    ``first.repeats`` gains each repeat's run (written under ``repeats/seed-<S>/``, which
    ``pipeline report`` does not take as rows; checkpoints in ``workdir/repeats/seed-<S>/``),
    ``first.row`` the mean, standard deviation and t-interval of the test accuracy over the
    seeds (:func:`pipeline.metrics.scoring.with_repeats`), and ``first.per_seed`` every seed's
    scores (``repeats.csv|md``).

    Parameters
    ----------
    data, options, kwargs
        As given to :func:`finetune` for ``first``.
    first
        The run of the first seed.
    repeats
        Seeds in all, ``first``'s included.
    workdir
        ``first``'s working folder.

    Returns
    -------
    list of dict
        One row of ``repeats.csv`` per seed.
    """
    seed = options.training.seed
    kwargs.pop("split_seed", None)
    for r in range(1, repeats):
        folder = None if workdir is None else Path(workdir) / "repeats" / f"seed-{seed + r}"
        reseeded = options.replace(training=options.training.replace(seed=seed + r))
        first.repeats[seed + r] = finetune(data, options=reseeded, workdir=folder,
                                           split_seed=seed, **kwargs)
    runs = [first, *first.repeats.values()]
    first.per_seed = [{"seed": seed + r, "best_epoch": run.row["best_epoch"],
                       **{c: run.row[c] for c in SCORE_COLUMNS}, "seconds": run.row["fit_s"]}
                      for r, run in enumerate(runs)]
    first.row = with_repeats(first.row, [run.row["test_accuracy"] for run in runs])
    return first.per_seed


def _write(out: Path, result: FinetuneResult) -> dict[str, str]:
    """Every file of one run but ``run.json``, by kind; the rows learn where the network and
    their predictions went."""
    row, classes = result.row, result.classes
    backbone = row["backbone"]
    name = f"{backbone}-{row['cache_key'][:8]}-finetune-{row['blocks_unfrozen']}"
    name = name.replace("/", "_")
    model_path = result.model.save(out / "models" / f"{name}{NETWORK_SUFFIX}")
    row["model"] = str(model_path)
    predictions = Path("predictions") / f"{name}.npz"
    RowPredictions(result.test_paths, result.test_labels, result.test_pred, result.test_proba,
                   result.leaked, classes).save(out / predictions)
    row["predictions"] = predictions.as_posix()
    files = {}
    if result.tta_row is not None:
        tta_predictions = predictions.with_name(f"{name}+tta.npz")
        RowPredictions(result.test_paths, result.test_labels, result.tta_proba.argmax(1),
                       result.tta_proba, result.leaked, classes).save(out / tta_predictions)
        result.tta_row.update(model=str(model_path), predictions=tta_predictions.as_posix())
        files["tta_predictions"] = str(out / tta_predictions)
    files.update(_write_rows(out, *result.rows))
    history_csv, _ = tables.write_table(result.history, out / "history")
    files.update({"history_csv": str(history_csv), "model": str(model_path),
                  "predictions": str(out / predictions)})
    per_class = per_class_rows(result.test_labels, result.test_pred, classes,
                               backbone=backbone, head=row["head"])
    files["per_class"] = str(tables.write_table(per_class, out / "per_class")[0])
    trained = _trained(row)
    files["confusion_png"] = str(plots.confusion_matrix_plot(
        result.test_labels, result.test_pred, classes, out / "confusion_matrix.png",
        f"{backbone}, {trained} fine-tuned (accuracy {row['test_accuracy']:.3f})"))
    files["reliability_png"] = str(plots.reliability_diagram(
        {trained: reliability_curve(result.test_labels, result.test_proba)},
        out / "reliability.png", f"{backbone}, fine-tuned: calibration on the test split"))
    if result.history:
        files["history_png"] = str(plots.training_curves(
            result.history, out / "history.png", f"{backbone}, {trained} fine-tuned"))
    return files


def _trained(row: dict) -> str:
    """What a run trained, for titles: "top 2 block(s)" or "top 15 layers"."""
    if row["method"] == FROM_SCRATCH:
        return "every layer (from scratch)"
    layers = parse_layers(row["blocks_unfrozen"])
    return f"top {layers} layers" if layers else f"top {row['blocks_unfrozen']} block(s)"


def _write_rows(out: Path, *rows: dict) -> dict[str, str]:
    """``results.csv|md|json`` of one run: its rows (the row, then a test-time augmented
    one), each score with its 95% interval."""
    csv, md = tables.write_table(rows, out / "results")
    return {"results_csv": str(csv), "results_md": str(md),
            "results_json": str(write_json(out / "results.json", list(rows)))}

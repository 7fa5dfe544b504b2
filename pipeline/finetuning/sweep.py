"""Fine-tuning sweeps over learning rate, batch size and depth: every combination, or one
factor at a time as practitioners write the experiment up.

One factor at a time (the seeds' design): sweep the first factor with the others at their first
listed value, keep its best value (on validation), sweep the next factor with it, and so on, in
the order given. A grid runs every combination. Either way each run is an ordinary
:func:`pipeline.finetuning.run.finetune` run in a folder of its own, so a stopped sweep resumes: a
finished run is read back, never trained again, and an interrupted one resumes from its
checkpoint. The trunk's activations are cached once for every depth of the sweep; learning
rate and batch size do not change them, so every run after the first trains from the cache.

:func:`sweep` computes; ``result.write(out)`` writes the sweep's table, plot and record. What
a stopped sweep resumes from is written as it goes, into ``workdir/runs/<name>/``: each run's
checkpoint while it trains, then its files (:meth:`~pipeline.finetuning.run.FinetuneResult.write`)
and ``sweep-run.json``, by which it is read back (the checkpoint is then removed).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core import distributed
from pipeline.core.atomic import write_json
from pipeline.core.contract import Result
from pipeline.core.errors import SweepError
from pipeline.core.options import DEFAULT_BACKBONE, SWEEP_MODES, FinetuneOptions
from pipeline.metrics.scoring import POSITIVE_COLUMNS
from pipeline.models.backbone_spec import BackboneSpec
from pipeline.report import plots, tables
from pipeline.store import tracking
from pipeline.store.run_record import RECORD, RunRecord, shared_fields

__all__ = ["FACTORS", "SWEEP_MODES", "SweepError", "SweepResult", "plan_grid", "sweep"]

# The factors a sweep varies, in the seeds' order: learning rate, then batch size, then depth.
FACTORS = ("lr", "batch_size", "unfreeze")
RUN_RECORD = "sweep-run.json"
# What a run is chosen on: validation accuracy at its best epoch, ties to the lower loss.
SELECTION = "val_accuracy, then val_loss"



@dataclass
class SweepResult(Result):
    """One row per run in the order run, the chosen row, and the files written."""

    rows: list[dict]
    best: dict
    factors: dict[str, list] = field(default_factory=dict)
    mode: str = "grid"
    record: RunRecord | None = field(default=None, repr=False)  # run.json, written with it
    tracking_run: tracking.Run | None = field(default=None, repr=False)
    files: dict[str, str] = field(default_factory=dict)  # set by write()

    def to_json(self) -> dict:
        """``sweep.json``: the design, the selection rule, the chosen run and every run."""
        return {"mode": self.mode, "factors": self.factors, "selection": SELECTION,
                "best": self.best, "runs": self._table()}

    def _table(self) -> list[dict]:
        return [{**row, "chosen": row is self.best} for row in self.rows]

    def write(self, out: str | os.PathLike) -> list[Path]:
        """``sweep.csv|md|json``, ``sweep.png`` and ``run.json`` into ``out`` (rank 0 only);
        the runs' own files are already in their folders."""
        out = Path(out)
        if distributed.context().is_main:
            self.files = _write(out, self)
            if self.record is not None:
                # Every run reads the same cache on the same device: the first run's record.
                self.record.update(**shared_fields(Path(self.rows[0]["run"]) / RECORD),
                                   best=self.best["run"], tracking=(
                                       self.tracking_run.describe() if self.tracking_run
                                       else None))
                runs = [Path(row["run"]) / RECORD for row in self.rows]
                self.files["run_record"] = str(self.record.write(
                    out / RECORD, [*self.files.values(), *runs]))
            parent = self.tracking_run
            tracking.log_runs(parent, {"mode": self.mode, "factors": self.factors,
                                       "selection": SELECTION},
                              {f"best_{k}": self.best[k] for k in ("val_accuracy", "val_loss",
                                                                   "test_accuracy")},
                              self.files.values())
            if parent is not None:
                parent.set_tags({"pipeline.best_run": self.best["run"]})
                parent.end()
                self.tracking_run = None
        distributed.barrier()
        return [Path(f) for f in self.files.values()]


def plan_grid(factors: Mapping[str, Sequence]) -> list[dict]:
    """Every combination of the factors' values, the last factor varying fastest."""
    names = list(factors)
    return [dict(zip(names, values)) for values in itertools.product(*factors.values())]


def run_name(settings: Mapping) -> str:
    """The folder of one run under ``OUT/runs/``: its factor values, readable and unique."""
    return "_".join(f"{name}-{_value(settings[name])}" for name in settings)


def sweep(data: str | os.PathLike, factors: Mapping[str, Sequence], *, mode: str = "grid",
          backbone: str | BackboneSpec = DEFAULT_BACKBONE,
          options: FinetuneOptions = FinetuneOptions(),
          workdir: str | os.PathLike = "results/sweep", progress: bool | str | None = None,
          track: bool | tracking.Run | None = None, **kwargs) -> SweepResult:
    """Fine-tune once per combination of ``factors`` and choose the best run on validation.

    Parameters
    ----------
    data, backbone, options
        As for :func:`pipeline.finetuning.run.finetune`: the settings every run shares.
    factors
        ``{"lr": [...], "batch_size": [...], "unfreeze": [...]}`` (any of :data:`FACTORS`, in
        the order one-at-a-time sweeps them); a factor left out keeps ``options``' value.
    mode
        ``"grid"``: every combination; ``"one-at-a-time"``: each factor in turn, the factors
        not yet swept at their first value and the swept ones at their best.
    workdir
        ``runs/<name>/`` per run: its checkpoint while it trains, then its files (those of
        :meth:`~pipeline.finetuning.run.FinetuneResult.write`) and the record a stopped sweep
        reads it back by.
    progress, track
        As for :func:`~pipeline.finetuning.run.finetune`; tracked, each run is an MLflow run
        nested under one run of the sweep. Neither decides a run's outcome, so neither is in
        the fingerprint that a finished run is read back by.
    kwargs
        ``split_seed``, ``positive``, ``tta``: as for :func:`~pipeline.finetuning.run.finetune`.

    Returns
    -------
    SweepResult
        ``rows``: settings, best epoch, validation and test scores and seconds of each run;
        ``best``: the row chosen on validation (accuracy, then loss), never on test.
        ``result.write(out)`` writes ``sweep.csv|md|json``, ``sweep.png`` and ``run.json``.
    """
    factors = _checked(factors, mode)
    workdir = Path(workdir)
    depths = [k for k in factors.get("unfreeze", [options.network.unfreeze]) if k != "all"]
    request = backbone.request if isinstance(backbone, BackboneSpec) else {"backbone": backbone}
    record = RunRecord("sweep", {"data": os.fspath(data), "factors": factors, "mode": mode,
                                 "backbone": request, "options": options.to_json(), **kwargs},
                       seed=options.training.seed)
    parent = (tracking.start(track, workdir.absolute().parent, workdir.name, "sweep")
              if distributed.context().is_main else None)
    runner = _Runner(data, workdir, backbone, options, depths, kwargs, progress,
                     parent or track)
    try:
        if mode == "grid":
            rows = [runner.run(settings) for settings in plan_grid(factors)]
        else:
            rows = _one_at_a_time(runner, factors)
    except BaseException as error:
        if parent is not None:
            parent.end("KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED")
        raise
    return SweepResult(rows, choose(rows), factors, mode, record, parent)


def choose(rows: Sequence[dict]) -> dict:
    """The run with the highest validation accuracy; among equals, the lowest validation loss,
    then the first run."""
    def key(row: dict):
        accuracy = row["val_accuracy"] if math.isfinite(row["val_accuracy"]) else -math.inf
        loss = row["val_loss"] if math.isfinite(row["val_loss"]) else math.inf
        return (-accuracy, loss)
    return min(rows, key=key)


def _checked(factors: Mapping[str, Sequence], mode: str) -> dict[str, list]:
    if mode not in SWEEP_MODES:
        raise SweepError(f"unknown sweep {mode!r}; choose {' or '.join(SWEEP_MODES)}")
    unknown = [name for name in factors if name not in FACTORS]
    if unknown:
        raise SweepError(f"cannot sweep {', '.join(unknown)}; a sweep varies "
                         f"{', '.join(FACTORS)}")
    empty = [name for name, values in factors.items() if not values]
    if empty:
        raise SweepError(f"no values to sweep for {', '.join(empty)}")
    # A value listed twice would train the same run twice; keep the first.
    return {name: list(dict.fromkeys(values)) for name, values in factors.items()}


def _one_at_a_time(runner: _Runner, factors: dict[str, list]) -> list[dict]:
    current = {name: values[0] for name, values in factors.items()}
    rows: dict[str, dict] = {}
    for name, values in factors.items():
        tried = []
        for value in values:
            settings = {**current, name: value}
            key = run_name(settings)
            if key not in rows:  # the previous factor's best run is this factor's first
                rows[key] = runner.run(settings)
            tried.append(rows[key])
        current[name] = choose(tried)[name]
    return list(rows.values())


class _Runner:
    """Runs one combination in its own folder, or reads back the row it finished with."""

    def __init__(self, data, workdir: Path, backbone: str | BackboneSpec,
                 shared: FinetuneOptions, depths: list, rest: dict,
                 progress: bool | str | None = None, track: bool | tracking.Run | None = None):
        self.data, self.workdir, self.backbone = data, workdir, backbone
        self.shared, self.depths, self.rest = shared, depths, rest
        self.progress, self.track = progress, track

    def run(self, settings: dict) -> dict:
        from pipeline.finetuning.loop import CHECKPOINT
        from pipeline.finetuning.run import finetune

        folder = self.workdir / "runs" / run_name(settings)
        options = self.shared.with_flat(settings)
        fingerprint = self._fingerprint(options)
        record = folder / RUN_RECORD
        if record.exists():
            return self._finished(record, fingerprint, settings)
        result = finetune(self.data, backbone=self.backbone, options=options, workdir=folder,
                          activation_depths=self.depths, progress=self.progress,
                          track=self.track, **self.rest)
        # Written as it goes: a finished run is read back from its folder, never trained again.
        result.write(folder)
        row = _row(settings, result, folder)
        if distributed.context().is_main:
            # A record is there only for a run that finished.
            write_json(record, {"fingerprint": fingerprint, "row": row})
            # The record answers from now on; the checkpoint served only to resume the run
            # (35 MB a Lite0 run: 513 of a 15-run sweep's 714 MB). Its model stays in models/.
            (folder / CHECKPOINT).unlink(missing_ok=True)
        return row

    def _fingerprint(self, options: FinetuneOptions) -> dict:
        """What, besides the run's own folder, decides its outcome."""
        backbone = (self.backbone.request if isinstance(self.backbone, BackboneSpec)
                    else {"backbone": self.backbone})
        return json.loads(json.dumps({"data": os.fspath(self.data), "backbone": backbone,
                                      "options": options.to_json(), "settings": self.rest},
                                     default=str))

    @staticmethod
    def _finished(record: Path, fingerprint: dict, settings: dict) -> dict:
        try:
            saved = json.loads(record.read_text())
        except (OSError, ValueError) as err:
            raise SweepError(f"cannot read {record}: {err}; remove its run folder to train "
                             "it again") from None
        # Older sweep folders kept the progress setting (which decides nothing) in theirs.
        saved.get("fingerprint", {}).get("settings", {}).pop("progress", None)
        if _nested(saved.get("fingerprint", {}), fingerprint) != fingerprint:
            raise SweepError(f"{record.parent} is a run of another sweep (other data or "
                             "settings); remove it to start over", path=record.parent,
                             reason="another-run")
        return {**saved["row"], **settings, "resumed": True}


# A backbone's request as a fingerprint holds it (BackboneSpec.request's keys).
_BACKBONE_KEYS = ("backbone", "weights", "layer", "pool", "image_size")


def _nested(saved: dict, current: dict) -> dict:
    """A fingerprint written before the options were nested by concern, as it reads today.

    Such a record holds the flat ``FinetuneConfig`` under ``config`` and, in ``settings``,
    the backbone's request, the extraction options and the rest, side by side. Each goes to
    its place; what the old record does not name (a setting that did not exist yet, such as
    ``--decode``, or a default it did not write down) is taken as today's, as the old code
    ran without it. ``offline`` only said where weights came from, so it decides nothing.
    A record already nested is returned as it is.
    """
    if "config" not in saved:
        return saved
    settings = {k: v for k, v in saved.get("settings", {}).items() if k != "offline"}
    backbone = {**current.get("backbone", {}),
                **{k: settings.pop(k) for k in _BACKBONE_KEYS if k in settings}}
    extract = {k: settings.pop(k) for k in list(settings) if k in current["options"]["extract"]}
    options = json.loads(json.dumps(current["options"]))  # a deep copy, in JSON's types
    for concern, values in options.items():
        # The one seed of the old config also drew the splits (the extraction's seed now).
        flat = (saved["config"] if concern != "extract" else
                {**{k: v for k, v in saved["config"].items() if k == "seed"}, **extract})
        values.update({k: flat[k] for k in values if k in flat})
    return {"data": saved.get("data"), "backbone": backbone, "options": options,
            "settings": settings}


def _row(settings: dict, result, folder: Path) -> dict:
    row = result.row
    best = next((h for h in result.history if h["epoch"] == row["best_epoch"]), None)
    return {**settings, "best_epoch": row["best_epoch"], "epochs_run": row["epochs_run"],
            "val_loss": best["val_loss"] if best else math.nan,
            "val_accuracy": best["val_accuracy"] if best else math.nan,
            "test_accuracy": row["test_accuracy"], "macro_f1": row["macro_f1"],
            **{c: row[c] for c in POSITIVE_COLUMNS if c in row},
            "trained_from": row.get("trained_from", ""), "seconds": row["fit_s"],
            "run": folder.as_posix(), "resumed": False}


def _write(out: Path, result: SweepResult) -> dict[str, str]:
    rows, best, factors, mode = result.rows, result.best, result.factors, result.mode
    named = ", ".join(f"{name}={_value(best[name])}" for name in factors)
    preamble = (f"{mode} sweep of {', '.join(factors)}: {len(rows)} runs, chosen on "
                f"{SELECTION}: **{named}** (test accuracy {best['test_accuracy']:.4f}).")
    csv, md = tables.write_table(result._table(), out / "sweep", preamble)
    sweep_json = write_json(out / "sweep.json", result.to_json())
    png = plots.factor_plot(rows, list(factors), "val_accuracy", out / "sweep.png",
                            f"{mode} sweep: validation accuracy per setting", chosen=best)
    return {"sweep_csv": str(csv), "sweep_md": str(md), "sweep_json": str(sweep_json),
            "sweep_png": str(png)}


def _value(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)

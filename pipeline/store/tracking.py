"""Experiment tracking in MLflow, optional: each head fit, fine-tune run and sweep run a run.

``--track`` (``track=True``), or ``MLFLOW_TRACKING_URI`` set, logs each fit to MLflow: its
parameters, per-epoch metrics as they come, the results row, the plots and the saved model as
artifacts. A command's fits are nested under one parent run (the heads of one ``pipeline
heads``, the runs of a sweep or freeze-depth experiment). Without a URI the store is local,
``<results>/mlruns/`` beside the stage's ``--out`` (an SQLite file and an artifact folder), so
nothing needs a server; ``mlflow ui --backend-store-uri sqlite:///<results>/mlruns/mlflow.db``
shows it. Only MLflow's client API is used (no active run, nothing global), and mlflow is
imported only when tracking is on.
"""

from __future__ import annotations

import contextlib
import json
import math
import numbers
import os
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

from pipeline.core.errors import TrackingError
from pipeline.core.extras import installed, require_all

__all__ = ["DEFAULT_EXPERIMENT", "EXPERIMENT_ENV", "INSTALL", "STORE", "TRACKING_URI_ENV",
           "EpochLogger", "Run", "TrackingError", "check", "ending", "local_store", "start"]

TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
EXPERIMENT_ENV = "MLFLOW_EXPERIMENT_NAME"  # MLflow's own variable, honoured the same way
DEFAULT_EXPERIMENT = "pipeline"
STORE = "mlruns"  # the local store's folder, beside the stage's --out
INSTALL = "pip install 'cnn-bottleneck-pipeline[track]'"
# What the local store needs: MLflow's client and its SQLite backend (the file backend is
# in maintenance mode and refused by MLflow 3 unless MLFLOW_ALLOW_FILE_STORE is set).
_CLIENT_MODULES = ("mlflow",)
_LOCAL_MODULES = ("mlflow", "sqlalchemy", "alembic")
# MLflow's limits per log_batch call and per parameter value.
_PARAMS_PER_BATCH, _METRICS_PER_BATCH, _PARAM_LENGTH = 100, 1000, 6000



def check(track: bool | Run | None) -> bool:
    """Whether tracking is on: ``track`` (a :class:`Run` is on), or, when None, whether
    ``MLFLOW_TRACKING_URI`` is set.

    Asked for with ``track=True`` and MLflow missing:
    :class:`~pipeline.core.errors.MissingExtraError`, whose one line names the extra. Asked
    for only by the environment variable: a warning on stderr, and no tracking (a URI set for
    other projects does not stop this one).
    """
    if isinstance(track, Run):
        return True
    uri = os.environ.get(TRACKING_URI_ENV, "")
    on = bool(uri) if track is None else bool(track)
    if not on:
        return False
    needed = _CLIENT_MODULES if uri else _LOCAL_MODULES
    missing = [m for m in needed if not installed(m)]
    if missing and track is None:
        print(f"warning: {TRACKING_URI_ENV} is set but tracking needs MLflow "
              f"({', '.join(missing)} not installed): {INSTALL}; running without tracking",
              file=sys.stderr)
        return False
    require_all(needed, "tracking")  # asked for, and missing: the one line naming the extra
    return True


def local_store(results: str | os.PathLike) -> Path:
    """The local store under the results folder ``results``: ``results/mlruns/``."""
    return Path(results).absolute() / STORE


def start(track: bool | Run | None, results: str | os.PathLike, name: str, stage: str,
          tags: Mapping[str, str] | None = None, start_time: float | None = None
          ) -> Run | None:
    """A new MLflow run, or None when tracking is off (:func:`check`).

    Parameters
    ----------
    track
        True, False, None (on when ``MLFLOW_TRACKING_URI`` is set), or a parent :class:`Run`,
        under which the new run is nested (in the parent's store and experiment).
    results
        The folder whose ``mlruns/`` is the local store when no URI is set.
    name
        The run's name in the MLflow UI.
    stage
        ``heads``, ``head``, ``finetune``, ``sweep`` or ``freeze-depth`` (tag
        ``pipeline.stage``).
    tags
        More tags.
    start_time
        When the run started (``time.time()``); default now.
    """
    if not check(track):
        return None
    from pipeline.store.run_record import command

    run_tags = {"pipeline.stage": stage, "mlflow.source.type": "LOCAL",
                "mlflow.source.name": " ".join(command())[:_PARAM_LENGTH], **(tags or {})}
    if isinstance(track, Run):
        client, experiment, uri = track.client, track.experiment_id, track.uri
        run_tags["mlflow.parentRunId"] = track.run_id
    else:
        client, experiment, uri = _open(results)
    started = None if start_time is None else int(start_time * 1000)
    run = client.create_run(experiment, start_time=started, tags=run_tags, run_name=name)
    return Run(client, run.info.run_id, experiment, uri, name)


@contextlib.contextmanager
def ending(run: Run | None) -> Iterator[Run | None]:
    """Ends ``run`` as FINISHED after the block, FAILED on an error, KILLED on Ctrl-C."""
    if run is None:
        yield None
        return
    try:
        yield run
    except KeyboardInterrupt:
        run.end("KILLED")
        raise
    except BaseException:
        run.end("FAILED")
        raise
    run.end("FINISHED")


def _open(results) -> tuple:
    """The client, experiment id and URI: ``MLFLOW_TRACKING_URI``'s store, or the local one."""
    with warnings.catch_warnings():  # SQLAlchemy's deprecation notes about MLflow's models
        warnings.simplefilter("ignore", DeprecationWarning)
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        uri = os.environ.get(TRACKING_URI_ENV, "")
        artifacts = None
        if not uri:
            store = local_store(results)
            store.mkdir(parents=True, exist_ok=True)
            uri = f"sqlite:///{store / 'mlflow.db'}"
            # Artifacts beside the database, not in ./mlartifacts of whatever folder ran it.
            artifacts = (store / "artifacts").as_uri()
        client = MlflowClient(tracking_uri=uri)
        name = os.environ.get(EXPERIMENT_ENV) or DEFAULT_EXPERIMENT
        experiment = client.get_experiment_by_name(name)
        if experiment is not None:
            return client, experiment.experiment_id, uri
        try:
            return client, client.create_experiment(name, artifact_location=artifacts), uri
        except MlflowException:  # another process created it meanwhile
            return client, client.get_experiment_by_name(name).experiment_id, uri


class Run:
    """One MLflow run, logged through the client (no active run, nothing global).

    Parameters, metrics and tags are sent in batches; values that are not finite numbers are
    not metrics, and parameter values are cut at MLflow's limit.
    """

    def __init__(self, client, run_id: str, experiment_id: str, uri: str, name: str):
        self.client, self.run_id, self.experiment_id = client, run_id, experiment_id
        self.uri, self.name = uri, name
        self._params: set[str] = set()

    def describe(self) -> dict:
        """Where the run is, for a run record: URI, experiment and run id."""
        return {"tracking_uri": self.uri, "experiment_id": self.experiment_id,
                "run_id": self.run_id, "run_name": self.name}

    def log_params(self, params: Mapping) -> None:
        """Each parameter once (MLflow refuses a second, different value); None is skipped."""
        from mlflow.entities import Param

        fresh = [Param(str(k), _text(v)[:_PARAM_LENGTH]) for k, v in params.items()
                 if v is not None and str(k) not in self._params]
        self._params.update(p.key for p in fresh)
        for lo in range(0, len(fresh), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, params=fresh[lo:lo + _PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping, step: int = 0) -> None:
        """The finite numbers of ``metrics`` at ``step`` (an epoch; 0 for final values)."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(str(k), float(v), now, step) for k, v in metrics.items()
                 if _number(v)]
        for lo in range(0, len(batch), _METRICS_PER_BATCH):
            self.client.log_batch(self.run_id, metrics=batch[lo:lo + _METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping) -> None:
        from mlflow.entities import RunTag

        batch = [RunTag(str(k), _text(v)[:_PARAM_LENGTH]) for k, v in tags.items()
                 if v is not None]
        for lo in range(0, len(batch), _PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id, tags=batch[lo:lo + _PARAMS_PER_BATCH])

    def log_row(self, row: Mapping) -> None:
        """A results row: its numbers as metrics, the whole row as ``row.json``."""
        self.log_metrics(row)
        self.log_json(row, "row.json")

    def log_json(self, obj, name: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / name
            path.write_text(json.dumps(obj, indent=2, default=str) + "\n")
            self.client.log_artifact(self.run_id, str(path))

    def log_files(self, paths: Iterable[str | os.PathLike], folder: str | None = None) -> None:
        """Files as artifacts (under ``folder``); files that are not there are skipped."""
        for path in paths:
            if path and Path(path).is_file():
                self.client.log_artifact(self.run_id, os.fspath(path), folder)

    def log_history(self, history: Iterable[Mapping]) -> None:
        """A fine-tune's history rows as metrics at their epochs (``seconds`` is
        ``epoch_seconds``)."""
        for row in history:
            self.log_metrics({("epoch_seconds" if k == "seconds" else k): v
                              for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)


class EpochLogger:
    """A fine-tune's ``on_epoch``: each epoch's history row to ``run``, as it comes; at the
    end, :meth:`finish` logs the epochs a resumed run did before (they were not seen)."""

    def __init__(self, run: Run | None):
        self.run, self.logged = run, set()

    def __call__(self, epoch: int, row: dict) -> None:
        if self.run is not None:
            self.run.log_history([row])
            self.logged.add(epoch)

    def finish(self, history: Iterable[Mapping]) -> None:
        if self.run is not None:
            self.run.log_history([r for r in history if r["epoch"] not in self.logged])


def _number(value) -> bool:
    # numbers.Real holds numpy's scalars too; a bool is a flag, not a metric.
    return (isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value))


def _text(value) -> str:
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, default=str)
    return str(value)


# --- what each stage logs ---------------------------------------------------------------------

def log_head_fit(parent: Run | None, row: Mapping, estimator, out: Path, seed: int,
                 started: float) -> None:
    """One head fit as a run nested under ``parent``: its parameters (the estimator's own
    too), its loss curves per epoch where it has them, the results row, the saved head and
    its test predictions."""
    if parent is None:
        return
    run = start(parent, out, f"{row['backbone']} / {row['head']}", "head",
                tags={"pipeline.cache_key": row["cache_key"]}, start_time=started)
    with ending(run):
        own = {f"head.{k}": v for k, v in estimator.get_params(deep=False).items()
               if isinstance(v, (str, int, float, bool, type(None)))}
        run.log_params({"head": row["head"], "backbone": row["backbone"],
                        "cache_key": row["cache_key"], "method": row["method"],
                        "chosen": row["chosen"], "seed": seed, **own})
        # The MLP head's curves (pipeline.heads.MLPHead): per-epoch metrics like a fine-tune's.
        for name, key in (("loss_curve_", "train_loss"), ("validation_loss_curve_", "val_loss")):
            for epoch, value in enumerate(getattr(estimator, name, None) or [], start=1):
                run.log_metrics({key: value}, step=epoch)
        run.log_row(row)
        run.log_files([row["model"]], "model")
        run.log_files([out / row["predictions"]], "predictions")


def log_heads(parent: Run | None, options, rows: list[dict], files: Iterable) -> None:
    """The run of a whole ``fit_heads`` call: its settings, the best test accuracy, and its
    tables, plots and run record."""
    if parent is None:
        return
    parent.log_params({"heads": list(options.heads), "shots": list(options.shots),
                       "draws": options.draws, "seed": options.seed,
                       "repeats": options.repeats, "positive": options.positive,
                       "cache_key": sorted({r["cache_key"] for r in rows})})
    parent.log_metrics({"best_test_accuracy": max(r["test_accuracy"] for r in rows)})
    parent.log_files([f for f in files if Path(f).suffix in _TABLES_AND_PLOTS])


def log_finetune_start(run: Run | None, config: Mapping, fields: Mapping) -> None:
    """A fine-tune's parameters, before its first epoch: every option (``config``, by field
    name) and ``fields`` (backbone, weights, cache key, how it is trained, ...)."""
    if run is None:
        return
    run.log_params({**config, **fields})


def log_finetune_end(run: Run | None, row: Mapping, files: Mapping, record: Path) -> None:
    """A fine-tune's results row, tables, plots, test predictions, saved network and run
    record."""
    if run is None:
        return
    run.log_row(row)
    run.log_files([f for k, f in files.items() if k not in ("model", "predictions")])
    run.log_files([files.get("predictions")], "predictions")
    run.log_files([files.get("model")], "model")
    run.log_files([record])


def log_runs(parent: Run | None, params: Mapping, metrics: Mapping, files: Iterable) -> None:
    """The parent run of a sweep or freeze-depth experiment: its settings, the chosen run's
    scores, its tables, plot and run record."""
    if parent is None:
        return
    parent.log_params(params)
    parent.log_metrics(metrics)
    parent.log_files(files)


# What a parent run keeps of its command's files (models and predictions go with each fit).
_TABLES_AND_PLOTS = (".csv", ".md", ".json", ".png")

"""MLflow tracking: each head fit, fine-tune and sweep run logged to a local store, read back
through MLflow's own client."""

from __future__ import annotations

import csv
import importlib.util
import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline.cli.main import main
from pipeline.core.options import FinetuneOptions
from pipeline.finetuning.sweep import sweep
from pipeline.models.backbones import resolve_backbone
from pipeline.store import run_record, tracking
from tests.conftest import extract_tiny, run_finetune

mlflow = pytest.importorskip("mlflow", reason="tracking needs the [track] extra")
TINY_ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32",
             "--workers", "0"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _client(store):
    return mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


def _runs(client) -> dict[str, object]:
    """Every run of the experiment by name."""
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    return {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}


def _artifacts(client, run, folder: str = "") -> set[str]:
    return {a.path for a in client.list_artifacts(run.info.run_id, folder or None)}


def _read_artifact(client, run, path: str, tmp_path) -> str:
    local = client.download_artifacts(run.info.run_id, path, str(tmp_path))
    with open(local) as fh:
        return fh.read()


@pytest.fixture
def cache(tmp_path, image_folder):
    return extract_tiny(image_folder, cache_dir=tmp_path / "c", progress=False).cache_path


def test_heads_log_each_fit_under_one_run_to_a_local_store(tmp_path, cache):
    out = tmp_path / "results" / "heads"
    result = _run("heads", cache, "--heads", "logreg,mlp", "--out", out, "--track", "--json",
                  "--quiet")
    assert result.exit_code == 0, result.output
    rows = {r["head"]: r for r in json.loads(result.stdout)["results"]}  # stdout: JSON alone
    client = _client(tmp_path / "results" / "mlruns")  # beside --out, nothing else needed
    runs = _runs(client)
    assert set(runs) == {"heads", "resnet18 / logreg", "resnet18 / mlp"}
    parent = runs["heads"]
    assert parent.info.status == "FINISHED"
    assert parent.data.params["heads"] == '["logreg", "mlp"]'
    assert parent.data.metrics["best_test_accuracy"] == max(r["test_accuracy"]
                                                            for r in rows.values())
    assert {"results.csv", "results.json", "comparison.png", "confusion_matrix.png",
            "run.json"} <= _artifacts(client, parent)
    record = run_record.read_record(out / "run.json")
    assert record["tracking"]["run_id"] == parent.info.run_id
    for head in ("logreg", "mlp"):
        run, row = runs[f"resnet18 / {head}"], rows[head]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert run.info.status == "FINISHED"
        assert run.data.params["head"] == head and run.data.params["seed"] == "0"
        assert run.data.params["cache_key"] == row["cache_key"]
        for name in ("test_accuracy", "test_accuracy_ci_low", "macro_f1", "log_loss", "ece"):
            assert run.data.metrics[name] == pytest.approx(row[name])
        assert json.loads(_read_artifact(client, run, "row.json", tmp_path / head)) == row
        assert _artifacts(client, run, "model") == {f"model/{row['model'].rsplit('/', 1)[1]}"}
        assert _artifacts(client, run, "predictions") == {row["predictions"]}
    assert runs["resnet18 / logreg"].data.params["head.refit_on"] == "train"
    curve = client.get_metric_history(runs["resnet18 / mlp"].info.run_id, "train_loss")
    assert [m.step for m in curve] == list(range(1, len(curve) + 1)) and len(curve) >= 1


def test_a_sweep_logs_each_run_with_its_epochs_nested_under_the_sweep(tmp_path, split_folder):
    out = tmp_path / "results" / "sweep"
    spec = resolve_backbone("resnet18", "none", image_size=32)
    options = FinetuneOptions.from_flat({"epochs": 2, "unfreeze": 1, "views": 1, "workers": 0,
                                         "cache_dir": tmp_path / "c"})
    result = sweep(split_folder, {"lr": [0.01, 0.001]}, backbone=spec, options=options,
                   workdir=out, progress=False, track=True)
    result.write(out)
    client = _client(tmp_path / "results" / "mlruns")
    runs = _runs(client)
    names = {"resnet18 lr-0.01", "resnet18 lr-0.001"}
    assert set(runs) == {"sweep"} | names
    parent = runs["sweep"]
    assert parent.data.tags["pipeline.best_run"] == result.best["run"]
    assert parent.data.metrics["best_val_accuracy"] == result.best["val_accuracy"]
    assert {"sweep.csv", "sweep.json", "sweep.png", "run.json"} <= _artifacts(client, parent)
    for row in result.rows:
        run = runs[f"resnet18 lr-{row['lr']:g}"]
        assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert float(run.data.params["lr"]) == row["lr"]
        assert run.data.params["trained_from"] == "cached activations"
        val = client.get_metric_history(run.info.run_id, "val_loss")
        assert [m.step for m in val] == [1, 2]  # one point per epoch, as history.csv has them
        assert [m.value for m in val] == pytest.approx(  # history.csv has 4 decimals
            [h["val_loss"] for h in _history(row)], abs=5e-5)
        assert run.data.metrics["test_accuracy"] == pytest.approx(row["test_accuracy"])
        assert {"history.csv", "history.png", "results.json", "confusion_matrix.png",
                "reliability.png", "run.json", "row.json", "model"} <= _artifacts(client, run)
        assert next(iter(_artifacts(client, run, "model"))).endswith("-finetune-1.net")

    # progress and tracking decide nothing: the same sweep, shown and untracked, reads back
    again = sweep(split_folder, {"lr": [0.01, 0.001]}, backbone=spec, options=options,
                  workdir=out, progress=None, track=False)
    assert all(row["resumed"] for row in again.rows)
    assert len(_runs(client)) == 3


def _history(row) -> list[dict]:
    with open(f"{row['run']}/history.csv") as fh:
        return [{k: float(v) for k, v in r.items()} for r in csv.DictReader(fh)]


def test_a_failed_run_is_marked_failed_and_writes_no_record(tmp_path, split_folder):
    def stop(epoch, row):
        raise RuntimeError("stopped by the test")

    out = tmp_path / "results" / "ft"
    with pytest.raises(RuntimeError, match="stopped by the test"):
        run_finetune(split_folder, out, epochs=2, unfreeze=0, cache_dir=tmp_path / "c",
                     workers=0, on_epoch=stop, track=True)
    runs = _runs(_client(tmp_path / "results" / "mlruns"))
    assert [r.info.status for r in runs.values()] == ["FAILED"]
    assert not (out / "run.json").exists()


def test_the_tracking_uri_turns_tracking_on_and_no_track_off(tmp_path, cache, monkeypatch):
    server = tmp_path / "server"
    server.mkdir()
    monkeypatch.chdir(tmp_path)  # MLflow puts a new experiment's artifacts in ./mlruns
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, f"sqlite:///{server / 'mlflow.db'}")
    monkeypatch.setenv(tracking.EXPERIMENT_ENV, "mine")
    assert _run("heads", cache, "--heads", "logreg", "--out", tmp_path / "r" / "h",
                "--quiet").exit_code == 0
    client = _client(server)
    experiment = client.get_experiment_by_name("mine")
    assert len(client.search_runs([experiment.experiment_id])) == 2  # heads, and its fit
    assert not (tmp_path / "r" / "mlruns").exists()  # the URI's store, not a local one
    assert _run("heads", cache, "--heads", "logreg", "--out", tmp_path / "r" / "h2",
                "--quiet", "--no-track").exit_code == 0
    assert len(client.search_runs([experiment.experiment_id])) == 2


def test_without_mlflow_track_says_how_to_install_it(tmp_path, cache, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "mlflow" else real(name, *a))
    out = tmp_path / "h"
    result = _run("heads", cache, "--heads", "logreg", "--out", out, "--track")
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'cnn-bottleneck-pipeline[track]'" in lines[0]
    assert not out.exists()  # nothing fitted
    # A URI in the environment alone: a warning, and the run goes on untracked.
    monkeypatch.setenv(tracking.TRACKING_URI_ENV, "http://localhost:1")
    result = _run("heads", cache, "--heads", "logreg", "--out", out, "--quiet")
    assert result.exit_code == 0 and "running without tracking" in result.stderr
    assert run_record.read_record(out / "run.json")["tracking"] is None


def test_an_untracked_run_does_not_import_mlflow(tmp_path, cache):
    code = (f"import sys\nfrom pipeline.cli.main import main\n"
            f"try:\n    main(['heads', {str(cache)!r}, '--heads', 'logreg', '--out', "
            f"{str(tmp_path / 'h')!r}, '--quiet'])\nexcept SystemExit as e:\n"
            f"    assert not e.code, e.code\n"
            f"print('mlflow' in sys.modules)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert run.stdout.splitlines()[-1] == "False"

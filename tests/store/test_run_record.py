"""Run records: every stage's run.json says which command, versions and data made its results."""

from __future__ import annotations

import json
from datetime import datetime
from importlib.metadata import version
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from pipeline.cli.main import main
from pipeline.heads import HeadError
from pipeline.store import run_record
from tests.conftest import fit_and_write

TINY_ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32",
             "--workers", "0"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def _fingerprint(cache: str) -> str:
    with h5py.File(cache, "r") as f:
        return json.loads(f.attrs["spec"])["dataset"]["fingerprint"]


def _check_common(record: dict, stage: str, command: list[str]) -> None:
    assert record["format"] == "pipeline-run" and record["format_version"] == 1
    assert record["stage"] == stage
    assert record["argv"] == command and record["command"] == " ".join(command)
    assert record["pipeline_version"] == record["versions"]["pipeline"]
    for name in ("torch", "torchvision", "timm", "scikit-learn"):
        assert record["versions"][name] == version(name)
    started, ended = (datetime.strptime(record[k], "%Y-%m-%dT%H:%M:%S%z")
                      for k in ("started", "ended"))
    assert started <= ended and record["seconds"] >= 0


def test_extract_records_itself_beside_the_cache_once(tmp_path, image_folder):
    cache_dir = tmp_path / "c"
    args = ["extract", image_folder, *TINY_ARGS, "--cache-dir", cache_dir, "--seed", "3",
            "--json"]
    out = json.loads(_run(*args).stdout)
    path = run_record.extract_record_path(out["cache_path"])
    assert path.name == Path(out["cache_path"]).name.replace(".h5", ".run.json")
    record = run_record.read_record(path)
    _check_common(record, "extract", ["pipeline", *map(str, args)])
    assert record["device"] == "cpu" and record["seed"] == 3
    assert record["cache_key"] == out["key"]
    assert record["data_fingerprint"] == _fingerprint(out["cache_path"])
    assert record["data"] == str(image_folder)
    assert record["settings"]["backbone"]["backbone"] == "resnet18"
    assert record["settings"]["options"]["seed"] == 3
    assert record["files"] == [Path(out["cache_path"]).name]
    assert record["images"] == 30 and record["failed"] == 0

    before = path.read_text()
    assert json.loads(_run(*args).stdout)["hit"]  # a hit ran nothing and records nothing
    assert path.read_text() == before
    listed = json.loads(_run("cache", "list", "--cache-dir", cache_dir, "--json").stdout)
    assert [row["path"] for row in listed] == [out["cache_path"]]  # not taken for a cache
    assert _run("cache", "rm", out["key"][:8], "--cache-dir", cache_dir).exit_code == 0
    assert not path.exists()  # removed with its cache


def test_heads_and_finetune_record_their_runs_and_report_links_rows(tmp_path, split_folder):
    cache_dir, out = tmp_path / "c", tmp_path / "results"
    cache = json.loads(_run("extract", split_folder, *TINY_ARGS, "--cache-dir", cache_dir,
                            "--json").stdout)
    heads_args = ["heads", cache["cache_path"], "--heads", "logreg,linear", "--out",
                  out / "heads", "--seed", "2"]
    assert _run(*heads_args).exit_code == 0
    record = run_record.read_record(out / "heads" / "run.json")
    _check_common(record, "heads", ["pipeline", *map(str, heads_args)])
    assert record["seed"] == 2 and record["settings"]["heads"] == ["logreg", "linear"]
    assert record["cache_key"] == cache["key"]
    assert record["data_fingerprint"] == _fingerprint(cache["cache_path"])
    assert record["caches"][0]["extract_record"] == str(
        run_record.extract_record_path(cache["cache_path"]))
    assert record["tracking"] is None
    assert {"results.csv", "results.json", "comparison.png",
            f"models/resnet18-{cache['key'][:8]}-logreg.head",
            f"predictions/resnet18-{cache['key'][:8]}-linear.npz"} <= set(record["files"])
    assert all((out / "heads" / f).exists() for f in record["files"])

    tune_args = ["finetune", split_folder, *TINY_ARGS, "--cache-dir", cache_dir, "--epochs",
                 "1", "--unfreeze", "0,1", "--views", "1", "--out", out / "finetune"]
    assert _run(*tune_args).exit_code == 0
    for k in (0, 1):
        run = run_record.read_record(out / "finetune" / f"unfreeze-{k}" / "run.json")
        _check_common(run, "finetune", ["pipeline", *map(str, tune_args)])
        assert run["cache_key"] == cache["key"] and run["device"] == "cpu"
        assert run["seed"] == 0 and run["resumed_from_epoch"] == 0
        assert run["trained_from"] == "cached activations"
        assert run["settings"]["options"]["network"]["unfreeze"] == k
        assert {"results.json", "history.csv", "history.png", "per_class.csv",
                f"models/resnet18-{cache['key'][:8]}-finetune-{k}.net"} <= set(run["files"])
    whole = run_record.read_record(out / "finetune" / "run.json")
    assert whole["stage"] == "freeze-depth" and whole["settings"]["depths"] == [0, 1]
    assert whole["data_fingerprint"] == _fingerprint(cache["cache_path"])
    assert {"freeze_depth.csv", "unfreeze-0/run.json", "unfreeze-1/run.json"} <= set(
        whole["files"])

    report = json.loads(_run("report", out, "--json").stdout)
    linked = {(r["method"], r["head"]): r["run_record"] for r in report["rows"]}
    assert linked == {("transfer", "logreg"): str(out / "heads" / "run.json"),
                      ("transfer", "linear"): str(out / "heads" / "run.json"),
                      ("fine-tune", "finetune-0"): str(out / "finetune/unfreeze-0/run.json"),
                      ("fine-tune", "finetune-1"): str(out / "finetune/unfreeze-1/run.json")}
    own = run_record.read_record(report["files"]["run_record"])
    assert own["stage"] == "report" and own["cache_key"] == [cache["key"]]


def test_a_run_that_fails_leaves_the_previous_record(tmp_path, image_folder):
    cache = json.loads(_run("extract", image_folder, *TINY_ARGS, "--cache-dir", tmp_path / "c",
                            "--json").stdout)["cache_path"]
    out = tmp_path / "heads"
    fit_and_write([cache], out, heads=("logreg",))
    first = (out / "run.json").read_text()
    # Each value is allowed, so make_head builds it; scikit-learn refuses the pair when fitting.
    with pytest.raises(HeadError, match="could not be fitted.*Unsupported set of arguments"):
        fit_and_write([cache], out, heads=("sklearn.svm.LinearSVC:penalty=l1,loss=hinge",))
    assert (out / "run.json").read_text() == first


def test_records_take_the_python_callers_argv_and_plain_values(tmp_path, monkeypatch):
    monkeypatch.setattr("sys.argv", ["/usr/bin/my-script.py", "--fast"])
    record = run_record.RunRecord("heads", {"out": tmp_path, "shots": (1, "all")}, seed=1)
    written = run_record.read_record(record.write(tmp_path / "x" / "run.json",
                                                  [tmp_path / "x" / "a.csv", "/elsewhere/b"]))
    assert written["command"] == "my-script.py --fast"
    assert written["settings"] == {"out": str(tmp_path), "shots": [1, "all"]}
    assert written["files"] == ["/elsewhere/b", "a.csv"]
    with run_record.command_line(["pipeline", "heads", "a b.h5"]):
        assert run_record.command() == ["pipeline", "heads", "a b.h5"]
    (tmp_path / "other.json").write_text('{"format": "something-else"}')
    with pytest.raises(ValueError, match="not a run record"):
        run_record.read_record(tmp_path / "other.json")

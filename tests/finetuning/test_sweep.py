"""Sweeps: the runs a grid and a one-at-a-time sweep make, choice on validation, resume."""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import pytest

import pipeline.finetuning.run
from pipeline.core.options import FinetuneOptions
from pipeline.finetuning.sweep import SweepError, choose, plan_grid, run_name, sweep
from pipeline.models.backbones import resolve_backbone
from tests.conftest import make_folder

FT = {"workers": 0, "epochs": 1, "patience": 5}


def _options(**flat) -> FinetuneOptions:
    return FinetuneOptions.from_flat(flat)


def _fake_scores(settings: dict) -> tuple[float, float]:
    """Validation accuracy peaking at lr 1e-3 and batch 16; test prefers lr 1e-1."""
    val = 0.9 - 0.1 * abs(math.log10(settings["lr"]) + 3) - 0.01 * abs(settings["batch_size"] - 16)
    test = 0.99 if settings["lr"] == 1e-1 else val
    return val, test


@pytest.fixture
def fake_finetune(monkeypatch):
    """finetune replaced by scores known in advance; records the settings of every call."""
    calls = []

    def fake(data, *, backbone, options, workdir, activation_depths, **rest):
        settings = {"lr": options.optim.lr, "batch_size": options.training.batch_size,
                    "unfreeze": options.network.unfreeze}
        calls.append({**settings, "depths": list(activation_depths), "rest": rest})
        val, test = _fake_scores(settings)
        row = {"best_epoch": 1, "epochs_run": 1, "test_accuracy": test, "macro_f1": test,
               "fit_s": 0.1, "trained_from": "cached activations"}
        history = [{"epoch": 1, "val_loss": 1 - val, "val_accuracy": val}]
        return SimpleNamespace(row=row, history=history, write=lambda out: [])

    monkeypatch.setattr(pipeline.finetuning.run, "finetune", fake)
    return calls


def test_plan_grid_is_every_combination_last_factor_fastest():
    plan = plan_grid({"lr": [0.1, 0.01], "batch_size": [16, 32, 64]})
    assert len(plan) == 6
    assert plan[:3] == [{"lr": 0.1, "batch_size": b} for b in (16, 32, 64)]
    assert len({run_name(p) for p in plan}) == 6


def test_choose_uses_validation_only_and_breaks_ties_on_loss():
    rows = [{"val_accuracy": 0.8, "val_loss": 0.5, "test_accuracy": 0.99},
            {"val_accuracy": 0.9, "val_loss": 0.7, "test_accuracy": 0.10},
            {"val_accuracy": 0.9, "val_loss": 0.6, "test_accuracy": 0.20},
            {"val_accuracy": math.nan, "val_loss": math.nan, "test_accuracy": 1.0}]
    assert choose(rows) is rows[2]


def test_grid_runs_every_combination_once(fake_finetune, tmp_path):
    factors = {"lr": [1e-1, 1e-3], "batch_size": [16, 32], "unfreeze": [0, 2, "all"]}
    result = sweep("data", factors, mode="grid", workdir=tmp_path)
    assert len(fake_finetune) == len(result.rows) == 12
    assert {(c["lr"], c["batch_size"], c["unfreeze"]) for c in fake_finetune} == {
        (lr, b, k) for lr in (1e-1, 1e-3) for b in (16, 32) for k in (0, 2, "all")}
    # one trunk pass for every cached depth of the sweep ("all" trains from images)
    assert all(c["depths"] == [0, 2] for c in fake_finetune)
    assert (result.best["lr"], result.best["batch_size"]) == (1e-3, 16)  # not test's 1e-1


def test_one_at_a_time_sweeps_each_factor_at_the_best_so_far(fake_finetune, tmp_path):
    factors = {"lr": [1e-1, 1e-2, 1e-3, 1e-4], "batch_size": [32, 16, 64], "unfreeze": [1, 2]}
    result = sweep("data", factors, mode="one-at-a-time", workdir=tmp_path)
    assert not (tmp_path / "sweep.json").exists()  # computed; written by the result
    assert {p.name for p in result.write(tmp_path)} == {"sweep.csv", "sweep.md", "sweep.json",
                                                        "sweep.png", "run.json"}
    tried = [(c["lr"], c["batch_size"], c["unfreeze"]) for c in fake_finetune]
    assert tried == [(1e-1, 32, 1), (1e-2, 32, 1), (1e-3, 32, 1), (1e-4, 32, 1),  # lr at batch 32
                     (1e-3, 16, 1), (1e-3, 64, 1),  # batch at the best lr; (1e-3, 32) not again
                     (1e-3, 16, 2)]  # depth at the best lr and batch
    assert len(result.rows) == 7
    assert (result.best["lr"], result.best["batch_size"]) == (1e-3, 16)
    table = json.loads((tmp_path / "sweep.json").read_text())
    assert sum(r["chosen"] for r in table["runs"]) == 1
    assert (tmp_path / "sweep.png").stat().st_size > 0
    assert "lr=0.001, batch_size=16" in (tmp_path / "sweep.md").read_text()


def test_a_finished_run_is_never_trained_again(fake_finetune, tmp_path):
    factors = {"lr": [1e-2, 1e-3], "unfreeze": [1]}
    first = sweep("data", factors, mode="grid", workdir=tmp_path, options=_options(epochs=3))
    # A run that did not finish (no record) is trained again; the finished one is read back.
    (tmp_path / "runs" / run_name({"lr": 1e-3, "unfreeze": 1}) / "sweep-run.json").unlink()
    second = sweep("data", factors, mode="grid", workdir=tmp_path, options=_options(epochs=3))
    assert len(fake_finetune) == 3 and fake_finetune[-1]["lr"] == 1e-3
    assert [r["resumed"] for r in second.rows] == [True, False]
    assert second.best["lr"] == first.best["lr"]


def test_a_folder_of_another_sweep_is_refused(fake_finetune, tmp_path):
    sweep("data", {"lr": [1e-3]}, workdir=tmp_path, options=_options(epochs=3))
    with pytest.raises(SweepError, match="another sweep"):
        sweep("data", {"lr": [1e-3]}, workdir=tmp_path, options=_options(epochs=4))


@pytest.mark.parametrize(("factors", "mode", "message"), [
    ({"momentum": [0.9]}, "grid", "cannot sweep momentum"),
    ({"lr": []}, "grid", "no values"),
    ({"lr": [0.1]}, "random", "unknown sweep"),
])
def test_bad_sweeps_are_refused(factors, mode, message, tmp_path):
    with pytest.raises(SweepError, match=message):
        sweep("data", factors, mode=mode, workdir=tmp_path)


def test_a_real_sweep_trains_from_one_activation_pass(tmp_path):
    data = make_folder(tmp_path / "images", per_class=8)
    result = sweep(data, {"lr": [1e-2, 1e-3], "unfreeze": [0, 1]}, workdir=tmp_path / "o",
                   backbone=resolve_backbone("resnet18", "none", image_size=32),
                   options=_options(cache_dir=tmp_path / "c", batch_size=8, **FT),
                   progress=False)
    assert len(result.rows) == 4
    assert all(r["trained_from"] == "cached activations" for r in result.rows)
    assert all(0 <= r["val_accuracy"] <= 1 for r in result.rows)
    # two depths, one file each, written once for the whole sweep
    assert len(list((tmp_path / "c").glob("*.activations.h5"))) == 2
    assert result.best in result.rows and result.best == choose(result.rows)
    folders = [tmp_path / "o" / "runs" / run_name({"lr": r["lr"], "unfreeze": r["unfreeze"]})
               for r in result.rows]
    assert all((f / "results.json").exists() and list((f / "models").glob("*.net"))
               for f in folders)
    # A finished run answers from its sweep-run.json: its checkpoint is gone.
    assert not any((f / "checkpoint.pt").exists() for f in folders)


def test_the_command_sweeps_when_given_several_values(tmp_path):
    from click.testing import CliRunner

    from pipeline.cli.main import main

    data = make_folder(tmp_path / "images", per_class=8)
    args = ["finetune", str(data), "--backbone", "resnet18", "--weights", "none",
            "--image-size", "32", "--workers", "0", "--epochs", "1", "--unfreeze", "0,1",
            "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(main, [*args, "--lr", "0.01,0.001", "--batch-size", "8",
                                       "--sweep", "one-at-a-time", "--json"])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)  # progress lines go to stderr
    assert [(r["lr"], r["unfreeze"]) for r in out["runs"]] == [(0.01, 0), (0.001, 0),
                                                              (out["best"]["lr"], 1)]
    refused = CliRunner().invoke(main, [*args, "--lr", "0.1,0.01", "--repeats", "2"])
    assert refused.exit_code != 0 and "--repeats" in refused.output
    assert "Traceback" not in refused.output
    bad = CliRunner().invoke(main, [*args, "--lr", "0.1,fast"])
    assert bad.exit_code == 2 and "such as 0.1,0.01" in bad.output


def _as_written_before_nesting(fingerprint: dict) -> dict:
    """A run record's fingerprint in the form sweeps wrote before the options were nested by
    concern (measured on such a folder: the flat FinetuneConfig under "config"; the backbone's
    request, some extraction options and the rest side by side in "settings")."""
    options = fingerprint["options"]
    config = {k: v for concern in ("optim", "network", "training", "activations")
              for k, v in options[concern].items()}
    backbone = {k: v for k, v in fingerprint["backbone"].items()
                if k in ("backbone", "weights", "image_size")}
    extract = {k: options["extract"][k] for k in ("workers", "cache_dir", "split_fractions",
                                                  "device", "compile", "engine")}
    return {"data": fingerprint["data"], "config": config,
            "settings": {**backbone, **extract, "offline": None, **fingerprint["settings"]}}


def test_a_run_recorded_before_the_options_were_nested_is_read_back(fake_finetune, tmp_path):
    factors = {"lr": [1e-3]}
    sweep("data", factors, workdir=tmp_path, options=_options(epochs=3))
    record = tmp_path / "runs" / run_name({"lr": 1e-3}) / "sweep-run.json"
    saved = json.loads(record.read_text())
    saved["fingerprint"] = _as_written_before_nesting(saved["fingerprint"])
    record.write_text(json.dumps(saved))
    again = sweep("data", factors, workdir=tmp_path, options=_options(epochs=3))
    assert again.rows[0]["resumed"] and len(fake_finetune) == 1
    # an old record of other settings is still another sweep's
    saved["fingerprint"]["config"]["epochs"] = 4
    record.write_text(json.dumps(saved))
    with pytest.raises(SweepError, match="another sweep"):
        sweep("data", factors, workdir=tmp_path, options=_options(epochs=3))

"""CLI wiring: JSON output, exit codes, one-line errors, cache management."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
from click.testing import CliRunner

from pipeline.cli.main import main
from pipeline.store.cache import read_strings
from tests.conftest import make_folder, make_split_folder, write_image

TINY_ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32",
             "--workers", "0"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_extract_json_then_hit(tmp_path, image_folder):
    args = ["extract", image_folder, *TINY_ARGS, "--cache-dir", tmp_path / "c", "--json"]
    first = _run(*args)
    assert first.exit_code == 0, first.output
    out = json.loads(first.stdout)
    assert out["hit"] is False and out["images"] == 30 and out["failed"] == 0
    assert out["dim"] == 512 and out["seconds"] > 0 and out["cache_path"].endswith(".h5")
    second = json.loads(_run(*args).stdout)
    assert second["hit"] is True and second["cache_path"] == out["cache_path"]


def test_extract_summary_and_write_json(tmp_path, image_folder):
    summary = tmp_path / "r" / "features.json"
    result = _run("extract", image_folder, *TINY_ARGS, "--cache-dir", tmp_path / "c",
                  "--write-json", summary)
    assert result.exit_code == 0 and "extracted 30 images (512-d)" in result.output
    assert json.loads(summary.read_text())["images"] == 30
    again = _run("extract", image_folder, *TINY_ARGS, "--cache-dir", tmp_path / "c")
    assert again.output.startswith("cache hit:") and "no model was run" in again.output


def _assert_one_line_error(result, text):
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:") and text in lines[0], result.output
    assert "Traceback" not in result.output


def test_user_errors_are_one_line(tmp_path):
    _assert_one_line_error(_run("extract", tmp_path / "nowhere", *TINY_ARGS), "no such file")
    single = make_folder(tmp_path / "single", classes=("only",), per_class=3)
    _assert_one_line_error(_run("extract", single, *TINY_ARGS), "single class")
    (tmp_path / "empty").mkdir()
    _assert_one_line_error(_run("extract", tmp_path / "empty", *TINY_ARGS), "no images")
    images = make_folder(tmp_path / "ok", per_class=10)
    # The library says what is wrong; the CLI adds the command that helps (cli/messages.py).
    _assert_one_line_error(_run("extract", images, "--backbone", "nonet"),
                           "unknown backbone 'nonet'; `pipeline backbones` lists the known ones")
    (images / "m.csv").write_text("path,label\n../../x.png,a\n")
    _assert_one_line_error(_run("extract", images / "m.csv", *TINY_ARGS), "outside")
    _assert_one_line_error(_run("cache", "info", "zzz", "--cache-dir", tmp_path),
                           "match 'zzz'; `pipeline cache list` shows them")


def test_cache_list_info_rm(tmp_path, image_folder):
    cache_dir = tmp_path / "c"
    out = json.loads(_run("extract", image_folder, *TINY_ARGS, "--cache-dir", cache_dir,
                          "--json").stdout)
    listed = json.loads(_run("cache", "list", "--cache-dir", cache_dir, "--json").stdout)
    assert [r["path"] for r in listed] == [out["cache_path"]]
    info = json.loads(_run("cache", "info", out["key"][:8], "--cache-dir", cache_dir,
                           "--json").stdout)
    assert info["spec"]["backbone"] == "resnet18" and info["spec"]["weights"] == "none(seed=0)"
    assert info["splits"] == {"train": 24, "val": 3, "test": 3}
    removed = _run("cache", "rm", out["key"][:8], "--cache-dir", cache_dir)
    assert removed.exit_code == 0 and not list(cache_dir.iterdir())


def test_cache_verify_reports_each_cache_and_exits_1_on_damage(tmp_path, image_folder):
    cache_dir = tmp_path / "c"
    path = _cache(tmp_path, image_folder)
    sound = _run("cache", "verify", "--cache-dir", cache_dir)
    assert sound.exit_code == 0 and f"{path}  ok  " in sound.output
    with h5py.File(path) as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 1)
        fh.write(b"\x7f")
    damaged = _run("cache", "verify", Path(path).name, "--cache-dir", cache_dir, "--json")
    assert damaged.exit_code == 1
    report = json.loads(damaged.stdout)
    assert report[0]["status"] == "damaged" and report[0]["problems"][0].startswith("/features")
    assert Path(path).exists()  # verify only reports
    extracted = _run("extract", image_folder, *TINY_ARGS, "--cache-dir", cache_dir)
    assert "the cache was damaged" in extracted.output
    listed = json.loads(_run("cache", "list", "--cache-dir", cache_dir, "--json").stdout)
    assert sorted(r["status"] for r in listed) == ["complete", "damaged (moved aside)"]


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "extract" in done.stdout


def test_the_program_freezes_its_objects_before_exiting_with_the_commands_code(monkeypatch):
    """run() (the `pipeline` program) leaves the exit code and error line of main alone and
    freezes the objects, so the exit skips its last full collection; main does not."""
    import gc
    import importlib

    cli = importlib.import_module("pipeline.cli.main")  # the module: pipeline.cli.main is main

    frozen = []
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))

    def fails():
        raise SystemExit(3)

    monkeypatch.setattr(cli, "main", fails)
    with pytest.raises(SystemExit) as exit_:
        cli.run()
    assert exit_.value.code == 3 and frozen == [True]
    monkeypatch.undo()
    frozen.clear()
    monkeypatch.setattr(gc, "freeze", lambda: frozen.append(True))
    assert CliRunner().invoke(main, ["--help"]).exit_code == 0 and frozen == []
    done = subprocess.run([sys.executable, "-m", "pipeline", "cache", "info", "/no/such.h5"],
                          capture_output=True, text=True)
    assert done.returncode == 1 and done.stderr.count("\n") == 1 and "Traceback" not in done.stderr


def _cache(tmp_path, image_folder):
    out = _run("extract", image_folder, *TINY_ARGS, "--cache-dir", tmp_path / "c", "--json")
    return json.loads(out.stdout)["cache_path"]


def test_heads_json_and_table(tmp_path, image_folder):
    cache_path = _cache(tmp_path, image_folder)
    result = _run("heads", cache_path, "--heads", "logreg", "--out", tmp_path / "h", "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["results"]
    assert rows[0]["head"] == "logreg" and 0 <= rows[0]["test_accuracy"] <= 1
    table = _run("heads", cache_path, "--heads",
                 "logreg;sklearn.neighbors.KNeighborsClassifier:n_neighbors=2,weights=distance",
                 "--out", tmp_path / "h2")
    assert table.exit_code == 0 and "| KNeighborsClassifier |" in table.output


def test_predict_cli_csv_and_json(tmp_path, image_folder):
    cache_path = _cache(tmp_path, image_folder)
    rows = json.loads(_run("heads", cache_path, "--heads", "logreg", "--out", tmp_path / "h",
                           "--json").stdout)["results"]
    model = rows[0]["model"]
    csv_out = _run("predict", model, image_folder / "cat", "--top-k", "2", "--workers", "0")
    lines = csv_out.stdout.strip().splitlines()
    assert csv_out.exit_code == 0 and len(lines) == 11
    assert lines[0] == "path,prediction,probability,class1,p1,class2,p2,error"
    as_json = json.loads(_run("predict", model, image_folder / "cat" / "000.png", "--json",
                              "--workers", "0").stdout)
    assert as_json["predictions"][0]["prediction"] in ("cat", "dog", "fox")


def test_stage_two_user_errors_are_one_line_and_keep_results(tmp_path, image_folder):
    cache_path = _cache(tmp_path, image_folder)
    out = tmp_path / "h"
    assert _run("heads", cache_path, "--heads", "logreg", "--out", out).exit_code == 0
    before = (out / "results.csv").read_text()
    _assert_one_line_error(_run("heads", cache_path, "--heads", "nohead", "--out", out),
                           "nohead")
    _assert_one_line_error(_run("heads", cache_path, "--heads", "mlp:depth=3", "--out", out),
                           "depth")
    _assert_one_line_error(_run("heads", cache_path, "--heads", "logreg;linear:select_on=f1",
                                "--out", out), "'select_on' parameter of LinearProbe")
    _assert_one_line_error(_run("heads", cache_path, "--heads",
                                "sklearn.svm.LinearSVC:penalty=l1,loss=hinge", "--out", out),
                           "could not be fitted")
    _assert_one_line_error(_run("heads", tmp_path / "x.h5", "--out", out), "no such cache")
    partial = tmp_path / "p.h5.partial"
    partial.write_bytes(b"")
    _assert_one_line_error(_run("heads", partial, "--out", out), "interrupted")
    assert (out / "results.csv").read_text() == before
    _assert_one_line_error(_run("predict", tmp_path / "none.head", image_folder), "no such")


def test_finetune_blocks_and_report_commands(tmp_path, image_folder):
    out = tmp_path / "run"
    assert _run("heads", _cache(tmp_path, image_folder), "--heads", "logreg", "--out",
                out / "heads").exit_code == 0
    tuned = _run("finetune", image_folder, *TINY_ARGS, "--cache-dir", tmp_path / "c",
                 "--unfreeze", "0,1", "--epochs", "1", "--batch-size", "8", "--out",
                 out / "finetune", "--json")
    assert tuned.exit_code == 0, tuned.output
    rows = json.loads(tuned.stdout)
    assert [r["blocks_unfrozen"] for r in rows] == [0, 1]
    report = json.loads(_run("report", out, "--json").stdout)
    assert {r["method"] for r in report["rows"]} == {"transfer", "fine-tune"}
    listed = _run("blocks", "resnet18")
    assert listed.exit_code == 0 and "layer4" in listed.output
    _assert_one_line_error(_run("finetune", image_folder, *TINY_ARGS, "--cache-dir",
                                tmp_path / "c", "--unfreeze", "7", "--out", out / "x"), "blocks")
    _assert_one_line_error(_run("blocks", "squeezenet1_0"), "cannot find the blocks")


def test_repeats_and_the_report_that_compares_rows(tmp_path, image_folder):
    out = tmp_path / "run"
    heads = _run("heads", _cache(tmp_path, image_folder), "--heads", "logreg,mlp", "--repeats",
                 "2", "--out", out / "heads", "--json")
    assert heads.exit_code == 0, heads.output
    assert [r["repeats"] for r in json.loads(heads.stdout)["results"]] == [2, 2]

    def tune(folder):
        tuned = _run("finetune", image_folder, *TINY_ARGS, "--cache-dir", tmp_path / "c",
                     "--unfreeze", "1", "--epochs", "1", "--batch-size", "8", "--repeats", "2",
                     "--out", folder, "--json")
        assert tuned.exit_code == 0, tuned.output
        return json.loads(tuned.stdout)

    rows = tune(out / "finetune")
    assert rows[0]["repeats"] == 2 and "test_accuracy_seeds_std" in rows[0]
    run = out / "finetune" / "unfreeze-1"
    saved = json.loads((run / "results.json").read_text())[0]
    assert saved["repeats"] == 2 and saved["predictions"].endswith(".npz")
    seeds = (run / "repeats.csv").read_text().splitlines()
    assert [line.split(",")[0] for line in seeds[1:]] == ["0", "1"]
    # The repeat kept the splits and features: its cache key is the first seed's.
    repeat = json.loads((run / "repeats" / "seed-1" / "results.json").read_text())[0]
    assert repeat["cache_key"] == saved["cache_key"]
    import torch  # the repeat trained with its own seed: its checkpoint says so

    args = torch.load(run / "repeats" / "seed-1" / "checkpoint.pt", weights_only=True)["args"]
    assert json.loads(args)["config"]["training"]["seed"] == 1
    tune(tmp_path / "again")  # the same seed, the same scores for every seed

    def scores(folder):
        return [line.rsplit(",", 1)[0] for line in  # all but the seconds
                (folder / "unfreeze-1" / "repeats.csv").read_text().splitlines()]
    assert scores(tmp_path / "again") == scores(out / "finetune")

    report = _run("report", out)
    assert report.exit_code == 0, report.output
    assert report.output.startswith("Best: ")
    assert "fine-tuning (best: finetune-1" in report.output.splitlines()[0]
    table = json.loads(_run("report", out, "--json").stdout)
    assert [r["head"] for r in table["rows"]].count("finetune-1") == 1  # repeats are not rows
    assert all(0 <= r["p_vs_best"] <= 1 for r in table["rows"])
    assert (out / "report" / "reliability.png").exists()


def _manifest(root, split_cells):
    """A CSV manifest of 2 classes x 10 images; ``split_cells(i)`` gives image i's split."""
    lines = ["path,label" + (",split" if split_cells else "")]
    for c in ("cat", "dog"):
        for i in range(10):
            write_image(root / "img" / f"{c}{i}.png", seed=(0 if c == "cat" else 100) + i)
            cell = f",{split_cells(i)}" if split_cells else ""
            lines.append(f"img/{c}{i}.png,{c}{cell}")
    (root / "m.csv").write_text("\n".join(lines) + "\n")
    return root / "m.csv"


_LAYOUTS = {
    "train-val folders": (lambda r: make_split_folder(r, {"train": 8, "val": 2}),
                          {"val": "given", "test": "carved"}),
    "train-test folders": (lambda r: make_split_folder(r, {"train": 8, "test": 2}),
                           {"val": "carved", "test": "given"}),
    "train-only folder": (lambda r: make_split_folder(r, {"train": 10}),
                          {"val": "carved", "test": "carved"}),
    "manifest without split": (lambda r: _manifest(r, None), {"val": "carved",
                                                              "test": "carved"}),
    "manifest with every split": (
        lambda r: _manifest(r, lambda i: "train" if i < 6 else "val" if i < 8 else "test"),
        {"val": "given", "test": "given"}),
    "manifest with empty split cells": (
        lambda r: _manifest(r, lambda i: "test" if i < 2 else ""),
        {"val": "carved", "test": "given"}),
}


@pytest.mark.parametrize("layout", list(_LAYOUTS))
def test_every_layout_runs_through_every_stage(tmp_path, layout):
    make, sources = _LAYOUTS[layout]
    data = make(tmp_path / "data")
    cache_dir, run = tmp_path / "c", tmp_path / "run"
    extracted = _run("extract", data, *TINY_ARGS, "--cache-dir", cache_dir, "--json")
    assert extracted.exit_code == 0, extracted.output
    key = json.loads(extracted.stdout)["key"]
    info = json.loads(_run("cache", "info", key[:8], "--cache-dir", cache_dir, "--json").stdout)
    assert all(info["splits"][s] > 0 for s in ("train", "val", "test"))
    for split, origin in sources.items():
        assert info["split_sources"][split].startswith(origin), info["split_sources"]
    heads = _run("heads", json.loads(extracted.stdout)["cache_path"], "--heads", "logreg",
                 "--out", run / "heads", "--json")
    assert heads.exit_code == 0, heads.output
    tuned = _run("finetune", data, *TINY_ARGS, "--cache-dir", cache_dir, "--unfreeze", "1",
                 "--epochs", "1", "--batch-size", "8", "--out", run / "finetune", "--json")
    assert tuned.exit_code == 0, tuned.output
    report = json.loads(_run("report", run, "--json").stdout)
    assert {r["method"] for r in report["rows"]} == {"transfer", "fine-tune"}
    assert report["cache_keys"] == [key]  # heads and fine-tune scored on the same test images


def test_unlabelled_folder_extracts_predicts_and_exports_but_is_not_trained_on(tmp_path):
    labelled = make_folder(tmp_path / "labelled", classes=("cat", "dog"), per_class=10)
    flat = tmp_path / "flat"
    for i in range(6):
        write_image(flat / f"{i}.png", seed=500 + i)
    cache_dir = tmp_path / "c"
    done = _run("extract", flat, *TINY_ARGS, "--cache-dir", cache_dir)
    assert done.exit_code == 0 and "unlabelled images" in done.output
    assert "`pipeline audit`" in done.output  # what does take an unlabelled cache
    cache = next(cache_dir.glob("*.h5"))
    _assert_one_line_error(_run("heads", cache, "--out", tmp_path / "h"),
                           "`pipeline predict` and `pipeline cache export` take it as it is")
    _assert_one_line_error(_run("finetune", flat, *TINY_ARGS, "--cache-dir", cache_dir,
                                "--out", tmp_path / "f"), "unlabelled")
    model = json.loads(_run("heads", _cache(tmp_path, labelled), "--heads", "logreg", "--out",
                            tmp_path / "h", "--json").stdout)["results"][0]["model"]
    from_cache = json.loads(_run("predict", model, cache, "--json").stdout)["predictions"]
    from_images = json.loads(_run("predict", model, flat, "--json", "--workers",
                                  "0").stdout)["predictions"]
    assert len(from_cache) == 6
    assert [r["prediction"] for r in from_cache] == [r["prediction"] for r in from_images]
    for a, b in zip(from_cache, from_images):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    exported = _run("cache", "export", cache.name[-28:-3], "--cache-dir", cache_dir,
                    "--format", "csv", "--out", tmp_path / "u.csv")
    assert exported.exit_code == 0 and (tmp_path / "u.csv").read_text().count("\n") == 7


def test_awkward_files_are_skipped_listed_and_counted(tmp_path):
    data = make_split_folder(tmp_path / "data", {"train": 8, "val": 2, "test": 2})
    (data / "train" / "cat" / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (data / "train" / "cat" / "loop").symlink_to(data)
    (data / "train" / "empty").mkdir()
    (data / "train" / "dog" / "notes.txt").write_text("x")
    shutil.copy(data / "train" / "dog" / "000.png", os.fsencode(data / "train" / "dog") +
                b"/caf\xe9.png")
    shutil.copy(data / "train" / "cat" / "000.png", data / "test" / "cat" / "copy.png")
    result = _run("extract", data, *TINY_ARGS, "--cache-dir", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert "skipped unreadable train/cat/gone.png: dangling link" in result.output
    ignored = next(line for line in result.output.splitlines() if line.startswith("ignored"))
    assert ignored.startswith("ignored 3 file(s) or folder(s): ")
    assert all(f"1 {kind}" in ignored for kind in ("reached twice", "empty class folder",
                                                    "other extension"))
    assert "1 group(s) span two splits" in result.output
    assert "train/cat/000.png = test/cat/copy.png" in result.output
    info = json.loads(_run("cache", "info", str(next((tmp_path / "c").glob("*.h5"))),
                           "--json").stdout)
    assert info["images"] == 27 and info["failed"] == 1  # the copy and the odd name count
    assert info["ignored"] == {"reached twice": 1, "empty class folder": 1,
                               "other extension": 1}
    assert info["duplicates"]["across_splits"] == 1
    with h5py.File(next((tmp_path / "c").glob("*.h5"))) as f:
        stored = read_strings(f["paths"]).tolist()
    assert os.fsencode(data / "train/dog/caf\udce9.png") in [os.fsencode(data / p) for p in stored]
    strict = _run("extract", data, *TINY_ARGS, "--cache-dir", tmp_path / "c2", "--strict")
    _assert_one_line_error(strict, "gone.png: unreadable image (dangling link")


def test_a_class_folder_named_in_bytes_that_are_not_utf8(tmp_path):
    root = make_folder(tmp_path / "d", classes=("cat", "dog"), per_class=10)
    os.rename(os.fsencode(root / "dog"), os.fsencode(root) + b"/caf\xe9")
    cache_path = _cache(tmp_path, root)
    heads = _run("heads", cache_path, "--heads", "logreg", "--out", tmp_path / "h", "--json")
    assert heads.exit_code == 0, heads.output
    assert "caf\\xe9" in (tmp_path / "h" / "per_class.csv").read_text()
    predicted = _run("predict", json.loads(heads.stdout)["results"][0]["model"], root,
                     "--workers", "0", "--top-k", "2")
    assert predicted.exit_code == 0 and "/caf\\xe9/000.png" in predicted.output

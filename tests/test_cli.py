"""CLI wiring: JSON output, exit codes, one-line errors, cache management."""

from __future__ import annotations

import json
import subprocess
import sys

from click.testing import CliRunner

from pipeline.cli import main
from tests.conftest import make_folder

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
    _assert_one_line_error(_run("extract", images, "--backbone", "nonet"), "unknown backbone")
    (images / "m.csv").write_text("path,label\n../../x.png,a\n")
    _assert_one_line_error(_run("extract", images / "m.csv", *TINY_ARGS), "outside")
    _assert_one_line_error(_run("cache", "info", "zzz", "--cache-dir", tmp_path), "no cache")


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


def test_python_dash_m_runs_the_cli():
    done = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True,
                          text=True)
    assert done.returncode == 0 and "extract" in done.stdout


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

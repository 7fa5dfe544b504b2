"""Progress in a log: one line per interval and one at the end, one per fine-tuning epoch."""

from __future__ import annotations

import io
import json
import re

import pytest
from click.testing import CliRunner

from pipeline.cli.main import main
from pipeline.core import progress
from pipeline.core.errors import PipelineError
from tests.conftest import extract_tiny

TINY_ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32",
             "--workers", "0"]
# "[12:03:04] extract resnet18: 8/30 img (26.7%), 117.7 img/s, ETA 0s"
LINE = re.compile(r"^\[\d\d:\d\d:\d\d\] (?P<desc>.+?): (?P<done>[\d,]+)/(?P<total>[\d,]+) "
                  r"(?P<unit>\w+)(?P<rest>.*)$")
EPOCH = re.compile(r"^\[\d\d:\d\d:\d\d\] finetune (?P<run>\S+): epoch (?P<epoch>\d+)/"
                   r"(?P<epochs>\d+): train_loss \d+\.\d{4}, train_accuracy \d\.\d{4}, "
                   r"val_loss \d+\.\d{4}, val_accuracy \d\.\d{4}, lr [\d.e-]+, \d+\.\d s$")


class _Clock:
    """A clock the test moves by hand."""

    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if LINE.match(line) or EPOCH.match(line)]


def test_a_log_gets_a_line_per_interval_and_one_at_the_end():
    stream, clock = io.StringIO(), _Clock()
    with progress.Progress(300, "extract net", "img", progress=None, every=30, stream=stream,
                           clock=clock) as bar:
        assert bar.mode == "lines"  # a StringIO is not a terminal
        for _ in range(30):  # 10 images every 3 s: lines at 30 s and 60 s, then the end
            clock.now += 3
            bar.update(10)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 3, lines
    first = LINE.match(lines[0])
    assert first["desc"] == "extract net" and (first["done"], first["total"]) == ("100", "300")
    assert first["rest"] == " (33.3%), 3.3 img/s, ETA 1m 00s"
    assert lines[1].endswith("extract net: 200/300 img (66.7%), 3.3 img/s, ETA 30s")
    assert lines[2].endswith("extract net: 300/300 img in 1m 30s, 3.3 img/s")


def test_a_resumed_pass_rates_only_its_own_work_and_a_failed_one_has_no_end_line():
    stream, clock = io.StringIO(), _Clock()
    with pytest.raises(RuntimeError), progress.Progress(
            1000, "extract net", "img", initial=900, every=0, stream=stream,
            clock=clock, progress="lines") as bar:
        clock.now += 10
        bar.update(50)
        raise RuntimeError("stopped")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].endswith("950/1,000 img (95.0%), 5.0 img/s, ETA 10s")


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(progress.INTERVAL_ENV, raising=False)
    assert progress.interval() == 30
    monkeypatch.setenv(progress.INTERVAL_ENV, "0.5")
    assert progress.interval() == 0.5
    monkeypatch.setenv(progress.INTERVAL_ENV, "soon")
    with pytest.raises(PipelineError, match="PIPELINE_PROGRESS_INTERVAL must be a number"):
        progress.interval()


def test_a_terminal_gets_tqdms_bar_and_quiet_gets_nothing():
    terminal = _Terminal()
    with progress.Progress(10, "extract net", progress=None, stream=terminal) as bar:
        assert bar.mode == "bar"
        bar.update(10)
    assert "\r" in terminal.getvalue() and "10/10" in terminal.getvalue()
    quiet = io.StringIO()
    with progress.Progress(10, "extract net", progress=False, stream=quiet) as bar:
        bar.update(10)
    assert quiet.getvalue() == ""
    assert progress.progress_mode(True, io.StringIO()) == "lines"
    assert progress.progress_mode("off") == "off"


def test_duration_reads_as_a_log_reader_skims():
    assert [progress.duration(s) for s in (0.4, 42, 787, 7380)] == ["0s", "42s", "13m 07s",
                                                                   "2h 03m"]


def test_an_extraction_off_a_terminal_prints_a_line_per_interval(tmp_path, image_folder,
                                                                  monkeypatch, capsys):
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")  # every batch: 8, 16, 24, then the end
    extract_tiny(image_folder, cache_dir=tmp_path / "c", batch_size=8)
    lines = _lines(capsys.readouterr().err)
    assert [LINE.match(line)["done"] for line in lines] == ["8", "16", "24", "30"]
    assert all(LINE.match(line)["desc"] == "extract resnet18" for line in lines)
    assert re.fullmatch(r" \(26\.7%\), [\d.]+ img/s, ETA \d+s", LINE.match(lines[0])["rest"])
    assert re.fullmatch(r" in \d+s, [\d.]+ img/s", LINE.match(lines[-1])["rest"])

    monkeypatch.setenv(progress.INTERVAL_ENV, "3600")  # a long interval: the end line alone
    extract_tiny(image_folder, cache_dir=tmp_path / "other", batch_size=8)
    assert [LINE.match(line)["done"] for line in _lines(capsys.readouterr().err)] == ["30"]

    extract_tiny(image_folder, cache_dir=tmp_path / "quiet", batch_size=8, progress=False)
    assert capsys.readouterr().err == ""


def test_finetune_prints_one_line_per_epoch_and_json_stays_clean(tmp_path, split_folder):
    args = ["finetune", split_folder, *TINY_ARGS, "--cache-dir", tmp_path / "c", "--epochs",
            "2", "--unfreeze", "1", "--views", "1", "--out", tmp_path / "ft", "--json"]
    run = CliRunner().invoke(main, [str(a) for a in args])
    assert run.exit_code == 0, run.output
    rows = json.loads(run.stdout)  # stdout: the JSON rows alone
    assert len(rows) == 1 and rows[0]["blocks_unfrozen"] == 1
    epochs = [EPOCH.match(line) for line in run.stderr.splitlines() if EPOCH.match(line)]
    assert [(m["run"], m["epoch"], m["epochs"]) for m in epochs] == [
        ("unfreeze-1", "1", "2"), ("unfreeze-1", "2", "2")]
    passes = [LINE.match(line)["desc"] for line in run.stderr.splitlines() if LINE.match(line)]
    assert passes == ["extract resnet18", "activations resnet18",
                      "activations view 1/1 resnet18"]

    again = CliRunner().invoke(main, [str(a) for a in args[:-3]] + [
        "--out", str(tmp_path / "quiet"), "--json", "--quiet"])
    assert again.exit_code == 0, again.output
    assert _lines(again.stderr) == []
    assert json.loads(again.stdout)[0].keys() == rows[0].keys()


def test_heads_count_their_fits(tmp_path, image_folder, monkeypatch):
    cache = extract_tiny(image_folder, cache_dir=tmp_path / "c", progress=False).cache_path
    monkeypatch.setenv(progress.INTERVAL_ENV, "0")
    run = CliRunner().invoke(main, ["heads", str(cache), "--heads", "logreg,linear", "--shots",
                                    "1,all", "--draws", "2", "--out", str(tmp_path / "h"),
                                    "--json"])
    assert run.exit_code == 0, run.output
    assert json.loads(run.stdout)["results"]
    # 2 heads, each fitted once, then per head 2 draws of 1 shot and 1 fit on all: 8 fits.
    done = [LINE.match(line)["done"] for line in _lines(run.stderr)]
    assert done == ["1", "2", "4", "5", "7", "8"], run.stderr
    assert all(LINE.match(line)["unit"] == "fit" for line in _lines(run.stderr))

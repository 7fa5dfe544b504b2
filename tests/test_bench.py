"""The bench's parts at a tiny size: a child measurement, timed runs, startup ratios."""

from __future__ import annotations

import sys

import pytest

from pipeline import bench
from tests.conftest import TINY


def test_a_child_extraction_reports_its_summary_and_peak_memory(tmp_path, image_folder):
    out = bench.child("extract", {"data": str(image_folder), "cache_dir": str(tmp_path / "c"),
                                  "progress": False, **TINY})
    assert out["images"] == 30 and out["hit"] is False and out["seconds"] > 0
    assert out["peak_rss_mb"] > 10


def test_an_unknown_child_mode_is_refused():
    with pytest.raises(ValueError, match="extract, finetune, forward"):
        bench.child("nothing", {})


def test_timed_runs_give_the_median_and_the_last_output():
    seconds, stdout = bench.timed_runs([sys.executable, "-c", "print('hi')"], 3)
    assert 0 < seconds < 30 and stdout == "hi\n"
    with pytest.raises(RuntimeError, match="failed"):
        bench.timed_runs([sys.executable, "-c", "raise SystemExit(3)"], 1)


def test_startup_ratios_are_against_import_torch_with_their_targets():
    ratios = bench.startup_ratios({"import_torch": 4.0, "help": 2.0, "cache_hit": 1.0})
    assert ratios["help"] == {"seconds": 2.0, "ratio": 0.5, "target": 0.1}
    assert ratios["cache_hit"] == {"seconds": 1.0, "ratio": 0.25, "target": 0.5}

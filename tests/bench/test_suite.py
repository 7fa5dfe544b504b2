"""The bench's parts at a tiny size: a child measurement, timed runs, startup ratios."""

from __future__ import annotations

import sys

import pytest

from pipeline.bench import children, finetuning, startup
from pipeline.bench import engines as engine_bench
from tests.conftest import TINY


def test_a_child_extraction_reports_its_summary_and_peak_memory(tmp_path, image_folder):
    out = children.child("extract", {"data": str(image_folder), "cache_dir": str(tmp_path / "c"),
                                  "progress": False, **TINY})
    assert out["images"] == 30 and out["hit"] is False and out["seconds"] > 0
    assert out["peak_rss_mb"] > 10


def test_an_unknown_child_mode_is_refused():
    with pytest.raises(ValueError, match="extract, finetune, forward"):
        children.child("nothing", {})


def test_timed_runs_give_the_median_and_the_last_output():
    seconds, stdout = startup.timed_runs([sys.executable, "-c", "print('hi')"], 3)
    assert 0 < seconds < 30 and stdout == "hi\n"
    with pytest.raises(RuntimeError, match="failed"):
        startup.timed_runs([sys.executable, "-c", "raise SystemExit(3)"], 1)


def test_startup_ratios_are_against_import_torch_with_their_targets():
    ratios = startup.startup_ratios({"import_torch": 4.0, "help": 2.0, "cache_hit": 1.0})
    assert ratios["help"] == {"seconds": 2.0, "ratio": 0.5, "target": 0.1}
    assert ratios["cache_hit"] == {"seconds": 1.0, "ratio": 0.25, "target": 0.5}


def test_spread_picks_evenly_and_numbers_the_repeats():
    assert finetuning.spread(10, 5) == [(0, 0), (2, 0), (4, 0), (6, 0), (8, 0)]
    assert finetuning.spread(3, 3) == [(0, 0), (1, 0), (2, 0)]
    assert finetuning.spread(2, 5) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    assert finetuning.spread(4, 0) == []


def test_a_sized_image_set_keeps_the_layout_and_repeats_past_its_size(tmp_path, split_folder):
    assert finetuning.sized_image_set(split_folder, tmp_path / "same", 22) == split_folder
    half = finetuning.sized_image_set(split_folder, tmp_path / "half", 11)
    double = finetuning.sized_image_set(split_folder, tmp_path / "double", 44)
    files = sorted(p.relative_to(half).as_posix() for p in half.rglob("*.png"))
    assert len(files) == 11 and files[0] == "test/cat/000.png"
    assert {f.split("/")[0] for f in files} == {"train", "val", "test"}
    doubled = sorted(p.relative_to(double).as_posix() for p in double.rglob("*.png"))
    assert len(doubled) == 44 and "train/dog/005-copy1.png" in doubled
    assert not (tmp_path / "double.partial").exists()


def test_finetune_ratios_are_against_their_targets():
    ratios = finetuning.finetune_ratios(1.0, 20.0, 30.0, 100.0)
    assert ratios["epoch"] == {"ratio": 0.05, "target": 0.1, "met": True}
    assert ratios["sweep"] == {"ratio": 0.3, "target": 0.25, "met": False}


def test_activation_bytes_are_the_stored_values_and_the_file_per_row(tmp_path):
    import h5py
    import numpy as np

    path = tmp_path / "a.activations.h5"
    with h5py.File(path, "w") as f:
        f.create_dataset("features", data=np.zeros((5, 12), dtype=np.float16))
        f.attrs["activation_shape"] = [3, 2, 2]
    out = finetuning.activation_bytes(path)
    assert out["shape"] == [3, 2, 2] and out["dtype"] == "float16" and out["rows"] == 5
    assert out["row_bytes"] == 24 and out["file_bytes_per_row"] == path.stat().st_size / 5


def test_engine_ratios_are_against_their_targets():
    ratios = engine_bench.engine_ratios({"eager": 40.0, "torch": 50.0, "onnxruntime": 80.0},
                                 {"torch": 48.0, "onnxruntime": 70.0, "auto": 70.0})
    assert ratios["auto_over_eager"] == {"ratio": 1.75, "target": 1.5, "met": True}
    assert ratios["end_to_end_over_forward"]["torch"] == {"ratio": 0.96, "target": 0.9,
                                                          "met": True}
    assert ratios["end_to_end_over_forward"]["onnxruntime"]["met"] is False  # 0.875
    assert ratios["forward_over_eager"] == {"eager": 1.0, "torch": 1.25, "onnxruntime": 2.0}


def test_the_bench_measures_the_engines_installed_for_the_device(monkeypatch):
    import torch

    from pipeline.models import engines

    monkeypatch.setattr(engines.OpenVinoEngine, "installed", lambda self: False)
    monkeypatch.setattr(engines.OnnxRuntimeEngine, "installed", lambda self: True)
    assert engine_bench.bench_engines_here(torch.device("cpu")) == ["eager", "torch", "onnxruntime"]
    assert engine_bench.bench_engines_here(torch.device("cuda")) == ["eager", "torch"]


def test_the_drift_bench_fits_the_growth_of_the_mmd_time(monkeypatch):
    from pipeline.bench import drift

    # seconds as 3 N²: the fitted exponent is 2 and 50,000 rows take 3 x 50,000² s
    monkeypatch.setattr("pipeline.bench.children.in_child", lambda mode, rows: {
        "rows": rows, "dim": 8, "permutations": 20, "seconds": 3.0 * rows ** 2, "p_value": 0.01,
        "peak_rss_mb": 100})
    result = drift.bench_drift(sizes=(10, 20, 40))
    assert abs(result["exponent"] - 2.0) < 1e-9
    assert abs(result["target_seconds_extrapolated"] - 3.0 * 50_000 ** 2) < 1e-3 * 3 * 50_000 ** 2
    assert abs(result["target_seconds_quadratic"] - 3.0 * 50_000 ** 2) < 1e-3 * 3 * 50_000 ** 2
    from pipeline.bench.children import mmd_once

    once = mmd_once(rows=60, dim=8, permutations=20)
    # what the bench prints beside each time: the sizes it ran, and a p-value of the test's
    # resolution (the MMD itself is tested in tests/monitoring/test_kernel.py)
    assert (once["rows"], once["dim"], once["permutations"]) == (60, 8, 20)
    assert 1 / 21 <= once["p_value"] <= 1 and once["seconds"] > 0

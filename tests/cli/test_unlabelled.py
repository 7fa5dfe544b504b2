"""CLI wiring of the unlabelled pool: pipeline heads --unlabelled and its rows in the report."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli.main import main
from tests.heads.unlabelled_data import one_torch_thread, planted_pair, write_cache

HEAD = "logreg:Cs=(0.1,1.0)"

one_thread = pytest.fixture(autouse=True)(one_torch_thread)


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_heads_with_a_pool_adds_self_trained_rows_the_report_pairs(tmp_path):
    cache, pool, _ = planted_pair(tmp_path / "data", shots=2, pool_n=400, spread=2.0)
    out = tmp_path / "results" / "heads"
    run = _run("heads", cache, "--heads", HEAD, "--out", out, "--unlabelled", pool,
               "--thresholds", "0.5", "--rounds", "2", "--quiet")
    assert run.exit_code == 0, run.output
    assert "logreg+self-train" in run.output and "Δ vs base" in run.output
    rows = json.loads((out / "self-train" / "results.json").read_text())
    assert rows[0]["head"] == "logreg+self-train" and rows[0]["base_head"] == "logreg"
    assert (out / "self-train" / "rounds.md").exists()
    assert (out / "self-train" / "run.json").exists()
    report = _run("report", tmp_path / "results", "--json")
    assert report.exit_code == 0, report.output
    table = json.loads(report.stdout)["rows"]
    heads = {r["head"]: r for r in table}
    assert {"logreg", "logreg+self-train"} <= set(heads)
    assert heads["logreg+self-train"]["p_vs_base"] != ""


def test_a_pool_of_another_feature_space_stops_before_any_fit(tmp_path):
    cache, _, _ = planted_pair(tmp_path / "data", shots=2, pool_n=50)
    other = write_cache(tmp_path / "other.h5", np.ones((4, 20)), key="other0000000",
                        spec={"layer": "blocks.5"})
    out = tmp_path / "out"
    run = _run("heads", cache, "--heads", HEAD, "--out", out, "--unlabelled", other)
    assert run.exit_code != 0
    assert "extracted differently" in run.output and "layer 'blocks.5'" in run.output
    assert "Traceback" not in run.output and not out.exists()

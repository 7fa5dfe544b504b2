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
    assert run.output.rstrip().endswith("extract the pool with the same backbone, weights, layer "
                                        "and image size; `pipeline extract` takes --backbone, "
                                        "--weights, --layer and --image-size")
    assert "Traceback" not in run.output and not out.exists()


def test_distill_prints_the_rows_and_the_agreement_then_reuses_the_teacher(tmp_path):
    from pipeline.heads.logreg import LogRegHead
    from pipeline.store.cache import cache_info, read_split
    from pipeline.store.persistence import save_head

    cache, pool, labelled_pool = planted_pair(tmp_path / "data", shots=2, pool_n=300)
    info = cache_info(cache)
    known = read_split(labelled_pool, "train")
    teacher = save_head(tmp_path / "teacher.head", LogRegHead(Cs=(1.0,)).fit(known.X, known.y),
                        {"head": "logreg", "backbone": "synthetic", "classes": info["classes"],
                         "dim": 20, "cache_key": info["key"], "spec": info["spec"],
                         "request": {}})
    args = ["distill", teacher, cache, "--unlabelled", pool, "--student", "linear",
            "--temperatures", "2", "--alphas", "0.9", "--out", tmp_path / "d", "--quiet"]
    first = _run(*args)
    assert first.exit_code == 0, first.output
    assert "linear+distill" in first.output and "teacher logreg" in first.output
    assert "agreement with the teacher" in first.output and "computed and stored" in first.output
    second = _run(*args)
    assert second.exit_code == 0 and "reused" in second.output
    rows = json.loads((tmp_path / "d" / "results.json").read_text())
    assert [r["head"] for r in rows] == ["linear+distill", "linear (no teacher)",
                                         "teacher logreg"]


def test_distill_refuses_a_teacher_of_other_classes_in_one_line(tmp_path):
    from pipeline.heads.logreg import LogRegHead
    from pipeline.store.cache import cache_info
    from pipeline.store.persistence import save_head

    cache, _, _ = planted_pair(tmp_path / "data", shots=2, pool_n=50)
    info = cache_info(cache)
    head = LogRegHead(Cs=(1.0,)).fit(np.eye(20)[:4], [0, 1, 0, 1])
    teacher = save_head(tmp_path / "t.head", head,
                        {"head": "logreg", "backbone": "synthetic", "classes": ["a", "b"],
                         "dim": 20, "cache_key": "x", "spec": info["spec"], "request": {}})
    run = _run("distill", teacher, cache, "--out", tmp_path / "d")
    assert run.exit_code != 0 and "classes" in run.output and "Traceback" not in run.output

"""pipeline audit and pipeline heads --exclude: wiring, JSON, one-line errors."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pipeline.cli.main import main
from tests.auditing.conftest import planted_cache


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_audit_json_then_heads_exclude_keeps_the_test_set(tmp_path):
    p = planted_cache(tmp_path / "c.h5", n=1500)
    out = tmp_path / "audit"
    ran = _run("audit", p.path, "--out", out, "--no-map", "--json", "-q")
    assert ran.exit_code == 0, ran.output
    found = json.loads(ran.stdout)
    assert found["exact_pairs"] == 6 and found["label_issues"]
    listed = out / "label_issues.csv"
    before = _run("heads", p.path, "--heads", "logreg", "--out", tmp_path / "h0", "--json", "-q")
    after = _run("heads", p.path, "--heads", "logreg", "--out", tmp_path / "h1", "--exclude",
                 listed, "--json", "-q")
    assert before.exit_code == 0 and after.exit_code == 0, after.output
    row0 = json.loads(before.stdout)["results"][0]
    row1 = json.loads(after.stdout)["results"][0]
    test_issues = sum(i["split"] == "test" for i in found["label_issues"])
    assert row1["excluded"] == len(found["label_issues"]) - test_issues > 0
    assert "excluded" not in row0
    assert row1["test_n"] == row0["test_n"]  # the test set stays whole
    assert row1["train_n"] < row0["train_n"]


def test_audit_text_summary_and_errors(tmp_path):
    p = planted_cache(tmp_path / "c.h5", n=600)
    ran = _run("audit", p.path, "--out", tmp_path / "a", "--no-map", "-q")
    assert ran.exit_code == 0, ran.output
    assert "leakage train-test: 6 exact" in ran.output
    assert "noise/static.png" in ran.output
    missing = _run("audit", tmp_path / "nope.h5")
    assert missing.exit_code == 1 and "no such cache file" in missing.output
    (tmp_path / "x.h5").write_text("not hdf5")
    bad = _run("audit", tmp_path / "x.h5")
    assert bad.exit_code == 1 and "not an HDF5 file" in bad.output
    unknown = tmp_path / "bad.csv"
    unknown.write_text("path\nnot/there.png\n")
    refused = _run("heads", p.path, "--heads", "logreg", "--out", tmp_path / "h",
                   "--exclude", unknown)
    assert refused.exit_code == 1 and "not in c.h5" in refused.output
    assert len(refused.output.strip().splitlines()) == 1

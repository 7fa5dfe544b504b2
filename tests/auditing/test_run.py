"""The audit stage end to end: a real tiny image cache, a planted one, an unlabelled set."""

from __future__ import annotations

import csv
import json

import pytest

from pipeline.auditing.run import audit
from pipeline.core.errors import OptionError
from pipeline.core.options import AuditOptions
from tests.auditing.conftest import planted_cache
from tests.conftest import extract_tiny, make_folder, write_image


def test_planted_faults_end_to_end(tmp_path):
    p = planted_cache(tmp_path / "c.h5")
    result = audit(p.path, options=AuditOptions(map_points=500), progress=False)
    written = result.write(tmp_path / "out")
    assert sorted(f.name for f in written) == sorted(
        f.name for f in (tmp_path / "out").iterdir())  # every file written, and listed
    flagged = {i.index for i in result.label_issues}
    assert len(flagged & set(p.flipped)) >= 0.8 * len(p.flipped)
    assert result.leakage["train-test"]["exact"] == len(p.copies) + len(p.copies_relabelled)
    assert result.outliers[0].path == "noise/static.png"
    assert result.map_points == 500
    different = [d for d in result.duplicates if d["different_labels"]]
    assert {(d["path_a"], d["path_b"]) for d in different if d["kind"] == "exact"} == {
        (f"c{p.true[a]}/{a:05d}.png", f"copies/{b:05d}.png") for a, b in p.copies_relabelled}
    for name in ("label_issues.csv", "label_issues.png", "duplicates.csv", "leakage.csv",
                 "outliers.csv", "outliers.png", "map.png", "audit.json"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    with open(tmp_path / "out" / "label_issues.csv") as fh:
        listed = list(csv.DictReader(fh))
    assert len(listed) == len(result.label_issues) and listed[0]["path"]
    summary = json.loads((tmp_path / "out" / "audit.json").read_text())
    assert summary["exact_pairs"] == len(p.copies) + len(p.copies_relabelled)


def test_real_image_cache_with_a_copy_across_splits(tmp_path):
    data = make_folder(tmp_path / "d", classes=("a", "b"), per_class=12)
    (data / "a" / "copy.png").write_bytes((data / "a" / "000.png").read_bytes())
    cache = extract_tiny(data, cache_dir=tmp_path / "c", progress=False,
                             split_fractions=(0.5, 0.25, 0.25)).cache_path
    result = audit(cache, options=AuditOptions(folds=3), progress=False)
    result.write(tmp_path / "out")
    exact = [d for d in result.duplicates if d["kind"] == "exact"]
    assert [(d["path_a"], d["path_b"]) for d in exact] == [("a/000.png", "a/copy.png")]
    assert result.label_issues_skipped is None and result.folds == 3
    assert (tmp_path / "out" / "map.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "out" / "outliers.png").stat().st_size > 0


def test_an_unlabelled_set_skips_label_issues_in_one_line(tmp_path):
    flat = tmp_path / "flat"
    for i in range(12):
        write_image(flat / f"{i:02d}.png", seed=i)
    (flat / "dup.png").write_bytes((flat / "03.png").read_bytes())
    cache = extract_tiny(flat, cache_dir=tmp_path / "c", progress=False).cache_path
    result = audit(cache, progress=False)
    assert not (tmp_path / "out").exists()  # the stage writes nothing
    result.write(tmp_path / "out")
    assert not result.labelled and result.label_issues == []
    assert "unlabelled" in result.label_issues_skipped
    assert "\n" not in result.label_issues_skipped
    assert [(d["path_a"], d["path_b"]) for d in result.duplicates
            if d["kind"] == "exact"] == [("03.png", "dup.png")]
    assert len(result.outliers) == 13
    assert (tmp_path / "out" / "map.png").exists()
    assert not (tmp_path / "out" / "label_issues.csv").exists()


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(OptionError, match="threshold must be a number in \\(0, 1\\]"):
        AuditOptions(threshold=1.5)
    with pytest.raises(OptionError, match="folds must be an integer >= 2, not 1"):
        AuditOptions(folds=1)
    with pytest.raises(TypeError):  # settings go by keyword, never by position
        AuditOptions(5)

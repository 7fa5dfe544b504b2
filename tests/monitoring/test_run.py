"""The drift stage and its command on tiny sets and a tiny random backbone: what each input
gives, and each bad input's one line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from pipeline.cli.main import main
from pipeline.core.errors import DataError, OptionError
from pipeline.monitoring.options import DriftOptions
from pipeline.monitoring.run import drift
from tests.conftest import extract_tiny, fit_and_write, make_folder, make_split_folder, write_image

FAST = DriftOptions(permutations=30, gallery=4)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A labelled reference cache (two classes), its heads' results folder, and new sets."""
    root = tmp_path_factory.mktemp("drift")
    reference = make_split_folder(root / "ref", {"train": 16, "val": 8, "test": 8},
                                  classes=("a", "b"))
    cache = extract_tiny(reference, root / "cache").cache_path
    results = root / "results"
    fit_and_write([cache], results / "heads", heads=("logreg",))
    new = make_folder(root / "new", classes=("a", "b", "c"), per_class=6)
    return {"root": root, "cache": cache, "results": results, "new": new,
            "cache_dir": root / "cache"}


def test_a_folder_against_a_cache_gives_every_measure(tiny, tmp_path):
    result = drift(tiny["new"], against=tiny["cache"], options=FAST)
    assert result.n_new == 18 and result.n_reference == 32
    assert result.new_classes == {"c": 6}
    assert any("never seen: c" in note for note in result.notes)
    assert any("fitted on the reference's training split" in note for note in result.notes)
    for measure in (result.domain_classifier, result.mmd, result.label_shift, result.novelty):
        assert {"p_value", "ci_low", "ci_high", "p_holm", "statistic"} <= set(measure)
    # The sample and the training split (less its copies of NEW's images).
    assert 32 < result.novelty["n_reference"] <= 64
    assert result.novelty["statistic"] == result.novelty["excess"]
    assert 1 / 31 <= result.mmd["p_value"] <= 1
    assert result.accuracy is not None and result.atc is not None
    assert result.sentence and isinstance(result.shifted, bool)
    files = result.write(tmp_path)
    assert {f.name for f in files} == {"drift.json", "drift.md", "drift_gallery.png"}
    body = json.loads((tmp_path / "drift.json").read_text())
    assert body["shifted"] == result.shifted and body["harmful"] == result.harmful
    assert body["sentence"] == result.sentence
    assert len(body["gallery"]) == 4
    assert result.sentence in (tmp_path / "drift.md").read_text()
    assert "novelty: excess share" in (tmp_path / "drift.md").read_text()
    assert body["novelty"]["p_holm"] >= body["novelty"]["p_value"]


def test_a_cache_of_every_block_measures_each_layer_with_the_novelty_test_too(tiny, tmp_path):
    reference = tiny["root"] / "ref"
    cache = extract_tiny(reference, tmp_path, layer="blocks").cache_path
    result = drift(tiny["new"], against=cache, options=FAST)
    assert len(result.layers) > 1
    from pipeline.monitoring.outputs import holm

    tests = ("p_classifier", "p_mmd", "p_novelty")
    adjusted = holm([r[t] for r in result.layers for t in tests]).reshape(-1, 3)
    for row, row_adjusted in zip(result.layers, adjusted):
        assert {"outlier_share", "novelty_excess", "novelty_ci_low", "novelty_ci_high"} <= set(row)
        assert row["novelty_ci_low"] <= row["novelty_excess"] <= row["novelty_ci_high"]
        assert row["p_holm"] == pytest.approx(row_adjusted.min())


def test_a_results_folder_judges_its_best_rows_head(tiny):
    result = drift(tiny["new"], against=tiny["results"], options=FAST)
    assert result.model.endswith(".head")
    assert any("best row" in note for note in result.notes)
    assert result.reference_cache == str(tiny["cache"])


def test_new_as_a_cache_of_the_same_spec_is_reused(tiny):
    cache = extract_tiny(tiny["new"], tiny["cache_dir"]).cache_path
    result = drift(cache, against=tiny["cache"], options=FAST)
    assert result.new_cache == str(cache)
    assert any("from its cache" in note for note in result.notes)


def test_new_as_a_cache_of_another_spec_is_extracted_again_and_said_so(tiny, tmp_path):
    other = extract_tiny(tiny["new"], tmp_path, image_size=48)
    result = drift(other.cache_path, against=tiny["cache"], options=FAST)
    assert any("re-extracted" in note and "preprocessing" in note for note in result.notes)
    assert result.new_cache != str(other.cache_path)


def test_copies_of_new_images_leave_the_reference_sample(tiny):
    result = drift(tiny["root"] / "ref" / "test", against=tiny["cache"], options=FAST)
    assert any("16 reference image(s) identical" in note for note in result.notes)
    assert result.n_reference == 16  # val only: test is NEW


def test_one_image_is_refused_in_one_line(tiny, tmp_path):
    write_image(tmp_path / "one" / "x.png", seed=3)
    with pytest.raises(DataError, match="1 readable image"):
        drift(tmp_path / "one", against=tiny["cache"], options=FAST)
    run = CliRunner().invoke(main, ["drift", str(tmp_path / "one"), "--against",
                                    str(tiny["cache"]), "-q"])
    assert run.exit_code == 1 and "Traceback" not in run.output
    assert "needs at least 10" in run.output and len(run.output.strip().splitlines()) == 1


def test_a_reference_without_a_validation_split_says_so(tmp_path):
    data = make_split_folder(tmp_path / "ref", {"train": 12, "test": 8}, classes=("a", "b"))
    cache = extract_tiny(data, tmp_path / "c", split_fractions=(1.0, 0.0, 0.0)).cache_path
    new = make_folder(tmp_path / "new", classes=("a", "b"), per_class=6)
    result = drift(new, against=cache, options=FAST.replace(reference=("test",)))
    assert result.atc is None
    assert any("no validation split" in note for note in result.notes)
    run = CliRunner().invoke(main, ["drift", str(new), "--against", str(cache), "-q",
                                    "--reference", "test", "--permutations", "20",
                                    "--out", str(tmp_path / "out")])
    assert run.exit_code == 0, run.output
    assert "no validation split" in run.output


def test_the_command_writes_and_prints_the_same_json(tiny, tmp_path):
    run = CliRunner().invoke(main, ["drift", str(tiny["new"]), "--against", str(tiny["cache"]),
                                    "--out", str(tmp_path), "--permutations", "20", "--json",
                                    "-q"])
    assert run.exit_code == 0, run.output
    printed = json.loads(run.output)
    assert printed == json.loads((tmp_path / "drift.json").read_text())
    assert set(printed) >= {"shifted", "harmful", "sentence", "domain_classifier", "mmd",
                            "label_shift"}


def test_bad_settings_and_paths_end_in_one_line(tiny, tmp_path):
    with pytest.raises(OptionError, match="reference"):
        DriftOptions(reference=("holdout",))
    for args, text in [(["--against", str(tmp_path / "none")], "no such cache or results"),
                       (["--against", str(tmp_path)], "no results row"),
                       (["--against", str(tiny["cache"]), "--level", "2"], "level must be")]:
        run = CliRunner().invoke(main, ["drift", str(tiny["new"]), *args, "-q"])
        assert run.exit_code != 0 and text in run.output, run.output
        assert "Traceback" not in run.output


def test_help_is_registered():
    run = CliRunner().invoke(main, ["drift", "--help"])
    assert run.exit_code == 0 and "--against" in run.output

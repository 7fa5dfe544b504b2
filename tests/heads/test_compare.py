"""Stage 2: heads fitted on cached features, scored, compared; k-shot draws."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import DataError, PipelineError
from pipeline.core.options import HeadsOptions
from pipeline.heads.compare import fit_heads, load_cache_data, sample_shots
from pipeline.metrics.scoring import RowPredictions
from pipeline.metrics.significance import accuracy_interval
from tests.conftest import (
    extract_tiny,
    fit_and_write,
    make_folder,
    make_split_folder,
    run_finetune,
)


@pytest.fixture(scope="module")
def cache_file(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("d") / "images", per_class=20)
    return extract_tiny(root, cache_dir=tmp_path_factory.mktemp("c")).cache_path


HEADS = ["logreg", "sklearn.neighbors.KNeighborsClassifier:n_neighbors=3"]


def test_table_plots_and_models_are_written(tmp_path, cache_file):
    result = fit_and_write([cache_file], tmp_path / "out", heads=HEADS)
    assert [r["head"] for r in result.rows] == ["logreg", "KNeighborsClassifier"]
    row = result.rows[0]
    assert row["backbone"] == "resnet18" and row["chosen"].startswith("C=")
    assert 0 <= row["test_accuracy"] <= 1 and row["test_n"] == 6 and row["fit_s"] > 0
    for name in ("results.csv", "results.md", "per_class.csv", "comparison.png",
                 "confusion_matrix.png", "reliability.png"):
        assert (tmp_path / "out" / name).stat().st_size > 0, name
    assert result.rows[0]["model"].endswith("-logreg.head")
    lines = (tmp_path / "out" / "per_class.csv").read_text().splitlines()
    assert len(lines) == 1 + 2 * 3  # header + 2 heads x 3 classes


def test_the_stage_writes_nothing_and_its_rows_are_a_direct_scikit_learn_fit(tmp_path,
                                                                            cache_file):
    from sklearn.neighbors import KNeighborsClassifier

    result = fit_heads([cache_file], options=HeadsOptions(heads=(HEADS[1],)), progress=False)
    assert list(tmp_path.iterdir()) == []  # fitting writes nothing
    data = load_cache_data(cache_file)
    direct = KNeighborsClassifier(n_neighbors=3).fit(data.train.X, data.train.y)
    y_pred = direct.predict(data.test.X)
    row = result.rows[0]
    assert row["test_accuracy"] == float(np.mean(y_pred == data.test.y))
    assert row["model"] == "models/resnet18-" + data.info["key"][:8] + \
        "-KNeighborsClassifier.head"  # relative until written
    written = result.write(tmp_path / "out")
    stored = RowPredictions.load(tmp_path / "out" / row["predictions"])
    np.testing.assert_array_equal(stored.y_pred, y_pred)
    on_disk = {p for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert set(written) == on_disk and row["model"] == str(
        tmp_path / "out" / "models" / Path(row["model"]).name)
    assert {p.name for p in on_disk} >= {"results.csv", "results.md", "results.json",
                                         "per_class.csv", "comparison.png", "run.json",
                                         "confusion_matrix.png", "reliability.png"}


def test_each_row_has_intervals_and_its_test_predictions(tmp_path, cache_file):
    result = fit_and_write([cache_file], tmp_path / "out", heads=HEADS)
    data = load_cache_data(cache_file)
    for row in result.rows:
        stored = RowPredictions.load(tmp_path / "out" / row["predictions"])
        assert stored.paths.tolist() == data.test.paths
        np.testing.assert_array_equal(stored.y_true, data.test.y)
        right = int((stored.y_pred == stored.y_true).sum())
        assert row["test_accuracy"] == right / len(data.test.y)
        assert (row["test_accuracy_ci_low"], row["test_accuracy_ci_high"]) == \
            accuracy_interval(right, len(data.test.y))
        assert stored.proba.shape == (len(data.test.y), 3) and not stored.leaked.any()
        assert row["macro_f1_ci_low"] <= row["macro_f1"] <= row["macro_f1_ci_high"]
    header = (tmp_path / "out" / "results.csv").read_text().splitlines()[0].split(",")
    assert header[3:6] == ["test_accuracy", "test_accuracy_ci_low", "test_accuracy_ci_high"]
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved[0]["ece_ci_high"] == result.rows[0]["ece_ci_high"]


def test_repeats_refit_with_other_seeds_on_the_same_splits(tmp_path, cache_file):
    def run(out):
        return fit_and_write([cache_file], out, heads=("logreg", "mlp"), repeats=3, seed=5)

    first, again = run(tmp_path / "a"), run(tmp_path / "b")
    single = fit_and_write([cache_file], tmp_path / "c", heads=("logreg", "mlp"), seed=5)
    logreg, mlp = first.rows
    assert logreg["repeats"] == mlp["repeats"] == 3
    assert logreg["test_accuracy_seeds_std"] == 0  # L-BFGS on the same split: no seed in it
    seeds = (tmp_path / "a" / "repeats.csv").read_text().splitlines()
    assert len(seeds) == 1 + 2 * 3 and [line.split(",")[2] for line in seeds[4:]] == \
        ["5", "6", "7"]
    accuracies = [float(line.split(",")[4]) for line in seeds[4:]]
    assert mlp["test_accuracy_seeds_mean"] == pytest.approx(np.mean(accuracies), abs=1e-4)
    # The first seed is the single run: repeats add columns and change no score.
    for row, alone in zip(first.rows, single.rows):
        assert {k: row[k] for k in alone if not k.endswith("_s") and k != "model"} == \
            {k: alone[k] for k in alone if not k.endswith("_s") and k != "model"}
    strip = [{k: v for k, v in r.items() if not k.endswith("_s") and k != "model"}
             for r in first.rows]
    assert strip == [{k: v for k, v in r.items() if not k.endswith("_s") and k != "model"}
                     for r in again.rows]
    with pytest.raises(PipelineError, match="repeats"):
        fit_and_write([cache_file], tmp_path / "d", heads=("logreg",), repeats=0)


def test_same_seed_same_table_to_the_digit(tmp_path, cache_file):
    def scores(out):
        rows = fit_and_write([cache_file], out, heads=HEADS, shots=(1, 2), draws=2, seed=3).rows
        return [{k: v for k, v in r.items() if not k.endswith("_s") and k != "model"}
                for r in rows]
    assert scores(tmp_path / "a") == scores(tmp_path / "b")


def test_several_caches_land_in_one_table(tmp_path, cache_file):
    other = extract_tiny(make_folder(tmp_path / "d", per_class=20),
                             cache_dir=tmp_path / "c", image_size=48)
    result = fit_and_write([cache_file, other.cache_path], tmp_path / "out", heads=("logreg",))
    assert len(result.rows) == 2 and len({r["model"] for r in result.rows}) == 2
    assert json.loads((tmp_path / "out" / "results.json").read_text())[1]["head"] == "logreg"


def test_activation_caches_among_the_paths_are_left_out_and_alone_refused(tmp_path):
    root = make_folder(tmp_path / "images", per_class=6)
    run_finetune(root, tmp_path / "ft", cache_dir=tmp_path / "c", epochs=1, batch_size=8,
                 workers=0)
    every = sorted((tmp_path / "c").glob("resnet18-*.h5"))  # the glob a user types
    activations = [p for p in every if p.name.endswith(".activations.h5")]
    assert activations and len(every) == len(activations) + 1
    result = fit_and_write(every, tmp_path / "out", heads=("logreg",))
    assert len(result.rows) == 1 and result.skipped == [str(p) for p in activations]
    assert result.to_json()["skipped_activation_caches"] == result.skipped
    with pytest.raises(DataError, match="is an activation cache written by fine-tuning"):
        fit_and_write(activations, tmp_path / "out2", heads=("logreg",))


def test_k_shot_sampling_takes_k_per_class_from_train_only():
    y = np.repeat([0, 1, 2], [5, 3, 8])
    picked = sample_shots(y, 4, np.random.default_rng(0))
    assert np.bincount(y[picked]).tolist() == [4, 3, 4]
    again = sample_shots(y, 4, np.random.default_rng(0))
    assert (picked == again).all()


def test_shots_table_has_a_row_per_k_with_spread(tmp_path, cache_file):
    result = fit_and_write([cache_file], tmp_path / "out", heads=("logreg",),
                           shots=(1, 3, "all"), draws=3)
    by_k = {r["shots"]: r for r in result.shots}
    assert set(by_k) == {1, 3, "all"} and by_k[1]["draws"] == 3 and by_k["all"]["draws"] == 1
    largest = int(np.bincount(load_cache_data(cache_file).train.y).max())
    assert by_k["all"]["k"] == largest and by_k[3]["k"] == 3
    assert by_k["all"]["mean_accuracy"] == result.rows[0]["test_accuracy"]
    assert by_k["all"]["accuracy_ci_low"] == result.rows[0]["test_accuracy_ci_low"]
    for row in result.shots:
        assert row["accuracy_ci_low"] <= row["mean_accuracy"] <= row["accuracy_ci_high"]
    assert (tmp_path / "out" / "shots.png").stat().st_size > 0


def test_k_shot_fits_never_see_val_or_test(tmp_path, cache_file, monkeypatch):
    data = load_cache_data(cache_file)
    allowed = {tuple(row) for row in data.train.X}
    seen = []
    import pipeline.heads.compare as compare_module

    original = compare_module._fit

    def spy(estimator, train, val):
        seen.append(train.X)
        return original(estimator, train, val)

    monkeypatch.setattr(compare_module, "_fit", spy)
    fit_and_write([cache_file], tmp_path / "out", heads=("logreg",), shots=(2,), draws=2)
    assert len(seen) == 3  # the full fit, then two 2-shot draws
    for X in seen[1:]:
        assert len(X) == 6 and all(tuple(row) in allowed for row in X)


def test_bad_inputs_are_pipeline_errors(tmp_path, cache_file):
    with pytest.raises(PipelineError):
        fit_and_write([cache_file], tmp_path / "out", heads=("nohead",))
    no_val = make_split_folder(tmp_path / "s", counts={"train": 4, "test": 2})
    path = extract_tiny(no_val, cache_dir=tmp_path / "c",
                        split_fractions=(1.0, 0.0, 0.0)).cache_path
    with pytest.raises(DataError, match="val split has no"):
        fit_and_write([path], tmp_path / "out", heads=("logreg",))
    with pytest.raises(PipelineError, match="no such cache"):
        fit_and_write([tmp_path / "missing.h5"], tmp_path / "out", heads=("logreg",))


def test_two_class_rows_carry_the_positive_class_recall(tmp_path):
    root = make_folder(tmp_path / "images", classes=("cat", "dog"), per_class=15)
    cache = extract_tiny(root, cache_dir=tmp_path / "c").cache_path
    default = fit_and_write([cache], tmp_path / "a", heads=("logreg",)).rows[0]
    chosen = fit_and_write([cache], tmp_path / "b", heads=("logreg",), positive="cat").rows[0]
    assert (default["positive_class"], chosen["positive_class"]) == ("dog", "cat")
    stored = RowPredictions.load(tmp_path / "a" / default["predictions"])
    dogs = stored.y_true == 1
    assert default["positive_recall"] == pytest.approx(np.mean(stored.y_pred[dogs] == 1))
    assert default["false_negative_rate"] == pytest.approx(1 - default["positive_recall"])
    with pytest.raises(PipelineError, match="positive must be one of the classes, 'cat', "
                                            "'dog', not 'fox'"):
        fit_and_write([cache], tmp_path / "c2", heads=("logreg",), positive="fox")

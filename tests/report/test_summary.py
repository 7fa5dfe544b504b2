"""pipeline report: intervals, rows compared on the same images, the sentence, leakage."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.errors import PipelineError
from pipeline.metrics.scoring import RowPredictions, results_row
from pipeline.metrics.significance import accuracy_interval, mcnemar_test, paired_difference
from pipeline.report.summary import compare_results, gather_results

N = 200
Y = np.arange(N) % 4
PATHS = np.array([f"test/{c}/{i:03d}.png" for i, c in enumerate(Y)])


def _predictions(right: int, seed: int = 0) -> np.ndarray:
    """Predictions right on the first ``right`` images and wrong on the others."""
    return np.where(np.arange(N) < right, Y, (Y + 1 + seed % 3) % 4)


def _proba(pred: np.ndarray) -> np.ndarray:
    proba = np.full((N, 4), 0.1)
    proba[np.arange(N), pred] = 0.7
    return proba


def _write_run(folder: Path, head: str, method: str, pred: np.ndarray, key: str = "k" * 20,
               leaked=None, order=None, stored: bool = True) -> dict:
    """A results.json of one row, as the stages write it, with its stored predictions."""
    row = results_row(backbone="resnet18", head=head, chosen="", y_true=Y, y_pred=pred,
                      proba=_proba(pred), n_classes=4, fit_s=1.0, predict_s=0.1,
                      cache_key=key, method=method)
    if stored:
        order = np.arange(N) if order is None else order
        RowPredictions(PATHS[order], Y[order], pred[order], _proba(pred)[order],
                       None if leaked is None else leaked[order],
                       ["a", "b", "c", "d"]).save(folder / "predictions" / f"{head}.npz")
        row["predictions"] = f"predictions/{head}.npz"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps([row]))
    return row


def test_each_row_is_compared_with_the_best_on_the_same_images(tmp_path):
    best, worse = _predictions(170), _predictions(150)
    _write_run(tmp_path / "heads", "logreg", "transfer", worse)
    _write_run(tmp_path / "finetune" / "unfreeze-1", "finetune-1", "fine-tune", best)
    result = compare_results(tmp_path)
    assert not (tmp_path / "report").exists()  # the stage computes; its result writes
    written = result.write(tmp_path / "report")
    assert sorted(f.name for f in written) == sorted(f.name for f in
                                                     (tmp_path / "report").iterdir())
    assert set(result.to_json()) == {"summary", "rows", "cache_keys", "files"}
    tuned, transfer = result.rows  # best first
    assert (tuned["head"], tuned["diff_vs_best"], tuned["p_vs_best"]) == ("finetune-1", 0, 1)
    expected = paired_difference(Y, worse, best)
    assert transfer["diff_vs_best"] == pytest.approx(-0.1)
    assert (transfer["diff_vs_best_ci_low"], transfer["diff_vs_best_ci_high"]) == \
        (expected.ci_low, expected.ci_high)
    assert transfer["p_vs_best"] == mcnemar_test(worse == Y, best == Y) == 2 * 0.5 ** 20
    assert (transfer["test_accuracy_ci_low"], transfer["test_accuracy_ci_high"]) == \
        accuracy_interval(150, N)
    md = (tmp_path / "report" / "report.md").read_text()
    first = md.splitlines()[0]
    assert first.startswith("Best: fine-tune resnet18 / finetune-1, test accuracy 0.850")
    assert "differ significantly on this data (difference +0.100" in first
    assert md == "\n\n".join(result.summary) + "\n\n" + md.split("\n\n", 1)[1]
    header = (tmp_path / "report" / "report.csv").read_text().splitlines()[0].split(",")
    assert header[4:7] == ["test_accuracy", "test_accuracy_ci_low", "test_accuracy_ci_high"]
    assert {"diff_vs_best", "diff_vs_best_ci_low", "diff_vs_best_ci_high", "p_vs_best",
            "ece", "ece_ci_low", "macro_f1_ci_high"} <= set(header)
    assert "repeats" not in header and "leaked_test_images" not in header  # none to show
    for name in ("report.png", "reliability.png", "report.json"):
        assert (tmp_path / "report" / name).stat().st_size > 0
    assert json.loads((tmp_path / "report" / "report.json").read_text())["summary"] == \
        result.summary


def test_a_difference_within_noise_is_called_so(tmp_path):
    _write_run(tmp_path / "a", "logreg", "transfer", _predictions(168))
    _write_run(tmp_path / "b", "mlp", "transfer", _predictions(160, seed=1))
    _write_run(tmp_path / "c", "finetune-1", "fine-tune", _predictions(171, seed=2))
    result = compare_results(tmp_path)
    result.write(tmp_path / "report")
    sentence = result.summary[0]
    assert ", though 1 of the 2 other rows is not significantly worse" in sentence  # not mlp
    assert "fine-tuning (best: finetune-1, 0.855) and transfer (best: logreg, 0.840) do not " \
           "differ significantly" in sentence
    assert [r["p_vs_best"] >= 0.05 for r in result.rows] == [True, True, False]


def test_only_rows_of_one_cache_key_are_compared(tmp_path):
    _write_run(tmp_path / "a", "logreg", "transfer", _predictions(150), key="a" * 20)
    _write_run(tmp_path / "b", "logreg-2", "transfer", _predictions(190), key="b" * 20)
    _write_run(tmp_path / "c", "finetune-1", "fine-tune", _predictions(160), key="a" * 20)
    result = compare_results(tmp_path)
    result.write(tmp_path / "report")
    assert result.cache_keys == ["a" * 20, "b" * 20]
    by_head = {r["head"]: r for r in result.rows}
    assert by_head["finetune-1"]["p_vs_best"] == 1 and by_head["logreg-2"]["p_vs_best"] == 1
    assert by_head["logreg"]["diff_vs_best"] == pytest.approx(-0.05)
    assert result.summary[0].startswith("On cache aaaaaaaa (resnet18): Best: fine-tune")
    assert result.summary[1].startswith("On cache bbbbbbbb (resnet18): Best: transfer")
    assert "only transfer rows were scored on these images" in result.summary[1]


def test_predictions_in_another_order_are_paired_image_by_image(tmp_path):
    best, worse = _predictions(170), _predictions(150)
    _write_run(tmp_path / "a", "logreg", "transfer", worse,
               order=np.random.default_rng(0).permutation(N))
    _write_run(tmp_path / "b", "finetune-1", "fine-tune", best)
    transfer = compare_results(tmp_path).rows[1]
    assert transfer["p_vs_best"] == mcnemar_test(worse == Y, best == Y)
    assert transfer["diff_vs_best"] == pytest.approx(-0.1)


def test_leaked_test_images_are_counted_and_left_out_of_a_second_score(tmp_path):
    leaked = np.zeros(N, dtype=bool)
    leaked[:12] = True  # all 12 right for both rows: they inflate the scores
    _write_run(tmp_path / "a", "logreg", "transfer", _predictions(150), leaked=leaked)
    _write_run(tmp_path / "b", "finetune-1", "fine-tune", _predictions(170), leaked=leaked)
    result = compare_results(tmp_path)
    result.write(tmp_path / "report")
    tuned, transfer = result.rows
    assert tuned["leaked_test_images"] == transfer["leaked_test_images"] == 12
    assert tuned["test_accuracy_without_leaked"] == pytest.approx(158 / 188)
    assert (transfer["test_accuracy_without_leaked_ci_low"],
            transfer["test_accuracy_without_leaked_ci_high"]) == accuracy_interval(138, 188)
    assert result.summary[1].startswith("Warning: 12 of 200 test images are identical to a "
                                           "training or validation image")
    assert "0.840 instead of 0.850" in result.summary[1]


def test_rows_without_stored_predictions_are_listed_but_not_compared(tmp_path):
    _write_run(tmp_path / "a", "logreg", "transfer", _predictions(150), stored=False)
    _write_run(tmp_path / "b", "finetune-1", "fine-tune", _predictions(170))
    result = compare_results(tmp_path)
    result.write(tmp_path / "report")
    assert [r["diff_vs_best"] for r in result.rows] == [0, ""]
    assert result.summary[-1].startswith("1 row(s) have no stored test predictions")
    assert "only fine-tune rows" in result.summary[0]


def test_seed_repeats_of_a_fine_tune_are_not_rows_of_their_own(tmp_path):
    run = tmp_path / "finetune" / "unfreeze-1"
    _write_run(run, "finetune-1", "fine-tune", _predictions(170))
    _write_run(run / "repeats" / "seed-1", "finetune-1", "fine-tune", _predictions(160))
    _write_run(tmp_path / "report", "stale", "transfer", _predictions(10))
    assert [r["head"] for r in gather_results(tmp_path)] == ["finetune-1"]


def test_a_damaged_predictions_file_is_one_clear_error(tmp_path):
    _write_run(tmp_path / "a", "logreg", "transfer", _predictions(150))
    (tmp_path / "a" / "predictions" / "logreg.npz").write_bytes(b"not a zip")
    with pytest.raises(PipelineError, match="cannot read stored predictions .* run the stage"):
        compare_results(tmp_path)


def test_tables_keep_small_values_such_as_a_learning_rate_of_1e_05(tmp_path):
    from pipeline.report.tables import write_table

    rows = [{"lr": lr, "test_accuracy": 0.86204, "p": p}
            for lr, p in ((0.1, 0.5), (1e-4, 0.0004), (1e-05, 2.5e-7), (0.0, float("nan")))]
    csv_path, md_path = write_table(rows, tmp_path / "sweep")
    lines = csv_path.read_text().splitlines()
    assert lines[1:] == ["0.1000,0.8620,0.5000", "0.0001,0.8620,0.0004",
                         "1e-05,0.8620,2.5e-07", "0.0000,0.8620,nan"]
    assert "| 1e-05 | 0.8620 | 2.5e-07 |" in md_path.read_text()

"""Mistakes to look at: the most confident wrong predictions, in order, drawn from their images;
the most-confused class pairs; a missing image is a tile, not an error."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix

from pipeline.core.options import ReportOptions
from pipeline.metrics.scoring import RowPredictions, results_row
from pipeline.report.mistakes import (
    best_row,
    confused_pairs,
    contact_sheet,
    contact_sheet_figure,
    top_mistakes,
)
from pipeline.report.summary import compare_results
from pipeline.store.run_record import RunRecord

CLASSES = ["cat", "dog", "fox"]


def _hand_built() -> RowPredictions:
    """Eight images: four right (one of them very confident), four wrong at 0.5 to 0.9."""
    y_true = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    y_pred = np.array([0, 2, 2, 1, 1, 0, 2, 0])
    proba = np.array([[0.99, 0.005, 0.005],  # right, the most confident of all
                      [0.2, 0.2, 0.6],  # wrong at 0.6
                      [0.1, 0.1, 0.8],  # right
                      [0.1, 0.9, 0.0],  # wrong at 0.9
                      [0.3, 0.4, 0.3],  # right
                      [0.5, 0.2, 0.3],  # wrong at 0.5
                      [0.1, 0.1, 0.8],  # wrong at 0.8
                      [0.6, 0.3, 0.1]])  # wrong at 0.6: ties keep the image order
    paths = np.array([f"test/{CLASSES[c]}/{i}.png" for i, c in enumerate(y_true)])
    return RowPredictions(paths, y_true, y_pred, proba, None, CLASSES)


def test_the_most_confident_wrong_predictions_come_first():
    shown = top_mistakes(_hand_built(), n=16)
    assert [m.index for m in shown] == [3, 6, 1, 7, 5]
    assert [m.probability for m in shown] == [0.9, 0.8, 0.6, 0.6, 0.5]
    first = shown[0]
    assert (first.path, first.true, first.predicted) == ("test/cat/3.png", "cat", "dog")
    assert [m.index for m in top_mistakes(_hand_built(), n=2)] == [3, 6]


def test_without_probabilities_the_wrong_images_keep_their_order():
    stored = _hand_built()
    stored.proba = None
    shown = top_mistakes(stored, n=3)
    assert [m.index for m in shown] == [1, 3, 5]
    assert all(np.isnan(m.probability) for m in shown)


def _solid(path: Path, colour: tuple[int, int, int]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (30, 20), colour).save(path)
    return path


def test_the_sheet_shows_each_mistake_in_order_with_its_own_image(tmp_path):
    stored = _hand_built()
    colours = {}
    for i, path in enumerate(stored.paths):
        colours[i] = (20 * i, 255 - 20 * i, 7 * i)
        _solid(tmp_path / path, colours[i])
    shown = top_mistakes(stored, n=4)
    fig = contact_sheet_figure(shown, tmp_path, "t", columns=3)
    tiles = [ax for ax in fig.axes if ax.images]
    assert len(tiles) == 4
    for ax, mistake in zip(tiles, shown):
        pixels = np.asarray(ax.images[0].get_array())
        assert tuple(pixels[0, 0]) == colours[mistake.index]
        assert ax.get_title() == (f"true: {mistake.true}\n"
                                  f"predicted: {mistake.predicted} ({mistake.probability:.2f})")
    path = contact_sheet(shown, tmp_path / "sheet.png", tmp_path)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_a_missing_or_broken_image_gets_an_unreadable_tile(tmp_path):
    stored = _hand_built()
    (tmp_path / "test" / "cat").mkdir(parents=True)
    (tmp_path / "test" / "cat" / "3.png").write_bytes(b"not an image")  # the first mistake
    shown = top_mistakes(stored, n=3)  # the others are not on disk at all
    fig = contact_sheet_figure(shown, tmp_path)
    tiles = [ax for ax in fig.axes if ax.images]
    assert len(tiles) == 3
    assert all([t.get_text() for t in ax.texts] == ["unreadable"] for ax in tiles)
    assert contact_sheet(shown, tmp_path / "sheet.png", tmp_path).stat().st_size > 0


def test_confused_pairs_match_a_hand_count():
    pairs = confused_pairs(_hand_built())
    # true -> predicted: cat -> dog (image 3), cat -> fox (6), dog -> fox (1), dog -> cat (7),
    # fox -> cat (5); cat has 3 test images, dog 3, fox 2.
    assert [(p["true"], p["predicted"], p["count"]) for p in pairs] == [
        ("fox", "cat", 1), ("cat", "dog", 1), ("cat", "fox", 1), ("dog", "cat", 1),
        ("dog", "fox", 1)]
    assert pairs[0]["share_of_true"] == 0.5 and pairs[1]["share_of_true"] == pytest.approx(1 / 3)


def test_confused_pairs_match_sklearns_confusion_matrix():
    rng = np.random.default_rng(0)
    y_true = rng.integers(0, 5, 400)
    y_pred = np.where(rng.random(400) < 0.6, y_true, rng.integers(0, 5, 400))
    stored = RowPredictions(np.array([f"{i}.png" for i in range(400)]), y_true, y_pred, None,
                            None, list("abcde"))
    matrix = confusion_matrix(y_true, y_pred, labels=range(5))
    pairs = confused_pairs(stored)
    off = matrix.copy()
    np.fill_diagonal(off, 0)
    assert len(pairs) == np.count_nonzero(off)
    for pair in pairs:
        t, p = "abcde".index(pair["true"]), "abcde".index(pair["predicted"])
        assert pair["count"] == matrix[t, p]
        assert pair["share_of_true"] == pytest.approx(matrix[t, p] / matrix[t].sum())
    counts = [p["count"] for p in pairs]
    assert counts == sorted(counts, reverse=True) and counts[0] == off.max()
    assert len(confused_pairs(stored, top=3)) == 3


def _run(folder: Path, head: str, stored: RowPredictions, root: Path | None) -> None:
    """A results.json of one row with its predictions, and the run.json naming the data."""
    row = results_row(backbone="resnet18", head=head, chosen="", y_true=stored.y_true,
                      y_pred=stored.y_pred, proba=stored.proba, n_classes=3, fit_s=1.0,
                      predict_s=0.1, cache_key="k" * 20, method="transfer")
    stored.save(folder / "predictions" / f"{head}.npz")
    row["predictions"] = f"predictions/{head}.npz"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps([row]))
    if root is not None:
        RunRecord("heads").update(cache_key="k" * 20, data=str(root)).write(folder / "run.json")


def test_the_report_draws_the_mistakes_of_its_best_row(tmp_path):
    data = tmp_path / "data"
    best = _hand_built()
    for path in best.paths:
        _solid(data / path, (200, 10, 10))
    worse = _hand_built()
    worse.y_pred = worse.y_true.copy()
    worse.y_pred[:6] = (worse.y_true[:6] + 1) % 3
    _run(tmp_path / "runs" / "a", "logreg", worse, data)
    _run(tmp_path / "runs" / "b", "mlp", best, data)
    result = compare_results(tmp_path / "runs", options=ReportOptions(mistakes=3))
    result.write(tmp_path / "runs" / "report")
    out = tmp_path / "runs" / "report"
    assert result.rows[0]["head"] == "mlp"  # the best row, whose mistakes are drawn
    assert result.files["mistakes_png"] == str(out / "mistakes.png")
    assert (out / "mistakes.png").read_bytes()[:4] == b"\x89PNG"
    lines = (out / "confused_pairs.csv").read_text().splitlines()
    assert lines[0] == "true,predicted,count,share_of_true"
    assert lines[1] == "fox,cat,1,0.5000" and len(lines) == 1 + 5
    md = (out / "report.md").read_text()
    assert md.rstrip().endswith(
        f"Mistakes of the best row (transfer resnet18 / mlp, 5 of 8 test images wrong): the 3 "
        f"most confident in mistakes.png (images read from {data}), the most-confused class "
        "pairs in confused_pairs.md (first: fox -> cat, 1 image, 50% of its class).")
    assert "mlp" in (out / "confused_pairs.md").read_text().splitlines()[0]


def test_best_row_is_the_most_accurate_with_predictions():
    rows = [{"test_accuracy": 0.9}, {"test_accuracy": 0.8}, {"test_accuracy": 0.8}]
    stored = _hand_built()
    assert best_row(rows, [None, stored, stored]) == 1
    assert best_row(rows, [stored, stored, stored]) == 0
    assert best_row(rows, [None, None, None]) is None

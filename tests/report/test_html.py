"""report.html: one self-contained page with every row, every plot embedded, nothing fetched."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from pipeline.metrics.scoring import RowPredictions, results_row
from pipeline.report import plots
from pipeline.report.compact import compact_rows
from pipeline.report.html import freeze_depth_series
from pipeline.report.summary import compare_results

N = 120
Y = np.arange(N) % 3
CLASSES = ["cat", "dog", "<b>fox</b>"]  # a folder name is not markup
PATHS = np.array([f"test/{CLASSES[c]}/{i:03d}.png" for i, c in enumerate(Y)])


class Page(HTMLParser):
    """What a test needs of the page: images, scripts, links, and each table's cells."""

    def __init__(self, text: str):
        super().__init__()
        self.images, self.links, self.scripts = [], [], []
        self.tables: dict[str, list[list[str]]] = {}
        self._table = self._row = None
        self._in_cell = False
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        elif tag == "link" or (tag == "a" and "href" in attrs):
            self.links.append(attrs.get("href", ""))
        elif tag == "script":
            self.scripts.append(attrs.get("src"))
        elif tag == "table":
            self._table = self.tables.setdefault(attrs.get("id", ""), [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._row.append("")
            self._in_cell = True

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._in_cell = False
        elif tag == "table":
            self._table = self._row = None

    def handle_data(self, data):
        if self._in_cell:
            self._row[-1] += data


def _run(folder: Path, head: str, method: str, right: int) -> None:
    pred = np.where(np.arange(N) < right, Y, (Y + 1) % 3)
    proba = np.full((N, 3), 0.15)
    proba[np.arange(N), pred] = 0.7
    row = results_row(backbone="resnet18", head=head, chosen="C=1", y_true=Y, y_pred=pred,
                      proba=proba, n_classes=3, fit_s=2.5, predict_s=0.1, cache_key="k" * 20,
                      method=method)
    RowPredictions(PATHS, Y, pred, proba, None, CLASSES).save(folder / "predictions" / "p.npz")
    row["predictions"] = "predictions/p.npz"
    (folder / "results.json").write_text(json.dumps([row]))
    (folder / "run.json").write_text(json.dumps({
        "stage": method, "command": f"pipeline {method} data/", "started": "2026-12-06T12:00",
        "seconds": 3.0, "cache_key": "k" * 20, "versions": {"torch": "2.14.1"}}))


@pytest.fixture
def report(tmp_path):
    """A run folder with two heads (and their k-shot plot), a freeze-depth sweep of three
    depths, and its report."""
    _run(tmp_path / "heads" / "a", "logreg", "transfer", 100)
    _run(tmp_path / "heads" / "b", "mlp", "transfer", 90)
    plots.curve_plot({"logreg": ([1, 5], [0.5, 0.7], [0.4, 0.6], [0.6, 0.8])},
                     tmp_path / "heads" / "shots.png", "k-shot", "k", "accuracy")
    depths = tmp_path / "finetune"
    for k, right in ((0, 95), (1, 105), (2, 98)):
        _run(depths / f"unfreeze-{k}", f"finetune-{k}", "fine-tune", right)
    (depths / "freeze_depth.csv").write_text(
        "blocks_unfrozen,test_accuracy,test_accuracy_ci_low,test_accuracy_ci_high\n"
        "0,0.792,0.71,0.86\n2,0.817,0.74,0.88\n1,0.875,0.80,0.93\n")
    result = compare_results(tmp_path)
    result.write(tmp_path / "report")
    return result, Path(result.files["report_html"])


def test_every_plot_is_embedded_and_nothing_is_fetched(report):
    result, path = report
    page = Page(path.read_text())
    assert len(page.images) == 7  # forest, accuracy, freeze depth, k-shot, confusion,
    for src in page.images:       # calibration, mistakes
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert page.links == [] and page.scripts == [None]  # the sorting script is inline
    assert "http://" not in path.read_text() and "https://" not in path.read_text()
    assert {"forest_png", "freeze_depth_png", "confusion_matrix_png"} <= set(result.files)


def test_every_row_of_the_compact_table_is_on_the_page(report):
    result, path = report
    page = Page(path.read_text())
    header, *body = page.tables["results"]
    compact = compact_rows(result.rows)
    assert header == list(compact[0])
    assert body == [[str(row[c]) for c in header] for row in compact]
    assert [row[header.index("head")] for row in body] == [
        "finetune-1", "logreg", "finetune-2", "finetune-0", "mlp"]


def test_class_names_are_escaped_and_the_records_listed(report):
    _, path = report
    text = path.read_text()
    assert "<b>fox</b>" not in text and "&lt;b&gt;fox&lt;/b&gt;" in text
    page = Page(text)
    per_class = page.tables["per-class"]
    assert [r[0] for r in per_class[1:]] == CLASSES and per_class[0][0] == "class"
    records = page.tables["records"][1:]
    assert len(records) == 6  # five runs and the report's own
    assert "pipeline transfer data/" in [r[1] for r in records]


def test_freeze_depth_series_sorts_depths_and_skips_single_runs(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "freeze_depth.csv").write_text(
        "blocks_unfrozen,test_accuracy,test_accuracy_ci_low,test_accuracy_ci_high\n"
        "2,0.8,0.7,0.9\n0,0.6,0.5,0.7\nall,0.9,0.8,1.0\n")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "freeze_depth.csv").write_text(
        "blocks_unfrozen,test_accuracy,test_accuracy_ci_low,test_accuracy_ci_high\n"
        "1,0.8,0.7,0.9\n")
    assert freeze_depth_series(tmp_path) == {"a": ([0, 2], [0.6, 0.8], [0.5, 0.7], [0.7, 0.9])}


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which(
        "google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="no headless browser on this machine (Debian: "
                    "apt-get install chromium); report.html is checked by parsing only")
@pytest.mark.parametrize("order", ["", "#sort=4", "#sort=-4"])
def test_a_browser_opens_the_page_and_sorts_the_table(report, order, tmp_path):
    result, path = report
    dom = subprocess.run(
        [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
         f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", path.as_uri() + order],
        capture_output=True, text=True, timeout=120, check=True).stdout
    header, *body = Page(dom).tables["results"]
    assert header[4] == "accuracy [95% CI]" and len(body) == len(result.rows)
    accuracy = [float(r[4].split()[0]) for r in body]
    expected = sorted(accuracy, reverse=order != "#sort=4")  # the report lists best first
    assert accuracy == expected
    assert "logreg" in dom and "data:image/png;base64," in dom


def test_the_layer_curve_and_the_advice_are_on_the_page_and_in_the_summary(tmp_path):
    _run(tmp_path / "heads", "logreg", "transfer", 100)
    curve = {"test": ([0, 1], [0.6, 0.8], [0.5, 0.7], [0.7, 0.9])}
    plots.curve_plot(curve, tmp_path / "heads" / "layers.png", "layers", "depth", "accuracy")
    advice = tmp_path / "advice"
    advice.mkdir()
    plots.curve_plot(curve, advice / "advice.png", "advice", "depth", "accuracy")
    sentence = "Advice (resnet18): heads only (--unfreeze 0; sweep 0,1): 100 per class."
    (advice / "advice.json").write_text(json.dumps({"sentence": sentence, "unfreeze": 0}))
    result = compare_results(tmp_path)
    result.write(tmp_path / "report")
    text = Path(result.files["report_html"]).read_text()
    assert sentence in result.summary and sentence in Path(result.files["report_md"]
                                                              ).read_text()
    captions = re.findall(r"<figcaption>(.*?)</figcaption>", text)
    assert captions[2:4] == ["Linear probe per layer: heads", "Advice: advice"]
    assert len(Page(text).images) == len(captions) == 7


def test_a_drift_json_in_the_run_folder_adds_a_drift_section(tmp_path):
    _run(tmp_path / "heads", "logreg", "transfer", 100)
    drift = tmp_path / "drift"
    drift.mkdir()
    sentence = "A harmful shift: NEW (50 images) (domain classifier AUC 0.900)."
    measure = {"ci_low": 0.1, "ci_high": 0.3, "p_value": 0.001}
    (drift / "drift.json").write_text(json.dumps({
        "sentence": sentence, "shifted": True, "harmful": True,
        "domain_classifier": {**measure, "auc": 0.9}, "mmd": {**measure, "mmd2": 0.0123},
        "label_shift": {**measure, "total_variation": 0.2},
        "novelty": {**measure, "excess": 0.0789, "statistic": 0.0789}}))
    plots.curve_plot({"x": ([0, 1], [0, 1], None, None)}, drift / "drift_gallery.png", "g",
                     "x", "y")
    (tmp_path / "other" / "drift").mkdir(parents=True)
    (tmp_path / "other" / "drift" / "drift.json").write_text("{}")  # not ours: left out
    result = compare_results(tmp_path)
    result.write(tmp_path / "report")
    text = Path(result.files["report_html"]).read_text()
    assert "<h2>Drift: drift</h2>" in text and sentence in text
    assert "0.0123" in text and "[0.1000, 0.3000]" in text
    assert "novel images (excess outlier share)" in text and "0.0789" in text
    assert "New images most unlike the reference" in text
    assert "Drift: other" not in text

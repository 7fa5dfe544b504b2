"""`predict` on images gives what the head gave on the cached features."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from pipeline.cache import read_split
from pipeline.compare import fit_heads
from pipeline.extract import extract_features
from pipeline.persistence import ModelFileError, load_head, save_head
from pipeline.predict import predict_images, write_predictions
from tests.conftest import TINY, write_image

DEMO = Path(__file__).resolve().parents[1] / "data" / "fashion-mnist-mini"


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads")
    cache = extract_features(DEMO, cache_dir=tmp_path_factory.mktemp("c"), **TINY).cache_path
    result = fit_heads([cache], ["logreg"], out)
    return cache, Path(result.rows[0]["model"])


def test_predict_on_demo_test_images_equals_predictions_on_cached_features(demo_model):
    cache, model = demo_model
    test = read_split(cache, "test")
    saved = load_head(model)
    classes = saved.meta["classes"]
    expected = {str(DEMO / p): classes[c] for p, c in
                zip(test.paths, saved.estimator.predict(test.X))}
    rows = predict_images(model, [DEMO / "test"], top_k=3, workers=0)
    assert len(rows) == len(expected) == 500
    assert {r["path"]: r["prediction"] for r in rows} == expected
    probs = saved.estimator.predict_proba(test.X)
    first = rows[0]
    assert [c for c, _ in first["top_k"]][0] == first["prediction"]
    assert first["probability"] == pytest.approx(probs[0].max(), abs=1e-5)


def test_unreadable_images_get_an_error_row_and_csv(tmp_path, demo_model):
    _, model = demo_model
    write_image(tmp_path / "ok.png", 1)
    (tmp_path / "bad.png").write_bytes(b"")
    rows = predict_images(model, [tmp_path / "bad.png", tmp_path / "ok.png"], workers=0)
    assert rows[0]["path"].endswith("bad.png") and rows[0]["error"]
    assert rows[1]["prediction"] in load_head(model).meta["classes"]
    stream = io.StringIO()
    write_predictions(rows, stream, top_k=2)
    header, bad, ok = stream.getvalue().splitlines()
    assert header == "path,prediction,probability,class1,p1,class2,p2,error"
    assert bad.endswith(rows[0]["error"]) and ok.count(",") == 7


def test_a_head_for_other_features_is_refused(tmp_path, demo_model):
    _, model = demo_model
    saved = load_head(model)
    meta = {**saved.meta, "spec": {**saved.meta["spec"], "image_size": 64,
                                   "preprocessing": {**saved.meta["spec"]["preprocessing"],
                                                     "crop": 64}}}
    other = save_head(tmp_path / "other.head", saved.estimator, meta)
    write_image(tmp_path / "img.png", 3)
    with pytest.raises(ModelFileError, match="preprocessing"):
        predict_images(other, [tmp_path / "img.png"], workers=0)
    wrong_dim = save_head(tmp_path / "dim.head", saved.estimator, {**saved.meta, "dim": 7})
    with pytest.raises(ModelFileError, match="expects 7 features"):
        predict_images(wrong_dim, [tmp_path / "img.png"], workers=0)

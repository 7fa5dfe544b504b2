"""`predict`: a head gives on images what it gave on the cached features; a fine-tuned network
gives its own softmax, without the feature path."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.core.options import PredictOptions
from pipeline.deploy.predict import predict_images, write_predictions
from pipeline.extract import batches
from pipeline.finetuning.network import FinetunedNetwork
from pipeline.models import feature_model
from pipeline.models.backbones import (
    build_classifier,
    replace_classifier,
    resolve_backbone,
)
from pipeline.store.cache import cache_info, read_split
from pipeline.store.persistence import ModelFileError, load_head, save_head
from tests.conftest import extract_tiny, fit_and_write, make_folder, write_image

DEMO = Path(__file__).resolve().parents[2] / "data" / "fashion-mnist-mini"


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("heads")
    cache = extract_tiny(DEMO, cache_dir=tmp_path_factory.mktemp("c")).cache_path
    result = fit_and_write([cache], out, heads=("logreg",))
    return cache, Path(result.rows[0]["model"])


def test_predict_on_demo_test_images_equals_predictions_on_cached_features(demo_model):
    cache, model = demo_model
    test = read_split(cache, "test")
    saved = load_head(model)
    classes = saved.meta["classes"]
    expected = {str(DEMO / p): classes[c] for p, c in
                zip(test.paths, saved.estimator.predict(test.X))}
    rows = predict_images(model, [DEMO / "test"], options=PredictOptions(top_k=3, workers=0)).rows
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
    rows = predict_images(model, [tmp_path / "bad.png", tmp_path / "ok.png"],
                          options=PredictOptions(workers=0)).rows
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
        predict_images(other, [tmp_path / "img.png"], options=PredictOptions(workers=0))
    wrong_dim = save_head(tmp_path / "dim.head", saved.estimator, {**saved.meta, "dim": 7})
    with pytest.raises(ModelFileError, match="expects 7 features"):
        predict_images(wrong_dim, [tmp_path / "img.png"], options=PredictOptions(workers=0))


def test_a_head_on_a_cache_gives_its_predictions_on_the_stored_features(demo_model):
    cache, model = demo_model
    saved = load_head(model)
    test = read_split(cache, "test")
    rows = {r["path"]: r for r in predict_images(model, [cache]).rows}
    assert len(rows) == cache_info(cache)["images"]
    classes = saved.meta["classes"]
    proba = saved.estimator.predict_proba(test.X)
    for path, c, p in zip(test.paths, saved.estimator.predict(test.X), proba):
        row = rows[str(DEMO / path)]
        # float32 features: the head's products differ in their last bits with the block size
        assert row["prediction"] == classes[c]
        assert row["probability"] == pytest.approx(p.max(), rel=1e-5)


# --- a fine-tuned network ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_network(tmp_path_factory):
    """A random-init 3-class resnet18 at 32 px, as finetune() returns one, and a cache of its
    images."""
    root = make_folder(tmp_path_factory.mktemp("net") / "images", per_class=3)
    cache = extract_tiny(root, cache_dir=tmp_path_factory.mktemp("c")).cache_path
    info = cache_info(cache)
    spec = resolve_backbone("resnet18", "none", image_size=32)
    module = build_classifier(spec)
    replace_classifier(spec, module, len(info["classes"]))
    with torch.no_grad():  # far from uniform probabilities, so a wrong order would show
        module.fc.weight.mul_(50)
    network = FinetunedNetwork.from_module(module, spec, info["classes"],
                                           request=info["request"], cache_key=info["key"],
                                           unfrozen=1)
    return network, root, cache


@pytest.fixture
def no_feature_path(monkeypatch):
    """Fail if anything of the feature path runs: feature model, feature batches."""
    def refuse(*_args, **_kw):
        raise AssertionError("a network went through the feature path")

    monkeypatch.setattr(batches, "feature_batches", refuse)
    monkeypatch.setattr(batches, "prepare_model", refuse)
    monkeypatch.setattr(feature_model, "make_feature_model", refuse)


def _softmax_of_module(network: FinetunedNetwork, paths) -> np.ndarray:
    transform = network.spec.preprocessing.transform()
    x = torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])
    with torch.no_grad():
        return torch.softmax(network.module(x), dim=1).numpy()


def test_the_result_writes_the_csv_it_prints_and_nothing_before(tiny_network, tmp_path):
    network, root, _ = tiny_network
    path = network.save(tmp_path / "model" / "tiny.net")
    result = predict_images(path, [root], options=PredictOptions(top_k=2, workers=0))
    assert [p.name for p in path.parent.iterdir()] == ["tiny.net"]  # computed, not written
    assert not (tmp_path / "out").exists()
    printed = io.StringIO(newline="")
    result.to_csv(printed)
    assert result.write(tmp_path / "out" / "predictions.csv") == [
        tmp_path / "out" / "predictions.csv"]
    # the bytes as printed: csv's own line ends, not translated
    assert (tmp_path / "out" / "predictions.csv").read_bytes().decode() == printed.getvalue()
    header = printed.getvalue().splitlines()[0]
    assert header == "path,prediction,probability,class1,p1,class2,p2,error"
    assert result.to_json() == {"model": str(path), "predictions": result.rows}
    assert len(result.rows) == len(list(root.rglob("*.png")))


def test_a_network_classifies_images_by_the_softmax_of_its_logits(tiny_network,
                                                                   no_feature_path):
    network, root, _ = tiny_network
    rows = predict_images(network, [root], options=PredictOptions(top_k=3, workers=0)).rows
    expected = _softmax_of_module(network, [r["path"] for r in rows])
    got = np.array([[dict(r["top_k"])[c] for c in network.classes] for r in rows])
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert [r["prediction"] for r in rows] == [network.classes[i] for i in expected.argmax(1)]
    assert not network.module.training and next(network.module.parameters()).device.type == "cpu"


def test_a_saved_network_reads_the_images_of_a_cache(tiny_network, no_feature_path, tmp_path):
    network, root, cache = tiny_network
    path = network.save(tmp_path / "tiny.net")
    from_cache = predict_images(path, [cache], options=PredictOptions(workers=0)).rows
    from_images = predict_images(network, [root], options=PredictOptions(workers=0)).rows
    assert len(from_cache) == len(from_images) == 9
    by_path = {r["path"]: r for r in from_images}
    for row in from_cache:
        assert row["prediction"] == by_path[row["path"]]["prediction"]
        assert row["probability"] == pytest.approx(by_path[row["path"]]["probability"])


def test_a_network_for_other_preprocessing_is_refused(tiny_network, tmp_path):
    network, root, _ = tiny_network
    spec = {**network.meta["spec"],
            "preprocessing": {**network.meta["spec"]["preprocessing"], "crop": 64}}
    other = FinetunedNetwork(network.module, network.spec, {**network.meta, "spec": spec})
    with pytest.raises(ModelFileError, match="preprocessing"):
        predict_images(other.save(tmp_path / "other.net"), [root],
                       options=PredictOptions(workers=0))

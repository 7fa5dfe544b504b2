"""Test-time augmentation: a mirror-blind network gets exactly its plain answer, another the
mean over its views; heads average over each view's features; fine-tune adds a +tta row."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image, ImageOps
from torch import nn
from torchvision.transforms import v2

from pipeline.cli.main import main
from pipeline.core.errors import OptionError
from pipeline.core.options import PredictOptions
from pipeline.deploy.predict import predict_images
from pipeline.finetuning.network import FinetunedNetwork
from pipeline.finetuning.tta import TTAError, average, input_size, transform, view_count, views
from pipeline.metrics.scoring import RowPredictions
from pipeline.models.backbones import build_classifier, replace_classifier, resolve_backbone
from tests.conftest import extract_tiny, fit_and_write, make_folder

CLASSES = ["cat", "dog", "fox"]
TINY_ARGS = ["--backbone", "resnet18", "--weights", "none", "--image-size", "32",
             "--workers", "0"]


class _MirrorBlind(nn.Module):
    """A network that cannot tell an image from its mirror: it sees their mean."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner((x + x.flip(-1)) / 2)


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_folder(tmp_path_factory.mktemp("tta") / "images", per_class=3)


@pytest.fixture(scope="module")
def network() -> FinetunedNetwork:
    """A random-init 3-class resnet18 at 32 px, neither uniform nor saturated."""
    spec = resolve_backbone("resnet18", "none", image_size=32)
    module = build_classifier(spec)
    replace_classifier(spec, module, len(CLASSES))
    with torch.no_grad():
        module.fc.weight.mul_(3)
    return FinetunedNetwork(module.eval(), spec, {"classes": CLASSES})


def _probabilities(rows: list[dict]) -> np.ndarray:
    return np.array([[dict(r["top_k"])[c] for c in CLASSES] for r in rows])


def _softmax(module: nn.Module, x: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return torch.softmax(module(x).double(), dim=1).numpy()


def _batch(paths, preprocess) -> torch.Tensor:
    return torch.stack([preprocess(Image.open(p).convert("RGB")) for p in paths])


def test_a_mirror_blind_network_gets_exactly_its_plain_prediction(network, images):
    blind = FinetunedNetwork(_MirrorBlind(network.module).eval(), network.spec, network.meta)
    plain = predict_images(blind, [images], options=PredictOptions(top_k=3, workers=0)).rows
    flipped = predict_images(blind, [images],
                             options=PredictOptions(top_k=3, workers=0, tta="flip")).rows
    assert [r["top_k"] for r in flipped] == [r["top_k"] for r in plain]  # to the last bit
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(average(blind.predict_proba, x, "flip", 32),
                                  blind.predict_proba(x))


def test_another_network_gets_the_mean_over_the_image_and_its_mirror(network, images):
    plain = predict_images(network, [images], options=PredictOptions(top_k=3, workers=0)).rows
    rows = predict_images(network, [images],
                          options=PredictOptions(top_k=3, workers=0, tta="flip")).rows
    x = _batch([r["path"] for r in rows], network.spec.preprocessing.transform())
    expected = (_softmax(network.module, x) + _softmax(network.module, x.flip(-1))) / 2
    np.testing.assert_allclose(_probabilities(rows), expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(_probabilities(rows), _probabilities(plain), atol=1e-3)
    assert [r["prediction"] for r in rows] == [CLASSES[i] for i in expected.argmax(1)]


def test_crops_are_torchvisions_ten_crops_at_the_resize_size(network, images):
    recipe = network.spec.preprocessing  # resize 36, crop 32
    assert (input_size(recipe, "crops"), view_count(recipe, "crops")) == (36, 10)
    x = torch.randn(2, 3, 36, 36, generator=torch.Generator().manual_seed(0))
    cut = views(x, "crops", 32)
    assert len(cut) == 10 and all(v.shape == (2, 3, 32, 32) for v in cut)
    assert torch.equal(cut[4], x[..., 2:34, 2:34])  # the centre crop
    assert torch.equal(cut[0], x[..., :32, :32])  # a corner
    for first in cut[:5]:  # each crop's mirror is among the other five
        assert any(torch.equal(first.flip(-1), other) for other in cut[5:])
    rows = predict_images(network, [images],
                          options=PredictOptions(top_k=3, workers=0, tta="crops")).rows
    tensor = v2.Compose([v2.PILToTensor(), v2.Resize(36, antialias=True), v2.CenterCrop(36),
                         v2.ToDtype(torch.float32, scale=True),
                         v2.Normalize(list(recipe.mean), list(recipe.std))])
    big = _batch([r["path"] for r in rows], tensor)
    expected = np.mean([_softmax(network.module, c) for c in v2.TenCrop(32)(big)], axis=0)
    np.testing.assert_allclose(_probabilities(rows), expected, rtol=1e-5, atol=1e-7)


def test_crops_are_the_mirror_alone_where_the_recipe_does_not_crop(network):
    recipe = replace(network.spec.preprocessing, resize=32)
    assert (input_size(recipe, "crops"), view_count(recipe, "crops")) == (32, 2)
    x = torch.randn(1, 3, 32, 32)
    assert len(views(x, "crops", 32)) == 2
    assert transform(recipe, "crops")(Image.new("RGB", (50, 40))).shape == (3, 32, 32)


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A logistic-regression head on the tiny backbone's features, and its cache."""
    root = make_folder(tmp_path_factory.mktemp("head") / "images", per_class=8)
    cache = extract_tiny(root, cache_dir=tmp_path_factory.mktemp("c")).cache_path
    result = fit_and_write([cache], tmp_path_factory.mktemp("heads"), heads=("logreg",))
    return Path(result.rows[0]["model"]), root, cache


def test_a_head_averages_over_the_features_of_each_view(head, tmp_path):
    model, root, _ = head
    paths = sorted(root.glob("*/*.png"))[:6]
    mirrors = []
    for i, path in enumerate(paths):
        mirrors.append(tmp_path / f"{i}.png")
        ImageOps.mirror(Image.open(path)).save(mirrors[-1])
    plain = _probabilities(predict_images(model, paths,
                                          options=PredictOptions(top_k=3, workers=0)).rows)
    mirrored = _probabilities(predict_images(model, mirrors,
                                             options=PredictOptions(top_k=3, workers=0)).rows)
    rows = predict_images(model, paths, options=PredictOptions(top_k=3, workers=0, tta="flip")).rows
    np.testing.assert_allclose(_probabilities(rows), (plain + mirrored) / 2, rtol=1e-4,
                               atol=1e-6)
    assert not np.allclose(_probabilities(rows), plain, atol=1e-4)


def test_a_head_refuses_tta_on_cached_features(head):
    model, _, cache = head
    with pytest.raises(TTAError, match="needs images") as err:
        predict_images(model, [cache], options=PredictOptions(tta="flip", workers=0))
    assert err.value.path == cache and "--" not in str(err.value)  # a script meets it too
    result = CliRunner().invoke(main, ["predict", str(model), str(cache), "--tta", "flip"])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"Error: test-time augmentation needs images: {cache} holds the features of the plain "
        "images only; give the image files or folders instead; or predict without --tta"]
    with pytest.raises(OptionError, match="tta must be one of 'flip', 'crops' or unset"):
        PredictOptions(tta="mirror")


def test_finetune_tta_writes_its_own_row_that_the_report_lists(tmp_path):
    images = make_folder(tmp_path / "images", per_class=10).resolve()
    out = tmp_path / "runs" / "finetune"
    tuned = CliRunner().invoke(main, [str(a) for a in (
        "finetune", images, *TINY_ARGS, "--cache-dir", tmp_path / "c", "--epochs", "1",
        "--batch-size", "4", "--out", out, "--tta", "flip", "--quiet")])
    assert tuned.exit_code == 0, tuned.output
    run = out / "unfreeze-1"
    plain, tta = json.loads((run / "results.json").read_text())
    assert (plain["head"], tta["head"]) == ("finetune-1", "finetune-1+tta")
    assert tta["chosen"] == plain["chosen"] + ",tta=flip"
    assert tta["predictions"] != plain["predictions"] and tta["model"] == plain["model"]
    stored = RowPredictions.load(run / tta["predictions"])
    assert tta["test_accuracy"] == np.mean(stored.y_pred == stored.y_true)
    np.testing.assert_array_equal(stored.paths, RowPredictions.load(
        run / plain["predictions"]).paths)
    # The stored probabilities are the saved network's, averaged over image and mirror.
    rows = predict_images(tta["model"], [images / p for p in stored.paths],
                          options=PredictOptions(top_k=3, workers=0, tta="flip")).rows
    np.testing.assert_allclose(_probabilities(rows), stored.proba, rtol=1e-4, atol=1e-6)
    report = CliRunner().invoke(main, ["report", str(tmp_path / "runs"), "--json"])
    assert report.exit_code == 0, report.output
    listed = json.loads(report.stdout)
    assert sorted(r["head"] for r in listed["rows"]) == ["finetune-1", "finetune-1+tta"]
    assert "p_vs_best" in listed["rows"][1]  # the two are compared image by image
    assert Path(listed["files"]["mistakes_png"]).exists()
    assert f"images read from {images}" in Path(listed["files"]["report_md"]).read_text()

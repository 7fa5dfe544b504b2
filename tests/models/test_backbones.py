"""The backbone registry: recipes, weights, and a bottleneck that is the classifier's input."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_sample_images
from torchvision.models import ResNet18_Weights

from pipeline.core.errors import BackboneError, WeightsError
from pipeline.core.options import ExtractOptions
from pipeline.data.images import ImageFiles, load_image_set
from pipeline.extract.features import extract_features
from pipeline.models.backbones import (
    build_classifier,
    build_feature_model,
    list_backbones,
    resolve_backbone,
)
from pipeline.models.weights import (
    BundledWeights,
    DefaultWeights,
    EnumWeights,
    FileWeights,
    HubTag,
    RandomInit,
    parse_weights,
)
from tests.conftest import make_folder

FAMILIES = ["resnet18", "vgg11", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny",
            "densenet121", "regnet_y_400mf"]


@pytest.mark.parametrize("name", FAMILIES)
def test_cached_bottleneck_through_final_layer_gives_the_logits(tmp_path, name):
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=3)
    spec = resolve_backbone(name, "none", image_size=32)  # random init seeded as extract's
    result = extract_features(root, backbone=spec, options=ExtractOptions(
        workers=0, cache_dir=tmp_path / "c", split_fractions=(1.0, 0.0, 0.0)))
    model = build_classifier(spec)
    images = load_image_set(root, (1.0, 0.0, 0.0))
    files = ImageFiles(images, spec.preprocessing.transform(), (3, 32, 32))
    x = torch.stack([files[i][0] for i in range(len(files))])
    final = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with h5py.File(result.cache_path) as f:
        cached = torch.from_numpy(f["features"][:])
    assert cached.shape == (6, final.in_features) and cached.dtype == torch.float32
    with torch.inference_mode():
        torch.testing.assert_close(final(cached), model(x), rtol=1e-4, atol=1e-4)


def test_offline_lite0_weights_are_real_imagenet_weights():
    spec = resolve_backbone("efficientnet_lite0")
    assert spec.weights.pretrained and len(spec.weights.sha256) == 64
    assert spec.preprocessing.mean == (0.5, 0.5, 0.5)  # inputs scaled to [-1, 1]
    model, transform = build_classifier(spec), spec.preprocessing.transform()
    categories = ResNet18_Weights.IMAGENET1K_V1.meta["categories"]
    samples = load_sample_images()
    expected = {"china.jpg": {"palace", "monastery", "bell cote", "pagoda", "church"},
                "flower.jpg": {"daisy", "bee", "sea anemone", "pot", "vase"}}
    for filename, pixels in zip(samples.filenames, samples.images):
        x = transform(Image.fromarray(pixels)).unsqueeze(0)
        with torch.inference_mode():
            top5 = {categories[i] for i in model(x)[0].topk(5).indices}
        wanted = expected[filename.rsplit("/", 1)[-1]]
        assert len(top5 & wanted) >= 2, (filename, top5)


def test_missing_torchvision_weights_name_the_file_and_folder(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as err:
        resolve_backbone("resnet18", offline=True)  # tests/test_weights_download.py: online
    message = str(err.value)
    assert "resnet18-f37072fd.pth" in message and str(tmp_path / "hub" / "checkpoints") in message
    assert "\n" not in message


def test_hub_cache_weights_are_found_and_identified(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.manual_seed(1)
    state = build_classifier(resolve_backbone("resnet18", "none")).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    spec = resolve_backbone("resnet18")
    assert spec.weights.identity == "ResNet18_Weights.IMAGENET1K_V1"
    loaded = build_classifier(spec).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_weights_path_loads_that_file(tmp_path):
    torch.manual_seed(2)
    state = build_classifier(resolve_backbone("resnet18", "none")).state_dict()
    torch.save({"model": state}, tmp_path / "mine.pth")  # a training checkpoint wraps it
    spec = resolve_backbone("resnet18", str(tmp_path / "mine.pth"))
    assert spec.weights.identity == "file:mine.pth" and spec.weights.sha256
    loaded = build_classifier(spec).state_dict()
    assert torch.equal(loaded["fc.weight"], state["fc.weight"])


@pytest.mark.parametrize("text, expected", [
    ("default", DefaultWeights("default")),
    ("DEFAULT", DefaultWeights("DEFAULT")),
    ("None", RandomInit("None")),
    ("bundled", BundledWeights("bundled")),
    ("tag:a1_in1k", HubTag("tag:a1_in1k", tag="a1_in1k")),
    ("IMAGENET1K_V2", EnumWeights("IMAGENET1K_V2", member="IMAGENET1K_V2")),
    ("ResNet50_Weights.IMAGENET1K_V2",
     EnumWeights("ResNet50_Weights.IMAGENET1K_V2", "IMAGENET1K_V2", "ResNet50_Weights")),
    ("ResNet18_Weights.IMAGENET1K_V1",
     EnumWeights("ResNet18_Weights.IMAGENET1K_V1", "IMAGENET1K_V1", "ResNet18_Weights")),
    ("ResNet50_Weights.DEFAULT", EnumWeights("ResNet50_Weights.DEFAULT", "DEFAULT",
                                             "ResNet50_Weights")),
    ("mine.pth", FileWeights("mine.pth", path=Path("mine.pth"))),
    ("mine.safetensors", FileWeights("mine.safetensors", path=Path("mine.safetensors"))),
    ("pytorch_model.bin", FileWeights("pytorch_model.bin", path=Path("pytorch_model.bin"))),
    ("checkpoints/best", FileWeights("checkpoints/best", path=Path("checkpoints/best"))),
    # not an enum spelling: a file that may not exist
    ("run.v2.ckpt", FileWeights("run.v2.ckpt", path=Path("run.v2.ckpt"))),
])
def test_weights_strings_are_parsed_once_into_their_kind(text, expected):
    request = parse_weights(text)
    assert request == expected and type(request) is type(expected) and request.text == text
    assert parse_weights(request) is request  # a parsed request passes through


def test_an_existing_file_is_a_file_whatever_its_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "IMAGENET1K_V1").write_bytes(b"")
    assert parse_weights("IMAGENET1K_V1") == FileWeights("IMAGENET1K_V1",
                                                         path=Path("IMAGENET1K_V1"))
    assert isinstance(parse_weights(tmp_path / "x"), FileWeights)  # a Path is always a file


def test_an_enum_with_its_class_builds_those_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    torch.manual_seed(3)
    state = build_classifier(resolve_backbone("resnet18", "none")).state_dict()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    spec = resolve_backbone("resnet18", "ResNet18_Weights.IMAGENET1K_V1", offline=True)
    assert spec.weights.identity == "ResNet18_Weights.IMAGENET1K_V1"
    assert torch.equal(build_classifier(spec).state_dict()["fc.weight"], state["fc.weight"])
    with pytest.raises(WeightsError, match="are not weights of resnet18"):
        resolve_backbone("resnet18", "ResNet50_Weights.IMAGENET1K_V1", offline=True)


def test_kinds_a_family_does_not_have_are_refused_in_one_line():
    with pytest.raises(WeightsError, match="torchvision weights are enum members"):
        resolve_backbone("resnet18", "bundled")
    with pytest.raises(WeightsError, match="efficientnet_lite0 takes the weights default"):
        resolve_backbone("efficientnet_lite0", "IMAGENET1K_V1")
    with pytest.raises(WeightsError, match="timm weights are chosen by tag"):
        resolve_backbone("timm/resnet18", "IMAGENET1K_V1")


def test_weights_that_do_not_fit_are_refused(tmp_path):
    torch.save({"fc.weight": torch.zeros(2, 2)}, tmp_path / "wrong.pth")
    with pytest.raises(WeightsError, match="does not fit"):
        build_classifier(resolve_backbone("resnet18", str(tmp_path / "wrong.pth")))
    (tmp_path / "junk.pth").write_bytes(b"junk")
    with pytest.raises(WeightsError, match="cannot read"):
        build_classifier(resolve_backbone("resnet18", str(tmp_path / "junk.pth")))
    with pytest.raises(WeightsError, match="does not exist"):
        resolve_backbone("resnet18", str(tmp_path / "absent.pth"))


def test_unknown_backbone_weights_and_layer(tmp_path):
    with pytest.raises(BackboneError, match="unknown backbone"):
        resolve_backbone("resnet1000")
    with pytest.raises(WeightsError, match="no weights"):
        resolve_backbone("resnet18", "IMAGENET9K")
    with pytest.raises(BackboneError, match="no layer"):
        build_feature_model(resolve_backbone("resnet18", "none", layer="layer9"))


def test_layer_option_pools_that_node():
    spec = resolve_backbone("resnet18", "none", layer="layer3", pool="max")
    features = build_feature_model(spec)
    model = build_classifier(spec)  # the same seeded random weights
    seen = {}
    model.layer3.register_forward_hook(lambda _m, _i, out: seen.update(layer3=out))
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        model(x)
        np.testing.assert_allclose(features(x).numpy(),
                                   seen["layer3"].amax(dim=(2, 3)).numpy(), rtol=1e-5, atol=1e-6)
    assert features(x).shape == (2, 256)


def test_random_init_is_seeded_and_the_seed_is_part_of_the_key():
    a = resolve_backbone("resnet18", "none", seed=0)
    b = resolve_backbone("resnet18", "none", seed=1)
    assert a.key()["weights"] != b.key()["weights"]
    w0, w0_again = (build_classifier(a).fc.weight for _ in range(2))
    assert torch.equal(w0, w0_again)
    assert not torch.equal(w0, build_classifier(b).fc.weight)


def test_image_size_keeps_the_recipes_resize_ratio():
    spec = resolve_backbone("resnet18", "none", image_size=112)
    assert (spec.preprocessing.crop, spec.preprocessing.resize) == (112, 128)  # 224:256


def test_every_registered_backbone_resolves_with_its_recipe():
    names = list_backbones()
    assert names[0] == "efficientnet_lite0" and "resnet50" in names and len(names) > 50
    for name in names:
        spec = resolve_backbone(name, "none")
        prep = spec.preprocessing
        assert prep.crop > 0 and prep.resize >= prep.crop and len(prep.mean) == 3, name
        assert spec.key()["weights"] == "none(seed=0)" and not spec.weights.pretrained


def test_a_resolution_is_remembered_while_the_weights_file_is_unchanged(tmp_path, monkeypatch):
    torch.manual_seed(4)
    state = build_classifier(resolve_backbone("resnet18", "none")).state_dict()
    torch.save(state, tmp_path / "mine.pth")
    first = resolve_backbone("resnet18", str(tmp_path / "mine.pth"))
    hashed = []
    monkeypatch.setattr("pipeline.models.weights.file_sha256",
                        lambda p: hashed.append(p) or "x" * 64)
    again = resolve_backbone("resnet18", str(tmp_path / "mine.pth"))
    assert again.key() == first.key() and hashed == []  # remembered: not hashed again
    torch.save({k: v + 1 if v.is_floating_point() else v for k, v in state.items()},
               tmp_path / "mine.pth")  # another size or mtime: resolved and hashed again
    changed = resolve_backbone("resnet18", str(tmp_path / "mine.pth"))
    assert hashed and changed.weights.sha256 == "x" * 64


def test_a_remembered_resolution_builds_nothing_and_imports_no_family(monkeypatch):
    first = resolve_backbone("resnet18", "none", image_size=48, seed=2)
    monkeypatch.setattr("pipeline.models.families.get_family", lambda name: pytest.fail("resolved"))
    again = resolve_backbone("resnet18", "none", image_size=48, seed=2)
    assert again == first and again.request["seed"] == 2

"""The family registry: every family answers the same questions, and a new one is one class."""

from __future__ import annotations

import sys

import h5py
import pytest
import torch
from torch import nn

from pipeline.core.errors import BackboneError
from pipeline.core.options import ExtractOptions
from pipeline.extract.features import extract_features
from pipeline.models import families
from pipeline.models.backbones import (
    build_classifier,
    build_feature_model,
    list_backbones,
    resolve_backbone,
)
from pipeline.models.blocks import Block, find_blocks, freeze_below
from pipeline.models.families import family_of
from pipeline.models.families.base import Family, Resolution
from pipeline.models.preprocessing import Preprocessing
from pipeline.models.weights import RandomInit, random_init
from tests.conftest import make_folder

# One small architecture per registered family, random init so nothing is downloaded.
REPRESENTATIVE = {"lite0": "efficientnet_lite0", "timm": "timm/resnet10t",
                  "torchvision": "resnet18"}


def test_every_registered_family_has_a_representative_here():
    assert set(families.list_families()) == set(REPRESENTATIVE)


@pytest.mark.parametrize("family", sorted(REPRESENTATIVE))
def test_every_family_answers_the_same_questions(family):
    spec = resolve_backbone(REPRESENTATIVE[family], "none", image_size=64)
    assert spec.family == family and family_of(spec).name == family
    model = build_classifier(spec)
    name, final = family_of(spec).classifier(model)
    assert model.get_submodule(name) is final
    x = torch.randn(2, 3, 64, 64)
    features = build_feature_model(spec)  # checks that the bottleneck gives the model's own logits
    with torch.inference_mode():
        assert features(x).shape == (2, final.in_features)
    blocks = family_of(spec).blocks(model)
    assert blocks and all(isinstance(b, Block) for b in blocks)
    assert family_of(spec).layer_names(model)
    head = family_of(spec).replace_classifier(model, 3)
    with torch.inference_mode():
        assert model(x).shape == (2, 3) and head.out_features == 3


def test_names_go_to_the_family_that_claims_them():
    assert families.family_for("efficientnet_lite0") == "lite0"
    assert families.family_for("timm/resnet50.a1_in1k") == "timm"
    assert families.family_for("resnet50") == "torchvision"  # the fallback
    assert list_backbones()[0] == "efficientnet_lite0"


def test_a_family_is_registered_once():
    with pytest.raises(ValueError, match="already registered"):
        families.register_family("timm", "x:Y", lambda name: False)
    with pytest.raises(ValueError, match="only one backbone family can be the fallback"):
        families.register_family("other", "x:Y", None)


def test_lite0_keys_stay_those_of_timm():
    """Caches written before the adapters recorded the bundled Lite0 as timm's."""
    assert resolve_backbone("efficientnet_lite0", "none").key()["family"] == "timm"


# --- a new family: one class and one registration -----------------------------------------------

class TwoStageNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.stage1 = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU())
        self.stage2 = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.pool(self.stage2(self.stage1(self.stem(x)))).flatten(1))


class ToyFamily(Family):
    name = "toy"

    def resolve(self, name, request, offline):
        if not isinstance(request, RandomInit):
            raise BackboneError("toy networks have no pretrained weights")
        return Resolution("two-stage", random_init(0),
                          Preprocessing(36, 32, (0.5,) * 3, (0.5,) * 3, "bilinear"))

    def build(self, spec):
        return TwoStageNet()

    def blocks(self, model):
        return [Block("stage1", ("stage1",)), Block("stage2", ("stage2",))]


@pytest.fixture
def toy_family(monkeypatch):
    monkeypatch.setattr(families, "_REGISTRY", dict(families._REGISTRY))
    monkeypatch.setattr(families, "_LOADED", dict(families._LOADED))
    families.register_family("toy", f"{__name__}:ToyFamily", lambda n: n.startswith("toy/"))
    assert sys.modules[__name__].ToyFamily is ToyFamily


def test_a_new_family_is_one_class_and_one_registration(toy_family, tmp_path):
    spec = resolve_backbone("toy/two-stage", "none", seed=3)
    assert spec.key()["family"] == "toy" and spec.arch == "two-stage"
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=3)
    result = extract_features(root, backbone=spec, options=ExtractOptions(
        seed=3, workers=0, cache_dir=tmp_path / "c", split_fractions=(1.0, 0.0, 0.0)))
    with h5py.File(result.cache_path) as f:
        assert f["features"].shape == (6, 16)  # the input of TwoStageNet.fc
    model = build_classifier(spec)
    head = family_of(spec).replace_classifier(model, 2)
    top = freeze_below(model, spec.family, 1, head)
    assert [b.name for b in top] == ["stage2"]
    assert [b.name for b in find_blocks(model, "toy")] == ["stage1", "stage2"]
    assert not model.stage1[0].weight.requires_grad and model.stage2[0].weight.requires_grad

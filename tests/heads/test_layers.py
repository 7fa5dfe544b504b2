"""Several layers in one pass and one cache, and the linear probe on each layer."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from pipeline.core.errors import BackboneError
from pipeline.models.backbones import build_feature_model, resolve_backbone
from pipeline.store.integrity import verify_cache
from tests.conftest import extract_tiny, fit_and_write, make_split_folder


@pytest.fixture(scope="module")
def layered(tmp_path_factory):
    root = make_split_folder(tmp_path_factory.mktemp("layers") / "data",
                             counts={"train": 8, "val": 4, "test": 4}, classes=("a", "b", "c"))
    cache_dir = root.parent / "cache"
    return root, cache_dir, extract_tiny(root, cache_dir=cache_dir, layer="blocks")


def test_blocks_come_out_of_one_pass_side_by_side_with_a_view_per_layer(layered):
    root, cache_dir, result = layered
    single = {name: extract_tiny(root, cache_dir=cache_dir,
                                     layer=None if name == "bottleneck" else name)
              for name in ("layer2", "bottleneck")}
    with h5py.File(result.cache_path) as f:
        layers = json.loads(f.attrs["layers"])
        assert [name for name, _, _ in layers] == ["layer1", "layer2", "layer3", "bottleneck"]
        assert layers[-1][2] == result.dim == f["features"].shape[1]
        for name, start, stop in layers:
            assert np.array_equal(f[f"layers/{name}"][:], f["features"][:, start:stop])
        for name, one in single.items():
            with h5py.File(one.cache_path) as g:
                assert np.allclose(f[f"layers/{name}"][:], g["features"][:], atol=1e-4)
    assert verify_cache(result.cache_path)["status"] == "ok"
    again = extract_tiny(root, cache_dir=cache_dir, layer="blocks")
    assert again.hit and again.cache_path == result.cache_path


def test_the_heads_draw_the_probe_of_every_layer(layered, tmp_path):
    _, _, result = layered
    comparison = fit_and_write([result.cache_path], tmp_path, heads=("logreg",))
    assert [r["layer"] for r in comparison.layers] == ["layer1", "layer2", "layer3",
                                                       "bottleneck"]
    assert [r["features"] for r in comparison.layers] == [64, 128, 256, 512]
    for row in comparison.layers:
        assert row["test_accuracy_ci_low"] <= row["test_accuracy"] <= row["test_accuracy_ci_high"]
    assert (tmp_path / "layers.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "layers.csv").read_text().splitlines()[0].startswith("backbone,layer")


def test_an_unknown_or_repeated_layer_is_refused():
    for layers, error in (("layer1,layer9", "no layer 'layer9'"),
                          ("layer1,layer1", "same node twice")):
        with pytest.raises(BackboneError, match=error):
            build_feature_model(resolve_backbone("resnet18", "none", layer=layers,
                                                 image_size=32))


def test_the_default_heads_on_a_multi_layer_cache_add_the_multi_layer_head(layered, tmp_path):
    _, _, result = layered
    comparison = fit_and_write([result.cache_path], tmp_path)
    rows = {r["head"]: r for r in comparison.rows}
    assert list(rows) == ["logreg", "mlp", "linear", "multilayer"]
    chosen = dict(part.split("=", 1) for part in rows["multilayer"]["chosen"].split(","))
    if chosen["layers"] == "all":
        assert float(chosen["fraction"]) == 1
    else:
        counts = {name: int(k) for name, k in
                  (item.split(":") for item in chosen["layers"].split("+"))}
        assert set(counts) <= {"layer1", "layer2", "layer3", "bottleneck"}
        assert sum(counts.values()) == round(float(chosen["fraction"]) * result.dim)
    single = fit_and_write([result.cache_path], tmp_path / "one", heads=("logreg",))
    assert [r["head"] for r in single.rows] == ["logreg"]  # heads named: no head added

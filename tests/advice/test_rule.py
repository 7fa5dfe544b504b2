"""The advice on two kinds of data: similar to the pretraining (the bottleneck probes best) and
far from it (a lower block probes best), small and large; from caches shaped as --layer blocks
writes them."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from pipeline.advice.rule import SMALL_PER_CLASS, advise_cache, gap_margin, strategy
from pipeline.core.errors import DataError
from tests.auditing.conftest import digest
from tests.conftest import write_cache

LAYERS = [["layer1", 0, 16], ["layer2", 16, 32], ["layer3", 32, 48], ["bottleneck", 48, 64]]


def layered_cache(path, per_class: int, signal: str, classes: int = 3, seed: int = 0,
                  layer: str = "blocks"):
    """Four 16-column layers; the class shows strongly in ``signal``, weakly elsewhere."""
    rng = np.random.default_rng(seed)
    sizes = {"train": per_class, "val": 60, "test": 60}
    y = np.concatenate([np.repeat(np.arange(classes), n) for n in sizes.values()])
    split = sum(([name] * (n * classes) for name, n in sizes.items()), [])
    X = rng.normal(size=(len(y), 64))
    for name, start, stop in LAYERS:
        strength = 2.5 if name == signal else 0.35
        X[:, start:stop] += strength * rng.normal(size=(classes, 16))[y]
    paths = [f"{i:05d}.png" for i in range(len(y))]
    write_cache(path, X, paths=paths, digests=[digest(i) for i in range(len(y))], labels=y,
                split=split, classes=[f"c{c}" for c in range(classes)])
    with h5py.File(path, "r+") as f:
        spec = json.loads(f.attrs["spec"])
        f.attrs.update(spec=json.dumps({**spec, "layer": layer}), layers=json.dumps(LAYERS))
    return path


def test_a_small_set_that_the_bottleneck_serves_gets_heads_only(tmp_path):
    advice = advise_cache(layered_cache(tmp_path / "c.h5", 40, "bottleneck"))
    written = advice.write(tmp_path / "out")
    assert sorted(f.name for f in written) == sorted(f.name for f in (tmp_path / "out").iterdir())
    assert advice.small and advice.similar and advice.best_layer == "bottleneck"
    assert (advice.unfreeze, advice.strategy) == (0, "heads only")
    assert advice.sweep == [0, 1] and advice.blocks == 4
    written = json.loads((tmp_path / "out" / "advice.json").read_text())
    assert written["unfreeze"] == 0 and "heads only" in written["sentence"]
    assert (tmp_path / "out" / "advice.png").read_bytes()[:4] == b"\x89PNG"
    assert [r["layer"] for r in written["layers"]] == [name for name, _, _ in LAYERS]


def test_a_small_set_far_from_the_pretraining_gets_the_top_block(tmp_path):
    advice = advise_cache(layered_cache(tmp_path / "c.h5", 40, "layer2"))
    assert advice.small and not advice.similar
    assert advice.best_layer == "layer2" and advice.blocks_above_best == 2
    assert advice.gap > advice.margin
    assert (advice.unfreeze, advice.strategy) == (1, "fine-tune the top block")
    assert "multilayer head" in advice.sentence()


def test_a_large_set_far_from_the_pretraining_retrains_the_blocks_above_its_best_probe(tmp_path):
    advice = advise_cache(layered_cache(tmp_path / "c.h5", SMALL_PER_CLASS, "layer1"))
    assert not advice.small and not advice.similar and advice.best_layer == "layer1"
    assert (advice.unfreeze, advice.strategy) == (3, "fine-tune the top 3 blocks")
    assert advice.sweep == [2, 3, 4]


def test_logme_ranks_the_informative_layer_first(tmp_path):
    advice = advise_cache(layered_cache(tmp_path / "c.h5", 40, "layer3"))
    scores = {r["layer"]: r["logme"] for r in advice.layers}
    assert max(scores, key=scores.get) == "layer3"


def test_a_cache_of_other_layers_is_refused_in_one_line(tmp_path):
    path = layered_cache(tmp_path / "c.h5", 10, "bottleneck", layer="layer1,bottleneck")
    with pytest.raises(DataError, match="advice needs every block's features") as err:
        advise_cache(path)
    assert err.value.layer == "layer1,bottleneck" and "--" not in str(err.value)


def test_the_matrix():
    assert strategy(small=True, similar=True, blocks_above_best=0, blocks=7) == (0, "heads only")
    assert strategy(True, False, 4, 7) == (1, "fine-tune the top block")
    assert strategy(False, True, 0, 7) == (1, "fine-tune the top block")
    assert strategy(False, False, 1, 7) == (2, "fine-tune the top 2 blocks")
    assert strategy(False, False, 6, 7) == (6, "fine-tune the top 6 blocks")
    assert strategy(False, False, 9, 7) == (7, "fine-tune all")


def test_the_margin_is_two_standard_errors_and_at_least_a_point():
    assert gap_margin(0.5, 100) == pytest.approx(0.1)
    assert gap_margin(0.99, 100_000) == 0.01

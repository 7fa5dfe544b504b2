"""Cached block activations: the trained blocks see exactly what the frozen trunk would give."""

from __future__ import annotations

import json
import sys

import h5py
import numpy as np
import pytest
import torch

from pipeline.core.errors import CacheError
from pipeline.core.options import FinetuneOptions
from pipeline.finetuning import activations
from pipeline.finetuning.activations import ActivationError, cut_network, lowest_trained
from pipeline.finetuning.run import sweep_depths
from pipeline.models.backbones import build_classifier, replace_classifier, resolve_backbone
from pipeline.models.blocks import Block
from pipeline.models.families import family_of
from pipeline.store import integrity, writer
from pipeline.store.catalog import list_caches
from tests.conftest import make_folder, run_finetune

FT = {"workers": 0, "batch_size": 4, "epochs": 1, "lr": 1e-2, "split_fractions": (0.5, 0.25, 0.25)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("act") / "images", classes=("a", "b", "c"),
                       per_class=8)


def _run(data, tmp_path, name, **kw):
    return run_finetune(data, tmp_path / name, cache_dir=tmp_path / "c", **{**FT, **kw})


def _states_equal(a, b, atol=1e-6):
    sa, sb = a.model.module.state_dict(), b.model.module.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        torch.testing.assert_close(sa[key].float(), sb[key].float(), atol=atol, rtol=1e-5,
                                   msg=key)


@pytest.mark.parametrize("unfreeze", [0, 1, 2, "15L"])
def test_cached_and_image_paths_end_an_epoch_with_the_same_weights(data, tmp_path, unfreeze):
    """--augment none: the same batches, the same trunk outputs, so the same training.

    At 0 this is the linear probe trained by the loop, from cached bottleneck features.
    """
    cached = _run(data, tmp_path, "cached", unfreeze=unfreeze, augment="none",
                  activation_dtype="float32")
    images = _run(data, tmp_path, "images", unfreeze=unfreeze, augment="none", from_images=True)
    assert cached.row["trained_from"] == "cached activations"
    assert images.row["trained_from"] == "images (--from-images)"
    _states_equal(cached, images)
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert cached.history[0][key] == pytest.approx(images.history[0][key], rel=1e-5)
    assert cached.row["test_accuracy"] == images.row["test_accuracy"]
    np.testing.assert_array_equal(cached.test_pred, images.test_pred)
    # The test is not vacuous: training moved the head away from its warm start.
    assert cached.history[0]["train_loss"] > 0


def test_the_trunk_runs_on_the_engine_that_extracted_the_features(data, tmp_path, monkeypatch):
    """--engine onnxruntime: the activation pass and the image loop's frozen trunk run the
    exported trunk too (its own export, kept in the cache folder), its activations are keyed
    by it, and both ways still end an epoch alike."""
    pytest.importorskip("onnxruntime")
    from pipeline.models import engines

    used = []
    prepare = engines.prepare

    def spy(name, model, *args, **kwargs):
        used.append((name, type(model).__name__))
        return prepare(name, model, *args, **kwargs)

    monkeypatch.setattr(engines, "prepare", spy)
    torch_run = _run(data, tmp_path, "torch", unfreeze=1, augment="none",
                     activation_dtype="float32")
    cached = _run(data, tmp_path, "cached", unfreeze=1, augment="none",
                  activation_dtype="float32", engine="onnxruntime")
    assert ("onnxruntime", "_Concatenated") in used  # the activation pass
    used.clear()
    images = _run(data, tmp_path, "images", unfreeze=1, augment="none", from_images=True,
                  engine="onnxruntime")
    assert ("onnxruntime", "_Activation") in used  # the image loop's frozen trunk
    assert cached.row["trained_from"] == "cached activations"
    files = {}
    for path in (tmp_path / "c").glob("*.activations.h5"):
        with h5py.File(path) as f:
            files[json.loads(f.attrs["spec"]).get("engine", "torch")] = f["features"][:]
    assert set(files) == {"torch", "onnxruntime"}  # another key: other last bits
    scale = np.abs(files["torch"]).max()
    assert np.abs(files["onnxruntime"] - files["torch"]).max() <= 1e-4 * scale
    exports = [p.name for p in (tmp_path / "c").glob("*.exported")]
    assert len(exports) == 3  # the features' network, the pass's trunk, the loop's trunk
    _states_equal(cached, images, atol=1e-6)  # measured: equal
    # Against torch's trunk only the last bits of the activations differ, which an epoch
    # at lr 1e-2 carries to 1.6e-3 in weights of up to 3.4 (measured).
    _states_equal(cached, torch_run, atol=1e-2)


def test_float16_activations_train_close_to_the_images(data, tmp_path):
    cached = _run(data, tmp_path, "half", unfreeze=1, augment="none")
    images = _run(data, tmp_path, "images", unfreeze=1, augment="none", from_images=True)
    _states_equal(cached, images, atol=1e-2)


@pytest.mark.parametrize("settings, why", [
    ({"unfreeze": "all"}, "every block trained"),
    ({"unfreeze": "39L"}, "the stem is trained"),
    ({"unfreeze": 1, "bn_train": True}, "--bn-train"),
])
def test_runs_that_cached_activations_cannot_serve_read_images_and_say_so(
        data, tmp_path, settings, why):
    result = _run(data, tmp_path, "o", **settings)
    assert result.row["trained_from"].startswith("images") and why in result.row["trained_from"]
    assert not list((tmp_path / "c").glob("*.activations.h5"))


def test_views_are_seeded_and_drawn_per_epoch(data, tmp_path):
    first = _run(data, tmp_path, "v1", unfreeze=1, views=2, epochs=2)
    path = next((tmp_path / "c").glob("*.activations.h5"))
    with h5py.File(path) as f:
        n_images = 24
        rows, shape = f["features"][:], tuple(f.attrs["activation_shape"])
        assert len(rows) == n_images + 2 * 12 and shape == (256, 2, 2)  # layer4's input at 32 px
        plain, views = rows[:n_images], rows[n_images:]
        paths = list(f["paths"][:])
        assert paths[n_images:n_images + 12] == paths[n_images + 12:]  # view 0, then view 1
        same_image = [paths.index(p) for p in paths[n_images:n_images + 12]]
        assert not np.allclose(views[:12], views[12:])  # two different views of each image
        assert not np.allclose(views[:12], plain[same_image])  # augmented, not the plain one
    again = _run(data, tmp_path / "again", "v2", unfreeze=1, views=2, epochs=2)
    with h5py.File(next((tmp_path / "again" / "c").glob("*.activations.h5"))) as f:
        np.testing.assert_array_equal(f["features"][:], rows)  # seeded: the same crops
    _states_equal(first, again, atol=0)


def test_a_sweep_runs_the_trunk_once_for_every_depth(data, tmp_path, monkeypatch):
    calls = []
    write = activations.write_activations
    # sys.modules: the package's attribute `finetune` is the function, not the module.
    monkeypatch.setattr(sys.modules["pipeline.finetuning.setup"], "write_activations",
                        lambda cuts, *a, **k: calls.append(len(cuts)) or write(cuts, *a, **k))
    options = FinetuneOptions.from_flat({"cache_dir": tmp_path / "c", "augment": "none", **FT})
    table = sweep_depths(data, [0, 1, 2, "all"], options=options, progress=False,
                         backbone=resolve_backbone("resnet18", "none", image_size=32)).table
    assert [r["blocks_unfrozen"] for r in table] == [0, 1, 2, 4]
    assert calls == [3]  # one pass, three boundaries; "all" reads images
    kinds = [r["kind"] for r in list_caches(tmp_path / "c")]
    assert kinds.count("activations") == 3 and kinds.count("features") == 1


def test_a_cut_across_a_skip_connection_is_refused():
    spec = resolve_backbone("resnet18", "none", image_size=32)
    model = build_classifier(spec)
    replace_classifier(spec, model, 3)
    blocks = family_of(spec).blocks(model)
    assert cut_network(spec, model, lowest_trained(spec, model, blocks, 1)).block == "layer4"
    assert lowest_trained(spec, model, blocks, 0).name == "fc"
    # Cutting inside a residual block would drop its shortcut: refused, not silently wrong.
    with pytest.raises(ActivationError, match="cross its boundary"):
        cut_network(spec, model, Block("layer4.0.conv2", ("layer4.0.conv2",)))
    with pytest.raises(ActivationError, match="no block boundary"):
        lowest_trained(spec, model, blocks, 5)


def test_a_full_disk_stops_before_writing(data, tmp_path, monkeypatch):
    asked = []

    def room_for_the_features_only(path):
        asked.append(path)  # the feature cache asks first, then the activation cache
        return type("Usage", (), {"free": 10**12 if len(asked) == 1 else 1000})()

    monkeypatch.setattr(writer.shutil, "disk_usage", room_for_the_features_only)
    with pytest.raises(CacheError, match="the activation cache needs .* but .* free") as err:
        _run(data, tmp_path, "o", unfreeze=1)
    assert "\n" not in str(err.value)
    assert not list((tmp_path / "c").glob("*.activations.h5*"))


def test_an_interrupted_activation_pass_resumes_to_the_same_file(data, tmp_path, monkeypatch):
    whole = _run(data, tmp_path / "whole", "o", unfreeze=1, views=2, epochs=0)
    expected = next((tmp_path / "whole" / "c").glob("*.activations.h5"))
    write = activations.FeatureWriter.write

    def killed_among_the_views(self, start, *args, **kwargs):
        # Rows 0-23 are the plain images, 24-47 two views of the 12 training images.
        if self.final.name.endswith(".activations.h5") and start >= 28:
            raise KeyboardInterrupt
        return write(self, start, *args, **kwargs)

    monkeypatch.setattr(activations.FeatureWriter, "write", killed_among_the_views)
    with pytest.raises(KeyboardInterrupt):
        _run(data, tmp_path / "cut", "o", unfreeze=1, views=2, epochs=0)
    partial, = (tmp_path / "cut" / "c").glob("*.activations.h5.partial")
    with h5py.File(partial) as f:
        assert 24 < f.attrs["rows_done"] < 48  # stopped inside the views
    monkeypatch.setattr(activations.FeatureWriter, "write", write)
    resumed = _run(data, tmp_path / "cut", "o", unfreeze=1, views=2, epochs=0)
    path = next((tmp_path / "cut" / "c").glob("*.activations.h5"))
    with h5py.File(expected) as a, h5py.File(path) as b:
        np.testing.assert_array_equal(a["features"][:], b["features"][:])
    assert whole.row["trained_from"] == resumed.row["trained_from"] == "cached activations"


def test_layer_counts_train_those_layers_from_the_blocks_that_hold_them(data, tmp_path):
    """15 layers of resnet18 reach into layer3: the cache holds layer3's input, layer3's
    lower layers run frozen on it, and only the 15 layers and the head change."""
    before = build_classifier(resolve_backbone("resnet18", "none", image_size=32)).state_dict()
    result = _run(data, tmp_path, "layers", unfreeze="15L", augment="none")
    after = result.model.module.state_dict()
    assert result.row["trained_from"] == "cached activations"
    assert result.row["head"] == "finetune-15L"
    changed = {k.rsplit(".", 1)[0] for k in before
               if not k.startswith("fc.") and not torch.equal(before[k], after[k])}
    # counted from the top by hand: layer4's 10 layers, layer3.1's 4, layer3.0's downsample bn
    top15 = {f"layer4.{b}.{m}" for b in (0, 1) for m in ("conv1", "bn1", "conv2", "bn2")}
    top15 |= {"layer4.0.downsample.0", "layer4.0.downsample.1", "layer3.0.downsample.1"}
    top15 |= {f"layer3.1.{m}" for m in ("conv1", "bn1", "conv2", "bn2")}
    assert len(top15) == 15 and changed == top15


def test_a_damaged_activation_cache_is_moved_aside_and_the_next_run_rebuilds_it(data, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr(activations, "_CHUNK_BYTES", 5000)  # a few rows a chunk, not the cap
    first = _run(data, tmp_path, "o", unfreeze=1, augment="none")
    path = next((tmp_path / "c").glob("*.activations.h5"))
    with h5py.File(path) as f:
        features = f["features"]
        row_bytes = features.shape[1] * features.dtype.itemsize
        # small checksummed chunks of the activation pass's own size
        assert features.fletcher32 and features.chunks[0] == 5000 // row_bytes > 1
        offset = features.id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 3)
        fh.write(b"\xff\xff")
    with pytest.raises(integrity.CacheDamaged, match="is damaged .*moved it to .*damaged: run the "
                                                 "same command again") as err:
        _run(data, tmp_path, "again", unfreeze=1, augment="none")
    assert "\n" not in str(err.value)
    assert path.with_name(path.name + ".damaged").exists() and not path.exists()
    again = _run(data, tmp_path, "again", unfreeze=1, augment="none")
    assert path.exists() and again.row["trained_from"] == "cached activations"
    _states_equal(first, again)


def test_augmented_views_are_the_same_when_threads_draw_them_side_by_side(data):
    """An engine's streams decode batches in several threads; each view stays seeded by its
    image and view, whatever the other threads draw meanwhile."""
    from concurrent.futures import ThreadPoolExecutor

    from pipeline.data.images import load_image_set
    from pipeline.finetuning.loaders import train_transform

    spec = resolve_backbone("resnet18", "none", image_size=32)
    images = load_image_set(data)
    views = activations._Views(images, train_transform(spec), (3, 32, 32), seed=3, view=1)
    alone = [views[i][0] for i in range(len(images))]
    order = [i for _ in range(8) for i in range(len(images))]
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda i: views[i][0], order))
    for i, view in zip(order, together):
        assert torch.equal(view, alone[i]), i

"""Engines: torch prepared for inference, exported engines checked against torch, auto, the
background decoding of the next batches, and exported engines run in streams."""

from __future__ import annotations

import glob
import json
import shutil
import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from pipeline.core.errors import MissingExtraError
from pipeline.extract.batches import prefetched
from pipeline.models import engines, families
from pipeline.models.backbones import build_feature_model, resolve_backbone
from pipeline.models.engines import (
    AUTO_ORDER,
    CHECK_RTOL,
    EngineError,
    export_path,
    prepare,
    prepare_for_inference,
    resolve_engine,
)
from pipeline.models.families import Family, family_of
from tests.conftest import extract_tiny, run_finetune

CPU = torch.device("cpu")
# One network or more per registered family, at a small input size (Lite0 with its real
# weights; the others random, with random BatchNorm statistics so that folding them matters).
SAMPLES = {
    "lite0": [("efficientnet_lite0", "default", 64)],
    "timm": [("timm/tf_mobilenetv3_small_minimal_100", "none", 64)],
    "torchvision": [("resnet18", "none", 32), ("mobilenet_v3_small", "none", 64)],
}


def _randomize_norms(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.5, generator=g)
                m.running_var.uniform_(0.5, 2.0, generator=g)
                m.weight.uniform_(0.5, 1.5, generator=g)
                m.bias.normal_(0, 0.3, generator=g)


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_every_registered_family_has_a_sample():
    assert set(SAMPLES) == set(families.list_families())


@pytest.mark.parametrize("family, backbone, weights, size",
                         [(f, *s) for f, samples in SAMPLES.items() for s in samples])
def test_the_prepared_network_gives_the_eager_features(family, backbone, weights, size):
    from timm.layers import Conv2dSame

    spec = resolve_backbone(backbone, weights, image_size=size)
    assert spec.family == family
    model = build_feature_model(spec)
    if weights == "none":
        _randomize_norms(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(3, size)
    prepared = prepare_for_inference(model, x[:2], family_of(spec))
    with torch.inference_mode():
        want, got = model(x), prepared(x)
    assert (got - want).abs().max() <= 1e-5 * want.abs().max()
    # Every BatchNorm of these networks follows a convolution: all are folded.
    assert _count(model, nn.BatchNorm2d) > 0 and _count(prepared, nn.BatchNorm2d) == 0
    if family in ("lite0", "timm"):  # TensorFlow "same" padding, now fixed for the size
        assert _count(model, Conv2dSame) > 0 and _count(prepared, Conv2dSame) == 0
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    convs = [m for m in prepared.modules() if isinstance(m, nn.Conv2d)]
    assert all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs
               if c.weight.shape[-1] > 1)
    assert not any(p.requires_grad for p in prepared.parameters())


class _Skip(nn.Module):
    """A convolution whose output feeds its BatchNorm and a skip connection too."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        y = self.conv(x)
        return (self.norm(y) + y).mean(dim=(2, 3))


class _Twice(nn.Module):
    """The same convolution and norm applied twice (shared weights)."""

    def __init__(self):
        super().__init__()
        self.conv, self.norm = nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.norm(self.conv(self.norm(self.conv(x)))).mean(dim=(2, 3))


def test_a_fold_that_would_change_the_features_is_not_used():
    model = _Skip().eval()
    _randomize_norms(model)
    x = _images(2, 8)
    ready = prepare("torch", model, x, Family(), CPU)
    assert "unprepared" in ready.note and ready.difference == 0.0
    with torch.inference_mode():  # channels_last only: equal up to rounding
        torch.testing.assert_close(ready.run(x), model(x))


def test_a_layer_called_twice_is_left_alone():
    model = _Twice().eval()
    _randomize_norms(model)
    x = _images(2, 8)
    ready = prepare("torch", model, x, Family(), CPU)
    assert ready.note == "" and _count(ready.run, nn.BatchNorm2d) == 1
    with torch.inference_mode():
        torch.testing.assert_close(ready.run(x), model(x))


# --- exported engines ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Tiny ResNet-18 (TINY's network) exported once for onnxruntime, in a cache folder."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    root = tmp_path_factory.mktemp("engines")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PIPELINE_MEMO_DIR", str(root / "memo"))
        spec = resolve_backbone("resnet18", "none", image_size=32)
    model = build_feature_model(spec)
    folder = export_path(root / "cache", spec.name, spec.key(), (3, 32, 32))
    x = _images(4, 32)
    first = prepare("onnxruntime", model, x, family_of(spec), CPU, folder, spec.key())
    return SimpleNamespace(spec=spec, model=model, folder=folder, x=x, first=first)


def _copy_export(exported, cache_dir):
    """The fixture's export in another cache folder (each test its own)."""
    target = cache_dir / exported.folder.name
    shutil.copytree(exported.folder, target)
    return target


def test_onnxruntime_exports_once_and_gives_torchs_features(exported):
    assert exported.first.engine == "onnxruntime" and exported.first.exported
    assert exported.first.difference <= CHECK_RTOL
    record = json.loads((exported.folder / "exported.json").read_text())
    assert record["network"] == json.loads(json.dumps(exported.spec.key()))
    assert record["input_shape"] == [3, 32, 32]
    again = prepare("onnxruntime", exported.model, exported.x, family_of(exported.spec), CPU,
                    exported.folder)
    assert not again.exported
    for n in (1, 3, 9):  # any batch size: the last batch of a set is smaller
        x = _images(n, 32, seed=n)
        with torch.inference_mode():
            want, got = exported.model(x), again.run(x)
        assert got.shape == want.shape
        assert (got - want).abs().max() <= CHECK_RTOL * want.abs().max()


def test_openvino_runs_the_same_export(exported):
    pytest.importorskip("openvino")
    ready = prepare("openvino", exported.model, exported.x, family_of(exported.spec), CPU,
                    exported.folder)
    assert ready.engine == "openvino" and not ready.exported  # onnxruntime's file, reused
    assert ready.difference <= CHECK_RTOL
    x = _images(5, 32, seed=7)
    with torch.inference_mode():
        want, got = exported.model(x), ready.run(x)
    assert (got - want).abs().max() <= CHECK_RTOL * want.abs().max()


def test_an_export_is_named_by_the_network_the_shape_and_the_exporter(monkeypatch):
    one = export_path("c", "timm/x", {"w": 1}, (3, 32, 32))
    assert one == export_path("c", "timm/x", {"w": 1}, (3, 32, 32))
    assert one.name.startswith("timm_x-") and one.suffix == ".exported"
    assert one != export_path("c", "timm/x", {"w": 2}, (3, 32, 32))
    assert one != export_path("c", "timm/x", {"w": 1}, (3, 64, 64))
    monkeypatch.setattr(engines, "_version", lambda p: "0.0" if p == "torch" else None)
    assert one != export_path("c", "timm/x", {"w": 1}, (3, 32, 32))


def test_wrong_features_are_refused_by_name_and_passed_over_by_auto(exported, tmp_path,
                                                                     monkeypatch):
    folder = _copy_export(exported, tmp_path)
    monkeypatch.setattr(engines.OnnxRuntimeEngine, "prepare",
                        lambda self, *a: (lambda x: torch.ones(len(x), 512)))
    monkeypatch.setattr(engines.OnnxRuntimeEngine, "installed", lambda self: True)
    args = (exported.model, exported.x, family_of(exported.spec), CPU, folder)
    with pytest.raises(EngineError, match="onnxruntime's features differ from eager torch's"):
        prepare("onnxruntime", *args)
    assert resolve_engine("auto", "cpu", export=folder) == "onnxruntime"
    ready = prepare("onnxruntime", *args, strict=False)
    assert ready.engine == "torch" and ready.note.startswith("auto: onnxruntime not used")
    assert resolve_engine("auto", "cpu", export=folder) != "onnxruntime"  # remembered


def test_the_cache_commands_list_describe_and_remove_an_export(exported, tmp_path):
    from pipeline.cli.main import main

    folder = _copy_export(exported, tmp_path)
    engines._refuse(folder, "openvino", "a runtime's failure")
    key = folder.name.split("-")[1].split(".")[0]
    run = CliRunner().invoke
    listed = run(main, ["cache", "list", "--cache-dir", str(tmp_path)])
    lines = listed.output.splitlines()
    assert listed.exit_code == 0 and len(lines) == 2, listed.output
    megabytes = (folder / "model.onnx").stat().st_size / 1e6
    assert lines[0].startswith(f"{folder}  export  resnet18  features  {megabytes:.1f} MB")
    assert lines[1] == f"{folder}.refused.json  auto refused openvino"
    info = json.loads(run(main, ["cache", "info", key, "--cache-dir", str(tmp_path),
                                 "--json"]).output)
    assert info["network"] == json.loads(json.dumps(exported.spec.key()))
    assert info["files"] == ["exported.json", "model.onnx"] and info["input_shape"] == [3, 32, 32]
    refused = run(main, ["cache", "verify", key, "--cache-dir", str(tmp_path)])
    assert refused.exit_code == 1 and "is an engine's export" in refused.output
    assert folder.is_dir()  # refused, not moved aside as a damaged cache
    removed = run(main, ["cache", "rm", key, "--cache-dir", str(tmp_path)])
    assert removed.exit_code == 0 and removed.output == f"removed {folder}\n"
    assert list(tmp_path.iterdir()) == []  # the refusal note went with its export
    again = prepare("onnxruntime", exported.model, exported.x, family_of(exported.spec), CPU,
                    folder, exported.spec.key())
    assert again.exported  # exported anew


def test_auto_and_named_engines_resolve_without_importing_them(monkeypatch):
    def installed(*names):
        for name, engine in engines._ENGINES.items():
            monkeypatch.setattr(type(engine), "installed", lambda self, ok=name in names: ok)

    installed("torch", "onnxruntime", "openvino")
    assert resolve_engine("auto", "cpu") == AUTO_ORDER[0] == "onnxruntime"
    assert resolve_engine("auto", "cuda") == "torch"
    assert resolve_engine("auto", "cpu", compile=True) == "torch"
    installed("torch", "openvino")
    assert resolve_engine("auto", "cpu") == "openvino"
    installed("torch")
    assert resolve_engine("auto", "cpu") == "torch"
    with pytest.raises(MissingExtraError, match=r"pip install 'cnn-bottleneck-pipeline\[onnx\]'"):
        resolve_engine("onnxruntime", "cpu")
    installed("torch", "onnxruntime", "openvino")
    with pytest.raises(EngineError, match="runs on the CPU, not on cuda"):
        resolve_engine("openvino", "cuda")
    with pytest.raises(EngineError, match="compiling applies to torch's network"):
        resolve_engine("onnxruntime", "cpu", compile=True)
    with pytest.raises(EngineError, match="engine must be one of"):
        resolve_engine("tensorrt", "cpu")


# --- extraction --------------------------------------------------------------------------------

def _spec_of(path):
    with h5py.File(path) as f:
        return (json.loads(f.attrs["spec"]), f["features"][:], json.loads(f.attrs["timings"]),
                json.loads(f.attrs["versions"]))


def test_extraction_with_onnxruntime_is_keyed_by_it_and_gives_torchs_features(
        exported, tmp_path, image_folder):
    cache = tmp_path / "c"
    _copy_export(exported, cache)  # TINY's network: the export is found, not redone
    by_torch = extract_tiny(image_folder, cache_dir=cache)
    by_ort = extract_tiny(image_folder, cache_dir=cache, engine="onnxruntime")
    assert by_torch.engine == "torch" and by_ort.engine == "onnxruntime"
    assert by_ort.key != by_torch.key and not by_ort.hit
    torch_spec, torch_features, _, _ = _spec_of(by_torch.cache_path)
    ort_spec, ort_features, timings, versions = _spec_of(by_ort.cache_path)
    assert "engine" not in torch_spec  # torch keeps the keys caches had before engines
    assert ort_spec["engine"] == "onnxruntime"
    assert {k: v for k, v in ort_spec.items() if k != "engine"} == torch_spec
    assert timings["engine"]["name"] == "onnxruntime" and not timings["engine"]["exported"]
    assert timings["engine"]["check_difference"] <= CHECK_RTOL
    assert versions["onnxruntime"] == engines.get_engine("onnxruntime").version()
    scale = np.abs(torch_features).max()
    assert np.abs(ort_features - torch_features).max() <= CHECK_RTOL * scale
    auto = extract_tiny(image_folder, cache_dir=cache, engine="auto")
    assert auto.hit and auto.cache_path == by_ort.cache_path  # onnxruntime comes first
    assert auto.to_json()["engine"] == "onnxruntime"
    assert len(list(cache.glob("*.exported"))) == 1
    if glob.glob("/dev/nvidia[0-9]*"):  # a GPU machine asks torch about its device
        return
    code = (f"from tests.conftest import extract_tiny\n"
            f"r = extract_tiny({str(image_folder)!r}, cache_dir={str(cache)!r}, "
            f"engine='auto')\n"
            f"import json, sys\n"
            f"print(json.dumps([r.hit, [m for m in ('torch', 'onnxruntime', 'openvino', 'onnx')"
            f" if m in sys.modules]]))")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert json.loads(run.stdout.splitlines()[-1]) == [True, []]


def test_the_cli_names_the_extra_of_a_missing_engine(tmp_path, image_folder, monkeypatch):
    from pipeline.cli.main import main

    monkeypatch.setattr(engines.OpenVinoEngine, "installed", lambda self: False)
    result = CliRunner().invoke(main, [
        "extract", str(image_folder), "--backbone", "resnet18", "--weights", "none",
        "--image-size", "32", "--workers", "0", "--cache-dir", str(tmp_path / "c"),
        "--engine", "openvino"])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "pip install 'cnn-bottleneck-pipeline[openvino]'" in lines[0]


def test_from_images_runs_the_prepared_trunk_below_the_trained_blocks(tmp_path, monkeypatch):
    from tests.conftest import make_folder

    prepared = []
    original = engines.prepare_for_inference

    def spy(model, example, family):
        prepared.append(type(model).__name__)
        return original(model, example, family)

    monkeypatch.setattr(engines, "prepare_for_inference", spy)
    data = make_folder(tmp_path / "d", classes=("a", "b"), per_class=6)
    result = run_finetune(data, tmp_path / "o", cache_dir=tmp_path / "c", unfreeze=1,
                          epochs=1, from_images=True, batch_size=4, workers=0,
                          split_fractions=(0.5, 0.25, 0.25))
    assert result.row["trained_from"] == "images (--from-images)"
    assert "_Activation" in prepared  # the trunk below layer4, for every epoch's images


# --- decoding the next batches while the engine runs -------------------------------------------

def test_the_next_batches_are_decoded_while_the_current_one_is_used():
    second = threading.Event()

    def batches():
        for i in range(4):
            if i == 1:
                second.set()
            yield i

    items = prefetched(batches(), 2)
    assert next(items) == 0
    assert second.wait(10)  # decoded while this batch is still being used
    assert list(items) == [1, 2, 3]
    assert list(prefetched(iter(range(3)), 0)) == [0, 1, 2]


def test_a_decoding_error_is_raised_here_and_closing_stops_the_thread():
    def failing():
        yield 1
        raise OSError("disk gone")

    with pytest.raises(OSError, match="disk gone"):
        list(prefetched(failing(), 2))
    made = []

    def endless():
        while True:
            made.append(1)
            yield len(made)

    items = prefetched(endless(), 2)
    assert next(items) == 1
    items.close()
    assert not any(t.name == "pipeline-prefetch" for t in threading.enumerate())
    count = len(made)
    time.sleep(0.2)
    assert len(made) == count


def test_with_one_core_onnxruntime_decodes_ahead_in_a_thread(exported, tmp_path, image_folder,
                                                             monkeypatch):
    from pipeline.extract import batches as extract

    used = []
    original = extract.prefetched

    def spy(items, depth):
        used.append(depth)
        return original(items, depth)

    monkeypatch.setattr(extract, "prefetched", spy)
    monkeypatch.setattr(engines, "_threads", lambda: 1)  # one core: a single stream
    # Tiny images on a tiny network: decoding may outweigh the forward pass, which hands the
    # decoding to threads instead (tests/extract/test_photos.py); this is the engine's choice.
    monkeypatch.setattr(extract, "_THREADS_FROM", float("inf"))
    cache = tmp_path / "c"
    _copy_export(exported, cache)
    extract_tiny(image_folder, cache_dir=cache)  # workers 0, torch on the CPU
    assert used == []
    extract_tiny(image_folder, cache_dir=cache, engine="onnxruntime")
    assert used == [extract._PREFETCH_BATCHES]
    assert engines.get_engine("torch").decodes_ahead("cuda")
    assert not engines.get_engine("torch").decodes_ahead("cpu")


# --- streams ---------------------------------------------------------------------------------

def test_exported_engines_run_a_stream_per_core_on_a_cpu_and_torch_one(monkeypatch):
    monkeypatch.setattr(engines, "_threads", lambda: 4)
    for name in ("onnxruntime", "openvino"):
        engine = engines.get_engine(name)
        assert engine.streams("cpu", workers=0) == 4
        assert engine.streams("cpu", workers=2) == 1  # loader processes have the cores
        assert engine.streams("cuda", workers=0) == 1
    assert engines.get_engine("torch").streams("cpu", workers=0) == 1


@pytest.mark.parametrize("name", ["onnxruntime", "openvino"])
def test_an_engine_in_streams_gives_each_thread_its_own_batchs_features(exported, name):
    pytest.importorskip(name)
    ready = prepare(name, exported.model, exported.x, family_of(exported.spec), CPU,
                    exported.folder, streams=3)
    assert ready.engine == name and ready.streams == 3
    inputs = [_images(n, 32, seed=10 + n) for n in (1, 4, 7, 2, 5, 3)]
    got: dict[int, torch.Tensor] = {}
    start = threading.Barrier(3)

    def stream(k):
        start.wait()  # the three threads call the engine at the same time
        for j in range(k, len(inputs), 3):
            got[j] = ready.run(inputs[j])

    threads = [threading.Thread(target=stream, args=(k,)) for k in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for j, x in enumerate(inputs):
        with torch.inference_mode():
            want = exported.model(x)
        assert got[j].shape == want.shape
        assert (got[j] - want).abs().max() <= CHECK_RTOL * want.abs().max()


def test_torch_and_its_fallback_serve_one_stream(exported, tmp_path, monkeypatch):
    model, x, family = exported.model, exported.x, family_of(exported.spec)
    assert prepare("torch", model, x, family, CPU, streams=4).streams == 1
    folder = _copy_export(exported, tmp_path)
    monkeypatch.setattr(engines.OnnxRuntimeEngine, "prepare",
                        lambda self, *a: (lambda x: torch.ones(len(x), 512)))
    fallback = prepare("onnxruntime", model, x, family, CPU, folder, strict=False, streams=4)
    assert fallback.engine == "torch" and fallback.streams == 1


def test_extraction_in_streams_writes_what_one_stream_writes(exported, tmp_path, image_folder,
                                                              monkeypatch):
    from pipeline.extract import batches as extract

    (image_folder / "dog" / "004b.png").write_bytes(b"not an image")
    (image_folder / "fox" / "gone.png").symlink_to(image_folder / "nowhere.png")
    cache_dir = {n: _copy_export(exported, tmp_path / f"c{n}").parent for n in (1, 3)}
    runs, results = [], {}
    original = extract._streamed

    def spy(run, files, indices, batch_size, streams):
        runs.append(streams)
        return original(run, files, indices, batch_size, streams)

    monkeypatch.setattr(extract, "_streamed", spy)
    for n in (1, 3):
        monkeypatch.setattr(engines, "_threads", lambda n=n: n)
        results[n] = extract_tiny(image_folder, cache_dir=cache_dir[n], engine="onnxruntime",
                                      batch_size=4)
    assert runs == [3]  # one thread: in turn (decoding ahead); three: three streams
    assert results[3].failures == results[1].failures and len(results[3].failures) == 2
    one, three = (_spec_of(results[n].cache_path)[1] for n in (1, 3))
    with h5py.File(results[1].cache_path) as a, h5py.File(results[3].cache_path) as b:
        np.testing.assert_array_equal(a["paths"][:], b["paths"][:])
        np.testing.assert_array_equal(a["valid"][:], b["valid"][:])
        np.testing.assert_array_equal(a["content_sha256"][:], b["content_sha256"][:])
    np.testing.assert_allclose(three, one, rtol=1e-5, atol=1e-5 * np.nanmax(np.abs(one)))


def test_closing_the_streamed_batches_cancels_the_rest_and_stops_the_threads():
    from pipeline.extract.batches import _streamed

    started = []

    class Files:
        def __getitem__(self, i):
            started.append(i)
            time.sleep(0.01)
            return torch.full((2,), float(i)), i, "", ""

    batches = _streamed(lambda x: x.numpy() * 2, Files(), range(400), 4, 2)
    first = [next(batches) for _ in range(3)]
    assert [b[2].tolist() for b in first] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11]]
    assert first[1][0][:, 0].tolist() == [8.0, 10.0, 12.0, 14.0]  # run on its own batch
    batches.close()
    assert not any(t.name.startswith("pipeline-stream") for t in threading.enumerate())
    count = len(started)
    time.sleep(0.1)
    assert len(started) == count < 400  # nothing decoded after closing, most never


def test_a_streamed_batchs_error_is_raised_here_in_order():
    from pipeline.extract.batches import _streamed

    def run(x):
        if x[0, 0] == 8:
            raise RuntimeError("engine failed on the third batch")
        return x.numpy()

    class Files:
        def __getitem__(self, i):
            return torch.full((2,), float(i)), i, "", ""

    batches = _streamed(run, Files(), range(40), 4, 3)
    assert next(batches)[2].tolist() == [0, 1, 2, 3]
    assert next(batches)[2].tolist() == [4, 5, 6, 7]
    with pytest.raises(RuntimeError, match="third batch"):
        next(batches)

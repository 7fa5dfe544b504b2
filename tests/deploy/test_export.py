"""`export`: one file, uint8 images in, the same probabilities as `predict` out, no pipeline."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli.main import main
from pipeline.core.errors import ExportError, OptionError
from pipeline.core.options import ExportOptions, PredictOptions
from pipeline.deploy.export import choose_model, export_model, resized_size
from pipeline.deploy.predict import predict_images
from pipeline.finetuning.network import FinetunedNetwork
from pipeline.models.backbones import build_classifier, replace_classifier, resolve_backbone
from pipeline.store.cache import cache_info
from tests.conftest import extract_tiny, fit_and_write, write_image

DOCS = Path(__file__).resolve().parents[2] / "docs" / "export.md"
# Wider and taller than the tiny recipe's 36 px resize: both passes shrink, with antialiasing.
SIZE = (70, 90)  # height, width
CLASSES = ("cat", "dog", "fox")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Images of one size, their cache, the three exportable heads and a fine-tuned network."""
    root = tmp_path_factory.mktemp("export") / "images"
    for c, name in enumerate(CLASSES):
        for i in range(6):
            write_image(root / name / f"{i:02d}.png", 10 * c + i, size=SIZE[::-1])
    cache = extract_tiny(root, cache_dir=root.parent / "cache").cache_path
    heads = fit_and_write([cache], root.parent / "heads", heads=("logreg", "mlp", "linear"))
    info = cache_info(cache)
    spec = resolve_backbone("resnet18", "none", image_size=32)
    module = build_classifier(spec)
    replace_classifier(spec, module, len(CLASSES))
    with torch.no_grad():  # far from uniform, short of certain: a wrong pixel would show
        module.fc.weight.mul_(4)
    net = FinetunedNetwork.from_module(module, spec, info["classes"], request=info["request"],
                                       cache_key=info["key"], unfrozen=1)
    models = {r["head"]: Path(r["model"]) for r in heads.rows}
    models["network"] = net.save(root.parent / "tiny.net")
    images = sorted(root.rglob("*.png"))
    return models, images, heads


def _export(model, out: Path, **options):
    """``export_model`` with ``ExportOptions(**options)``, its file written to ``out``."""
    result = export_model(model, options=ExportOptions(**options))
    assert result.write(out) == [out]
    return result


def _batch(images) -> np.ndarray:
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images])


def _predicted(model, images) -> np.ndarray:
    rows = predict_images(model, images, options=PredictOptions(top_k=len(CLASSES), workers=0),
                          progress=False).rows
    return np.array([[dict(r["top_k"])[c] for c in CLASSES] for r in rows])


def _run(path: Path, batch: np.ndarray) -> np.ndarray:
    if path.suffix == ".onnx":
        return ort.InferenceSession(str(path)).run(None, {"images": batch})[0]
    with torch.no_grad():
        return torch.jit.load(str(path))(torch.from_numpy(batch)).numpy()


@pytest.mark.parametrize("kind", ["logreg", "mlp", "linear", "network"])
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_the_file_gives_predicts_probabilities(trained, tmp_path, kind, fmt):
    models, images, _ = trained
    result = _export(models[kind], tmp_path / f"m.{fmt}", format=fmt, input_size=SIZE)
    assert result.classes == list(CLASSES) and result.input_size == SIZE
    got = _run(result.path, _batch(images))
    want = _predicted(models[kind], images)
    difference = float(np.abs(got - want).max())
    print(f"{kind} {fmt}: max |export - predict| = {difference:.2e}")
    assert difference <= 1e-4
    assert np.allclose(got.sum(axis=1), 1, atol=1e-5)
    assert want.max(axis=1).min() < 0.99  # not saturated: a wrong pixel would move them


def test_any_batch_size_runs_and_the_file_carries_classes_and_size(trained, tmp_path):
    models, images, _ = trained
    path = _export(models["logreg"], tmp_path / "m.onnx", input_size=SIZE).path
    session = ort.InferenceSession(str(path))
    meta = session.get_modelmeta().custom_metadata_map
    assert json.loads(meta["classes"]) == list(CLASSES)
    assert json.loads(meta["input_size"]) == list(SIZE)
    batch = _batch(images)
    one = session.run(None, {"images": batch[:1]})[0]
    assert one.shape == (1, 3) and np.allclose(one, session.run(None, {"images": batch})[0][:1],
                                               atol=1e-6)
    extra = {"meta.json": ""}
    _export(models["logreg"], tmp_path / "m.pt", format="torchscript", input_size=SIZE)
    torch.jit.load(str(tmp_path / "m.pt"), _extra_files=extra)
    assert json.loads(extra["meta.json"])["classes"] == list(CLASSES)


def test_a_results_folder_exports_its_most_accurate_model(trained):
    models, _, heads = trained
    best = max(heads.rows, key=lambda r: r["test_accuracy"])
    folder = models["logreg"].parent.parent
    assert choose_model(folder) == Path(best["model"])


def test_the_documented_script_runs_on_the_file_without_pipeline(trained, tmp_path):
    models, images, _ = trained
    path = _export(models["mlp"], tmp_path / "m.onnx", input_size=SIZE).path
    code = re.search(r"```python\n(.*?)```", DOCS.read_text(), re.S).group(1)
    script = tmp_path / "classify.py"
    # The script, then proof that it ran without the package.
    script.write_text(code + "\nassert 'pipeline' not in sys.modules\n")
    out = subprocess.run([sys.executable, "-I", str(script), str(path), *map(str, images[:4])],
                         capture_output=True, text=True, check=True, cwd=tmp_path).stdout
    want = _predicted(models["mlp"], images[:4])
    for line, row, image in zip(out.splitlines(), want, images):
        assert line == f"{image}: {CLASSES[row.argmax()]} ({row.max():.3f})"


def test_resized_size_is_torchvisions():
    from torchvision.transforms.v2 import functional as F

    for size in [(70, 90), (90, 70), (36, 36), (500, 333), (28, 28)]:
        resized = F.resize(torch.zeros(1, *size), [36], antialias=True).shape[1:]
        assert resized_size(size, 36) == tuple(resized)


def test_bad_input_ends_in_one_line(trained, tmp_path):
    models, _, _ = trained
    runner = CliRunner()
    empty = runner.invoke(main, ["export", str(tmp_path)])
    assert empty.exit_code == 1
    assert empty.output.strip().splitlines() == [
        f"Error: {tmp_path}: no saved model (.head or .net) with a results row under it; run "
        "`pipeline heads` or `pipeline finetune` first"]
    unknown = runner.invoke(main, ["export", str(models["logreg"]), "--format", "tflite"])
    assert unknown.exit_code == 1 and unknown.output.strip().splitlines() == [
        "Error: format must be one of 'onnx', 'torchscript', not 'tflite'"]
    with pytest.raises(OptionError, match="input-size must be a height and a width"):
        ExportOptions(input_size=(0, 20))
    zero = runner.invoke(main, ["export", str(models["logreg"]), "--input-size", "0,20"])
    assert zero.exit_code == 1 and zero.output.strip().splitlines() == [
        "Error: input-size must be a height and a width, each an integer >= 1 (e.g. 224,224) "
        "or unset, not (0, 20)"]
    assert list(models["logreg"].parent.glob("*.onnx")) == []
    bad_size = runner.invoke(main, ["export", str(models["logreg"]), "--input-size", "big"])
    assert bad_size.exit_code == 2 and "give HEIGHT,WIDTH" in bad_size.output


def test_the_command_writes_the_file_and_says_what_it_takes(trained, tmp_path):
    models, _, _ = trained
    out = tmp_path / "net.pt"
    result = CliRunner().invoke(main, ["export", str(models["network"]), "--format",
                                       "torchscript", "--input-size", "70,90", "--out",
                                       str(out), "--json"])
    assert result.exit_code == 0, result.output
    shown = json.loads(result.output.strip().splitlines()[-1])
    assert shown["path"] == str(out) and shown["input_size"] == [70, 90] and out.exists()


def test_the_stage_writes_nothing_and_the_file_lands_beside_the_model_by_default(trained):
    models, images, _ = trained
    model = models["logreg"]
    before = sorted(model.parent.iterdir())
    result = export_model(model, options=ExportOptions(format="torchscript", input_size=SIZE))
    assert sorted(model.parent.iterdir()) == before  # computed in memory, nothing written
    assert result.path is None and result.to_json() == {
        "path": None, "source": str(model), "format": "torchscript",
        "classes": list(CLASSES), "input_size": list(SIZE)}
    with pytest.raises(TypeError):
        export_model(model, "onnx")  # options by keyword only
    beside = model.with_suffix(".pt")
    assert result.default_path == beside and result.write() == [beside]
    assert result.to_json()["path"] == str(beside)
    np.testing.assert_allclose(_run(beside, _batch(images)),
                               _predicted(model, images), atol=1e-4)
    beside.unlink()
    shown = CliRunner().invoke(main, ["export", str(model), "--input-size", "70,90"])
    assert shown.exit_code == 0, shown.output
    assert shown.output.strip().splitlines() == [
        f"exported {model} as onnx -> {model.with_suffix('.onnx')} (uint8 images "
        "(N, 70, 90, 3) in, probabilities of 3 classes out)"]
    assert sorted(p.name for p in model.parent.iterdir()) == sorted(
        [p.name for p in before] + [model.with_suffix(".onnx").name])
    model.with_suffix(".onnx").unlink()


def test_an_onnx_model_over_what_one_file_holds_is_refused(trained, monkeypatch):
    models, _, _ = trained
    monkeypatch.setattr("pipeline.deploy.export._ONNX_LIMIT", 1000)  # as if 2 GiB were 1 kB
    with pytest.raises(ExportError, match="one ONNX file holds; export it as torchscript") as err:
        export_model(models["logreg"], options=ExportOptions(input_size=SIZE))
    assert err.value.bytes > 1000 and err.value.format == "onnx"

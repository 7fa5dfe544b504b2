"""Every registered head, through fit, save, load, predict and export, answers for itself.

Export asks a head for its linear form or its torch module (pipeline.heads.protocol), never
for its class name; this runs the whole registry (HEADS) on a multi-layer cache, so a new head
that cannot be exported fails here, and a classifier of another library is refused in one
line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from pipeline.cli.main import main
from pipeline.deploy.export import ExportError, ExportOptions, export_model
from pipeline.heads import HEADS
from pipeline.heads.protocol import ChoosesParams, HasLinearForm, HasLogitModule
from pipeline.store.cache import read_splits
from pipeline.store.persistence import load_head
from tests.conftest import extract_tiny, fit_and_write, write_image

SIZE = (44, 52)  # height, width: larger than the tiny recipe's resize, so both passes shrink
CLASSES = ("cat", "dog", "fox")
# Short trainings, so the module's fits take seconds; every registered name is still run.
QUICK = {"mlp": "mlp:hidden_sizes=(16,),max_epochs=5,device='cpu'",
         "linear": "linear:max_epochs=5,device='cpu'"}
FOREIGN = "sklearn.linear_model.LogisticRegression:max_iter=200"


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A multi-layer cache of tiny images, every registered head and a foreign one fitted."""
    root = tmp_path_factory.mktemp("every") / "images"
    for c, name in enumerate(CLASSES):
        for i in range(7):
            write_image(root / name / f"{i:02d}.png", 20 * c + i, size=SIZE[::-1])
    cache = extract_tiny(root, root.parent / "cache", layer="blocks", progress=False).cache_path
    specs = tuple(QUICK.get(name, name) for name in HEADS) + (FOREIGN,)
    rows = fit_and_write([cache], root.parent / "heads", heads=specs).rows
    models = {row["head"]: Path(row["model"]) for row in rows}
    splits = read_splits(cache)
    X = np.concatenate([s.X for s in splits.values()])
    paths = [p for s in splits.values() for p in s.paths]
    images = np.stack([np.asarray(Image.open(root / p).convert("RGB")) for p in paths])
    return models, X, images, rows


def _run(path: Path, images: np.ndarray) -> np.ndarray:
    if path.suffix == ".onnx":
        return ort.InferenceSession(str(path)).run(None, {"images": images})[0]
    with torch.no_grad():
        return torch.jit.load(str(path))(torch.from_numpy(images)).numpy()


def test_the_registry_is_what_this_file_runs():
    assert set(QUICK) <= set(HEADS) and len(HEADS) >= 4


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_every_registered_head_exports_its_own_probabilities(fitted, tmp_path, name, fmt):
    models, X, images, _ = fitted
    head = load_head(models[name]).estimator
    assert isinstance(head, HasLinearForm | HasLogitModule)  # what export asks of a head
    want = head.predict_proba(X)
    assert want.max(axis=1).min() < 0.999  # not saturated: a wrong feature would show
    assert np.array_equal(head.predict(X), head.classes_[want.argmax(1)])
    result = export_model(models[name], options=ExportOptions(format=fmt, input_size=SIZE))
    result.write(tmp_path / f"m.{fmt}")
    assert result.classes == list(CLASSES)
    got = _run(result.path, images)
    difference = float(np.abs(got - want).max())
    print(f"{name} {fmt}: max |export - predict_proba| = {difference:.2e}")
    assert difference <= 1e-4


@pytest.mark.parametrize("name", sorted(HEADS))
def test_the_linear_form_or_module_is_the_heads_prediction(fitted, name):
    models, X, _, _ = fitted
    head = load_head(models[name]).estimator
    if isinstance(head, HasLinearForm):
        coef, intercept = head.linear_form()
        logits = X.astype(np.float64) @ coef.T + intercept
    else:
        with torch.no_grad():
            logits = head.logit_module()(torch.from_numpy(X)).double().numpy()
    proba = np.exp(logits - logits.max(1, keepdims=True))
    proba /= proba.sum(1, keepdims=True)
    np.testing.assert_allclose(proba, head.predict_proba(X), atol=1e-5)


def test_every_registered_head_says_what_it_chose(fitted):
    models, _, _, rows = fitted
    chosen = {row["head"]: row["chosen"] for row in rows}
    for name in HEADS:
        head = load_head(models[name]).estimator
        assert isinstance(head, ChoosesParams)
        said = head.chosen_params()
        assert said and chosen[name].startswith(f"{next(iter(said))}=")
    multilayer = load_head(models["multilayer"]).estimator
    assert chosen["multilayer"].endswith(f"layers={multilayer.layers_}")
    assert chosen["LogisticRegression"] == "max_iter=200"  # a foreign head: what it was given


def test_a_foreign_classifier_is_refused_in_one_line(fitted, tmp_path):
    models, _, _, _ = fitted
    with pytest.raises(ExportError, match="LogisticRegression head has no tensor form"):
        export_model(models["LogisticRegression"])
    result = CliRunner().invoke(main, ["export", str(models["LogisticRegression"])])
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1
    assert "LogisticRegression head has no tensor form" in result.output

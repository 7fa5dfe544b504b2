"""A missing optional dependency ends every command that needs it in one line naming the extra.

Each module is hidden as ``pip install .`` without the extra would leave it
(``sys.modules[name] = None`` makes its import fail), then the command that needs it is run.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from pipeline.cli.main import main
from pipeline.core.extras import EXTRAS
from tests.audit.conftest import planted_cache
from tests.conftest import TINY, make_folder

TINY_ARGS = ["--backbone", TINY["backbone"], "--weights", TINY["weights"], "--image-size",
             str(TINY["image_size"]), "--workers", "0"]


def _run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """A tiny labelled cache and a logreg head saved on it."""
    root = tmp_path_factory.mktemp("extras")
    images = make_folder(root / "images", per_class=6)
    done = _run("extract", images, *TINY_ARGS, "--cache-dir", root / "cache", "--json")
    cache = json.loads(done.stdout)["cache_path"]
    heads = _run("heads", cache, "--heads", "logreg", "--out", root / "heads", "--json", "-q")
    model = json.loads(heads.stdout)["results"][0]["model"]
    return root, images, Path(cache), Path(model)


def _assert_names_the_extra(result, module: str):
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output and "ModuleNotFoundError" not in result.output
    assert f"needs {module}, which is not installed" in lines[0]
    assert f"pip install 'cnn-bottleneck-pipeline[{EXTRAS[module]}]'" in lines[0]


def _cases(fitted, tmp_path):
    root, images, cache, model = fitted
    planted = planted_cache(tmp_path / "planted.h5", n=300).path
    extract = ["extract", images, *TINY_ARGS, "--cache-dir", tmp_path / "c"]
    return {
        "cleanlab": ["audit", planted, "--out", tmp_path / "a", "--no-map", "-q"],
        "openTSNE": ["audit", planted, "--out", tmp_path / "a", "--map", "-q"],
        "onnx": ["export", model, "--format", "onnx", "--out", tmp_path / "m.onnx"],
        "onnxscript": ["export", model, "--format", "onnx", "--out", tmp_path / "m.onnx"],
        "onnxruntime": [*extract, "--engine", "onnxruntime"],
        "openvino": [*extract, "--engine", "openvino"],
        "mlflow": ["heads", cache, "--heads", "logreg", "--out", tmp_path / "h", "--track",
                   "-q"],
        "pyarrow": ["cache", "export", cache, "--cache-dir", root / "cache", "--format",
                    "parquet", "--out", tmp_path / "f.parquet"],
    }


CASES = ["cleanlab", "openTSNE", "onnx", "onnxscript", "onnxruntime", "openvino", "mlflow",
         "pyarrow"]


def test_every_extra_is_tried():
    # Every extra of pyproject.toml with a module of its own has a command here.
    assert {EXTRAS[m] for m in CASES} == set(EXTRAS.values())


@pytest.mark.parametrize("module", CASES)
def test_a_missing_extra_ends_in_one_line(fitted, tmp_path, monkeypatch, module):
    args = _cases(fitted, tmp_path)[module]
    monkeypatch.setitem(sys.modules, module, None)
    _assert_names_the_extra(_run(*args), module)

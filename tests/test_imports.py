"""Importing the package and asking for help change nothing in the process and load no framework."""

from __future__ import annotations

import glob
import json
import subprocess
import sys

import pytest

from tests.conftest import make_folder

HEAVY = ("torch", "torchvision", "timm", "sklearn", "matplotlib", "h5py", "onnxruntime",
         "openvino", "onnx", "mlflow")


def _loaded_after(code: str) -> dict:
    """Which heavy modules a fresh interpreter holds after running ``code``."""
    report = f"print(json.dumps({{m: m in sys.modules for m in {HEAVY!r}}}))"
    probe = f"{code}\nimport json, sys\n{report}"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.splitlines()[-1])


def test_import_pipeline_loads_no_framework():
    loaded = _loaded_after("import pipeline")
    assert not any(loaded.values()), loaded


def test_cli_help_loads_no_framework():
    code = ("from pipeline.cli.main import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass")
    loaded = _loaded_after(code)
    assert not any(loaded.values()), loaded


def test_public_names_resolve_on_first_use():
    import pipeline

    assert pipeline.resolve_backbone.__module__ == "pipeline.models.backbones"
    assert set(pipeline.__all__) <= set(dir(pipeline))
    import pipeline.advice.run  # loading the subpackages leaves the names alone
    import pipeline.auditing.run
    import pipeline.finetuning.network

    assert callable(pipeline.audit) and callable(pipeline.advise)  # not the subpackages

    for name in pipeline.__all__:  # each comes from the subpackage that defines it
        assert getattr(pipeline, name).__module__.startswith(pipeline._EXPORTS[name]), name
    assert callable(pipeline.finetune)
    with pytest.raises(AttributeError):
        pipeline.no_such_name  # noqa: B018


def test_plots_leave_the_callers_matplotlib_alone(tmp_path):
    code = (f"import matplotlib\nmatplotlib.use('svg')\n"
            f"from pipeline.report import plots\n"
            f"plots.interval_chart(['a', 'b'], [0.5, 0.7], {str(tmp_path / 'p.png')!r}, 't')\n"
            f"import matplotlib.pyplot as plt\n"
            f"assert matplotlib.get_backend() == 'svg', matplotlib.get_backend()\n"
            f"assert plt.get_fignums() == []")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(bool(glob.glob("/dev/nvidia[0-9]*")), reason="a GPU machine asks torch")
def test_a_cache_hit_through_the_cli_imports_no_torch(tmp_path, fresh_memo):
    data = make_folder(tmp_path / "d", classes=("a", "b"), per_class=3)
    args = ["extract", str(data), "--backbone", "resnet18", "--weights", "none",
            "--image-size", "32", "--workers", "0", "--cache-dir", str(tmp_path / "c"),
            "--split", "1,0,0"]
    code = (f"import sys\nfrom pipeline.cli.main import main\n"
            f"try:\n    main({args!r})\nexcept SystemExit as e:\n    assert not e.code, e.code")
    first = _loaded_after(code)
    assert first["torch"]  # the miss ran the model
    hit = _loaded_after(code)
    assert not hit["torch"] and not hit["sklearn"] and not hit["matplotlib"], hit

"""A missing optional dependency ends in one line naming the extra to install."""

from __future__ import annotations

import sys

import pytest

from pipeline.core.errors import MissingExtraError, PipelineError
from pipeline.core.extras import EXTRAS, require


def test_an_installed_module_is_returned():
    assert require("json", "a test").dumps([1]) == "[1]"


def test_a_missing_module_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "cleanlab", None)  # import of it now fails as if absent
    with pytest.raises(MissingExtraError) as caught:
        require("cleanlab", "pipeline audit")
    err = caught.value
    assert isinstance(err, PipelineError)
    assert (err.module, err.extra) == ("cleanlab", "audit")
    line = str(err)
    assert "\n" not in line
    assert "pipeline audit needs cleanlab" in line
    assert "cnn-bottleneck-pipeline[audit]" in line


def test_a_submodule_request_names_the_top_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if never imported either
    with pytest.raises(MissingExtraError, match=r"\[parquet\]"):
        require("pyarrow.parquet", "reading Parquet")


def test_every_extra_named_exists_in_pyproject():
    from pathlib import Path

    import tomllib

    project = tomllib.loads((Path(__file__).parents[2] / "pyproject.toml").read_text())
    extras = set(project["project"]["optional-dependencies"])
    assert set(EXTRAS.values()) <= extras


def test_a_broken_dependency_of_an_installed_module_still_raises(monkeypatch, tmp_path):
    (tmp_path / "fakemod.py").write_text("import no_such_module_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError):
        require("fakemod", "a test")

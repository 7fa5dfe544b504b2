"""The error types: one module, facts as attributes, neutral words below the CLI, one line."""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import pytest

from pipeline.cli.messages import ADVICE, advice, one_line
from pipeline.core import errors
from pipeline.core.errors import CacheError, MissingExtraError, OptionError, PipelineError

PACKAGE = Path(__file__).resolve().parents[2] / "pipeline"
# Below the CLI the library names no command: a script meets these errors too.
NEUTRAL = ("core", "data", "models", "metrics", "store", "heads", "extract", "deploy")


def _modules():
    return sorted(p for p in PACKAGE.rglob("*.py"))


def _error_classes(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)
            and any("Error" in ast.unparse(base) or ast.unparse(base) in errors.__all__
                    for base in node.bases)]


def test_every_error_type_is_defined_in_core_errors_once():
    elsewhere = {str(p.relative_to(PACKAGE)): _error_classes(p) for p in _modules()
                 if p != PACKAGE / "core" / "errors.py" and _error_classes(p)}
    assert elsewhere == {}
    names = _error_classes(PACKAGE / "core" / "errors.py")
    assert len(names) == len(set(names)) and "ExportError" in names
    assert sorted(names + ["PipelineError"]) == sorted(errors.__all__)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), PipelineError)


def _raised_strings(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            found += [c.value for c in ast.walk(node.exc)
                      if isinstance(c, ast.Constant) and isinstance(c.value, str)]
    return found


@pytest.mark.parametrize("layer", NEUTRAL)
def test_errors_below_the_cli_name_no_command(layer):
    wording = {str(p.relative_to(PACKAGE)): text for p in (PACKAGE / layer).rglob("*.py")
               for text in _raised_strings(p) if "`pipeline " in text}
    assert wording == {}


@pytest.mark.parametrize("layer", [*NEUTRAL, "finetuning", "advice", "auditing",
                                   "distillation", "report"])
def test_errors_below_the_cli_name_no_flag(layer):
    # A flag is the command line's spelling of an option; pipeline.cli.messages adds it.
    wording = {str(p.relative_to(PACKAGE)): text for p in (PACKAGE / layer).rglob("*.py")
               for text in _raised_strings(p) if re.search(r"--[a-z]", text)}
    assert wording == {}


def test_every_advice_is_for_a_reason_the_library_raises():
    strings = {c.value for p in _modules() if "cli" not in p.parts
               for c in ast.walk(ast.parse(p.read_text()))
               if isinstance(c, ast.Constant) and isinstance(c.value, str)}
    assert sorted(set(ADVICE) - strings) == []


def test_facts_are_attributes_and_survive_pickling():
    err = CacheError("x.h5 is not ours", path=Path("x.h5"), reason="engine-export")
    assert err.path == Path("x.h5") and err.reason == "engine-export"
    assert err.facts == {"path": Path("x.h5")}
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is CacheError and str(again) == str(err)
    assert again.path == err.path and again.reason == err.reason
    option = pickle.loads(pickle.dumps(OptionError("folds", 1, "an integer >= 2")))
    assert (option.option, option.value, option.allowed) == ("folds", 1, "an integer >= 2")
    assert str(option) == "folds must be an integer >= 2, not 1"
    extra = MissingExtraError("cleanlab", "audit", "the label audit")
    assert (extra.module, extra.extra, extra.purpose) == ("cleanlab", "audit", "the label audit")


def test_the_cli_words_the_advice_from_the_facts():
    err = errors.BackboneError("resnet18 has no layer 'x'", backbone="resnet18", layer="x",
                               reason="unknown-layer")
    assert "pipeline" not in str(err)
    assert one_line(err) == "resnet18 has no layer 'x'; `pipeline layers resnet18` lists them"
    unnamed = errors.BlockError("cannot unfreeze 9 layers", backbone=None,
                                reason="too-many-layers")
    assert advice(unnamed) == "`pipeline blocks BACKBONE --layers` lists them"
    assert one_line(PipelineError("plain")) == "plain"  # no reason: the message alone
    assert all("\n" not in text for text in ADVICE.values())


def test_an_error_from_a_dataloader_worker_is_its_last_line():
    wrapped = errors.DataError("Caught DataError in DataLoader worker process 0.\nTraceback "
                               "(most recent call last):\n  ...\npipeline.core.errors."
                               "DataError: a.png: cannot be read")
    assert one_line(wrapped) == "a.png: cannot be read"

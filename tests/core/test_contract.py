"""The stage contract: ranges declared as data, checked once; results that write themselves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from pipeline.core.atomic import save_figure, write_bytes, write_json, write_text
from pipeline.core.contract import Between, OneOf, Options, Result, Satisfies, to_plain
from pipeline.core.errors import OptionError, PipelineError


@dataclass(frozen=True, kw_only=True)
class ToyOptions(Options):
    folds: int = 5
    threshold: float = 0.97
    mode: str = "fast"
    top: int | None = None
    name: str = "a"

    constraints = {
        "folds": [Between(2, None, integer=True)],
        "threshold": [Between(0, 1, open="low")],
        "mode": [OneOf(("fast", "exact"))],
        "top": [Between(1, None, integer=True), None],
        "name": [Satisfies(lambda v: isinstance(v, str) and v.isalpha(), "letters")],
    }


def test_defaults_pass_and_every_range_refuses_with_its_facts():
    ToyOptions()
    cases = [("folds", 1, "an integer >= 2"), ("folds", 2.5, "an integer >= 2"),
             ("threshold", 0.0, "a number in (0, 1]"), ("threshold", 1.5, "a number in (0, 1]"),
             ("threshold", float("nan"), "(0, 1]"), ("mode", "slow", "one of 'fast', 'exact'"),
             ("top", 0, "or unset"), ("name", "a1", "letters"), ("folds", True, "integer")]
    for name, value, allowed in cases:
        with pytest.raises(OptionError) as caught:
            ToyOptions(**{name: value})
        err = caught.value
        assert isinstance(err, PipelineError)
        assert (err.option, err.value) == (name, value)
        assert allowed in str(err) and name.replace("_", "-") in str(err)


def test_bounds_are_inclusive_unless_open_and_none_only_where_declared():
    assert ToyOptions(threshold=1.0, folds=2, top=None).top is None
    assert ToyOptions(top=1).top == 1
    with pytest.raises(OptionError):
        ToyOptions(folds=None)


def test_options_are_keyword_only_frozen_and_replace_checks_again():
    with pytest.raises(TypeError):
        ToyOptions(5)  # positional settings are refused
    opts = ToyOptions()
    with pytest.raises(AttributeError):
        opts.folds = 3
    assert opts.replace(folds=3).folds == 3
    with pytest.raises(OptionError):
        opts.replace(folds=0)
    assert opts.to_json() == {"folds": 5, "threshold": 0.97, "mode": "fast", "top": None,
                              "name": "a"}


@dataclass
class ToyResult(Result):
    path: Path
    scores: np.ndarray
    counts: dict = field(default_factory=dict)

    def write(self, out):
        return [write_json(Path(out) / "toy.json", self.to_json())]


def test_result_to_json_is_plain_and_write_goes_where_asked(tmp_path):
    result = ToyResult(Path("/x/y.h5"), np.array([0.5, 1.0]), {"n": np.int64(3), 1: (1, 2)})
    plain = result.to_json()
    assert plain == {"path": "/x/y.h5", "scores": [0.5, 1.0], "counts": {"n": 3, "1": [1, 2]}}
    json.dumps(plain)  # nothing left that JSON cannot hold
    (written,) = result.write(tmp_path / "deep" / "out")
    assert json.loads(written.read_text())["scores"] == [0.5, 1.0]


def test_a_result_without_write_says_so():
    with pytest.raises(NotImplementedError, match="Result"):
        Result().write("x")


def test_to_plain_keeps_plain_values():
    assert to_plain({"a": [1, "b", None, 2.5]}) == {"a": [1, "b", None, 2.5]}
    assert to_plain(np.float32(0.5)) == 0.5 and isinstance(to_plain(np.float32(0.5)), float)


def test_atomic_helpers_make_folders_and_leave_no_temporary(tmp_path):
    text = write_text(tmp_path / "a" / "t.md", "héllo\n")
    assert text.read_text(encoding="utf-8") == "héllo\n"
    data = write_bytes(tmp_path / "b" / "d.bin", b"\x00\x01")
    assert data.read_bytes() == b"\x00\x01"
    obj = write_json(tmp_path / "j.json", {"p": Path("q")})
    assert json.loads(obj.read_text()) == {"p": "q"}
    from matplotlib.figure import Figure

    fig = Figure()
    fig.add_subplot().plot([0, 1])
    png = save_figure(fig, tmp_path / "c" / "f.png", dpi=50)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    leftovers = [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []

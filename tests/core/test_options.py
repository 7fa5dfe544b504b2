"""Stage settings as dataclasses: the CLI's defaults are theirs, and the stages take them."""

from __future__ import annotations

import json
from dataclasses import fields

import click
import pytest
from click.testing import CliRunner

from pipeline.cli.main import main
from pipeline.core.errors import OptionError
from pipeline.core.options import (
    AuditOptions,
    ExtractOptions,
    FinetuneConfig,
    HeadsOptions,
    ReportOptions,
    split_settings,
)
from pipeline.extract.features import extract_features
from pipeline.models.backbones import resolve_backbone


def _cli_default(command: str, name: str):
    param = next(p for p in main.commands[command].params if p.name == name)
    return param.default


@pytest.mark.parametrize("command, cls", [("extract", ExtractOptions),
                                          ("finetune", FinetuneConfig),
                                          ("heads", HeadsOptions),
                                          ("audit", AuditOptions),
                                          ("report", ReportOptions)])
def test_every_cli_default_is_the_dataclass_default(command, cls):
    names = {p.name for p in main.commands[command].params if isinstance(p, click.Option)}
    aliases = {"heads": "head_specs", "map": "draw_map"}
    checked = 0
    for field in fields(cls):
        name = aliases.get(field.name, field.name)
        if name not in names or field.name in ("cache_dir", "out"):
            continue
        cli = _cli_default(command, name)
        if isinstance(field.default, bool):  # flags (--x) and switches (--x/--no-x)
            assert cli is field.default, field.name
        elif field.name in ("heads", "shots"):
            assert cli == ",".join(map(str, field.default))
        elif field.name == "split_fractions":
            assert tuple(float(v) for v in cli.split(",")) == field.default
        elif cls is FinetuneConfig and field.name in ("unfreeze", "lr", "batch_size"):
            # lists (a sweep's): one value, as text
            assert cli == str(field.default)
        else:
            assert cli == field.default, field.name
        checked += 1
    assert checked >= {"extract": 9, "finetune": 13, "heads": 3, "audit": 7,
                       "report": 1}[command]


def test_settings_go_to_the_dataclass_that_has_them():
    cfg, opts, rest = split_settings({"lr": 0.1, "seed": 3, "cache_dir": "c", "weights": "none"},
                                     FinetuneConfig, ExtractOptions)
    assert cfg == {"lr": 0.1, "seed": 3} and opts == {"cache_dir": "c"}
    assert rest == {"weights": "none"}


def test_a_spec_and_options_give_the_cache_that_the_cli_gives(tmp_path, image_folder):
    spec = resolve_backbone("resnet18", "none", image_size=32)
    typed = extract_features(image_folder, backbone=spec,
                             options=ExtractOptions(cache_dir=tmp_path / "c", workers=0))
    ran = CliRunner().invoke(main, ["extract", str(image_folder), "--backbone", "resnet18",
                                    "--weights", "none", "--image-size", "32", "--workers", "0",
                                    "--cache-dir", str(tmp_path / "c"), "--json", "-q"])
    assert ran.exit_code == 0, ran.output
    assert json.loads(ran.stdout)["hit"] and json.loads(ran.stdout)["key"] == typed.key


def test_settings_go_by_keyword_to_the_one_place_that_takes_them(tmp_path, image_folder):
    with pytest.raises(TypeError):  # options are keyword-only
        ExtractOptions("float16")
    with pytest.raises(TypeError):  # no field of that name
        ExtractOptions(epochs=3)
    with pytest.raises(TypeError):  # nothing is routed by name: a spec carries the weights
        extract_features(image_folder, weights="none", cache_dir=tmp_path / "c")
    with pytest.raises(OptionError, match="dtype must be one of 'float32', 'float16'"):
        ExtractOptions(dtype="int8")
    with pytest.raises(OptionError, match="split-fractions must be three fractions"):
        ExtractOptions(split_fractions=(0.5, 0.5, 0.5))
    assert not (tmp_path / "c").exists()

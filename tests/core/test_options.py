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
    FINETUNE_CONCERNS,
    AuditOptions,
    ExtractOptions,
    HeadsOptions,
    OptimizerOptions,
    ReportOptions,
    TrainingOptions,
    split_settings,
)
from pipeline.extract.features import extract_features
from pipeline.models.backbones import resolve_backbone


def _cli_default(command: str, name: str):
    param = next(p for p in main.commands[command].params if p.name == name)
    return param.default


@pytest.mark.parametrize("command, cls", [("extract", ExtractOptions),
                                          *(("finetune", c) for c in FINETUNE_CONCERNS.values()),
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
        elif command == "finetune" and field.name in ("unfreeze", "lr", "batch_size"):
            # lists (a sweep's): one value, as text
            assert cli == str(field.default)
        else:
            assert cli == field.default, field.name
        checked += 1
    assert checked >= {"ExtractOptions": 9, "OptimizerOptions": 5, "NetworkOptions": 3,
                       "TrainingOptions": 5, "ActivationOptions": 3, "HeadsOptions": 3,
                       "AuditOptions": 7, "ReportOptions": 1}[cls.__name__]


def test_settings_go_to_the_dataclass_that_has_them():
    optim, training, opts, rest = split_settings(
        {"lr": 0.1, "seed": 3, "cache_dir": "c", "weights": "none"}, OptimizerOptions,
        TrainingOptions, ExtractOptions)
    assert optim == {"lr": 0.1} and training == {"seed": 3} and opts == {"cache_dir": "c"}
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


def test_fine_tune_options_refuse_a_value_out_of_range_by_concern():
    from pipeline.core.errors import OptionError
    from pipeline.core.options import FinetuneOptions, NetworkOptions, PredictOptions

    for build, message in (
            (lambda: OptimizerOptions(lr=0), "lr must be a number > 0 or one of 'auto'"),
            (lambda: OptimizerOptions(schedule="linear"), "schedule must be one of"),
            (lambda: NetworkOptions(unfreeze="top"), "unfreeze must be a number of blocks"),
            (lambda: NetworkOptions(unfreeze=-1), "unfreeze must be"),
            (lambda: TrainingOptions(batch_size=0), "batch-size must be an integer >= 1"),
            (lambda: FinetuneOptions(training=OptimizerOptions()), "training must be"),
            (lambda: PredictOptions(top_k=0), "top-k must be an integer >= 1"),
            (lambda: PredictOptions(device="tpu"), "device must be auto, cuda")):
        with pytest.raises(OptionError, match=message):
            build()
    for unfreeze in (0, 3, "all", "ALL", "15L", "15l"):
        assert NetworkOptions(unfreeze=unfreeze).unfreeze == unfreeze
    assert PredictOptions(device="cuda:1").device == "cuda:1"
    options = FinetuneOptions().with_flat({"lr": 0.01, "unfreeze": 2, "workers": 0})
    assert (options.optim.lr, options.network.unfreeze, options.extract.workers) == (0.01, 2, 0)
    with pytest.raises(TypeError, match="unexpected fine-tune setting"):
        FinetuneOptions.from_flat({"momentum": 0.9})

"""``pipeline advise DATA``: the blocks extracted once (then found in the cache), the advice
printed and written; a cache without blocks refused in one line."""

from __future__ import annotations

import json

from click.testing import CliRunner

from pipeline.advice.run import advise
from pipeline.cli.main import main
from tests.conftest import TINY, extract_tiny, make_split_folder, write_image


def test_advise_extracts_the_blocks_once_and_writes_its_advice(tmp_path):
    root = make_split_folder(tmp_path / "data", counts={"train": 8, "val": 4, "test": 4},
                             classes=("a", "b", "c"))
    args = ["advise", str(root), "--backbone", TINY["backbone"], "--weights", "none",
            "--image-size", "32", "--cache-dir", str(tmp_path / "cache"), "--out",
            str(tmp_path / "out"), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output.startswith("Advice (resnet18): ")
    assert "--unfreeze" in result.output and "LogME" in result.output
    assert "12 validation images cannot tell a gap under" in result.output  # 4 a class
    written = json.loads((tmp_path / "out" / "advice.json").read_text())
    assert written["blocks"] == 4 and written["per_class_median"] == 8
    assert [r["layer"] for r in written["layers"]] == ["layer1", "layer2", "layer3",
                                                       "bottleneck"]
    again = advise(written["cache"])  # the cache itself, nothing extracted
    assert again.unfreeze == written["unfreeze"] and again.files == {}
    assert again.to_json() == {**written, "files": {}}  # the same advice, not yet written


def test_a_cache_of_the_bottleneck_alone_is_refused_in_one_line(tmp_path):
    root = make_split_folder(tmp_path / "data", classes=("a", "b"))
    cache = extract_tiny(root, cache_dir=tmp_path / "cache").cache_path
    result = CliRunner().invoke(main, ["advise", str(cache)])
    assert result.exit_code != 0
    assert result.output.splitlines() == [
        f"Error: {cache}: advice needs every block's features (this cache holds "
        "bottleneck); extract with --layer blocks"]
    assert "Traceback" not in result.output


def test_a_flat_unlabelled_folder_is_refused_in_one_line_naming_what_takes_it(tmp_path):
    for i in range(6):
        write_image(tmp_path / "flat" / f"{i}.jpg", seed=i)
    args = ["advise", str(tmp_path / "flat"), "--backbone", TINY["backbone"], "--weights",
            "none", "--image-size", "32", "--cache-dir", str(tmp_path / "cache"), "-q"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1
    assert "unlabelled images" in result.output and "needs class folders" in result.output
    assert "`pipeline audit`" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1

"""`cache export`: features with path, label, split and valid, read back without this package."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import polars as pl
import pytest

from pipeline.core.errors import ExportError, OptionError
from pipeline.core.options import CacheExportOptions
from pipeline.store.export import export_cache
from tests.conftest import extract_tiny, make_folder, write_image


@pytest.fixture(scope="module")
def labelled_cache(tmp_path_factory):
    root = make_folder(tmp_path_factory.mktemp("d") / "images", classes=("a", "b"), per_class=6)
    (root / "a" / "bad.png").write_bytes(b"not a png")
    shutil.copy(root / "b" / "000.png", os.fsencode(root / "b") + b"/caf\xe9.png")
    return extract_tiny(root, cache_dir=tmp_path_factory.mktemp("c")).cache_path


def _stored(cache):
    with h5py.File(cache) as f:
        classes = f["classes"].asstr()[:]
        return (f["features"][:], f["valid"][:], f["paths"][:],
                classes[f["labels"][:]], f["split"].asstr()[:])


def test_parquet_read_back_with_pandas_and_polars(tmp_path, labelled_cache):
    features, valid, raw, labels, split = _stored(labelled_cache)
    out = tmp_path / "f.parquet"
    result = _export(labelled_cache, out, "parquet")
    assert result["rows"] == len(valid) == 14
    df = pd.read_parquet(out)
    assert list(df.columns) == ["path", "path_bytes", "label", "split", "valid", "features"]
    assert df["label"].tolist() == labels.tolist() and df["split"].tolist() == split.tolist()
    assert df["valid"].tolist() == valid.tolist() and not valid.all()
    assert df["path_bytes"].tolist() == raw.tolist()  # the names' bytes, losslessly
    assert "b/caf\\xe9.png" in df["path"].tolist()  # readable where the bytes are not UTF-8
    got = np.stack(df["features"].to_numpy())
    np.testing.assert_array_equal(got[valid], features[valid])
    assert np.isnan(got[~valid]).all()
    polars = pl.read_parquet(out)
    np.testing.assert_array_equal(polars["features"].to_numpy()[valid], features[valid])


def test_csv_read_back_with_pandas(tmp_path, labelled_cache):
    features, valid, _, labels, split = _stored(labelled_cache)
    out = tmp_path / "f.csv"
    _export(labelled_cache, out, "csv")
    df = pd.read_csv(out)
    assert list(df.columns[:4]) == ["path", "label", "split", "valid"]
    assert df.shape == (len(valid), 4 + features.shape[1])
    np.testing.assert_array_equal(df.iloc[:, 4:].to_numpy(np.float32)[valid], features[valid])
    assert df["label"].tolist() == labels.tolist() and df["split"].tolist() == split.tolist()


def test_npy_folder_read_back_with_numpy(tmp_path, labelled_cache):
    features, valid, raw, labels, _ = _stored(labelled_cache)
    _export(labelled_cache, tmp_path / "npy", "npy")
    got = np.load(tmp_path / "npy" / "features.npy", mmap_mode="r")
    np.testing.assert_array_equal(got[valid], features[valid])
    assert np.load(tmp_path / "npy" / "valid.npy").tolist() == valid.tolist()
    assert np.load(tmp_path / "npy" / "label.npy").tolist() == labels.tolist()
    assert np.load(tmp_path / "npy" / "path_bytes.npy").tolist() == raw.tolist()


def test_unlabelled_set_exports_without_labels_or_splits(tmp_path):
    for i in range(5):
        write_image(tmp_path / "flat" / f"{i}.png", i)
    cache = extract_tiny(tmp_path / "flat", cache_dir=tmp_path / "c").cache_path
    df = pd.read_parquet(_export(cache, tmp_path / "u.parquet", "parquet")["files"][0])
    assert df["label"].isna().all() and df["split"].isna().all() and df["valid"].all()
    _export(cache, tmp_path / "npy", "npy")
    assert not (tmp_path / "npy" / "label.npy").exists()


def test_unknown_format_is_a_user_error():
    with pytest.raises(OptionError, match="format must be one of 'npy', 'parquet', 'csv', "
                                          "not 'xlsx'"):
        CacheExportOptions(format="xlsx")


def test_an_out_of_the_wrong_kind_is_a_user_error_before_anything_is_written(tmp_path,
                                                                           labelled_cache):
    folder = tmp_path / "folder"
    folder.mkdir()
    for fmt in ("csv", "parquet"):
        with pytest.raises(ExportError, match=f"is a folder; {fmt} writes one file") as err:
            _export(labelled_cache, folder, fmt)
        assert err.value.path == folder and err.value.format == fmt  # the facts
        assert "--out" not in str(err.value)  # a script meets it too: no flag named
    afile = tmp_path / "features.csv"
    afile.write_text("mine")
    with pytest.raises(ExportError, match="is a file; npy writes a folder") as err:
        _export(labelled_cache, afile, "npy")
    assert err.value.path == afile
    assert list(folder.iterdir()) == [] and afile.read_text() == "mine"


def _reference(cache, out, fmt: str, block_rows: int) -> list:
    """What the export of ``cache`` as ``fmt`` must hold, byte for byte, written by plain
    numpy, csv and pyarrow calls on the whole cache (Parquet: one row group per block)."""
    import csv
    import io
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.data.layouts import as_bytes, display
    from pipeline.store.cache import read_strings

    with h5py.File(cache) as f:
        features, valid = f["features"][:], f["valid"][:]
        names = read_strings(f["paths"]).tolist()
        labelled = "labels" in f
        labels = (read_strings(f["classes"])[f["labels"][:]].tolist() if labelled
                  else [None] * len(valid))
        split = read_strings(f["split"]).tolist() if labelled else [None] * len(valid)
    path, raw = [display(p) for p in names], [as_bytes(p) for p in names]
    n, dim = features.shape
    if fmt == "npy":
        out.mkdir()
        columns = {"features": features, "valid": np.array(valid, bool),
                   "path": np.array(path, str), "path_bytes": np.array(raw, "S")}
        if labelled:
            columns.update(label=np.array(labels, str), split=np.array(split, str))
        for name, array in columns.items():
            np.save(out / f"{name}.npy", array)
        files = [f"{name}.npy" for name in columns]
        (out / "columns.json").write_text(json.dumps(
            {"rows": n, "dim": dim, "labelled": labelled, "files": files}, indent=2) + "\n")
        return sorted(p.name for p in out.iterdir())
    if fmt == "csv":
        text = io.StringIO(newline="")
        writer = csv.writer(text)
        writer.writerow(["path", "label", "split", "valid", *(f"f{j}" for j in range(dim))])
        for i in range(n):
            writer.writerow([path[i], labels[i] or "", split[i] or "", bool(valid[i]),
                             *(f"{v:.9g}" for v in features[i].astype(np.float64))])
        out.write_bytes(text.getvalue().encode("utf-8"))
        return [out.name]
    value = pa.float32()
    schema = pa.schema([("path", pa.string()), ("path_bytes", pa.binary()),
                        ("label", pa.string()), ("split", pa.string()), ("valid", pa.bool_()),
                        ("features", pa.list_(value, dim))])
    with pq.ParquetWriter(out, schema) as writer:
        for lo in range(0, n, block_rows):
            rows = slice(lo, lo + block_rows)
            flat = pa.array(features[rows].reshape(-1), value)
            writer.write_table(pa.table({
                "path": path[rows], "path_bytes": pa.array(raw[rows], pa.binary()),
                "label": pa.array(labels[rows], pa.string()),
                "split": pa.array(split[rows], pa.string()), "valid": valid[rows],
                "features": pa.FixedSizeListArray.from_arrays(flat, dim)}, schema=schema))
    return [out.name]


@pytest.mark.parametrize("fmt", ["npy", "parquet", "csv"])
@pytest.mark.parametrize("block_rows", [None, 4])
@pytest.mark.parametrize("labelled", [True, False])
def test_the_files_are_byte_for_byte_those_of_plain_writers(tmp_path, labelled_cache,
                                                            monkeypatch, fmt, block_rows,
                                                            labelled):
    """Each format's bytes, also when the cache is read in several blocks (4 rows each)."""
    if labelled:
        cache = labelled_cache
    else:
        for i in range(5):
            write_image(tmp_path / "flat" / f"{i}.png", i)
        cache = extract_tiny(tmp_path / "flat", cache_dir=tmp_path / "c").cache_path
    with h5py.File(cache) as f:
        n, dim = f["features"].shape
        itemsize = f["features"].dtype.itemsize
    if block_rows:
        monkeypatch.setattr("pipeline.store.export._BLOCK_BYTES", block_rows * dim * itemsize)
    name = "npy" if fmt == "npy" else f"f.{fmt}"
    (tmp_path / "got").mkdir()
    (tmp_path / "want").mkdir()
    got, want = tmp_path / "got" / name, tmp_path / "want" / name
    expected = _reference(cache, want, fmt, block_rows or n)
    result = _export(cache, got, fmt)
    files = sorted(p.name for p in got.iterdir()) if fmt == "npy" else [got.name]
    assert files == expected
    assert sorted(Path(p).name for p in result["files"]) == expected
    for file in expected:
        wanted = (want / file if fmt == "npy" else want).read_bytes()
        assert (got / file if fmt == "npy" else got).read_bytes() == wanted, file
    # no temporary is left beside the files
    assert sorted(p.name for p in got.parent.iterdir()) == [name]


def _export(cache, out, fmt: str) -> dict:
    """``export_cache`` as ``pipeline cache export`` runs it: plan, write, the JSON."""
    result = export_cache(cache, options=CacheExportOptions(format=fmt))
    result.write(out)
    return result.to_json()


def test_the_stage_plans_and_writes_nothing_until_write(tmp_path, labelled_cache):
    before = sorted(labelled_cache.parent.iterdir())
    result = export_cache(labelled_cache, options=CacheExportOptions(format="csv"))
    assert result.to_json() == {"rows": 14, "dim": result.dim, "format": "csv", "files": []}
    assert sorted(labelled_cache.parent.iterdir()) == before and result.dim > 0
    with pytest.raises(TypeError):
        export_cache(labelled_cache, tmp_path / "f.csv")  # options by keyword only
    assert result.write(tmp_path / "f.csv") == [tmp_path / "f.csv"]
    assert result.to_json()["files"] == [str(tmp_path / "f.csv")]


@pytest.mark.parametrize("fmt", ["npy", "parquet", "csv"])
def test_an_interrupted_write_leaves_the_previous_file_and_no_temporary(
        tmp_path, labelled_cache, monkeypatch, fmt):
    import pipeline.store.export as module

    blocks = module._blocks

    def first_block_then_fail(f):
        yield next(blocks(f))
        raise RuntimeError("killed")

    with h5py.File(labelled_cache) as f:
        dim = f["features"].shape[1]
    monkeypatch.setattr(module, "_BLOCK_BYTES", 4 * dim * 4)  # 4 rows a block
    monkeypatch.setattr(module, "_blocks", first_block_then_fail)
    out = tmp_path / "out"
    out.mkdir()
    target = out / "features.npy" if fmt == "npy" else out / f"f.{fmt}"
    target.write_bytes(b"previous")
    with pytest.raises(RuntimeError, match="killed"):
        _export(labelled_cache, out if fmt == "npy" else target, fmt)
    assert sorted(p.name for p in out.iterdir()) == [target.name]
    assert target.read_bytes() == b"previous"


def test_the_command_writes_the_files_and_says_what_it_wrote(tmp_path, labelled_cache):
    from click.testing import CliRunner

    from pipeline.cli.main import main

    runner = CliRunner()
    dim = h5py.File(labelled_cache)["features"].shape[1]
    out = tmp_path / "f.csv"
    shown = runner.invoke(main, ["cache", "export", str(labelled_cache), "--format", "csv",
                                 "--out", str(out)])
    assert shown.exit_code == 0, shown.output
    assert shown.output.strip().splitlines() == [f"14 rows x {dim} features -> {out} (csv)"]
    as_json = runner.invoke(main, ["cache", "export", str(labelled_cache), "--format", "npy",
                                   "--out", str(tmp_path / "npy"), "--json"])
    assert json.loads(as_json.output) == {
        "rows": 14, "dim": dim, "format": "npy",
        "files": [str(tmp_path / "npy" / f) for f in (
            "features.npy", "valid.npy", "path.npy", "path_bytes.npy", "label.npy",
            "split.npy", "columns.json")]}
    wrong = runner.invoke(main, ["cache", "export", str(labelled_cache), "--out",
                                 str(tmp_path / "npy")])
    assert wrong.exit_code == 1 and wrong.output.strip().splitlines() == [
        f"Error: {tmp_path / 'npy'} is a folder; parquet writes one file: give a file "
        f"name such as {tmp_path / 'npy' / 'features.parquet'}"]

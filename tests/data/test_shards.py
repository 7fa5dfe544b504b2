"""Shard files as data sets: Parquet, Arrow folders and WebDataset tars, read through addresses."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner
from PIL import Image

from pipeline.cli.main import main
from pipeline.core.errors import DataError
from pipeline.data.images import ImageFiles, load_image_set, read_image
from pipeline.data.shards import expand_braces, image_bytes, split_address
from tests.conftest import TINY, extract_tiny

NAMES = ["zebra", "ant", "mole"]  # a ClassLabel order that is not alphabetical


def png(seed: int, size: int = 20) -> bytes:
    rng = np.random.default_rng(seed)
    out = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out, "PNG")
    return out.getvalue()


def hf_metadata(names=NAMES) -> dict:
    """The schema metadata Hugging Face datasets writes: Image and ClassLabel features."""
    features = {"image": {"_type": "Image"}, "label": {"names": list(names), "_type": "ClassLabel"}}
    return {"huggingface": json.dumps({"info": {"features": features}})}


def write_parquet(path: Path, n: int = 9, seed: int = 0, struct: bool = True,
                  labels="classlabel", split=None, row_group_size: int | None = None) -> Path:
    """``n`` PNG rows; labels "classlabel" (ints + metadata), "strings", "ints" or None."""
    images = [png(seed + i) for i in range(n)]
    columns = {"image": [{"bytes": b, "path": f"{seed + i}.png"} for i, b in enumerate(images)]
               if struct else images}
    if labels == "strings":
        columns["label"] = [NAMES[i % 3] for i in range(n)]
    elif labels in ("classlabel", "ints"):
        columns["label"] = [i % 3 for i in range(n)]
    if split is not None:
        columns["split"] = split
    table = pa.table(columns)
    if labels == "classlabel":
        table = table.replace_schema_metadata(hf_metadata())
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


def _extract(data, tmp_path, **kw):
    return extract_tiny(data, tmp_path / "c", progress=False, **kw)


def _cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.output


def _cli_extract(data, tmp_path) -> tuple[int, str]:
    return _cli("extract", data, "--cache-dir", tmp_path / "c", "--backbone", TINY["backbone"],
                "--weights", TINY["weights"], "--image-size", TINY["image_size"], "--workers", 0)


def _one_line_error(code: int, output: str, *fragments: str) -> None:
    assert code != 0 and "Traceback" not in output and output.count("\n") == 1, output
    for fragment in fragments:
        assert fragment in output, output


# --- Parquet -------------------------------------------------------------------------------------

def test_plain_bytes_with_string_labels_and_a_split_column(tmp_path):
    split = ["train"] * 6 + ["valid"] * 3 + ["test"] * 3
    path = write_parquet(tmp_path / "d" / "data.parquet", n=12, struct=False, labels="strings",
                         split=split)
    images = load_image_set(path)
    assert images.paths[:2] == ["data.parquet#0", "data.parquet#1"]
    assert images.classes == sorted(NAMES)  # strings: sorted, as class folders are
    assert [images.classes[k] for k in images.labels[:3]] == NAMES
    assert images.split_counts() == {"train": 6, "val": 3, "test": 3}
    assert images.split_sources["val"] == "given (split column)"
    image, digest = read_image(images.absolute(4))
    assert np.array_equal(np.asarray(image), np.asarray(Image.open(io.BytesIO(png(4)))))
    assert len(digest) == 64


def test_struct_images_with_classlabel_integers_keep_the_classlabel_order(tmp_path):
    images = load_image_set(write_parquet(tmp_path / "data.parquet", n=9))
    assert images.classes == NAMES
    assert list(images.labels) == [i % 3 for i in range(9)]
    assert image_bytes(images.absolute(5)) == png(5)


def test_integer_labels_without_metadata_are_named_in_numeric_order(tmp_path):
    table = pa.table({"img": [png(i) for i in range(33)], "label": [i % 11 for i in range(33)]})
    pq.write_table(table, tmp_path / "x.parquet")
    images = load_image_set(tmp_path / "x.parquet")
    assert images.classes == [str(i) for i in range(11)]  # "10" after "9", not after "1"
    assert images.classes[images.labels[21]] == "10"


def test_splits_from_file_names_in_a_folder_of_shards(tmp_path):
    root = tmp_path / "hub" / "data"
    write_parquet(root / "train-00000-of-00002.parquet", n=9, seed=0)
    write_parquet(root / "train-00001-of-00002.parquet", n=9, seed=100)
    write_parquet(root / "validation-00000-of-00001.parquet", n=6, seed=200)
    write_parquet(root / "test-00000-of-00001.parquet", n=6, seed=300)
    (root / "README.md").write_text("a dataset card")
    images = load_image_set(tmp_path / "hub")
    assert images.split_counts() == {"train": 18, "val": 6, "test": 6}
    assert images.paths[0] == "data/test-00000-of-00001.parquet#0"
    assert images.split_sources["val"].startswith("given (file names such as data/validation")
    assert image_bytes(images.root / "data/train-00001-of-00002.parquet#3") == png(103)


def test_a_row_that_does_not_decode_is_listed_and_skipped(tmp_path):
    rows = [png(i) for i in range(9)]
    rows[4] = b"\x89PNG this is not a picture"
    table = pa.table({"image": rows, "label": [NAMES[i % 3] for i in range(9)]})
    pq.write_table(table, tmp_path / "data.parquet")
    result = _extract(tmp_path / "data.parquet", tmp_path)
    assert result.failed == 1 and result.failures[0][0] == "data.parquet#4"
    assert "UnidentifiedImageError" in result.failures[0][1]
    with h5py.File(result.cache_path) as f:
        assert list(f["valid"][:]) == [i != 4 for i in range(9)]


def test_missing_image_column_unknown_label_and_empty_shard_end_in_one_line(tmp_path):
    pq.write_table(pa.table({"pixels": [1, 2], "label": [0, 1]}), tmp_path / "a.parquet")
    _one_line_error(*_cli_extract(tmp_path / "a.parquet", tmp_path), "no column of image bytes",
                    "pixels (int64)")
    bad = pa.table({"image": [png(0), png(1)], "label": [0, 7]})
    pq.write_table(bad.replace_schema_metadata(hf_metadata()), tmp_path / "b.parquet")
    _one_line_error(*_cli_extract(tmp_path / "b.parquet", tmp_path),
                    "row 1: label 7 is not one of the 3 class names of its ClassLabel")
    named = pa.table({"image": [png(0)], "label": ["giraffe"]})
    pq.write_table(named.replace_schema_metadata(hf_metadata()), tmp_path / "c.parquet")
    _one_line_error(*_cli_extract(tmp_path / "c.parquet", tmp_path),
                    "label 'giraffe' is not one of the names of its ClassLabel (zebra, ant")
    empty = pa.table({"image": pa.array([], pa.binary()), "label": pa.array([], pa.int64())})
    pq.write_table(empty, tmp_path / "d.parquet")
    _one_line_error(*_cli_extract(tmp_path / "d.parquet", tmp_path), "d.parquet: an empty shard")


def test_the_cache_key_changes_when_a_shard_changes(tmp_path):
    root = tmp_path / "d"
    write_parquet(root / "train-0.parquet", n=9)
    write_parquet(root / "test-0.parquet", n=6, seed=50)
    first = _extract(root, tmp_path)
    assert _extract(root, tmp_path).hit
    write_parquet(root / "test-0.parquet", n=6, seed=60)  # same rows, other pictures
    changed = _extract(root, tmp_path)
    assert not changed.hit and changed.key != first.key
    hashed = _extract(root, tmp_path, hash_contents=True)
    os.utime(root / "test-0.parquet", ns=(1, 1))  # touched, not changed: content hash holds
    assert _extract(root, tmp_path, hash_contents=True).key == hashed.key


def test_an_interrupted_extraction_resumes_where_it_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.store.writer._CHUNK_BYTES", 4 * 512 * 4)  # 4 rows a chunk
    data = write_parquet(tmp_path / "d" / "data.parquet", n=16, row_group_size=5)

    def interrupt(done, total):
        if done >= 8:
            raise RuntimeError("killed")

    with pytest.raises(RuntimeError, match="killed"):
        _extract(data, tmp_path, batch_size=4, on_batch=interrupt)
    resumed = _extract(data, tmp_path, batch_size=4)
    assert resumed.resumed_from == 8 and not resumed.hit and resumed.failed == 0
    whole = extract_tiny(data, tmp_path / "whole", progress=False, batch_size=4)
    with h5py.File(resumed.cache_path) as a, h5py.File(whole.cache_path) as b:
        np.testing.assert_allclose(a["features"][:], b["features"][:], rtol=1e-5, atol=1e-6)
        assert list(a["paths"].asstr()[:]) == [f"data.parquet#{i}" for i in range(16)]


def test_a_large_parquet_is_read_a_batch_at_a_time(tmp_path):
    """One row group of 2,000 rows of 16 KB (32 MB of image bytes, in pages of 64 rows):
    listing reads the labels only, and reading every image holds a page and a batch at a time,
    never the column (read a column chunk at once, as pyarrow does by default, it peaks at
    34 MB)."""
    path = tmp_path / "big.parquet"
    rng = np.random.default_rng(0)
    blobs = [rng.bytes(16_000) for _ in range(2000)]
    pq.write_table(pa.table({"image": blobs, "label": [i % 2 for i in range(2000)]}), path,
                   row_group_size=2000, compression="none", use_dictionary=False,
                   write_batch_size=64)
    script = textwrap.dedent(f"""
        import pyarrow as pa
        from pipeline.data.parquet import BATCH_ROWS, list_parquet, row_reader
        assert list_parquet({str(path)!r}).rows == 2000
        reader = row_reader({str(path)!r})
        total = sum(len(reader.image_bytes(i)) for i in range(2000))
        assert total == 2000 * 16_000, total
        assert reader.largest_batch == BATCH_ROWS, reader.largest_batch
        print(pa.default_memory_pool().max_memory())
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 0, run.stderr
    peak = int(run.stdout.split()[-1])
    assert peak < 8_000_000, f"pyarrow held {peak:,} bytes at once for a 32 MB column"


def test_addresses_are_told_from_files(tmp_path):
    data = write_parquet(tmp_path / "a.parquet", n=3)
    assert split_address(f"{data}#2") == (str(data), "2")
    odd = tmp_path / "x.parquet#1.png"  # a real file with such a name stays a file
    odd.write_bytes(png(9))
    assert split_address(odd) is None and image_bytes(odd) == png(9)
    with pytest.raises(FileNotFoundError, match="no row 3"):
        image_bytes(f"{data}#3")
    with pytest.raises(FileNotFoundError):
        image_bytes(tmp_path / "gone.parquet#0")


# --- Arrow (save_to_disk) ------------------------------------------------------------------------

def write_arrow_folder(folder: Path, n: int, seed: int = 0, split: str = "train",
                       files: int = 2) -> Path:
    """What ``Dataset.save_to_disk`` writes: ``data-*.arrow`` (IPC streams), its
    ``dataset_info.json`` and ``state.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data-{k:05d}-of-{files:05d}.arrow" for k in range(files)]
    schema = pa.schema({"image": pa.struct({"bytes": pa.binary(), "path": pa.string()}),
                        "label": pa.int64()}, metadata=hf_metadata())
    rows = iter(range(n))
    for k, name in enumerate(names):
        chunk = [next(rows) for _ in range(n // files + (k < n % files))]
        with pa.OSFile(str(folder / name), "wb") as sink, \
                pa.ipc.new_stream(sink, schema) as writer:
            for part in (chunk[:3], chunk[3:]):  # two record batches per file
                writer.write_batch(pa.record_batch(
                    {"image": [{"bytes": png(seed + i), "path": None} for i in part],
                     "label": [i % 3 for i in part]}, schema=schema))
    features = json.loads(hf_metadata()["huggingface"])["info"]["features"]
    (folder / "dataset_info.json").write_text(json.dumps({"features": features}))
    (folder / "state.json").write_text(json.dumps(
        {"_data_files": [{"filename": n} for n in names], "_split": split}))
    return folder


def test_an_arrow_folder_as_save_to_disk_writes_it(tmp_path):
    folder = write_arrow_folder(tmp_path / "ds", n=15)
    (folder / "cache-1f2e3d.arrow").write_bytes(b"a map() cache, not data")
    images = load_image_set(folder)
    assert len(images) == 15 and images.classes == NAMES
    assert images.paths[:2] == ["data-00000-of-00002.arrow#0", "data-00000-of-00002.arrow#1"]
    assert ("cache-1f2e3d.arrow", "not a data file of its state.json") in images.ignored
    assert image_bytes(images.root / "data-00001-of-00002.arrow#4") == png(12)
    assert [images.classes[k] for k in images.labels[8:11]] == ["mole", "zebra", "ant"]


def test_a_dataset_dict_folder_gives_its_splits_from_its_folders(tmp_path):
    root = tmp_path / "dd"
    write_arrow_folder(root / "train", n=12)
    write_arrow_folder(root / "test", n=6, seed=50, split="test", files=1)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    images = load_image_set(root)
    assert images.split_counts() == {"train": 9, "val": 3, "test": 6}  # val: 1 per class
    assert images.split_sources["test"] == ("given (file names such as "
                                            "test/data-00000-of-00001.arrow)")
    result = _extract(root, tmp_path)
    assert result.images == 18 and result.failed == 0


# --- WebDataset ----------------------------------------------------------------------------------

def write_tar(path: Path, n: int = 6, seed: int = 0, label: str | None = "cls",
              extra: dict | None = None) -> Path:
    """``n`` samples ``<key>.png`` with a ``.cls`` integer or a ``.json`` label (or none)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for i in range(n):
            key = f"{path.stem}/{seed + i:06d}"
            add(f"{key}.png", png(seed + i))
            if label == "cls":
                add(f"{key}.cls", str(i % 3).encode())
            elif label == "json":
                add(f"{key}.json", json.dumps({"label": NAMES[i % 3], "w": 20}).encode())
        for name, data in (extra or {}).items():
            add(name, data)
    return path


def test_tar_with_cls_labels_groups_members_by_key(tmp_path):
    path = write_tar(tmp_path / "train-0.tar", n=9,
                     extra={"train-0/000003.txt": b"a caption", "README": b"notes",
                            "train-0/000009.png": b"not a picture", "train-0/000009.cls": b"1"})
    images = load_image_set(path)
    assert images.paths[3] == "train-0.tar#train-0/000003.png"
    assert images.classes == ["0", "1", "2"] and list(images.labels[:4]) == [0, 1, 2, 0]
    assert image_bytes(images.absolute(3)) == png(3)
    files = ImageFiles(images, lambda image: np.asarray(image), (20, 20, 3))
    assert files[3][2] == "" and files[3][0].shape == (20, 20, 3)
    assert files[9][2].startswith("UnidentifiedImageError")  # listed and skipped, not raised
    assert ("train-0.tar#train-0/000003.txt", "not the image or label of sample "
            "train-0/000003") in images.ignored
    assert ("train-0.tar#README", "no extension: not part of a sample") in images.ignored


def test_tar_with_json_labels(tmp_path):
    images = load_image_set(write_tar(tmp_path / "a.tar", n=9, label="json"))
    assert images.classes == sorted(NAMES)
    assert [images.classes[k] for k in images.labels[:3]] == NAMES


def test_a_brace_pattern_and_a_folder_of_tars_read_the_same_shards(tmp_path):
    for k in range(3):
        write_tar(tmp_path / "shards" / f"train-{k:04d}.tar", n=6, seed=10 * k)
    write_tar(tmp_path / "shards" / "test-0000.tar", n=6, seed=90)
    pattern = load_image_set(str(tmp_path / "shards" / "train-{0000..0002}.tar"))
    assert len(pattern) == 18 and pattern.split_counts()["test"] > 0  # carved: train only
    folder = load_image_set(tmp_path / "shards")
    assert folder.split_counts()["test"] == 6 and len(folder) == 24
    assert set(pattern.paths) < set(folder.paths)
    with pytest.raises(DataError, match=r"1 of its 4 files do not exist, the first .*0003\.tar"):
        load_image_set(str(tmp_path / "shards" / "train-{0000..0003}.tar"))


def test_brace_expansion_follows_bash():
    assert expand_braces("s-{0000..0002}.tar") == ["s-0000.tar", "s-0001.tar", "s-0002.tar"]
    assert expand_braces("{train,test}-{0..1}.tar") == ["train-0.tar", "train-1.tar",
                                                        "test-0.tar", "test-1.tar"]
    assert expand_braces("a{1..5..2}") == ["a1", "a3", "a5"]
    assert expand_braces("a{x}b") == ["a{x}b"] and expand_braces("plain.tar") == ["plain.tar"]


def test_tar_errors_end_in_one_line(tmp_path):
    write_tar(tmp_path / "a.tar", n=3, extra={"a/orphan.cls": b"1"})
    _one_line_error(*_cli_extract(tmp_path / "a.tar", tmp_path),
                    "sample 'a/orphan' has no image member (.jpg, .jpeg, .png or .webp; it has "
                    ".cls)")
    write_tar(tmp_path / "b.tar", n=3, extra={"b/000009.png": png(9), "b/000009.cls": b"cat"})
    _one_line_error(*_cli_extract(tmp_path / "b.tar", tmp_path),
                    "b/000009.cls holds 'cat', not an integer class index")
    write_tar(tmp_path / "c.tar", n=0)
    _one_line_error(*_cli_extract(tmp_path / "c.tar", tmp_path), "c.tar: an empty shard")
    write_tar(tmp_path / "mixed" / "train-0.tar", n=3)
    write_tar(tmp_path / "mixed" / "train-1.tar", n=3, seed=5, label=None)
    _one_line_error(*_cli_extract(tmp_path / "mixed", tmp_path),
                    "train-1.tar has no label column or member while train-0.tar has")


# --- the examples of docs/data.md ----------------------------------------------------------------

def _doc_examples() -> list[str]:
    text = (Path(__file__).parents[2] / "docs" / "data.md").read_text(encoding="utf-8")
    section = text[text.index("## Parquet, Arrow and WebDataset shards"):]
    return [block.split("```", 1)[0] for block in section.split("```python\n")[1:]]


@pytest.mark.parametrize("example", _doc_examples(), ids=["parquet", "arrow", "webdataset"])
def test_the_documented_examples_write_and_read_back_as_they_say(example, tmp_path):
    expected = example.rstrip().rsplit("# prints: ", 1)[1]
    run = subprocess.run([sys.executable, "-c", example], capture_output=True, text=True,
                         cwd=tmp_path, env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == expected
    assert len(example.strip().splitlines()) <= 20

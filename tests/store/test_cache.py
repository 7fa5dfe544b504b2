"""The HDF5 feature store: keys, layout, atomic completion, resume and the readers."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.core.errors import CacheError
from pipeline.store import cache, catalog, integrity, paths
from pipeline.store.paths import cache_path, shard_path
from pipeline.store.writer import FeatureWriter, assemble_shards


def _meta(n=5):
    return {"paths": [f"c{i % 2}/{i}.png" for i in range(n)], "labels": np.arange(n) % 2,
            "split": ["train", "train", "val", "test", "train"][:n], "classes": ["c0", "c1"],
            "data_root": "/data"}


def _writer(tmp_path, key="k1", dim=4, dtype="float32"):
    final = cache_path(tmp_path, "net", key)
    return FeatureWriter(final, {"backbone": "net"}, key, dim, dtype, _meta())


def test_key_is_stable_and_sensitive_to_every_field():
    spec = {"backbone": "a", "preprocessing": {"crop": 224}, "dataset": {"n": 3}}
    assert paths.cache_key(spec) == paths.cache_key(dict(reversed(list(spec.items()))))
    changed = {**spec, "preprocessing": {"crop": 225}}
    assert paths.cache_key(changed) != paths.cache_key(spec)


def test_writer_completes_atomically_and_readers_see_only_complete_files(tmp_path):
    writer = _writer(tmp_path)
    writer.write(0, np.ones((3, 4), np.float32), np.array([True, False, True]), [(1, "bad")])
    assert not writer.final.exists() and writer.partial.exists()
    with pytest.raises(CacheError, match="interrupted"):
        cache.open_cache(writer.partial)
    writer.write(3, np.full((2, 4), 2, np.float32), np.ones(2, bool), [])
    path = writer.finish({"timings": {"seconds": 1.0}})
    assert path.exists() and not writer.partial.exists()
    with cache.open_cache(path) as f:
        assert f.attrs["format"] == integrity.FORMAT and f.attrs["complete"]
        assert f["features"].chunks is not None and f["features"].maxshape == (None, 4)
        assert f["classes"].asstr()[:].tolist() == ["c0", "c1"]
    assert cache.stored_summary(path) == (5, 4, [("c1/1.png", "bad")])


def test_resume_continues_after_the_rows_done(tmp_path):
    first = _writer(tmp_path)
    first.write(0, np.ones((2, 4), np.float32), np.ones(2, bool), [])
    first.close()
    again = _writer(tmp_path)
    assert again.rows_done == 2
    with pytest.raises(ValueError, match="in order"):
        again.write(4, np.ones((1, 4), np.float32), np.ones(1, bool), [])
    again.write(2, np.zeros((3, 4), np.float32), np.ones(3, bool), [])
    path = again.finish({})
    with h5py.File(path) as f:
        assert f["features"][:, 0].tolist() == [1, 1, 0, 0, 0]


def test_a_partial_file_of_another_key_or_corrupt_is_started_over(tmp_path):
    w = _writer(tmp_path, key="k1")
    w.write(0, np.ones((2, 4), np.float32), np.ones(2, bool), [])
    w.close()
    w.partial.write_bytes(b"garbage from a kill mid-write")
    assert _writer(tmp_path, key="k1").rows_done == 0


def test_read_split_returns_float32_rows_of_that_split_that_were_readable(tmp_path):
    w = _writer(tmp_path, dtype="float16")
    feats = np.arange(20, dtype=np.float32).reshape(5, 4)
    w.write(0, feats, np.array([True, False, True, True, True]), [(1, "bad")])
    path = w.finish({})
    train = cache.read_split(path, "train")
    assert train.X.dtype == np.float32 and train.X.flags.c_contiguous
    np.testing.assert_array_equal(train.X, feats[[0, 4]])  # row 1 is unreadable
    assert train.paths == ["c0/0.png", "c0/4.png"] and train.y.tolist() == [0, 0]
    assert cache.read_split(path, "val").X.shape == (1, 4)


def test_foreign_and_missing_files_are_refused(tmp_path):
    with pytest.raises(CacheError, match="no such"):
        cache.open_cache(tmp_path / "none.h5")
    (tmp_path / "text.h5").write_text("hello")
    with pytest.raises(CacheError, match="not an HDF5"):
        cache.open_cache(tmp_path / "text.h5")
    with h5py.File(tmp_path / "other.h5", "w") as f:
        f["x"] = [1]
    with pytest.raises(CacheError, match="not a feature cache"):
        cache.open_cache(tmp_path / "other.h5")


def test_list_find_and_remove(tmp_path):
    done = _writer(tmp_path, key="aaaa1111")
    done.write(0, np.ones((5, 4), np.float32), np.ones(5, bool), [])
    path = done.finish({})
    half = _writer(tmp_path, key="bbbb2222")
    half.close()
    rows = {r["path"]: r["status"] for r in catalog.list_caches(tmp_path)}
    assert rows == {str(path): "complete", str(half.partial): "partial"}
    assert catalog.find_cache(tmp_path, "aaaa") == path
    with pytest.raises(CacheError, match="no cache"):
        catalog.find_cache(tmp_path, "zzzz")
    catalog.remove_cache(path)
    assert not path.exists()


def _export_folder(cache_dir, name, network):
    folder = cache_dir / name
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"\0" * 3000)
    (folder / "exported.json").write_text(json.dumps({"network": network, "created": "then"}))
    return folder


def test_exports_are_listed_found_and_removed_beside_the_caches(tmp_path):
    done = _writer(tmp_path, key="aaaa1111")
    done.write(0, np.ones((5, 4), np.float32), np.ones(5, bool), [])
    path = done.finish({})
    whole = _export_folder(tmp_path, "net-cccc3333.exported", {"backbone": "net"})
    trunk = _export_folder(tmp_path, "net-dddd4444.exported",
                           {"backbone": "net", "activation": "blocks.5"})
    interrupted = tmp_path / "net-eeee5555.exported.partial-77"
    interrupted.mkdir()
    (interrupted / "model.onnx").write_bytes(b"\0" * 10)
    note = tmp_path / "net-ffff6666.exported.refused.json"  # auto refused before any export
    note.write_text(json.dumps({"onnxruntime": "why", "openvino": "why"}))
    rows = {Path(r["path"]).name: r for r in catalog.list_caches(tmp_path)}
    assert rows.keys() == {path.name, whole.name, trunk.name, interrupted.name, note.name}
    assert rows[whole.name]["kind"] == "export" and rows[whole.name]["network"] == "features"
    assert rows[trunk.name]["network"] == "trunk to blocks.5"
    assert rows[whole.name]["bytes"] == len(whole.joinpath("exported.json").read_bytes()) + 3000
    assert rows[interrupted.name] == {"path": str(interrupted), "status": "export (partial)",
                                      "bytes": 10}
    assert rows[note.name]["status"] == "auto refused onnxruntime, openvino"
    (tmp_path / f"{whole.name}.refused.json").write_text("{}")
    assert catalog.find_cache(tmp_path, "cccc") == whole  # the export before the note on it
    assert catalog.find_cache(tmp_path, "aaaa") == path
    with pytest.raises(CacheError, match="export of the network, not a feature cache"):
        cache.open_cache(whole)
    for found in ("cccc", "dddd", "eeee", "ffff"):
        catalog.remove_cache(catalog.find_cache(tmp_path, found))
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".json")) == [
        path.name]
    assert not list(tmp_path.glob("*.exported*"))


def test_read_splits_in_small_blocks_matches_the_stored_rows(tmp_path, monkeypatch):
    # chunks of 3 rows of dim 16
    monkeypatch.setattr("pipeline.store.writer._CHUNK_BYTES", 16 * 3 * 4)
    monkeypatch.setattr(cache, "READ_BYTES", 1)  # one chunk per block: many blocks
    n, rng = 23, np.random.default_rng(0)
    meta = {"paths": [f"{i}.png" for i in range(n)], "labels": np.arange(n) % 3,
            "split": list(rng.choice(["train", "val", "test"], size=n)), "classes": list("abc"),
            "data_root": "/"}
    writer = FeatureWriter(cache_path(tmp_path, "net", "k"), {"backbone": "net"},
                                 "k", 16, "float32", meta)
    feats = rng.normal(size=(n, 16)).astype(np.float32)
    valid = rng.random(n) > 0.2
    writer.write(0, feats, valid, [])
    path = writer.finish({})
    got = cache.read_splits(path)
    for name in ("train", "val", "test"):
        rows = np.flatnonzero((np.array(meta["split"]) == name) & valid)
        np.testing.assert_array_equal(got[name].X, feats[rows])
        assert got[name].paths == [meta["paths"][i] for i in rows]
        np.testing.assert_array_equal(got[name].y, meta["labels"][rows])


def _shards(tmp_path, n, world, dim=3, drop=None):
    """Shard files of a cache of ``n`` rows whose row i holds the value i, row 2 unreadable."""
    final = cache_path(tmp_path, "net", "k")
    meta = {**_meta(n), "split": ["train"] * n}
    paths = []
    for rank in range(world):
        rows = np.arange(rank, n, world)
        if drop is not None:
            rows = rows[rows != drop]
        shard = shard_path(final, rank, world)
        w = FeatureWriter(shard, {"shard": rank}, f"k/{rank}", dim, "float32",
                                {**meta, "paths": [meta["paths"][i] for i in rows],
                                 "labels": meta["labels"][rows], "split": ["train"] * len(rows),
                                 "index": rows})
        features = np.repeat(rows[:, None], dim, 1).astype(np.float32)
        w.write(0, features, rows != 2, [(2, "broken")] if 2 in rows else [])
        paths.append(w.finish({}))
    return final, meta, paths


@pytest.mark.parametrize("world", [1, 2, 3])
def test_assembled_shards_are_the_rows_in_data_set_order(tmp_path, world, monkeypatch):
    # Blocks of 3 rows, each gathered from every shard.
    monkeypatch.setattr("pipeline.store.writer._CHUNK_BYTES", 3 * 3 * 4)
    monkeypatch.setattr(cache, "READ_BYTES", 1)
    written = []
    write = FeatureWriter.write
    monkeypatch.setattr(FeatureWriter, "write",
                        lambda self, start, *a: written.append(start) or write(self, start, *a))
    final, meta, shards = _shards(tmp_path, 11, world)
    writer = FeatureWriter(final, {"backbone": "net"}, "k", 3, "float32", meta)
    assemble_shards(writer, shards)
    writer.finish({})
    assert written[-4:] == [0, 3, 6, 9]
    with cache.open_cache(final) as f:
        np.testing.assert_array_equal(f["features"][:, 0], np.arange(11))
        np.testing.assert_array_equal(f["valid"][:], np.arange(11) != 2)
    assert cache.stored_summary(final)[2] == [(meta["paths"][2], "broken")]
    listed = {row["status"] for row in catalog.list_caches(tmp_path)}
    assert listed == {"complete", "shard"}
    assert catalog.find_cache(tmp_path, "net-k") == final  # the cache, not its shards
    assert catalog.find_cache(tmp_path, f"shard-0-of-{world}") == shards[0]


def test_shards_that_miss_rows_are_refused(tmp_path):
    final, meta, shards = _shards(tmp_path, 11, 2, drop=5)
    writer = FeatureWriter(final, {"backbone": "net"}, "k", 3, "float32", meta)
    with pytest.raises(CacheError, match="hold 10 rows, the data set 11"):
        assemble_shards(writer, shards)


def test_an_interrupted_assembly_resumes_at_its_rows_done(tmp_path, monkeypatch):
    monkeypatch.setattr("pipeline.store.writer._CHUNK_BYTES", 3 * 3 * 4)
    monkeypatch.setattr(cache, "READ_BYTES", 1)
    final, meta, shards = _shards(tmp_path, 11, 2)
    first = FeatureWriter(final, {"backbone": "net"}, "k", 3, "float32", meta)
    first.write(0, np.repeat(np.arange(3.0)[:, None], 3, 1), np.arange(3) != 2, [(2, "broken")])
    first.close()  # killed after one block
    writer = FeatureWriter(final, {"backbone": "net"}, "k", 3, "float32", meta)
    assert writer.rows_done == 3
    starts = []
    write = FeatureWriter.write
    monkeypatch.setattr(FeatureWriter, "write",
                        lambda self, start, *a: starts.append(start) or write(self, start, *a))
    assemble_shards(writer, shards)
    writer.finish({})
    assert starts == [3, 6, 9]
    with cache.open_cache(final) as f:
        np.testing.assert_array_equal(f["features"][:, 0], np.arange(11))
    assert cache.stored_summary(final)[2] == [(meta["paths"][2], "broken")]


# --- checked numbers: checksums, verify, damaged files ------------------------------------------

def _complete(tmp_path, key="k1", n=5, dim=4):
    writer = _writer(tmp_path, key, dim)
    writer.write(0, np.arange(n * dim, dtype=np.float32).reshape(n, dim), np.ones(n, bool), [])
    return writer.finish({"timings": {}})


def _flip_byte_in_chunk(path, dataset="features", chunk=0, at=5):
    with h5py.File(path) as f:
        offset = f[dataset].id.get_chunk_info(chunk).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + at)
        byte = fh.read(1)
        fh.seek(offset + at)
        fh.write(bytes([byte[0] ^ 0x10]))


def test_numeric_datasets_carry_checksums_and_a_sound_cache_verifies(tmp_path):
    path = _complete(tmp_path)
    with h5py.File(path) as f:
        assert all(f[name].fletcher32 for name in ("features", "valid", "content_sha256",
                                                   "labels"))
    report = integrity.verify_cache(path)
    assert report["status"] == "ok" and report["problems"] == []
    assert {"features", "valid", "labels"} <= set(report["checksummed"])


def test_a_flipped_byte_in_a_chunk_fails_on_read_and_in_verify(tmp_path):
    path = _complete(tmp_path)
    _flip_byte_in_chunk(path)
    report = integrity.verify_cache(path)
    assert report["status"] == "damaged"
    assert report["problems"][0].startswith("/features rows 0-4")
    with pytest.raises(integrity.CacheDamaged, match="is damaged .*extract command"):
        cache.read_split(path, "train")
    assert path.exists()  # a reader leaves it where it is: extraction moves it aside


def test_a_truncated_cache_is_damaged_not_foreign(tmp_path):
    path = _complete(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(integrity.CacheDamaged, match="cannot be opened"):
        cache.open_cache(path)
    assert integrity.verify_cache(path)["status"] == "damaged"
    foreign = tmp_path / "foreign.h5"
    foreign.write_bytes(b"not hdf5 at all")
    with pytest.raises(CacheError, match="not an HDF5 file"):
        cache.open_cache(foreign)


def test_a_cache_written_without_checksums_is_readable_but_unchecked(tmp_path):
    path = tmp_path / "old.h5"
    shutil_src = _complete(tmp_path)
    with h5py.File(shutil_src) as src, h5py.File(path, "w") as dst:
        for name, value in src.attrs.items():
            dst.attrs[name] = value
        for name in src:
            dst.create_dataset(name, data=src[name][:])  # contiguous, no filter
    report = integrity.verify_cache(path)
    assert report["status"] == "unchecked" and "features" in report["unchecksummed"]


def test_quarantine_moves_aside_without_overwriting_and_list_shows_it(tmp_path):
    first = integrity.quarantine(_complete(tmp_path))
    second = integrity.quarantine(_complete(tmp_path))
    assert first.name.endswith(".h5.damaged") and second.name.endswith(".h5.damaged-2")
    rows = catalog.list_caches(tmp_path)
    assert [r["status"] for r in rows] == ["damaged (moved aside)"] * 2
    catalog.remove_cache(first)
    assert not first.exists()


def test_a_failed_write_says_what_was_needed_and_keeps_the_rows_before_it(tmp_path,
                                                                           monkeypatch):
    writer = _writer(tmp_path)
    writer.write(0, np.ones((2, 4), np.float32), np.ones(2, bool), [])

    def full(self, key, value):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(h5py.Dataset, "__setitem__", full)
    with pytest.raises(CacheError, match=r"No space left on device\) after 2 of 5 rows; the "
                                         r"cache needs about .* MB, .* free there"):
        writer.write(2, np.ones((3, 4), np.float32), np.ones(3, bool), [])
    monkeypatch.undo()
    writer.close()
    resumed = _writer(tmp_path)
    assert resumed.rows_done == 2  # the same command resumes there
    resumed.close()


def test_writer_locks_are_not_listed_or_found_as_caches(tmp_path):
    from pipeline.store import locks

    done = _complete(tmp_path, key="aaaa1111")
    shard = shard_path(done, 0, 2)
    with locks.writing(done), locks.writing(shard):
        assert [r["path"] for r in catalog.list_caches(tmp_path)] == [str(done)]
        assert catalog.find_cache(tmp_path, "aaaa1111") == done

"""Stage 1 end to end: cache hits, keys that follow every input, bad images, resume."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import h5py
import numpy as np
import pytest

from pipeline.core import distributed
from pipeline.core.distributed import Context
from pipeline.core.errors import CacheError, DataError
from pipeline.data.images import file_stamps, fingerprint_files, load_image_set
from pipeline.extract import features as extract
from pipeline.extract import rows as extraction_rows
from pipeline.extract.features import feature_key_spec
from pipeline.models import backbones
from pipeline.models.backbones import build_classifier, resolve_backbone
from pipeline.store.integrity import CacheDamaged
from pipeline.store.paths import cache_key
from pipeline.store.writer import FeatureWriter
from tests.conftest import TINY, extract_tiny, make_folder, write_image

# Rows of TINY's features (512 float32) in this many bytes make a chunk of 4 rows: extraction
# then writes, and a kill or Ctrl-C keeps, every 4 rows (a batch of 4).
FOUR_ROWS = 4 * 512 * 4


def _extract(data, cache_dir, **kw):
    return extract_tiny(data, cache_dir, **kw)


def _arrays(path):
    with h5py.File(path) as f:
        return {name: f[name][:] for name in ("features", "valid", "labels", "paths", "split")}


def test_second_run_is_a_hit_and_runs_no_model(tmp_path, image_folder, monkeypatch):
    first = _extract(image_folder, tmp_path / "c")
    assert not first.hit and first.images == 30 and first.dim == 512 and first.failed == 0
    # every network of a spec is built by build_classifier (build_feature_model cuts it)
    monkeypatch.setattr(backbones, "build_classifier",
                        lambda spec: pytest.fail("model built on a hit"))
    second = _extract(image_folder, tmp_path / "c")
    assert second.hit and second.cache_path == first.cache_path and second.dim == 512


def test_stored_split_and_labels_match_the_data(tmp_path, split_folder):
    result = _extract(split_folder, tmp_path / "c")
    stored = _arrays(result.cache_path)
    paths = [p.decode() for p in stored["paths"]]
    assert paths[0] == "train/cat/000.png"
    assert [s.decode() for s in stored["split"]].count("val") == 4
    assert stored["labels"][paths.index("test/dog/002.png")] == 1


@pytest.mark.parametrize("change", ["add", "remove", "modify", "image_size", "weights", "dtype",
                                    "layer", "seed"])
def test_any_change_of_the_inputs_gives_a_new_key(tmp_path, image_folder, change):
    base = _extract(image_folder, tmp_path / "c")
    kw = {}
    if change == "add":
        write_image(image_folder / "cat" / "new.png", 777)
    elif change == "remove":
        (image_folder / "dog" / "003.png").unlink()
    elif change == "modify":
        write_image(image_folder / "fox" / "001.png", 888)
    elif change == "image_size":
        kw["image_size"] = 48
    elif change == "weights":
        import torch

        torch.save(_random_resnet_state(), tmp_path / "w.pth")
        kw["weights"] = str(tmp_path / "w.pth")
    elif change == "dtype":
        kw["dtype"] = "float16"
    elif change == "layer":
        kw["layer"] = "layer3"
    elif change == "seed":
        kw["seed"] = 1
    again = _extract(image_folder, tmp_path / "c", **kw)
    assert not again.hit and again.key != base.key


def _random_resnet_state():
    from pipeline.models.backbones import resolve_backbone

    return build_classifier(resolve_backbone("resnet18", "none")).state_dict()


def test_unreadable_images_are_skipped_listed_and_nan(tmp_path, image_folder):
    (image_folder / "cat" / "zero.png").write_bytes(b"")
    (image_folder / "dog" / "text.png").write_text("not an image")
    good = (image_folder / "fox" / "000.png").read_bytes()
    (image_folder / "fox" / "cut.png").write_bytes(good[: len(good) // 2])
    result = _extract(image_folder, tmp_path / "c")
    assert result.failed == 3
    assert {p for p, _ in result.failures} == {"cat/zero.png", "dog/text.png", "fox/cut.png"}
    stored = _arrays(result.cache_path)
    bad = ~stored["valid"]
    assert bad.sum() == 3 and np.isnan(stored["features"][bad]).all()
    assert np.isfinite(stored["features"][~bad]).all()
    assert _extract(image_folder, tmp_path / "c").failures == result.failures  # hit keeps them


def test_strict_makes_an_unreadable_image_fatal(tmp_path, image_folder):
    (image_folder / "cat" / "zero.png").write_bytes(b"")
    with pytest.raises(DataError, match="zero.png"):
        _extract(image_folder, tmp_path / "c", strict=True)


def test_float16_storage(tmp_path, image_folder):
    result = _extract(image_folder, tmp_path / "c", dtype="float16")
    with h5py.File(result.cache_path) as f:
        assert f["features"].dtype == np.float16


def _assert_same_cache(resumed, whole):
    a, b = _arrays(resumed), _arrays(whole)
    for name in ("valid", "labels", "paths", "split"):
        np.testing.assert_array_equal(a[name], b[name])
    np.testing.assert_allclose(a["features"], b["features"], rtol=1e-5, atol=1e-6)


def test_kill_9_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, image_folder):
    cache_dir = tmp_path / "killed"
    script = textwrap.dedent(f"""
        import os, signal
        import pipeline.store.writer
        from tests.conftest import extract_tiny
        pipeline.store.writer._CHUNK_BYTES = {FOUR_ROWS}
        def die(done, total):
            if done >= 12:
                os.kill(os.getpid(), signal.SIGKILL)
        extract_tiny({str(image_folder)!r}, {str(cache_dir)!r}, batch_size=4, on_batch=die)
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == -9, run.stderr
    partials = list(cache_dir.glob("*.partial"))
    assert len(partials) == 1 and not list(cache_dir.glob("*.h5"))
    resumed = _extract(image_folder, cache_dir, batch_size=4)
    assert resumed.resumed_from == 12 and not resumed.hit
    whole = _extract(image_folder, tmp_path / "whole", batch_size=4)
    _assert_same_cache(resumed.cache_path, whole.cache_path)


def test_ctrl_c_keeps_progress_and_resume_equals_uninterrupted(tmp_path, image_folder,
                                                               monkeypatch):
    monkeypatch.setattr("pipeline.store.writer._CHUNK_BYTES", FOUR_ROWS)

    def interrupt(done, total):
        if done >= 8:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _extract(image_folder, tmp_path / "c", batch_size=4, on_batch=interrupt)
    resumed = _extract(image_folder, tmp_path / "c", batch_size=4)
    assert resumed.resumed_from == 8
    whole = _extract(image_folder, tmp_path / "whole", batch_size=4)
    _assert_same_cache(resumed.cache_path, whole.cache_path)


def test_features_stream_to_disk_a_chunk_at_a_time(tmp_path, monkeypatch):
    # Memory holds one chunk of features whatever N is: every write fills a chunk (8 rows,
    # two batches of 4), the last one what is left.
    written = []
    original = FeatureWriter.write

    def spy(self, start, features, valid, failures, digests=None):
        written.append(len(features))
        return original(self, start, features, valid, failures, digests)

    monkeypatch.setattr(FeatureWriter, "write", spy)
    monkeypatch.setattr("pipeline.store.writer._CHUNK_BYTES", 2 * FOUR_ROWS)
    for n, writes in ((4, [8]), (10, [8, 8, 4])):
        written.clear()
        root = make_folder(tmp_path / f"d{n}", classes=("a", "b"), per_class=n)
        _extract(root, tmp_path / "c", batch_size=4, split_fractions=(1.0, 0.0, 0.0))
        assert written == writes


def test_features_wait_at_most_a_few_seconds_for_their_chunk(tmp_path, monkeypatch):
    """A slow network (a large model on a CPU) still puts its rows on disk every few
    seconds, however many rows a chunk holds."""
    written = []
    original = FeatureWriter.write

    def spy(self, start, features, *args, **kwargs):
        written.append(len(features))
        return original(self, start, features, *args, **kwargs)

    monkeypatch.setattr(FeatureWriter, "write", spy)
    monkeypatch.setattr(extraction_rows, "WRITE_EVERY_S", 0.0)  # every batch is late
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=6)
    _extract(root, tmp_path / "c", batch_size=4, split_fractions=(1.0, 0.0, 0.0))
    assert written == [4, 4, 4]


def test_an_unreadable_image_under_strict_keeps_the_rows_before_it(tmp_path, image_folder):
    (image_folder / "fox" / "009b.png").write_bytes(b"")  # the last batch: 28 rows before it
    with pytest.raises(DataError, match="009b.png"):
        _extract(image_folder, tmp_path / "c", strict=True, batch_size=4)
    partial, = (tmp_path / "c").glob("*.partial")
    with h5py.File(partial) as f:
        assert f.attrs["rows_done"] == 28  # what waited for its chunk was written first


@pytest.mark.skipif(shutil.which("cc") is None, reason="torch.compile on CPU needs a C compiler")
def test_compiled_network_gives_the_same_features(tmp_path, image_folder):
    eager = _extract(image_folder, tmp_path / "eager")
    compiled = _extract(image_folder, tmp_path / "compiled", compile=True)
    assert compiled.cache_path.name == eager.cache_path.name  # compiling changes no number
    a, b = _arrays(compiled.cache_path), _arrays(eager.cache_path)
    np.testing.assert_allclose(a["features"], b["features"], rtol=1e-4, atol=1e-5)


def test_file_stamps_shared_out_between_ranks_give_the_single_process_fingerprint(
        image_folder, monkeypatch):
    images = load_image_set(image_folder)
    world = 3

    def every_rank(_mine):  # what all_gather returns: each rank's stamps of its own shard
        return [file_stamps(images, True, distributed.shard_indices(len(images), Context(r, world)))
                for r in range(world)]

    monkeypatch.setattr(distributed, "all_gather", every_rank)
    shared = extract._shared_stamps(images, True, Context(1, world))
    assert shared == file_stamps(images, True)
    assert fingerprint_files(images, True, shared) == fingerprint_files(images, True)


# --- damaged caches, concurrent runs, a full disk ---------------------------------------------

def _flip_feature_byte(path):
    with h5py.File(path) as f:
        offset = f["features"].id.get_chunk_info(0).byte_offset
    with open(path, "r+b") as fh:
        fh.seek(offset + 7)
        byte = fh.read(1)
        fh.seek(offset + 7)
        fh.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("damage", ["flipped byte", "truncated"])
def test_a_damaged_cache_is_moved_aside_and_built_again_on_hit(tmp_path, image_folder, damage):
    first = _extract(image_folder, tmp_path / "c")
    whole = _extract(image_folder, tmp_path / "whole")
    if damage == "flipped byte":
        _flip_feature_byte(first.cache_path)
    else:
        data = first.cache_path.read_bytes()
        first.cache_path.write_bytes(data[: len(data) - 4000])
    again = _extract(image_folder, tmp_path / "c")
    assert not again.hit and again.cache_path == first.cache_path
    assert again.repair_note.startswith("the cache was damaged (")
    assert (tmp_path / "c" / (first.cache_path.name + ".damaged")).exists()
    _assert_same_cache(again.cache_path, whole.cache_path)
    assert _extract(image_folder, tmp_path / "c").hit  # and a hit from then on


def test_no_repair_stops_at_a_damaged_cache_in_one_line(tmp_path, image_folder):
    from click.testing import CliRunner

    from pipeline.cli.main import main

    first = _extract(image_folder, tmp_path / "c")
    _flip_feature_byte(first.cache_path)
    args = ["extract", str(image_folder), "--cache-dir", str(tmp_path / "c"), "--backbone",
            TINY["backbone"], "--weights", TINY["weights"], "--image-size",
            str(TINY["image_size"]), "--workers", "0"]
    result = CliRunner().invoke(main, [*args, "--no-repair"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.count("\n") == 1 and "is damaged (/features rows" in result.output
    assert result.output.rstrip().endswith(  # the library's facts, then the command line's advice
        "and repair is off; run without --no-repair to move it aside and build it anew")
    assert first.cache_path.exists()  # left where it was
    repaired = CliRunner().invoke(main, args)
    assert repaired.exit_code == 0 and "the cache was damaged" in repaired.output


def test_two_runs_started_together_on_one_key_end_with_one_cache(tmp_path, image_folder):
    cache_dir = tmp_path / "shared"
    script = textwrap.dedent(f"""
        import json, time
        from tests.conftest import extract_tiny
        result = extract_tiny({str(image_folder)!r}, {str(cache_dir)!r}, batch_size=4,
                              on_batch=lambda done, total: time.sleep(0.3), progress="lines")
        print(json.dumps({{"hit": result.hit, "path": str(result.cache_path)}}))
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "PIPELINE_PROGRESS_INTERVAL": "1000"}
    runs = [subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, outputs):
        assert run.returncode == 0 and "Traceback" not in err, err
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted(r["hit"] for r in results) == [False, True]  # one wrote, one reused
    assert results[0]["path"] == results[1]["path"]
    assert [p.name for p in cache_dir.glob("*.h5*") if not p.name.endswith(".run.json")] == [
        os.path.basename(results[0]["path"])]  # no partial, lock or second cache left
    whole = _extract(image_folder, tmp_path / "whole")
    _assert_same_cache(results[0]["path"], whole.cache_path)


def test_a_full_disk_stops_in_one_line_and_the_same_command_resumes(tmp_path, image_folder,
                                                                     monkeypatch):
    from click.testing import CliRunner

    from pipeline.cli.main import main

    monkeypatch.setattr("pipeline.store.writer._CHUNK_BYTES", FOUR_ROWS)
    cache_dir = tmp_path / "c"
    other = _extract(image_folder, cache_dir, dtype="float16")  # a complete cache beside it
    before = other.cache_path.read_bytes()
    writes, original = [], h5py.Dataset.__setitem__

    def fill_up(self, key, value):
        if self.name == "/features":
            writes.append(key)
            if len(writes) > 2:
                raise OSError(28, "No space left on device")
        original(self, key, value)

    monkeypatch.setattr(h5py.Dataset, "__setitem__", fill_up)
    args = ["extract", str(image_folder), "--cache-dir", str(cache_dir), "--backbone",
            TINY["backbone"], "--weights", TINY["weights"], "--image-size",
            str(TINY["image_size"]), "--workers", "0", "--batch-size", "4"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "No space left on device) after 8 of 30 rows" in result.output
    assert "the cache needs about" in result.output and "run the same command" in result.output
    monkeypatch.undo()
    assert other.cache_path.read_bytes() == before  # the complete cache is untouched
    assert not list(cache_dir.glob("*.lock"))
    resumed = _extract(image_folder, cache_dir, batch_size=4)
    assert resumed.resumed_from == 8
    _assert_same_cache(resumed.cache_path, _extract(image_folder, tmp_path / "whole",
                                                    batch_size=4).cache_path)


def test_a_disk_too_small_for_the_cache_is_refused_before_any_model_runs(tmp_path,
                                                                         image_folder,
                                                                         monkeypatch):
    import shutil as shutil_module
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda _path: usage(10**9, 10**9, 1000))
    with pytest.raises(CacheError, match=r"the feature cache needs .* MB but .* has 0\.0 MB "
                                         "free"):
        _extract(image_folder, tmp_path / "c")
    assert not list((tmp_path / "c").glob("*.partial"))


def test_a_damaged_cache_that_cannot_be_moved_aside_stops_in_one_line(tmp_path, image_folder,
                                                                      monkeypatch):
    first = _extract(image_folder, tmp_path / "c")
    _flip_feature_byte(first.cache_path)

    def read_only(path):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(extract, "quarantine", read_only)
    with pytest.raises(CacheDamaged, match=r"is damaged \(/features rows .*cannot be moved "
                                           r"aside \(Permission denied\); remove it") as err:
        _extract(image_folder, tmp_path / "c")
    assert "\n" not in str(err.value) and first.cache_path.exists()


def test_an_unreadable_image_leaves_the_features_of_its_batch_mates_alone(tmp_path,
                                                                           image_folder):
    """Images are collated as 8-bit crops and normalised per batch: an unreadable one's
    placeholder must collate with them without turning the batch into something else."""
    clean = _extract(image_folder, tmp_path / "clean", batch_size=4)
    (image_folder / "cat" / "001b.png").write_bytes(b"")  # between cat/001 and cat/002
    mixed = _extract(image_folder, tmp_path / "mixed", batch_size=4)
    assert mixed.failed == 1
    a, b = _arrays(clean.cache_path), _arrays(mixed.cache_path)
    good = b["valid"]
    np.testing.assert_array_equal(a["paths"], b["paths"][good])
    np.testing.assert_allclose(b["features"][good], a["features"], rtol=1e-5, atol=1e-6)


def test_the_stage_contract_keeps_every_cache_key(tmp_path):
    # The keys that extract_features(root, cache_dir=..., hash_contents=True, **TINY) gave
    # before the stage contract (main, 2026-12-07): the new signature changes no key, so
    # every cache written before is still found.
    root = make_folder(tmp_path / "d", classes=("a", "b"), per_class=4)
    plain = extract_tiny(root, tmp_path / "c", hash_contents=True, progress=False)
    assert plain.key == "50c5dca76f0a87e1f3c3"
    spec = resolve_backbone("resnet18", "none", image_size=32)
    images = load_image_set(root, (0.8, 0.1, 0.1), 0)
    assert cache_key(feature_key_spec(spec, images, "float32", True, None)) == plain.key
    blocks = extract_tiny(root, tmp_path / "c", hash_contents=True, progress=False,
                          split_fractions=(0.5, 0.25, 0.25), seed=3, dtype="float16",
                          layer="blocks")
    assert blocks.key == "a71617a9e5ddb3f103aa"
    written = plain.write(tmp_path / "out")
    assert written == [tmp_path / "out" / "extract.json"]
    assert json.loads(written[0].read_text()) == plain.to_json()

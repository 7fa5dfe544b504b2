"""Extraction of photos: the decode mode in the cache key and record, and threads that decode
while the network runs when decoding is the larger share."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.images import ImageFiles, load_image_set
from pipeline.extract.batches import feature_batches
from pipeline.extract.features import feature_key_spec
from pipeline.models.backbones import resolve_backbone
from pipeline.store import run_record
from pipeline.store.cache import cache_info, read_split
from tests.conftest import extract_tiny, make_folder
from tests.data.test_decode import photo


def photo_folder(root, per_class: int = 5, size=(640, 480)):
    """Two classes of JPEG photos large enough to draft at TINY's recipe (resize 36)."""
    for c, name in enumerate(("a", "b")):
        for i in range(per_class):
            path = root / name / f"{i}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(photo(size, seed=10 * c + i)).save(path, quality=90)
    return root


@pytest.fixture(scope="module")
def spec():
    return resolve_backbone("resnet18", "none", image_size=32)


def test_the_decode_mode_keys_a_jpeg_cache_and_leaves_a_png_key_as_it_was(tmp_path, spec):
    jpegs = load_image_set(photo_folder(tmp_path / "jpg"))
    pngs = load_image_set(make_folder(tmp_path / "png"))
    key = {(name, mode): feature_key_spec(spec, images, "float32", False, None, decode=mode)
           for name, images in (("jpg", jpegs), ("png", pngs)) for mode in ("draft", "exact")}
    assert key["jpg", "draft"]["decode"] == "draft" and key["jpg", "exact"]["decode"] == "exact"
    # PNGs decode alike in both modes: the key is the one written before there were modes
    assert key["png", "draft"] == key["png", "exact"] and "decode" not in key["png", "draft"]


def test_both_modes_extract_close_features_into_their_own_caches(tmp_path):
    root = photo_folder(tmp_path / "photos")
    args = {"cache_dir": tmp_path / "c", "split_fractions": (1.0, 0.0, 0.0)}
    draft = extract_tiny(root, **args)
    exact = extract_tiny(root, decode="exact", **args)
    assert not draft.hit and not exact.hit and draft.cache_path != exact.cache_path
    record = json.loads(run_record.extract_record_path(draft.cache_path).read_text())
    assert record["settings"]["options"]["decode"] == "draft"
    a, b = read_split(draft.cache_path, "train").X, read_split(exact.cache_path, "train").X
    cosine = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    assert cosine.min() > 0.99 and not np.array_equal(a, b)
    assert extract_tiny(root, decode="exact", **args).hit


class _Timed(ImageFiles):
    """Images whose decoding takes ``decode_s``, each noting the thread that decoded it."""

    def __init__(self, images, decode_s: float):
        super().__init__(images, lambda image: torch.zeros(3, 32, 32), (3, 32, 32))
        self.decode_s, self.threads = decode_s, {}

    def preprocess(self, image, i):
        time.sleep(self.decode_s)
        self.threads[i] = threading.current_thread().name
        return torch.full((3, 32, 32), float(i))


@pytest.mark.parametrize("decode_s, forward_s, threaded", [(0.03, 0.0, True),
                                                           (0.0, 0.2, False)])
def test_threads_decode_ahead_only_when_decoding_outweighs_the_forward_pass(
        tmp_path, spec, decode_s, forward_s, threaded):
    images = load_image_set(make_folder(tmp_path / "d", per_class=8), (1.0, 0.0, 0.0))
    files = _Timed(images, decode_s)
    torch_threads, before = [], torch.get_num_threads()

    def model(x):
        time.sleep(forward_s)
        torch_threads.append(torch.get_num_threads())
        return x[:, 0, 0, :2]

    got = list(feature_batches(model, spec, images, torch.device("cpu"), batch_size=4,
                               workers=0, progress=False, files=files, decode_ahead=False))
    index = np.concatenate([b.index for b in got])
    assert index.tolist() == list(range(len(images)))  # in order, each once
    features = np.concatenate([b.features for b in got])
    assert np.array_equal(features[:, 0], index.astype(np.float32))  # each its own image's
    first = {files.threads[i] for i in range(4)}
    rest = {files.threads[i] for i in range(4, len(images))}
    assert first == {"MainThread"}  # the first batch decodes in turn, timed
    assert all(n.startswith("pipeline-decode") for n in rest) == threaded
    assert (rest == {"MainThread"}) == (not threaded)
    # torch on one thread while the decoders take the cores, as before once done
    assert torch_threads == [before] + [1 if threaded else before] * (len(got) - 1)
    assert torch.get_num_threads() == before


def test_a_fresh_process_decodes_the_first_photos_while_it_starts(tmp_path):
    """``pipeline extract`` in a new process forks a helper that decodes the first photos
    while torch loads (pipeline.data.early): the cache records how many, and holds what this
    process extracts with no helper (torch is loaded here, so it starts none)."""
    root = photo_folder(tmp_path / "photos", per_class=12)
    # First: it resolves the backbone, which a fresh process then finds remembered instead of
    # importing torch to resolve it (the memo is the test's own: tests/conftest.py).
    here = extract_tiny(root, tmp_path / "here", split_fractions=(1.0, 0.0, 0.0))
    command = [sys.executable, "-m", "pipeline", "extract", str(root), "--backbone", "resnet18",
               "--weights", "none", "--image-size", "32", "--workers", "0", "--split", "1,0,0",
               "--cache-dir", str(tmp_path / "fresh"), "--json", "--quiet"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert run.returncode == 0, run.stderr
    fresh = json.loads(run.stdout.strip().splitlines()[-1])
    assert fresh["key"] == here.key
    assert cache_info(fresh["cache_path"])["timings"]["decoded_early"] > 0
    assert cache_info(here.cache_path)["timings"]["decoded_early"] == 0
    a, b = read_split(fresh["cache_path"], "train"), read_split(here.cache_path, "train")
    assert list(a.paths) == list(b.paths)
    # torch's thread count differs between the runs: the same sums in another order
    np.testing.assert_allclose(a.X, b.X, rtol=1e-4, atol=1e-5)

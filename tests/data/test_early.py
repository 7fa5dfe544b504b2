"""The first images decoded by a forked helper process: the same images, digests and errors
as decoding them here, and nothing taken twice or after the loop has started."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest
from PIL import Image

from pipeline.data.early import EarlyDecodes, can_start
from pipeline.data.images import read_image
from tests.data.test_decode import photo

READ = {"hash_file": True, "resize": 36, "interpolation": "bicubic", "decode": "draft"}


@pytest.fixture
def photos(tmp_path):
    paths = []
    for i in range(6):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(photo((640, 480), seed=i)).save(paths[-1], quality=90)
    (tmp_path / "broken.jpg").write_bytes(paths[0].read_bytes()[:200])  # a truncated JPEG
    return [*paths[:3], tmp_path / "broken.jpg", *paths[3:]]


def _wait_for(early: EarlyDecodes, n: int) -> None:
    """Until ``n`` images are decoded: the first take stops the process starting others."""
    deadline = time.monotonic() + 60
    while early.ready() < n and time.monotonic() < deadline:
        time.sleep(0.02)


def test_taken_images_are_what_reading_them_here_gives(photos):
    early = EarlyDecodes(photos, count=5, **READ)
    try:
        _wait_for(early, 5)
        for i in (0, 1, 2, 4):
            image, digest = early.take(i)
            here, here_digest = read_image(photos[i], **READ)
            assert digest == here_digest and image.size == here.size == (48, 36)
            assert np.array_equal(np.asarray(image), np.asarray(here))
        assert early.taken == 4 and early.seconds > 0
        with pytest.raises(OSError):  # the truncated file fails as it fails here
            early.take(3)
        assert early.take(0) is None  # taken once only
        assert early.take(5) is None and not early.holds(5)  # beyond count: never decoded
    finally:
        early.close()


def test_after_the_first_take_no_other_image_is_started(tmp_path):
    big = tmp_path / "big.jpg"  # tens of ms to decode: 300 of them take seconds
    Image.fromarray(photo((2400, 1800))).save(big, quality=90)
    # drafted at half size only (its shorter side kept at twice 256): 20 ms or so each
    early = EarlyDecodes([big] * 300, **{**READ, "resize": 256}, count=300)
    try:
        _wait_for(early, 2)
        early.take(0)
        held = [i for i in range(300) if early.holds(i)]
        # the decoded ones and those in flight, in order: far from all 300 queued
        assert held == list(range(1, len(held) + 1)) and len(held) < 100
        assert all(early.take(i) is not None for i in held)
    finally:
        early.close()


def test_a_fork_is_only_started_before_torch_is_loaded(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    monkeypatch.setattr(threading, "active_count", lambda: 1)
    assert can_start() == sys.platform.startswith("linux")
    monkeypatch.setitem(sys.modules, "torch", object())
    assert not can_start()
    monkeypatch.delitem(sys.modules, "torch")
    monkeypatch.setattr(threading, "active_count", lambda: 2)
    assert not can_start()

"""Atomic writes: all or nothing, a temporary of its own per writer, a full disk in one line."""

from __future__ import annotations

import errno
import io
import os
import re

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from pipeline.core import atomic
from pipeline.core.atomic import atomic_write
from pipeline.core.errors import PipelineError, WriteError
from pipeline.store.persistence import load_head, save_head

OLD = b"the previous, complete file\n"


class _AlmostFull(io.FileIO):
    """A file on a disk with ``room`` bytes left: the write that crosses it fails."""

    room = 10

    def write(self, data):
        left = self.room - self.tell()
        if len(data) > left:
            super().write(bytes(data)[:max(left, 0)])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


class _FullDisk(atomic._Counted, _AlmostFull):
    """atomic_write's own raw file, on that disk."""


def _fill_disk(monkeypatch):
    """From now on every file atomic_write opens is on a disk that is almost full."""
    monkeypatch.setattr(atomic, "_Counted", _FullDisk)


@pytest.fixture
def full_disk(monkeypatch):
    _fill_disk(monkeypatch)


def _target(tmp_path):
    path = tmp_path / "out.bin"
    path.write_bytes(OLD)
    return path


def test_a_write_replaces_the_file_and_leaves_nothing_else(tmp_path):
    path = _target(tmp_path)
    with atomic_write(path) as fh:
        fh.write(b"new bytes")
    assert path.read_bytes() == b"new bytes"
    with atomic_write(path, "w") as fh:
        fh.write("text\n")
    assert path.read_text() == "text\n"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_a_full_disk_keeps_the_old_file_and_says_so_in_one_line(tmp_path, full_disk):
    path = _target(tmp_path)
    with pytest.raises(WriteError) as raised, atomic_write(path) as fh:
        fh.write(b"0123456789")
        fh.write(b"x" * 20_000)  # more than the buffer: it goes to the disk at once
    assert path.read_bytes() == OLD
    assert os.listdir(tmp_path) == ["out.bin"]
    message = str(raised.value)
    assert isinstance(raised.value, PipelineError) and "\n" not in message
    assert str(path) in message and "No space left on device" in message
    assert "needs at least 20,010 bytes (20.0 kB)" in message and "free there" in message
    assert "previous out.bin is unchanged" in message
    assert isinstance(raised.value.__cause__, OSError)


def test_a_text_write_that_fails_only_when_flushed_is_caught_too(tmp_path, full_disk):
    path = _target(tmp_path)
    with pytest.raises(WriteError, match="needs at least 100 bytes"), atomic_write(path, "w") as fh:
        fh.write("x" * 100)  # buffered: the disk is reached when the block ends
    assert path.read_bytes() == OLD and os.listdir(tmp_path) == ["out.bin"]


def test_a_size_known_up_front_is_what_the_message_says_is_needed(tmp_path, full_disk):
    path = _target(tmp_path)
    needed = pytest.raises(WriteError, match=r"needs 123,456 bytes \(123.5 kB\)")
    with needed, atomic_write(path, size=123_456) as fh:
        fh.write(b"x" * 123_456)
    assert path.read_bytes() == OLD


def test_a_failing_fsync_is_a_write_error_too(tmp_path, monkeypatch):
    path = _target(tmp_path)

    def fsync(_fd):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(WriteError, match="Input/output error"), atomic_write(path) as fh:
        fh.write(b"new bytes")
    assert path.read_bytes() == OLD and os.listdir(tmp_path) == ["out.bin"]


def test_other_exceptions_propagate_unchanged_and_leave_no_temporary(tmp_path):
    path = _target(tmp_path)
    bug = KeyError("a bug in the writer")
    with pytest.raises(KeyError) as raised, atomic_write(path) as fh:
        fh.write(b"half a file")
        raise bug
    assert raised.value is bug
    assert path.read_bytes() == OLD and os.listdir(tmp_path) == ["out.bin"]


def test_a_new_file_that_fails_is_not_there_at_all(tmp_path, full_disk):
    path = tmp_path / "new.bin"
    with pytest.raises(WriteError, match="no new.bin was written"), atomic_write(path) as fh:
        fh.write(b"x" * 100)
    assert os.listdir(tmp_path) == []


def test_two_writers_of_one_target_get_temporaries_of_their_own(tmp_path):
    path = _target(tmp_path)
    with atomic_write(path) as first, atomic_write(path) as second:
        names = sorted(os.listdir(tmp_path))
        assert len(names) == 3 and all(n.startswith("out.bin") for n in names)
        first.write(b"first")
        second.write(b"second")
    assert path.read_bytes() == b"first"  # the last to finish wins, whole
    assert os.listdir(tmp_path) == ["out.bin"]


def test_the_file_gets_the_permissions_a_plain_open_gives(tmp_path):
    path = tmp_path / "new.bin"
    umask = os.umask(0o027)
    try:
        with atomic_write(path) as fh:
            fh.write(b"x")
    finally:
        os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o640


def test_a_model_saved_on_a_full_disk_leaves_the_previous_model_loadable(tmp_path, monkeypatch):
    X = np.random.default_rng(0).normal(size=(20, 3))
    estimator = LogisticRegression().fit(X, (X[:, 0] > 0).astype(int))
    path = save_head(tmp_path / "m.head", estimator, {"classes": ["a", "b"], "dim": 3})
    before = path.read_bytes()
    _fill_disk(monkeypatch)
    with pytest.raises(WriteError, match="m.head") as raised:
        save_head(path, LogisticRegression(C=0.5).fit(X, X[:, 1] > 0), {"dim": 3})
    assert re.search(r"needs [\d,]+ bytes", str(raised.value))  # the size, known up front
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.head"]
    saved = load_head(path)
    np.testing.assert_array_equal(saved.estimator.predict(X), estimator.predict(X))

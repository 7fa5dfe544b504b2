"""Writer locks: one holder at a time, waiting with a message, dead holders taken over."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap
import time

import pytest

from pipeline.store import locks


def _hold_in_child(target, seconds: float) -> subprocess.Popen:
    code = textwrap.dedent(f"""
        import sys, time
        from pipeline.store import locks
        with locks.writing({str(target)!r}):
            print("held", flush=True)
            time.sleep({seconds})
    """)
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


def test_the_lock_is_held_for_the_block_and_released_after(tmp_path):
    target = tmp_path / "x.h5"
    with locks.writing(target):
        seen = locks.holder(target)
        assert seen["pid"] == os.getpid() and seen["host"] == platform.node()
    assert locks.holder(target) is None
    with pytest.raises(RuntimeError), locks.writing(target):
        raise RuntimeError("boom")
    assert locks.holder(target) is None  # released on an error too


def test_a_second_writer_waits_for_a_live_one_with_one_message(tmp_path):
    target = tmp_path / "x.h5"
    child = _hold_in_child(target, 1.5)
    said, started = [], time.monotonic()
    with locks.writing(target, timeout=30, on_wait=said.append):
        waited = time.monotonic() - started
        assert locks.holder(target)["pid"] == os.getpid()
    child.wait()
    assert waited >= 0.5 and len(said) == 1
    assert f"pid {child.pid}" in said[0] and "x.h5" in said[0]


def test_a_live_holder_past_the_timeout_is_refused_in_one_line(tmp_path):
    target = tmp_path / "x.h5"
    child = _hold_in_child(target, 30)
    try:
        with pytest.raises(locks.LockTimeout, match=rf"still being written by pid {child.pid}.*"
                                                    r"remove .*x\.h5\.lock"), \
                locks.writing(target, timeout=0.6):
            pass
        assert locks.holder(target)["pid"] == child.pid  # never taken from a live run
    finally:
        child.kill()
        child.wait()


def test_a_killed_holder_is_taken_over(tmp_path):
    target = tmp_path / "x.h5"
    child = _hold_in_child(target, 60)
    child.kill()  # as kill -9: its lock file stays behind
    child.wait()
    assert locks.holder(target)["pid"] == child.pid
    said = []
    with locks.writing(target, timeout=5, on_wait=said.append):
        assert locks.holder(target)["pid"] == os.getpid()
    assert said == []  # a dead holder is not waited for


def test_another_hosts_lock_is_live_until_it_goes_stale(tmp_path, monkeypatch):
    target = tmp_path / "x.h5"
    lock = locks.lock_path(target)
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "then"}))
    with pytest.raises(locks.LockTimeout, match="pid 1 on elsewhere"), \
            locks.writing(target, timeout=0.6):
        pass
    old = time.time() - locks.STALE_S - 5  # its writer stopped touching it long ago
    os.utime(lock, (old, old))
    with locks.writing(target, timeout=5):
        assert locks.holder(target)["host"] == platform.node()


def test_a_held_lock_is_touched_while_its_writer_works(tmp_path, monkeypatch):
    monkeypatch.setattr(locks, "HEARTBEAT_S", 0.1)
    target = tmp_path / "x.h5"
    with locks.writing(target):
        lock = locks.lock_path(target)
        old = time.time() - 1000
        os.utime(lock, (old, old))
        time.sleep(0.5)
        assert time.time() - lock.stat().st_mtime < 5


def test_an_untouched_lock_is_dead_even_if_its_pid_now_runs_something_else(tmp_path):
    target = tmp_path / "x.h5"
    lock = locks.lock_path(target)
    # pid 1 always runs: as if the writer died and its pid went to another process
    lock.write_text(json.dumps({"host": platform.node(), "pid": 1, "started": "then"}))
    with pytest.raises(locks.LockTimeout), locks.writing(target, timeout=0.6):
        pass  # touched recently: a live writer as far as anyone can tell
    old = time.time() - locks.STALE_S - 5
    os.utime(lock, (old, old))
    with locks.writing(target, timeout=5):
        assert locks.holder(target)["pid"] == os.getpid()

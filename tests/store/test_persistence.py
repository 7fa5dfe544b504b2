"""Saved heads and networks: each loaded as its kind, signed over header and payload and
verified before unpickling, atomically written; version 1 files still load."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from pipeline.store import persistence
from pipeline.store.persistence import (
    ModelFileError,
    SavedHead,
    SavedNetwork,
    load_head,
    load_model,
    load_network,
    read_header,
    save_head,
    save_network,
)


def _fitted():
    X = np.random.default_rng(0).normal(size=(20, 3))
    return LogisticRegression().fit(X, (X[:, 0] > 0).astype(int)), X


def test_round_trip_keeps_estimator_and_meta(tmp_path):
    estimator, X = _fitted()
    path = save_head(tmp_path / "m.head", estimator, {"classes": ["a", "b"], "dim": 3})
    saved = load_head(path)
    assert saved.meta == {"classes": ["a", "b"], "dim": 3}
    np.testing.assert_array_equal(saved.estimator.predict_proba(X), estimator.predict_proba(X))
    assert read_header(path)["format"] == "pipeline-head"
    assert not list(tmp_path.glob("*.tmp"))


def test_a_changed_payload_is_refused_before_unpickling(tmp_path, monkeypatch):
    estimator, _ = _fitted()
    path = save_head(tmp_path / "m.head", estimator, {})
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    import joblib

    monkeypatch.setattr(joblib, "load", lambda *_: pytest.fail("unpickled a corrupt file"))
    with pytest.raises(ModelFileError, match="checksum"):
        load_head(path)


def test_foreign_and_missing_files_are_refused(tmp_path):
    with pytest.raises(ModelFileError, match="no such"):
        load_head(tmp_path / "none.head")
    (tmp_path / "x.head").write_bytes(b"\x80\x04 a pickle, say\n")
    with pytest.raises(ModelFileError, match="not a model saved by pipeline"):
        load_head(tmp_path / "x.head")


def _state():
    return {"fc.weight": torch.arange(6.0).reshape(2, 3), "fc.bias": torch.zeros(2)}


_NETWORK_META = {"classes": ["a", "b"], "backbone": "resnet18", "unfrozen": 1,
                 "head": "finetune-1"}


def test_a_network_round_trips_as_a_network(tmp_path):
    path = save_network(tmp_path / "m.net", _state(), _NETWORK_META)
    header = read_header(path)
    assert header["format"] == "pipeline-network" and "fine-tuned network" in header["about"]
    for saved in (load_network(path), load_model(path)):
        assert isinstance(saved, SavedNetwork) and saved.meta == _NETWORK_META
        assert all(torch.equal(saved.state_dict[k], v) for k, v in _state().items())
    assert isinstance(load_model(save_head(tmp_path / "m.head", _fitted()[0], {})), SavedHead)


def test_each_kind_is_refused_where_the_other_is_expected(tmp_path):
    net = save_network(tmp_path / "m.net", _state(), _NETWORK_META)
    head = save_head(tmp_path / "m.head", _fitted()[0], {})
    with pytest.raises(ModelFileError, match="is a fine-tuned network, not a head"):
        load_head(net)
    with pytest.raises(ModelFileError, match="is a head for bottleneck features"):
        load_network(head)


def test_a_changed_network_payload_is_refused_before_loading(tmp_path, monkeypatch):
    path = save_network(tmp_path / "m.net", _state(), _NETWORK_META)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    monkeypatch.setattr(torch, "load", lambda *_, **__: pytest.fail("loaded a corrupt file"))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(path)


def test_a_fine_tuned_head_file_of_the_previous_version_loads_as_a_network(tmp_path):
    # What finetune wrote before networks had a format: a .head of meta kind "finetuned".
    old = {"kind": "finetuned", "backbone": "resnet18", "classes": ["a", "b"], "dim": 2,
           "cache_key": "k", "request": {"backbone": "resnet18"}, "spec": {},
           "head": "finetune-2"}
    buffer = io.BytesIO()
    torch.save(_state(), buffer)
    path = persistence._write(tmp_path / "old.head", persistence.HEAD_FORMAT,
                              buffer.getvalue(), "torch", old)
    saved = load_model(path)
    assert isinstance(saved, SavedNetwork) and saved.meta["unfrozen"] == 2
    assert "kind" not in saved.meta and "dim" not in saved.meta
    with pytest.raises(ModelFileError, match="not a head"):
        load_head(path)


def test_another_format_version_is_refused_in_one_line(tmp_path):
    path = save_network(tmp_path / "m.net", _state(), _NETWORK_META)
    header, payload = path.read_bytes().split(b"\n", 1)
    newer = json.loads(header) | {"format_version": 3}
    path.write_bytes(json.dumps(newer).encode() + b"\n" + payload)
    with pytest.raises(ModelFileError, match="format version 3.*upgrade pipeline"):
        load_model(path)


def _flipped(data: bytes, at: int) -> bytes:
    """``data`` with the byte at offset ``at`` changed, as bit rot or an editor would."""
    data = bytearray(data)
    data[at] ^= 0x01
    return bytes(data)


def test_any_edited_byte_of_a_head_is_refused_before_unpickling(tmp_path, monkeypatch):
    estimator, _ = _fitted()
    meta = {"classes": ["cat", "dog"], "dim": 3, "request": {"backbone": "resnet18"}}
    original = save_head(tmp_path / "m.head", estimator, meta).read_bytes()
    header = original.index(b"\n") + 1
    import joblib

    monkeypatch.setattr(joblib, "load", lambda *_: pytest.fail("unpickled an edited file"))
    edited = tmp_path / "edited.head"
    # Every byte of the header (class names, "dim", the request, the digest itself) and a
    # spread of payload bytes.
    for at in [*range(header), *range(header, len(original), 7), len(original) - 1]:
        edited.write_bytes(_flipped(original, at))
        with pytest.raises(ModelFileError):
            load_head(edited)


def test_edited_header_fields_are_refused_as_edited(tmp_path, monkeypatch):
    path = save_network(tmp_path / "m.net", _state(), _NETWORK_META | {"dim": 3})
    original = path.read_bytes()
    monkeypatch.setattr(torch, "load", lambda *_, **__: pytest.fail("loaded an edited file"))
    for before, after in [(b'"a", "b"', b'"b", "a"'), (b'"dim": 3', b'"dim": 4'),
                          (b'"resnet18"', b'"resnet50"')]:
        assert before in original
        path.write_bytes(original.replace(before, after))
        with pytest.raises(ModelFileError, match="is corrupt or was edited.*save it again"):
            load_model(path)


def test_the_digest_covers_the_header_and_the_payload(tmp_path):
    path = save_head(tmp_path / "m.head", _fitted()[0], {"dim": 3})
    line, payload = path.read_bytes().split(b"\n", 1)
    digest = read_header(path)["sha256"]
    assert read_header(path)["format_version"] == 2
    assert line.endswith(f'"sha256": "{digest}"}}'.encode())  # always the last field
    blanked = line.replace(digest.encode(), b"0" * 64) + b"\n" + payload
    assert hashlib.sha256(blanked).hexdigest() == digest


def _version_1(path, payload, kind, meta):
    """A model file as versions before 2 wrote it: the checksum covers the payload only."""
    header = {"format": persistence.HEAD_FORMAT if kind == "joblib" else
              persistence.NETWORK_FORMAT, "format_version": 1, "about": "...",
              "payload": kind, "sha256": hashlib.sha256(payload).hexdigest(), "meta": meta}
    path.write_bytes(json.dumps(header, sort_keys=True).encode() + b"\n" + payload)
    return path


def test_models_saved_in_version_1_still_load(tmp_path):
    import joblib

    estimator, X = _fitted()
    buffer = io.BytesIO()
    joblib.dump(estimator, buffer)
    head = _version_1(tmp_path / "old.head", buffer.getvalue(), "joblib", {"dim": 3})
    saved = load_head(head)
    assert saved.meta == {"dim": 3}
    np.testing.assert_array_equal(saved.estimator.predict(X), estimator.predict(X))
    buffer = io.BytesIO()
    torch.save(_state(), buffer)
    net = _version_1(tmp_path / "old.net", buffer.getvalue(), "torch", _NETWORK_META)
    assert load_model(net).meta == _NETWORK_META
    net.write_bytes(_flipped(net.read_bytes(), -10))  # its payload is still guarded
    with pytest.raises(ModelFileError, match="checksum"):
        load_network(net)


def test_a_version_2_file_relabelled_version_1_is_refused(tmp_path):
    path = save_head(tmp_path / "m.head", _fitted()[0], {"dim": 3})
    path.write_bytes(path.read_bytes().replace(b'"format_version": 2', b'"format_version": 1'))
    with pytest.raises(ModelFileError, match="checksum"):
        load_head(path)

"""Saved heads: checksummed before unpickling, atomically written."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression

from pipeline.persistence import ModelFileError, load_head, read_header, save_head


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

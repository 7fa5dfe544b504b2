"""`predict` on photos: a head reads a large JPEG as the extraction behind it did."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.core.options import PredictOptions
from pipeline.deploy.predict import decode_mode, predict_images
from pipeline.store.cache import read_split
from pipeline.store.persistence import load_head
from tests.conftest import extract_tiny, fit_and_write
from tests.extract.test_photos import photo_folder


@pytest.mark.parametrize("decode", ["draft", "exact"])
def test_a_head_gives_on_a_photo_what_it_gave_on_its_cached_features(tmp_path, decode):
    root = photo_folder(tmp_path / "photos", per_class=10, size=(800, 600))
    cache = extract_tiny(root, cache_dir=tmp_path / "c", decode=decode).cache_path
    model = Path(fit_and_write([cache], tmp_path / "heads", heads=("logreg",)).rows[0]["model"])
    saved = load_head(model)
    assert decode_mode(saved) == decode
    test = read_split(cache, "test")
    result = predict_images(model, [root / p for p in test.paths],
                            options=PredictOptions(workers=0))
    rows = {r["path"]: r for r in result.rows}
    proba = saved.estimator.predict_proba(test.X)
    for path, p in zip(test.paths, proba):
        row = rows[str(root / path)]
        assert row["prediction"] == saved.meta["classes"][int(np.argmax(p))]
        assert row["probability"] == pytest.approx(p.max(), rel=1e-4)

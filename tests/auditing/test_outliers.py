"""An off-manifold noise image tops the outliers."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.auditing.neighbours import nearest_neighbours, normalised
from pipeline.auditing.outliers import outlier_scores, top_outliers
from pipeline.auditing.rows import read_rows
from tests.auditing.conftest import planted_cache


def test_the_noise_image_is_the_top_outlier(tmp_path):
    p = planted_cache(tmp_path / "c.h5")
    rows = read_rows(p.path)
    scores = outlier_scores(nearest_neighbours(normalised(rows.X), 10))
    top = top_outliers(scores, rows.paths, 5)
    print(f"noise image: rank {[o.index for o in top].index(p.noise) + 1}, robust z "
          f"{top[0].robust_z:.1f}, next {top[1].robust_z:.1f}")
    assert top[0].index == p.noise and top[0].path == "noise/static.png"
    assert top[0].robust_z > 10 * top[1].robust_z
    assert [o.rank for o in top] == [1, 2, 3, 4, 5]
    assert np.all(np.diff([o.score for o in top]) <= 0)


def test_the_robust_z_is_the_scaled_median_absolute_deviation():
    scores = np.random.default_rng(0).gamma(2.0, size=501)
    top = top_outliers(scores, [str(i) for i in range(501)], 3)
    median = np.median(scores)
    mad = 1.4826 * np.median(np.abs(scores - median))  # the hand-written form it replaced
    for o in top:
        assert o.robust_z == pytest.approx((o.score - median) / mad, rel=1e-5)
    assert top_outliers(np.ones(4), list("abcd"), 2)[0].robust_z == 0.0  # no spread: 0

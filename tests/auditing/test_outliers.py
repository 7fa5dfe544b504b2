"""An off-manifold noise image tops the outliers."""

from __future__ import annotations

import numpy as np

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

"""The chunked kNN is exact; copies across splits are found and counted as leakage."""

from __future__ import annotations

import numpy as np

from pipeline.auditing.neighbours import (
    DEFAULT_THRESHOLD,
    exact_pairs,
    leakage_counts,
    near_pairs,
    nearest_neighbours,
    normalised,
)
from pipeline.auditing.rows import read_rows
from tests.auditing.conftest import planted_cache


def test_chunked_knn_equals_the_dense_answer():
    rng = np.random.default_rng(0)
    Xn = normalised(rng.normal(size=(300, 16)))
    knn = nearest_neighbours(Xn, 5, chunk=7)
    dense = Xn @ Xn.T
    np.fill_diagonal(dense, -np.inf)
    expected = np.argsort(-dense, axis=1)[:, :5]
    assert (knn.index == expected).all()
    assert np.allclose(knn.similarity, np.take_along_axis(dense, expected, 1), atol=1e-6)
    assert (knn.index != np.arange(300)[:, None]).all()


def test_copies_across_splits_are_found_and_counted(tmp_path):
    p = planted_cache(tmp_path / "c.h5")
    rows = read_rows(p.path)
    exact = exact_pairs(rows.digests)
    knn = nearest_neighbours(normalised(rows.X), 10)
    near = near_pairs(knn, DEFAULT_THRESHOLD, {(x.a, x.b) for x in exact})
    copies = set(p.copies + p.copies_relabelled)
    found_exact = {(x.a, x.b) for x in exact}
    found_near = {(x.a, x.b) for x in near}
    print(f"exact copies: {len(copies & found_exact)}/{len(copies)}, near copies: "
          f"{len(set(p.near) & found_near)}/{len(p.near)}, other near pairs: "
          f"{len(found_near - set(p.near))}")
    assert found_exact == copies
    assert set(p.near) <= found_near
    assert len(found_near - set(p.near)) <= 2  # distinct images of a class stay below 0.97
    counts = leakage_counts(exact + near, rows.split)
    assert counts["train-test"]["exact"] == len(copies)
    assert counts["train-test"]["near"] >= len(p.near)
    relabelled = {(a, b) for a, b in p.copies_relabelled}
    assert all(rows.labels[a] != rows.labels[b] for a, b in relabelled)


def test_leakage_names_split_pairs_in_order():
    from pipeline.auditing.neighbours import Pair

    split = np.array(["test", "train", "val", "train"])
    pairs = [Pair(0, 1, "exact", 1.0), Pair(1, 2, "near", 0.99), Pair(1, 3, "near", 0.98)]
    assert leakage_counts(pairs, split) == {"train-test": {"exact": 1, "near": 0},
                                            "train-val": {"exact": 0, "near": 1}}


def test_normalised_in_place_scales_the_given_array_and_a_copy_leaves_it():
    X = np.array([[3.0, 4.0], [0.0, 0.0]], np.float32)
    copied = normalised(X)
    assert X[0, 0] == 3.0 and np.allclose(copied, [[0.6, 0.8], [0, 0]])
    same = normalised(X, copy=False)
    assert same is X and np.allclose(X, [[0.6, 0.8], [0, 0]])


def test_the_library_knn_finds_the_pairs_of_the_dense_similarities():
    # scikit-learn's chunked cosine search replaced a hand-written one: the same pairs, the
    # same similarities (to float32 rounding), the progress adding up to every row.
    rng = np.random.default_rng(1)
    X = np.abs(rng.normal(size=(400, 32))).astype(np.float32)
    X[200:210] = X[:10] + 0.01 * rng.normal(size=(10, 32))  # ten near copies
    X[300] = X[5]  # and one exact copy, which ties with its original
    Xn = normalised(X)
    done = []
    knn = nearest_neighbours(Xn, 4, on_rows=done.append, chunk=50)
    assert sum(done) == 400 and len(done) > 1
    dense = Xn.astype(np.float64) @ Xn.T.astype(np.float64)
    np.fill_diagonal(dense, -np.inf)
    want = {(min(a, b), max(a, b)) for a, b in zip(*np.nonzero(dense >= 0.99))}
    got = {(p.a, p.b) for p in near_pairs(knn, 0.99)}
    assert got == want and len(want) >= 11
    np.testing.assert_allclose(knn.similarity, np.take_along_axis(dense, knn.index, 1),
                               atol=1e-6)

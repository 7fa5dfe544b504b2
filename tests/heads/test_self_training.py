"""Self-training on a pool of unlabelled features: planted clusters where the pool must help,
a pool that a low threshold turns against the head, quotas, and bad pools."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.core.options import SelfTrainOptions
from pipeline.heads.pool import PoolError, open_pool, pool_from_arrays
from pipeline.heads.self_training import select_pseudo_labels, self_train, thinned
from pipeline.heads.spec import HeadError
from pipeline.store.cache import cache_info
from pipeline.store.persistence import load_head
from tests.heads.unlabelled_data import one_torch_thread, planted_pair, write_cache

LOGREG = "logreg:Cs=(0.1,1.0,10.0)"  # three Cs keep each fit fast

one_thread = pytest.fixture(autouse=True)(one_torch_thread)


@pytest.fixture(scope="module")
def helped(tmp_path_factory):
    """Two labels per class of four noisy clusters, and a pool of 1,200 images of them."""
    folder = tmp_path_factory.mktemp("helped")
    cache, pool, labelled_pool = planted_pair(folder, shots=2, spread=2.0, seed=0)
    options = SelfTrainOptions(heads=(LOGREG,), thresholds=(0.5, 0.9), rounds=3)
    return cache, pool, self_train(cache, pool=labelled_pool, options=options, progress=False)


def test_the_pool_reveals_the_clusters_and_the_row_says_so(helped):
    _, _, result = helped
    row, = result.rows
    assert row["head"] == "logreg+self-train" and row["base_head"] == "logreg"
    # Two labels a class guess the clusters badly; the pool's structure lifts the head.
    assert row["test_accuracy"] > row["base_test_accuracy"] + 0.05
    assert row["diff_vs_base_ci_low"] > 0 and row["p_vs_base"] < 0.01
    assert row["rounds"] >= 1 and row["pool_used"] > 0 and row["pool_size"] == 1200
    assert row["pseudo_accuracy"] > 0.85  # the pool's own labels score the pseudo-labels
    assert row["pool_weights"] == "drawn by weight"  # LogRegHead takes no sample_weight
    base = result.predictions["logreg"]  # the supervised head's test predictions, kept too
    assert np.mean(base.y_pred == base.y_true) == row["base_test_accuracy"]


def test_rounds_record_validation_use_per_class_and_changes(helped):
    _, _, result = helped
    rounds = result.rounds
    assert rounds[0]["round"] == 0 and rounds[0]["used"] == 0  # the supervised head
    assert sum(r["chosen"] for r in rounds) == 1
    chosen = next(r for r in rounds if r["chosen"])
    assert chosen["val_accuracy"] == max(r["val_accuracy"] for r in rounds)
    for r in rounds[1:]:
        assert sum(r[f"used_c{c}"] for c in range(4)) == r["used"]
    # Pseudo-labels are decided again each round: later rounds drop or relabel some.
    later = [r for r in rounds if r["round"] >= 2]
    assert any(r["relabelled"] + r["dropped"] > 0 for r in later)
    assert any(r["added"] > 0 for r in later)


def test_a_bad_threshold_is_refused_on_validation(tmp_path):
    # The pool holds one class only, spread wide: with no confidence floor the per-class
    # quotas fill the other classes with its images, and validation accuracy falls.
    cache, _, pool = planted_pair(tmp_path, shots=10, classes=3, pool_n=600,
                                  pool_weights=[1, 0, 0], pool_spread=3.0, seed=0)
    bad = self_train(cache, pool=pool, progress=False,
                     options=SelfTrainOptions(heads=(LOGREG,), thresholds=(0.0,), rounds=3))
    row, = bad.rows
    assert row["rounds"] == 0 and row["threshold"] == "none"
    assert row["diff_vs_base"] == 0 and row["test_accuracy"] == row["base_test_accuracy"]
    supervised = bad.rounds[0]["val_accuracy"]
    assert all(r["val_accuracy"] < supervised for r in bad.rounds[1:])
    assert all(r["pseudo_accuracy"] < 0.5 for r in bad.rounds[1:])


def test_quotas_per_class_stop_the_collapse_onto_a_majority_class():
    rng = np.random.default_rng(0)
    predicted = np.where(rng.random(1000) < 0.9, 0, rng.integers(1, 3, 1000))
    confidence = np.where(predicted == 0, 0.99, 0.9)
    prior = np.full(3, 1 / 3)
    taken = select_pseudo_labels(confidence, predicted, prior, 0.5, 0.5, 10_000)
    counts = np.bincount(predicted[taken], minlength=3)
    assert counts[0] == math.ceil(0.5 * 1000 / 3)  # one global threshold would take ~900
    assert counts[1] == (predicted == 1).sum() and counts[2] == (predicted == 2).sum()
    # The most confident first, and never under the floor.
    assert (confidence[taken] >= 0.5).all()
    assert len(select_pseudo_labels(confidence, predicted, prior, 0.995, 1.0, 10_000)) == 0
    assert np.bincount(predicted[select_pseudo_labels(confidence, predicted, prior, 0, 1.0, 7)],
                       minlength=3).max() == 7  # max_per_class


def test_an_imbalanced_pool_fills_no_class_beyond_its_quota(tmp_path):
    cache, _, pool = planted_pair(tmp_path, shots=2, pool_n=800, spread=2.0,
                                  pool_weights=[0.85, 0.05, 0.05, 0.05], seed=1)
    result = self_train(cache, pool=pool, progress=False,
                        options=SelfTrainOptions(heads=(LOGREG,), thresholds=(0.0,), rounds=2))
    for r in result.rounds[1:]:
        quota = math.ceil(r["round"] / 2 * 800 / 4)
        assert max(r[f"used_c{c}"] for c in range(4)) <= quota


def test_a_head_with_sample_weight_gets_confidences_as_weights(helped, monkeypatch):
    from sklearn.linear_model import LogisticRegression

    cache, pool, _ = helped
    seen = []
    fit = LogisticRegression.fit

    def spy(self, X, y, sample_weight=None):
        seen.append(sample_weight)
        return fit(self, X, y, sample_weight=sample_weight)

    monkeypatch.setattr(LogisticRegression, "fit", spy)
    result = self_train(cache, pool=pool, progress=False, options=SelfTrainOptions(
        heads=("sklearn.linear_model.LogisticRegression",), thresholds=(0.5,), rounds=1))
    assert result.rows[0]["pool_weights"] == "sample_weight"
    weights = seen[-1]
    assert weights is not None and (weights[:8] == 1).all()  # the 8 labelled images
    assert (weights[8:] >= 0.5).all() and (weights[8:] < 1).any()


def test_thinning_keeps_each_row_with_its_weight():
    weights = np.full(20_000, 0.3)
    assert abs(thinned(weights, 0).mean() - 0.3) < 0.02
    assert thinned(np.ones(5), 0).all() and not thinned(np.zeros(5), 0).any()


def test_the_pool_is_read_in_blocks_and_rows_are_gathered_in_one_pass(helped):
    cache, pool_path, _ = helped
    pool = open_pool(pool_path, cache, cache_info(cache))
    pool.block_bytes = 256 * 20 * 4  # one 256-row chunk per block: five blocks
    blocks = list(pool.blocks())
    assert len(blocks) == 5 and sum(len(b) for _, b in blocks) == 1200
    whole = np.concatenate([b for _, b in blocks])
    picked = np.array([1100, 3, 700, 3])
    np.testing.assert_array_equal(pool.take(picked), whole[picked])


def test_write_saves_rows_models_predictions_and_a_record(helped, tmp_path):
    _, _, result = helped
    files = result.write(tmp_path / "st")
    names = {f.name for f in files}
    assert {"results.json", "results.csv", "rounds.md", "run.json"} <= names
    saved = load_head(result.rows[0]["model"])
    assert saved.meta["head"] == "logreg+self-train"
    assert (tmp_path / "st" / result.rows[0]["predictions"]).exists()


def test_bad_pools_and_heads_end_in_one_clear_error(helped, tmp_path):
    cache, pool, _ = helped
    info = cache_info(cache)
    with pytest.raises(PoolError, match="labelled cache itself"):
        open_pool(cache, cache, info)
    other = write_cache(tmp_path / "other.h5", np.ones((5, 20)), key="other0000000",
                        spec={"weights": "imagenet"})
    with pytest.raises(PoolError, match="weights 'imagenet' vs 'random'"):
        open_pool(other, cache, info)
    cropped = write_cache(tmp_path / "cropped.h5", np.ones((5, 20)), key="cropped00000",
                          spec={"preprocessing": {"crop": 4}, "image_size": 4})
    with pytest.raises(PoolError, match="preprocessing.crop 4 vs 8; image_size 4 vs 8"):
        open_pool(cropped, cache, info)
    narrow = write_cache(tmp_path / "narrow.h5", np.ones((5, 7)), key="narrow000000")
    with pytest.raises(PoolError, match="dim 7 vs 20"):
        open_pool(narrow, cache, info)
    import h5py

    with h5py.File(cache) as f:  # a pool holding only images of the labelled cache
        digests = f["content_sha256"][:3].tolist()
    copies = write_cache(tmp_path / "copies.h5", np.ones((3, 20)), key="copies000000",
                         digests=digests)
    with pytest.raises(PoolError, match="also in labelled.h5"):
        open_pool(copies, cache, info)
    unreadable = write_cache(tmp_path / "empty.h5", np.ones((2, 20)), key="empty0000000")
    with h5py.File(unreadable, "a") as f:
        f["valid"][...] = False
    with pytest.raises(PoolError, match="no readable image"):
        open_pool(unreadable, cache, info)
    with pytest.raises(PoolError, match="no images"):
        pool_from_arrays(np.zeros((0, 20)))
    with pytest.raises(HeadError, match="no probabilities"):
        self_train(cache, pool=pool, options=SelfTrainOptions(heads=("sklearn.svm.LinearSVC",)))


def test_write_logs_to_mlflow_as_stage_2_does(helped, tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="tracking needs the [track] extra")
    from pipeline.store import tracking

    _, _, result = helped
    out = tmp_path / "results" / "self-train"
    result.write(out, track=True)
    store = tracking.local_store(out.parent)
    client = mlflow.MlflowClient(f"sqlite:///{store / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(tracking.DEFAULT_EXPERIMENT)
    runs = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    fit = runs["synthetic / logreg+self-train"]
    assert fit.data.metrics["test_accuracy"] == pytest.approx(result.rows[0]["test_accuracy"])
    assert fit.data.metrics["diff_vs_base"] == pytest.approx(result.rows[0]["diff_vs_base"])
    assert runs["self-train"].data.params["rounds"] == "3"

"""Every stage after extraction on a cache of shard images: each finds its images again."""

from __future__ import annotations

import pytest

from pipeline.auditing.run import audit
from pipeline.core.options import AuditOptions, PredictOptions
from pipeline.deploy.predict import predict_images
from pipeline.report import tiles
from pipeline.report.summary import compare_results
from tests.conftest import extract_tiny, fit_and_write, run_finetune
from tests.data.test_shards import write_parquet, write_tar


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Parquet shards with splits in their names, and a tar of the same kind of samples."""
    root = tmp_path_factory.mktemp("hub")
    write_parquet(root / "data" / "train-00000-of-00002.parquet", n=12, row_group_size=5)
    write_parquet(root / "data" / "train-00001-of-00002.parquet", n=12, seed=100)
    write_parquet(root / "data" / "validation-00000-of-00001.parquet", n=6, seed=200)
    write_parquet(root / "data" / "test-00000-of-00001.parquet", n=9, seed=300)
    return root


@pytest.fixture(scope="module")
def cache(shards, tmp_path_factory):
    return extract_tiny(shards, tmp_path_factory.mktemp("c"), progress=False).cache_path


@pytest.fixture
def thumbnails(monkeypatch):
    """Every tile a sheet draws: True where its image was read, False for a blank tile."""
    drawn, real = [], tiles.thumbnail

    def spy(path, size):
        image = real(path, size)
        drawn.append(image is not None)
        return image

    monkeypatch.setattr(tiles, "thumbnail", spy)
    return drawn


def test_heads_and_the_report_mistake_sheet(cache, tmp_path, thumbnails):
    result = fit_and_write([cache], tmp_path / "heads", heads=("logreg",))
    assert len(result.rows) == 1
    compare_results(tmp_path / "heads").write(tmp_path / "heads" / "report")
    assert list((tmp_path / "heads").rglob("mistakes.png"))
    assert thumbnails and all(thumbnails)  # every mistake's tile read from its shard


def test_the_audit_gallery_reads_each_image_from_its_shard(cache, tmp_path, thumbnails):
    result = audit(cache, options=AuditOptions(folds=3), progress=False)
    result.write(tmp_path / "audit")
    assert result.images == 39
    assert len(thumbnails) > 0 and all(thumbnails)
    assert (tmp_path / "audit" / "outliers.png").read_bytes()[:4] == b"\x89PNG"


def test_finetune_on_shards_and_predict_on_its_cache(shards, cache, tmp_path):
    result = run_finetune(shards, tmp_path / "ft", cache_dir=cache.parent, epochs=1,
                          batch_size=8, workers=0)
    assert list(cache.parent.glob("*.activations.h5"))  # trained from cached activations
    rows = predict_images(result.files["model"], [cache],
                          options=PredictOptions(workers=0)).rows
    assert len(rows) == 39 and not [r for r in rows if "error" in r]
    assert rows[0]["path"].endswith("data/test-00000-of-00001.parquet#0")


def test_predict_reads_shard_files_given_directly(cache, tmp_path):
    heads = fit_and_write([cache], tmp_path / "heads", heads=("logreg",))
    model = next((tmp_path / "heads").rglob("*.head"), None)
    assert heads.rows and model is not None
    tar = write_tar(tmp_path / "new.tar", n=4, label=None)
    rows = predict_images(model, [tar], options=PredictOptions(workers=0)).rows
    assert [r["path"].rsplit("#", 1)[1] for r in rows] == [f"new/{i:06d}.png" for i in range(4)]
    assert all("prediction" in r for r in rows)
